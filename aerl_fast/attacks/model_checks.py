"""Checks on the model before a robustness evaluation (AutoAttack's `checks.py` has the same
spirit): a number from a model that returns probabilities, is random, or was left in training
mode means something other than what the user thinks.

- outputs must be [B, K] scores with K >= 2 (error);
- two forward passes of the same images in eval mode must agree: a random model has no
  reproducible robust set (error, naming the largest difference);
- rows in [0, 1] that sum to 1 are probabilities, not logits: CE on them and the margin/DLR losses
  lose their meaning (warning);
- a model in training mode is attacked in eval mode, as every aerl_fast attack does, and the user
  is told so, with whether it is random in training mode (dropout: two passes on a copy, so the
  user's BatchNorm statistics are not touched) (warning).
"""
from __future__ import annotations

import copy
import warnings
from typing import List

import torch

from ._common import AttackError, AttackWarning, attack_mode

PROBE = 32       # images the checks use
TOL = 1e-5       # relative to the logits' scale: bit-level noise of a deterministic model is far below


def _two_passes(model, x):
    with torch.no_grad():
        a, b = model(x), model(x)
    if not isinstance(a, torch.Tensor) or a.dim() != 2 or a.shape[0] != x.shape[0] or a.shape[1] < 2:
        shape = tuple(a.shape) if isinstance(a, torch.Tensor) else type(a).__name__
        raise AttackError(f"the model must return [B, K] logits with K >= 2 classes, got {shape}")
    a, b = a.float(), b.float()
    return a, float((a - b).abs().max()) / max(float(a.abs().max()), 1.0)


def _training_modules(model) -> List[str]:
    return [name or type(m).__name__ for name, m in model.named_modules() if m.training]


def check_model(model: torch.nn.Module, x: torch.Tensor) -> None:
    """Run the checks above on the first `PROBE` images of x (the model's mode is left as it was)."""
    probe = x[:PROBE].detach()
    training = _training_modules(model)
    with attack_mode(model):
        logits, diff = _two_passes(model, probe)
    if diff > TOL:
        raise AttackError(f"the model is random in eval mode: two forward passes of the same {probe.shape[0]} "
                          f"images differ by up to {diff:.3g} (relative to the largest logit); its robust set "
                          "cannot be reproduced. Make it deterministic (randomised defences need an "
                          "expectation over the randomness, e.g. AutoAttack's version='rand')")
    rows = logits.sum(1)
    if float(logits.min()) > -TOL and float(logits.max()) < 1 + TOL and bool(((rows - 1).abs() < TOL).all()):
        warnings.warn("the model's outputs look like probabilities (values in [0, 1], each row sums to 1): "
                      "attacks need logits; drop the final softmax", AttackWarning, stacklevel=3)
    if training:
        warnings.warn(f"the model is in training mode ({len(training)} modules, e.g. {', '.join(training[:3])})"
                      f"{_train_mode_randomness(model, probe)}; it is attacked in eval mode and left in "
                      "training mode afterwards: call model.eval() first to make this explicit",
                      AttackWarning, stacklevel=3)


def _train_mode_randomness(model, probe) -> str:
    try:
        twin = copy.deepcopy(model)
    except Exception:  # noqa: BLE001 - a module that cannot be copied is not probed in training mode
        return ""
    _, diff = _two_passes(twin, probe)
    if diff > TOL:
        return f" and random there (dropout?): two forward passes of the same images differ by up to {diff:.3g}"
    return ""
