"""Training the cells of a matrix: each cell is a run folder REPORT/runs/<cell>, trained by
`aerl_fast.train.run` or continued by `aerl_fast.train.resume` (no command lines in between).

A cell is done when its run folder holds summary.json and was trained with the cell's TrainConfig;
a folder trained with other settings is continued when only resumable fields differ (more epochs)
and refused otherwise (naming the field), never silently retrained.
"""
from __future__ import annotations

import shlex
from contextlib import contextmanager
from dataclasses import fields, replace
from pathlib import Path
from typing import List

from aerl_fast import train
from aerl_fast.config import TrainConfig
from aerl_fast.errors import ConfigError, UserError
from aerl_fast.train.cli import to_argv

from .matrix import Cell


def cell_state(cell: Cell, run_dir: Path):
    """("done" | "resume" | "new", {field: new value}) of a cell's run folder."""
    from aerl_fast.train.rundir import read_run_config  # noqa: PLC0415

    if not (run_dir / "config.json").is_file() or not (run_dir / "last.pt").is_file():
        return "new", {}
    saved, _, _ = read_run_config(run_dir)
    changes = {}
    for f in fields(TrainConfig):
        old, new = getattr(saved, f.name), getattr(cell.config, f.name)
        if old == new:
            continue
        if not f.metadata.get("resumable"):
            raise ConfigError(f"cell {cell.name}: {run_dir} was trained with {f.name} {old!r}, the preset now says "
                              f"{new!r}; move that folder away or use another --out")
        changes[f.name] = new
    if (run_dir / "summary.json").is_file() and not changes:
        return "done", {}
    return "resume", changes


def cell_done(cell: Cell, run_dir: Path) -> bool:
    return cell_state(cell, run_dir)[0] == "done"


def train_cell(cell: Cell, runs: Path, log=print) -> None:
    """Train (or continue) one cell into runs/<cell>, in this process."""
    run_dir = Path(runs) / cell.name
    state, changes = cell_state(cell, run_dir)
    if state == "done":
        return
    if state == "resume":
        train.resume(run_dir, {"progress": False}, changes=changes, log=log)
    else:  # killed before its first checkpoint: nothing to keep
        options = replace(cell.options, out=str(run_dir), progress=False,
                          overwrite=run_dir.is_dir() and any(run_dir.iterdir()))
        train.run(cell.config, options, log=log)
    if not (run_dir / "summary.json").is_file():
        raise UserError(f"{cell.name}: training finished without {run_dir / 'summary.json'}")


def command_for(cell: Cell, runs: Path) -> str:
    """The `python -m aerl_fast.train ...` line that trains or continues the cell (for job arrays)."""
    run_dir = Path(runs) / cell.name
    state, changes = cell_state(cell, run_dir)
    if state == "resume":
        flags = [f"--{k.replace('_', '-')}={v}" for k, v in changes.items()]
        argv = ["--resume", str(run_dir), "--no-progress", *flags]
    else:
        options = replace(cell.options, out=str(run_dir), progress=False,
                          overwrite=run_dir.is_dir() and any(run_dir.iterdir()))
        argv = to_argv(cell.config, options)
    return "python -m aerl_fast.train " + shlex.join(argv)


@contextmanager
def cell_lock(runs: Path, name: str, wait: bool):
    """An advisory lock on one cell (flock on runs/.<cell>.lock), so that two reproduce processes
    sharing a folder never train the same cell at once; yields False when another process holds it
    and `wait` is off.  The kernel drops the lock when its holder dies, so a killed run never leaves
    a stale lock.  Without fcntl (not POSIX) it always yields True."""
    try:
        import fcntl  # noqa: PLC0415
    except ImportError:  # pragma: no cover - Windows
        yield True
        return
    with open(runs / f".{name}.lock", "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def train_cells(cells: List[Cell], runs: Path, log):
    """Train every unfinished cell in this process; cells another process is training are left to
    it, then waited for (and finished here if that process died before it was done)."""
    def one(i, c):
        if cell_done(c, runs / c.name):  # (again: another process may have finished it meanwhile)
            log(f"[{i}/{len(cells)}] {c.name}: done, skipped")
            return
        log(f"[{i}/{len(cells)}] {c.name}: {command_for(c, runs)}")
        train_cell(c, runs, log)

    busy = []
    for i, c in enumerate(cells, 1):
        if cell_done(c, runs / c.name):
            log(f"[{i}/{len(cells)}] {c.name}: done, skipped")
            continue
        with cell_lock(runs, c.name, wait=False) as mine:
            if mine:
                one(i, c)
            else:
                log(f"[{i}/{len(cells)}] {c.name}: another process is training it; coming back to it last")
                busy.append((i, c))
    for i, c in busy:
        log(f"[{i}/{len(cells)}] {c.name}: waiting for the other process")
        with cell_lock(runs, c.name, wait=True):
            one(i, c)
