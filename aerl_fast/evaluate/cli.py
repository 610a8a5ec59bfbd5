"""python -m aerl_fast.evaluate RUN_DIR [RUN_DIR ...] [flags]: a thin shell over
`aerl_fast.evaluate.run` and `write_report`."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional

from aerl_fast import distributed
from aerl_fast.cli import add_settings, formatter, given, run_cli, stderr_log
from aerl_fast.errors import UserError

from .config import ATTACKS, EvalConfig, EvalOptions
from .report import write_report
from .runner import run

GROUPS = {"threat model": "threat model", "attacks": "attacks", "analysis": "analysis", "output": "output",
          "runtime": "runtime"}


@dataclass
class Parsed:
    runs: List[str]
    config: EvalConfig
    options: EvalOptions


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m aerl_fast.evaluate", argument_default=argparse.SUPPRESS, formatter_class=formatter,
        description="Robustness of trained models: attacks, transfer matrix, gradient dynamics, loss landscapes, "
                    "gradient-masking checks.")
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (best.pt, else last.pt) or checkpoint files")
    p.add_argument("--bundle", choices=EvalConfig.BUNDLES, default="default",
                   help="named settings the flags then override: default; study (PGD-L2 ε 1.0, step 0.1, 100 steps, no "
                        "clamp, last iterate, transfer and dynamics); smoke (20 steps on 500 images) (default: default)")
    add_settings(p, EvalConfig, groups=GROUPS)
    add_settings(p, EvalOptions, groups=GROUPS)
    p.add_argument("--last-iterate", dest="early_stop", action="store_false",
                   help="same as --no-early-stop: judge only PGD's last iterate")
    return p


def parse_args(argv=None) -> Parsed:
    """argv -> typed settings; a bad value exits like argparse does (status 2, one 'error:' line)."""
    return run_cli(_parse, argv)


def _parse(argv) -> Parsed:
    ns = build_parser().parse_args(argv)
    values = given(ns, EvalConfig)
    if "attacks" in values:
        attacks = tuple(a.lower() for a in values["attacks"])
        unknown = [a for a in attacks if a not in ATTACKS]
        if unknown or not attacks:
            raise UserError(f"unknown attack {', '.join(unknown) or '(none)'}; choose from {', '.join(ATTACKS)}")
        values["attacks"] = attacks
    if "aa_norm" in values:
        values["aa_norm"] = values["aa_norm"].lower()  # Linf / L2 as AutoAttack writes them
    if "step" in values and "rel_step" in values:
        raise UserError("--step and --rel-step exclude each other: give one")
    config = EvalConfig.bundle(getattr(ns, "bundle", "default"), **values).validate()
    options = EvalOptions(**given(ns, EvalOptions)).validate()
    return Parsed(list(ns.runs), config, options)


def _main(argv) -> Optional[dict]:
    args = _parse(argv)   # main's run_cli turns a UserError into the one-line exit
    out = Path(args.options.out) if args.options.out else Path("results") / f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not args.options.overwrite:
        raise UserError(f"{out} already holds files; pass --overwrite to write into it, or choose another --out")
    dist = distributed.DistContext()
    try:  # under torchrun every process attacks its shard (aa-fast); rank 0 writes the report
        dist = distributed.init()
        results = run(args.runs, None, args.config, replace(args.options, out=str(out)), log=stderr_log,
                      dist=dist if dist.enabled else None)
    finally:
        distributed.shutdown(dist)
    if results is None:
        return None
    metrics = write_report(results, out)
    print(metrics["table_md"])
    stderr_log(f"results in {out}")
    return metrics


def main(argv=None) -> dict:
    return run_cli(_main, argv)


if __name__ == "__main__":  # pragma: no cover
    main(sys.argv[1:])
