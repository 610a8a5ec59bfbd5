"""The training stage as library functions: `run` a new experiment, `resume` a stopped one.

Both work in a single process and under torchrun (they join the job torchrun describes); only rank
0 touches the run folder, and every rank returns the same RunSummary.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Optional, Union

from aerl_fast import distributed as distmod
from aerl_fast.checkpoint import load_checkpoint
from aerl_fast.config import RunOptions, TrainConfig
from aerl_fast.distributed import DistContext
from aerl_fast.errors import ConfigError

from . import rundir
from .trainer import Trainer


@dataclass
class RunSummary:
    """What summary.json holds: the run's outcome (best.pt's validation and test accuracy) and speed."""
    dataset: str
    model: str
    width: float
    objective: str
    epochs: int
    best_epoch: int
    best_val_acc: float
    test_acc: float
    num_classes: int
    train_images_per_s: Optional[float]
    total_train_s: float
    device: str
    amp: str
    loader: str
    run_dir: str
    world_size: Optional[int] = None
    kernel_fallbacks: list = field(default_factory=list)  # fused ops that fell back to their reference
    extra: dict = field(default_factory=dict)  # keys of summary.json this version does not name

    @classmethod
    def from_json(cls, d: dict) -> "RunSummary":
        names = {f.name for f in fields(cls)} - {"extra"}
        return cls(**{k: v for k, v in d.items() if k in names},
                   extra={k: v for k, v in d.items() if k not in names})

    def to_json(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k != "extra"}
        if d["world_size"] is None:
            d.pop("world_size")
        return {**d, **self.extra}


def _quiet(msg):
    pass


def run(config: TrainConfig, options: Optional[RunOptions] = None, *, log: Callable[[str], None] = _quiet) -> RunSummary:
    """Train `config` into a new run folder (options.out, default runs/<dataset>-<model>-<objective>-<time>).

    The folder is created only once the data and the device are known to be good, and removed again
    when the run fails before its first checkpoint, so a failed start never blocks the rerun."""
    config = TrainConfig(**config.to_json()).validate()  # a checked copy: the caller's object is not changed
    options = RunOptions(**(options or RunOptions()).to_json()).validate()
    run_dir = Path(options.out) if options.out else rundir.default_run_dir(config)
    options.out = str(run_dir)
    return _session(lambda dist: _train_new(dist, config, options, run_dir, log))


def resume(run_dir, options: Union[RunOptions, dict, None] = None, *, changes: Optional[dict] = None,
           log: Callable[[str], None] = _quiet) -> RunSummary:
    """Continue the run in `run_dir` from its last checkpoint (mid-epoch included).

    options: how this process runs it: a RunOptions, or a dict of changes to the options the run was
    last started with (None: those options unchanged).
    changes: TrainConfig fields to change; only the resumable ones may (`epochs`; `lr`, lower only),
    and each change is recorded in config.json's resume_history."""
    run_dir = Path(run_dir)
    return _session(lambda dist: _train_resumed(dist, run_dir, options, dict(changes or {}), log))


def _session(body):
    """Join the torchrun job the environment describes (a no-op in a single process) around `body`."""
    dist = DistContext()
    try:
        dist = distmod.init()
        return body(dist)
    finally:
        distmod.shutdown(dist)


def _train_new(dist: DistContext, cfg: TrainConfig, options: RunOptions, run_dir: Path, log) -> RunSummary:
    say = log if dist.is_main else _quiet
    dist.on_main(lambda: rundir.check_new_run_dir(run_dir, options.overwrite))
    trainer = Trainer(cfg, options, run_dir, log=say, dist=dist)
    created = dist.on_main(lambda: not run_dir.exists())
    dist.on_main(lambda: rundir.create_run_dir(run_dir, cfg, options))
    try:
        return RunSummary.from_json(trainer.run())
    except BaseException:
        if dist.is_main and created and not (run_dir / "last.pt").exists():
            shutil.rmtree(run_dir, ignore_errors=True)  # nothing to resume: leave no half-made folder
        raise


def _open_resumed(run_dir: Path, options: Optional[RunOptions], changes: dict):
    """Rank 0: (config, options, checkpoint state, history) of the run being resumed."""
    cfg, saved_options, history = rundir.read_run_config(run_dir)
    if not (run_dir / "last.pt").is_file():
        raise ConfigError(f"{run_dir}: no last.pt to resume from (the run stopped before its first checkpoint); "
                          f"start it again with --overwrite")
    state = load_checkpoint(run_dir / "last.pt")
    epoch, step = int(state["epoch"]), int(state["step"])
    cfg, new_history = rundir.resumed_config(cfg, changes, epoch, step)
    if cfg.epochs < epoch:
        raise ConfigError(f"--epochs {cfg.epochs} is below the {epoch} epochs already done")
    if not isinstance(options, RunOptions):
        options = RunOptions(**{**saved_options, **(options or {})})
    options = RunOptions(**{**options.to_json(), "out": str(run_dir)}).validate()
    return cfg, options, state, history + new_history, new_history


def _train_resumed(dist: DistContext, run_dir: Path, options, changes: dict, log) -> RunSummary:
    say = log if dist.is_main else _quiet

    def opened():
        cfg, opts, state, history, new = _open_resumed(run_dir, options, changes)
        return cfg.to_json(), opts.to_json(), state, history, new
    cfg_json, opt_json, state, history, new = dist.on_main(opened)
    cfg, opts = TrainConfig(**cfg_json), RunOptions(**opt_json)
    say(f"resuming {run_dir} at epoch {state['epoch'] + 1}, batch {state['step']}")
    for h in new:
        say(f"the run's config changes from epoch {h['epoch'] + 1} (batch {h['step']}) on: {h['field']} "
            f"{h['from']} -> {h['to']} (recorded in {run_dir / 'config.json'})")
    trainer = Trainer(cfg, opts, run_dir, resume_state=state, log=say, dist=dist)

    def reopen():
        removed = rundir.remove_stale_temp(run_dir)
        if removed:
            say(f"removed {removed} temporary file(s) a killed write left in {run_dir}")
        dropped = rundir.truncate_log(run_dir / "log.jsonl", int(state["epoch"]))
        if dropped:
            say(f"log.jsonl: dropped {dropped} line(s) the checkpoint does not cover (or torn by a kill)")
        rundir.write_json(run_dir / "config.json", rundir.config_record(cfg, opts, history))
        summary = run_dir / "summary.json"
        if trainer.epoch >= cfg.epochs and summary.is_file():
            return json.loads(summary.read_text())
        return None
    done = dist.on_main(reopen)
    return RunSummary.from_json(done if done is not None else trainer.run())
