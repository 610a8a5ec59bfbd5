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

# Gradient dynamics during PGD, loss landscapes, gradient-masking checks (see each module).
from .dynamics import gradient_dynamics, plot_dynamics  # noqa: E402
from .landscape import landscape_directions, loss_landscape, plot_landscape  # noqa: E402
from .masking import (MaskingFlag, check_epsilon_curve, check_gradient_free,  # noqa: E402
                      check_transfer, check_zero_gradients, large_epsilon, large_epsilon_accuracy,
                      zero_gradient_count)

__all__ += [
    "MaskingFlag", "check_epsilon_curve", "check_gradient_free", "check_transfer",
    "check_zero_gradients", "gradient_dynamics", "landscape_directions", "large_epsilon",
    "large_epsilon_accuracy", "loss_landscape", "plot_dynamics", "plot_landscape",
    "zero_gradient_count",
]
