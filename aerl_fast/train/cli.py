"""python -m aerl_fast.train [--preset NAME] [flags] | --resume RUN_DIR [flags]: a thin shell over
`aerl_fast.train.run` / `resume`."""
from __future__ import annotations

import argparse
import os
from dataclasses import fields

from aerl_fast.cli import add_settings, formatter, given, run_cli, stderr_log
from aerl_fast.config import RunOptions, TrainConfig, load_preset, split_values

from .stage import resume, run

GROUPS = {"data": "data", "model": "model", "objective": "objective", "optimisation": "optimisation",
          "runtime": "runtime (may change on --resume)"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m aerl_fast.train",
        description="Train an image classifier with SL, RL (ε-greedy REINFORCE), SL-adv, RL-adv or an "
                    "ablation objective.",
        argument_default=argparse.SUPPRESS, formatter_class=formatter)
    add_settings(p, TrainConfig, groups=GROUPS)
    add_settings(p, RunOptions, groups=GROUPS)
    start = p.add_argument_group("start")
    start.add_argument("--preset", metavar="NAME", help="a preset from configs/ (e.g. cifar10-rl) or a path to a "
                       "preset .json; flags given beside it override it")
    start.add_argument("--resume", metavar="RUN_DIR", help="continue a run from its last checkpoint: its config is "
                       "kept; --epochs, a lower --lr and the runtime options may change")
    return p


def parse(argv=None):
    """(TrainConfig values, RunOptions values, preset, resume) as given on the command line."""
    ns = build_parser().parse_args(argv)
    return given(ns, TrainConfig), given(ns, RunOptions), getattr(ns, "preset", None), getattr(ns, "resume", None)


def configs_from_args(train_values: dict, option_values: dict, preset):
    """(TrainConfig, RunOptions): defaults < preset < flags, checked."""
    values = dict(load_preset(preset)) if preset else {}
    values.update(train_values)
    values.update(option_values)
    t, o = split_values(values, preset or "command line")
    return TrainConfig(**t).validate(), RunOptions(**o).validate()


def to_argv(config: TrainConfig, options: RunOptions) -> list:
    """The command-line flags that reproduce (config, options) from the defaults: what
    `reproduce --print-commands` prints for a job scheduler."""
    argv = []
    for obj, cls in ((config, TrainConfig), (options, RunOptions)):
        base = cls()
        for f in fields(cls):
            v = getattr(obj, f.name)
            if v == getattr(base, f.name):
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(v, bool):
                argv.append(flag if v else "--no-" + f.name.replace("_", "-"))
            elif v is not None:
                argv += [flag, repr(v) if isinstance(v, float) else str(v)]
    return argv


def _main(argv) -> dict:
    train_values, option_values, preset, resume_dir = parse(argv)
    main_rank = os.environ.get("RANK", "0") == "0"
    if resume_dir is not None:
        if preset:
            train_values = {**load_preset(preset), **train_values}
            train_values, extra = split_values(train_values, preset)
            option_values = {**extra, **option_values}
        summary = resume(resume_dir, option_values, changes=train_values, log=stderr_log)
    else:
        config, options = configs_from_args(train_values, option_values, preset)
        summary = run(config, options, log=stderr_log)
    s = summary.to_json()
    if main_rank:
        print(f"done: {s['objective']} {s['model']} on {s['dataset']}: best val_acc "
              f"{s['best_val_acc']:.4f} (epoch {s['best_epoch']}), test_acc {s['test_acc']:.4f}, "
              f"{s['train_images_per_s']:.0f} img/s, {s['total_train_s']:.0f}s -> {s['run_dir']}")
    return s


def main(argv=None) -> dict:
    return run_cli(_main, argv)


