"""Analysis of attacked models: per-sample input-gradient statistics (see grad_stats)."""
from .grad_stats import (
    GradStats,
    GradStatsTracker,
    grad_stats,
    grad_stats_backend,
    grad_stats_reference,
)

__all__ = [
    "GradStats",
    "GradStatsTracker",
    "grad_stats",
    "grad_stats_backend",
    "grad_stats_reference",
]
