"""Run resource-bomb cases in one process whose address space is capped, one JSON line per case.

    python tests/hostile_bombs.py CASES.json

CASES.json: [{"name", "call": "module:function", "args": [...], "kwargs": {...}}, ...].  Everything
the cases call is imported first; then RLIMIT_AS is set HEADROOM above what the process has mapped,
so a bomb that gets past its guard fails with MemoryError here instead of taking the machine down.
"""
import importlib
import json
import resource
import sys

HEADROOM = 1 << 30  # bytes the cases may map beyond the imports; every bomb asks for 4 GiB or more


def _status_bytes(key: str) -> int:
    with open("/proc/self/status") as fh:
        line = next(ln for ln in fh if ln.startswith(key + ":"))
    return int(line.split()[1]) * 1024


def _peak_rss() -> int:
    """This process's own peak: getrusage's ru_maxrss also counts the parent's peak from before exec."""
    return _status_bytes("VmHWM")


def _resolve(spec: str):
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


def main(path: str) -> None:
    with open(path) as fh:
        cases = json.load(fh)
    funcs = {c["call"]: _resolve(c["call"]) for c in cases}
    from aerl_fast.errors import UserError
    try:  # DALI maps its libraries at import; do it before the cap (the image cases may use it)
        import nvidia.dali  # noqa: F401
    except ImportError:
        pass
    limit = _status_bytes("VmSize") + HEADROOM
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    print(json.dumps({"name": "__limit__", "limit": limit}), flush=True)
    for case in cases:
        result = {"name": case["name"], "error": None, "user_error": False, "message": ""}
        try:
            funcs[case["call"]](*case.get("args", []), **case.get("kwargs", {}))
        except BaseException as exc:  # noqa: BLE001 - every outcome is reported, MemoryError included
            result.update(error=type(exc).__name__, user_error=isinstance(exc, UserError), message=str(exc))
        result["maxrss"] = _peak_rss()
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
