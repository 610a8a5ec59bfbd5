"""The benchmarks' one baseline bookkeeping: each group's baseline time, and every other case's
speed-up against it, stored in `benchmark.extra_info["speedup_vs_baseline"]` and printed as

    [group] name: 12.345 ms/step  speedup vs baseline 1.23x        (> 1: faster than the baseline)

The first case of a group is its baseline; when it was deselected (-k), `fallback` (a callable
returning the baseline's seconds per unit, timed here in the same process) stands in for it.
"""
from typing import Callable, Dict, Optional

_BASE: Dict[str, float] = {}


def baseline_of(group: str) -> Optional[float]:
    return _BASE.get(group)


def set_baseline(group: str, seconds_per_unit: float):
    """A second reference inside a group (e.g. the study's RL-adv update beside its RL one)."""
    _BASE[group] = seconds_per_unit


def record(benchmark, group: str, name: str, seconds_per_unit: float, unit: str, baseline: bool = False,
           fallback: Optional[Callable[[], float]] = None) -> float:
    """Store the group's baseline, or this case's speed-up against it; returns the speed-up."""
    if baseline:
        _BASE[group] = seconds_per_unit
    elif group not in _BASE and fallback is not None:
        _BASE[group] = fallback()
    base = _BASE.get(group)
    speedup = base / seconds_per_unit if base else float("nan")
    benchmark.extra_info.update({f"per_{unit}_ms": round(seconds_per_unit * 1e3, 4),
                                 "speedup_vs_baseline": round(speedup, 3)})
    print(f"\n[{group}] {name}: {seconds_per_unit * 1e3:.3f} ms/{unit}  speedup vs baseline {speedup:.2f}x")
    return speedup
