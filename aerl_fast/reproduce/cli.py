"""python -m aerl_fast.reproduce --preset NAME [--out DIR] [--launcher local|slurm|submitit-local]
[--print-commands]: a thin shell over `aerl_fast.reproduce.run`."""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional

from aerl_fast.cli import add_settings, formatter, given, run_cli, stderr_log

from .launch import ClusterOptions
from .pipeline import print_commands, run


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m aerl_fast.reproduce", formatter_class=formatter, argument_default=argparse.SUPPRESS,
        description="Train, evaluate and report a whole experiment matrix of the study (resumable).")
    p.add_argument("--preset", required=True,
                   help="reproduce preset: smoke, ablation, matrix-cifar10, matrix-cifar100, matrix-imagenet100, "
                        "or a path to a .json")
    p.add_argument("--out", help="report folder (default: the preset's 'out', else reports/<preset>)")
    p.add_argument("--data-dir", help="dataset folder for every dataset of the matrix")
    p.add_argument("--print-commands", action="store_true",
                   help="print one `python -m aerl_fast.train ...` command per unfinished cell and exit")
    add_settings(p, ClusterOptions, groups={"cluster": "cluster (submitit)"})
    return p


def _main(argv) -> Optional[dict]:
    ns = build_parser().parse_args(argv)
    out, data_dir = getattr(ns, "out", None), getattr(ns, "data_dir", None)
    if getattr(ns, "print_commands", False):
        try:
            print_commands(ns.preset, out=out, data_dir=data_dir, log=stderr_log)
        except BrokenPipeError:  # `--print-commands | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return None
    cluster = ClusterOptions(**given(ns, ClusterOptions)).validate()
    return run(ns.preset, out=out, data_dir=data_dir, cluster=cluster, log=stderr_log)


def main(argv=None) -> Optional[dict]:
    return run_cli(_main, argv)
