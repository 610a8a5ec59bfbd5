"""The last step of scripts/gpu_check.sh, always run: $OUT/gpu-summary.md from what the steps left.

    python -m gpu_check.summary --out OUT --mode gpu|cpu|dry-run

Tables: the steps (status, time, budget), every figure with its CPU figure and roofline estimate
(figures.py), the benchmarks (pytest-benchmark's JSON), and every check.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from gpu_check.figures import CPU_BENCH, ROWS
from gpu_check.record import load_records

NO_CUDA = "skipped: no CUDA device"


def read_steps(out: Path) -> list:
    """[(name, status, seconds, budget)] from the driver's steps.tsv."""
    path = out / "steps.tsv"
    if not path.is_file():
        return []
    return [tuple(line.split("\t")) for line in path.read_text().splitlines() if line.strip()]


def dali_status(mode: str, records: dict) -> str:
    from aerl_fast.data.dali import dali_available
    if not dali_available():
        return "not run: DALI not installed"
    if mode != "gpu":
        return NO_CUDA
    for check in records.get("ext", {}).get("checks", []):
        if check["name"].startswith("DALI"):
            return f"{check['status']} {check['detail']}".strip()
    return "not run: the ext step left no record"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1000 else f"{v:,.0f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def _benchmarks(out: Path) -> list:
    path = out / "bench.json"
    return json.loads(path.read_text()).get("benchmarks", []) if path.is_file() else []


def bench_figures(out: Path) -> dict:
    """The figures the bench step measures: copy bandwidth and the CUDA trainer overhead."""
    found = {}
    for b in _benchmarks(out):
        info = b.get("extra_info", {})
        if b["group"].startswith("copy bandwidth") and "bytes_per_s" in info:
            found["copy_bandwidth"] = {"value": round(info["bytes_per_s"] / 1e9), "unit": "GB/s"}
        if b["group"] == "trainer overhead cuda" and "overhead_ratio" in info:
            found["trainer_overhead_cuda"] = {"value": info["overhead_ratio"], "unit": "x"}
    return found


def bench_rows(out: Path) -> list:
    rows = []
    for b in _benchmarks(out):
        info = b.get("extra_info", {})
        cpu = next((v for k, v in CPU_BENCH.items() if k in b["group"]), "-")
        traffic = "-"
        if "bytes_per_s" in info:
            traffic = f"{info['bytes_per_s'] / 1e9:.0f} GB/s"
            if "copy_bw_share" in info:
                traffic += f" ({100 * info['copy_bw_share']:.0f}% of copy)"
        roof = f"{info['roofline_s'] * 1e6:.1f} us" if "roofline_s" in info else "-"
        rows.append((b["group"], b["name"].split("::")[-1], f"{b['stats']['median'] * 1e6:.1f} us",
                     _fmt(info.get("speedup_vs_baseline", "-")), traffic, roof, cpu))
    return rows


def render(out: Path, mode: str) -> str:
    records = load_records(out)
    notes = [n for r in records.values() for n in r.get("notes", [])]
    lines = ["# GPU check summary", ""]
    lines.append({"gpu": "Ran on a CUDA device.", "cpu": "No CUDA device here: every step skipped.",
                  "dry-run": "--dry-run: nothing ran; every step skipped."}[mode])
    lines += [f"- {n}" for n in notes] + ["", "## Steps", "", "| step | status | seconds | budget s |",
                                          "|---|---|---:|---:|"]
    lines += [f"| {name} | {status} | {secs} | {budget} |" for name, status, secs, budget in read_steps(out)]
    lines += [f"| DALI GPU cases | {dali_status(mode, records)} | | |", "",
              "## Figures", "", "| figure | GPU | CPU | roofline estimate |", "|---|---|---|---|"]
    measured = dict(bench_figures(out), **{f["key"]: f for r in records.values() for f in r.get("figures", [])})
    for row in ROWS:
        f = measured.get(row["key"])
        gpu = f"{_fmt(f['value'])} {f['unit']}".strip() if f else (NO_CUDA if mode != "gpu" else "not measured")
        lines.append(f"| {row['label']} | {gpu} | {row['cpu']} | {row['roofline']} |")
    bench = bench_rows(out)
    if bench:
        lines += ["", "## Benchmarks (bench/, GPU cases)", "",
                  "| group | case | median | speed-up vs baseline | traffic | roofline (bytes / copy bw) | CPU |",
                  "|---|---|---:|---:|---|---:|---|"]
        lines += ["| " + " | ".join(r) + " |" for r in bench]
    checks = [(step, c) for step, r in records.items() for c in r.get("checks", [])]
    if checks:
        lines += ["", "## Checks", "", "| step | check | status | detail | s |", "|---|---|---|---|---:|"]
        lines += [f"| {s} | {c['name']} | {c['status']} | {c['detail']} | {c['seconds']} |" for s, c in checks]
    return "\n".join(lines) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--mode", choices=("gpu", "cpu", "dry-run"), required=True)
    args = ap.parse_args(argv)
    out = Path(args.out)
    text = render(out, args.mode)
    (out / "gpu-summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
