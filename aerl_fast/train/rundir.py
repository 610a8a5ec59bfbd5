"""The run folder: what a new run may write into, what a resumed run may change, and the files
beside the checkpoints (config.json, log.jsonl, TensorBoard).

config.json holds the TrainConfig at the top level (the keys a reader of the run needs: dataset,
model, objective, ...), the RunOptions of the last process under "run_options", and under
"resume_history" every change a --resume made to the TrainConfig (a longer run, a lower rate).
Folders written before TrainConfig and RunOptions were split hold the options at the top level:
they are read as the options of the last process.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import fields
from pathlib import Path

from aerl_fast.checkpoint import remove_stale_temp_files
from aerl_fast.config import OPTION_KEYS, RunOptions, TrainConfig, config_from_json, read_json
from aerl_fast.errors import CheckpointError, ConfigError
from aerl_fast.fields import flag_of, from_mapping

RUN_FILES = ("config.json", "log.jsonl", "summary.json", "best.pt", "last.pt")


def write_json(path: Path, obj):
    """Atomically: a crash leaves the old file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def remove_stale_temp(run_dir: Path) -> int:
    """Delete the temporary files a killed write left behind: save_checkpoint's (the checkpoint
    module knows their names) and write_json's; returns how many.  Only while no other process
    writes into the folder (a new run or a resume)."""
    stale = remove_stale_temp_files(run_dir)
    jsons = [p for p in run_dir.glob(".*.json.*.tmp") if p.is_file() and not p.is_symlink()]
    jsons += [p for p in run_dir.glob(".log.jsonl.*.tmp") if p.is_file() and not p.is_symlink()]
    for p in jsons:
        p.unlink(missing_ok=True)
    return len(stale) + len(jsons)


def default_run_dir(cfg: TrainConfig) -> Path:
    return Path("runs") / f"{cfg.dataset}-{cfg.model}-{cfg.objective}-{time.strftime('%Y%m%d-%H%M%S')}"


def holds_our_run(run_dir: Path) -> bool:
    """Whether `run_dir` holds an aerl_fast training run: a config.json this module wrote."""
    try:
        saved = json.loads((run_dir / "config.json").read_text())
        return isinstance(saved, dict) and "objective" in saved and "dataset" in saved
    except (OSError, ValueError):
        return False


def check_new_run_dir(run_dir: Path, overwrite: bool) -> None:
    """Refuse a folder a new run may not write into, before anything is loaded or created."""
    if run_dir.exists() and not run_dir.is_dir():
        raise ConfigError(f"--out {run_dir} is an existing file, not a folder")
    if run_dir.is_dir() and any(run_dir.iterdir()):
        if not overwrite:
            raise ConfigError(f"{run_dir} already holds files; pass --overwrite to reuse it, "
                              f"or --resume {run_dir} to continue it")
        if not holds_our_run(run_dir):
            raise ConfigError(f"--overwrite: {run_dir} does not hold an aerl_fast run (no config.json of ours); "
                              "it is not replaced: choose another --out")


def create_run_dir(run_dir: Path, cfg: TrainConfig, options: RunOptions) -> None:
    """Make the folder (or clear the files of the run --overwrite replaces) and write config.json."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for stale in RUN_FILES:
            (run_dir / stale).unlink(missing_ok=True)
        for stale in run_dir.glob("epoch_[0-9]*.pt"):  # periodic checkpoints of an earlier run
            stale.unlink()
        remove_stale_temp(run_dir)
        write_json(run_dir / "config.json", config_record(cfg, options, []))
    except OSError as exc:
        raise ConfigError(f"cannot write the run folder {run_dir}: {exc.strerror or exc}") from None


def config_record(cfg: TrainConfig, options: RunOptions, history: list, **extra) -> dict:
    return {**cfg.to_json(), "run_options": options.to_json(), "resume_history": history, **extra}


def read_run_config(run_dir: Path):
    """(TrainConfig, saved RunOptions values, resume history) of a run folder, either format."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{run_dir}: not a run folder (no config.json)")
    where = str(path)
    saved = read_json(path.read_text(), where)
    if not isinstance(saved, dict):
        raise CheckpointError(f"{where}: expected a JSON object")
    cfg = config_from_json(saved, where)
    options = saved.get("run_options")
    if not isinstance(options, dict):  # written before the split: the options sit at the top level
        options = {k: v for k, v in saved.items() if k in OPTION_KEYS}
    from_mapping(RunOptions, options, f"{where} (run_options)")  # checked, named
    history = saved.get("resume_history") or []
    return cfg, options, list(history) if isinstance(history, list) else []


def resumed_config(cfg: TrainConfig, changes: dict, at_epoch: int, at_step: int):
    """(new TrainConfig, history entries) for `changes` to a saved config on --resume: a field marked
    resumable may change (a lower lr only), any other change is refused naming the flag."""
    values, history = cfg.to_json(), []
    by_name = {f.name: f for f in fields(TrainConfig)}
    for key, new in changes.items():
        if key not in by_name:
            raise ConfigError(f"unknown training setting {key!r}")
        old = values[key]
        if new == old:
            continue
        f = by_name[key]
        if not f.metadata.get("resumable"):
            movable = " and ".join(flag_of(g) for g in fields(TrainConfig) if g.metadata.get("resumable"))
            raise ConfigError(f"{flag_of(f)} {new} differs from the run's {old}; on resume only {movable} (and the "
                              "run-time options: --device, --amp, --compile, --loader, --decoder, --progress, "
                              "--checkpoint-minutes, --save-every, --eval-batch-size) may change")
        if key == "lr" and new > old:
            raise ConfigError(f"--lr {new:g} is above the run's {old:g}: on resume the rate may only be lowered "
                              "(a higher rate is a new experiment: start a new run)")
        values[key] = new
        history.append({"field": key, "from": old, "to": new, "epoch": at_epoch, "step": at_step})
    return TrainConfig(**values).validate(), history


class RunLog:
    """log.jsonl (one line per epoch) and TensorBoard when installed."""

    def __init__(self, run_dir: Path, enabled_tb: bool = True):
        self.path = run_dir / "log.jsonl"
        self.tb = None
        if enabled_tb:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(run_dir / "tb"))
            except Exception:  # tensorboard not installed: the jsonl log is the record
                self.tb = None

    def epoch(self, record: dict):
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if self.tb is not None:
            for k, v in record.items():
                if isinstance(v, (int, float)) and k != "epoch":
                    self.tb.add_scalar(k, v, record["epoch"])
            self.tb.flush()

    def close(self):
        if self.tb is not None:
            self.tb.close()


def truncate_log(path: Path, epochs_done: int) -> int:
    """On resume, keep the log lines of the epochs the checkpoint holds: later lines (written just
    before a checkpoint that never landed) and a line torn by a kill are dropped.  Returns how many
    lines were dropped."""
    if not path.exists():
        return 0
    kept, dropped = [], 0
    for ln in path.read_text(errors="replace").splitlines():
        if not ln.strip():
            continue
        try:
            rec = json.loads(ln)
            epoch = int(rec.get("epoch", 0)) if isinstance(rec, dict) else None
        except (ValueError, TypeError):
            epoch = None
        if epoch is not None and 1 <= epoch <= epochs_done:  # epochs are 1-based
            kept.append(ln)
        else:
            dropped += 1
    write_json_lines(path, kept)
    return dropped


def write_json_lines(path: Path, lines):
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text("".join(ln + "\n" for ln in lines))
    os.replace(tmp, path)
