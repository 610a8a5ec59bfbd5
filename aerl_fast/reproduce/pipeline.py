"""The reproduce stage as a library function: validate the whole matrix, train its cells (in this
process or as cluster jobs), evaluate, write the report."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .cells import cell_done, command_for, train_cells
from .evaluation import evaluate_curves, evaluate_groups
from .launch import ClusterOptions, check_launcher, run_cells, run_evaluations
from .matrix import load_matrix, validate
from .report import write_report


def _quiet(msg):
    pass


def report_dir(m: dict, out) -> Path:
    return Path(out or m.get("out") or Path("reports") / m["_name"])


def run(preset: str, *, out=None, data_dir: Optional[str] = None, cluster: Optional[ClusterOptions] = None,
        log=_quiet) -> dict:
    """Reproduce the matrix of `preset` (a name from configs/matrix/ or a path) into `out`; returns
    report.json's content.  Resumable: finished cells and fresh evaluations are reused."""
    cluster = (cluster or ClusterOptions()).validate()
    check_launcher(cluster)
    m = load_matrix(preset)
    cells, config = validate(m, data_dir)  # everything checked before anything starts
    root = report_dir(m, out)
    log(f"{m['_name']}: {len(cells)} cells -> {root}")
    (root / "runs").mkdir(parents=True, exist_ok=True)
    if cluster.launcher == "local":
        train_cells(cells, root / "runs", log)
    else:
        run_cells(cells, root, cluster, log)
        run_evaluations(cells, root, config, data_dir, cluster, log)
    metrics = evaluate_groups(cells, root, config, data_dir, log)
    curves = evaluate_curves(cells, root, config, data_dir, log)
    report = write_report(m, cells, root, metrics, config, curves)
    log(f"report: {root / 'report.md'}")
    return report


def print_commands(preset: str, *, out=None, data_dir: Optional[str] = None, log=_quiet) -> int:
    """Print one `python -m aerl_fast.train ...` line per unfinished cell (for job arrays); returns
    how many.  Creates nothing."""
    m = load_matrix(preset)
    cells, _ = validate(m, data_dir)
    runs = (report_dir(m, out) / "runs").resolve()  # the commands run from wherever the scheduler starts them
    todo = [c for c in cells if not cell_done(c, runs / c.name)]
    for c in todo:
        print(command_for(c, runs), flush=True)
    log(f"{len(todo)} of {len(cells)} cells to train ({len(cells) - len(todo)} done)")
    return len(todo)
