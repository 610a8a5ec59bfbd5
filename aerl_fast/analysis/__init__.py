"""Analysis of attacked models: per-sample input-gradient statistics (grad_stats, backed by the
aerl_fast._C extension), gradient dynamics during PGD, loss landscapes, gradient-masking checks."""
from .dynamics import gradient_dynamics, plot_dynamics
from .gradient_stats import GradStats, GradStatsTracker, grad_stats, grad_stats_backend, grad_stats_reference
from .landscape import landscape_directions, loss_landscape, plot_landscape
from .masking import (MaskingFlag, check_epsilon_curve, check_gradient_free, check_transfer,
                      check_zero_gradients, large_epsilon, large_epsilon_accuracy, zero_gradient_count)

__all__ = [
    "GradStats", "GradStatsTracker", "grad_stats", "grad_stats_backend", "grad_stats_reference",
    "gradient_dynamics", "plot_dynamics", "landscape_directions", "loss_landscape", "plot_landscape",
    "MaskingFlag", "check_epsilon_curve", "check_gradient_free", "check_transfer", "check_zero_gradients",
    "large_epsilon", "large_epsilon_accuracy", "zero_gradient_count",
]
