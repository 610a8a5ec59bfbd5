"""One step's record, $OUT/steps/<step>.json: checks and figures are written as they happen, so a
step stopped over its time budget still leaves what it measured."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path


class Skip(Exception):
    """A check that cannot run here (one GPU, not enough memory, ...): the reason is recorded."""


class NotRun(Skip):
    """A check whose software is missing here (DALI): recorded as "not run: <reason>"."""


class StepRecord:
    def __init__(self, out, step: str, device: str):
        self.path = Path(out) / "steps" / f"{step}.json"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.data = {"step": step, "device": device, "checks": [], "figures": [], "notes": []}
        self._write()

    def _write(self):
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)

    def check(self, name: str, fn):
        """Run fn(); ok (with fn's return value as detail), FAIL (the error) or skipped (Skip)."""
        t0 = time.perf_counter()
        try:
            detail, status = fn(), "ok"
        except Skip as why:
            detail, status = "", f"{'not run' if isinstance(why, NotRun) else 'skipped'}: {why}"
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, the step goes on
            traceback.print_exc(file=sys.stderr)
            first = (str(exc).strip().splitlines() or [""])[0][:300]
            detail, status = f"{type(exc).__name__}: {first}", "FAIL"
        self.data["checks"].append({"name": name, "status": status, "detail": "" if detail is None
                                    else str(detail), "seconds": round(time.perf_counter() - t0, 2)})
        self._write()
        print(f"[{self.data['step']}] {name}: {status} {detail or ''}", flush=True)
        return status == "ok"

    @property
    def failed(self) -> bool:
        return any(c["status"] == "FAIL" for c in self.data["checks"])

    def figure(self, key: str, value, unit: str, note: str = ""):
        """A measured number; `key` names its row in figures.ROWS (CPU figure, roofline)."""
        self.data["figures"].append({"key": key, "value": value, "unit": unit, "note": note})
        self._write()
        print(f"[{self.data['step']}] {key}: {value} {unit} {note}", flush=True)

    def note(self, text: str):
        self.data["notes"].append(text)
        self._write()


def load_records(out) -> dict:
    """{step: record dict} of every step that wrote one."""
    found = {}
    for path in sorted((Path(out) / "steps").glob("*.json")):
        try:
            found[path.stem] = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            found[path.stem] = {"step": path.stem, "checks": [], "figures": [],
                                "notes": ["record unreadable (the step was stopped mid-write?)"]}
    return found


def step_args(doc: str, argv=None, budget_s: float = 0.0) -> argparse.Namespace:
    """A step's command line: --out, --device, --small and, for a step with a time budget,
    --budget (default $STEP_BUDGET, which gpu_check.sh sets, else `budget_s`)."""
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--out", required=True, help="the run's output folder ($OUT)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="small sizes (the CPU tests)")
    if budget_s:
        ap.add_argument("--budget", type=float, default=float(os.environ.get("STEP_BUDGET", budget_s)),
                        help="seconds for this step")
    return ap.parse_args(argv)
