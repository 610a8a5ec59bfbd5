"""Pieces every attack shares: the attack-mode context, the losses, input checks, per-sample ε.

Attack losses are *summed* over the batch, so the input gradient of one sample never depends on
which other samples share its batch (early stopping shrinks the batch; the study's mean-reduced
loss would rescale every gradient by 1/B).
"""
from __future__ import annotations

import contextlib
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from aerl_fast.errors import UserError

NORMS = ("linf", "l2")
LOSSES = ("ce", "margin", "dlr")

Scalar = Union[float, torch.Tensor]


class AttackError(UserError, ValueError):
    """Bad attack input (ε < 0, step > ε, unknown norm, empty batch, ...): the CLI prints it."""


class AttackWarning(UserWarning):
    """Something about the model or the inputs that makes a robustness number suspect (outputs that
    look like probabilities, a model left in training mode) but does not stop the attack."""


@contextlib.contextmanager
def attack_mode(model: torch.nn.Module):
    """Eval mode and frozen parameters for the duration of an attack; both restored afterwards.

    Freezing (requires_grad=False) keeps autograd from even recording the weight edges, so a
    backward computes the input gradient only (the study's loop also computes every parameter
    gradient: ~1.37x slower on AliCNN). Each module's own training flag is restored, so a model
    with mixed train/eval submodules comes back exactly as it was.
    """
    modes = [(m, m.training) for m in model.modules()]
    params = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in params:
        p.requires_grad_(False)
    try:
        yield model
    finally:
        for p, flag in params:
            p.requires_grad_(flag)
        for m, flag in modes:
            m.training = flag


def margin(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-sample logit margin z_y - max_{j != y} z_j (fp32): > 0 while the label wins."""
    z = logits.float()
    z_y = z.gather(1, y[:, None]).squeeze(1)
    return z_y - z.scatter(1, y[:, None], float("-inf")).amax(1)


def dlr_loss(logits: torch.Tensor, y: torch.Tensor, target: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per-sample difference-of-logits-ratio loss (Croce & Hein 2020), ascended by the attack:

        untargeted  -(z_y - max_{i != y} z_i) / (z_pi1 - z_pi3 + 1e-12)
        targeted    -(z_y - z_t) / (z_pi1 - (z_pi3 + z_pi4) / 2 + 1e-12)

    with z_pi1 >= z_pi2 >= ... the sorted logits.  Shift- and scale-invariant in the logits, so a
    saturated softmax (small CE gradients) does not stall it.
    """
    z = logits.float()
    need = 4 if target is not None else 3
    if z.shape[1] < need:
        raise AttackError(f"the {'targeted ' if target is not None else ''}DLR loss needs at least {need} classes "
                          f"(it divides by a gap between sorted logits); the model has {z.shape[1]}: use loss='ce'")
    top = z.topk(need, dim=1).values
    if target is None:
        return -margin(z, y) / (top[:, 0] - top[:, 2] + 1e-12)
    z_y = z.gather(1, y[:, None]).squeeze(1)
    z_t = z.gather(1, target[:, None]).squeeze(1)
    return -(z_y - z_t) / (top[:, 0] - 0.5 * (top[:, 2] + top[:, 3]) + 1e-12)


def attack_loss(logits: torch.Tensor, y: torch.Tensor, loss: str = "ce",
                targeted: bool = False) -> torch.Tensor:
    """The summed loss the attack ascends.

    ce:     cross-entropy on the label (untargeted) or minus cross-entropy on the target.
            For RL-trained models too: the policy is softmax(logits), so CE on the label is
            -log pi(label|x), the study's choice as well.
    margin: max_{j != y} z_j - z_y (Carlini-Wagner margin on logits); its gradient does not
            vanish when the softmax saturates, which CE's does in float32.
    dlr:    `dlr_loss` (untargeted only: its targeted form needs the label and the target).
    """
    z = logits.float()
    if loss == "ce":
        ce = F.cross_entropy(z, y, reduction="sum")
        return -ce if targeted else ce
    if loss == "margin":
        m = margin(z, y)
        return m.sum() if targeted else -m.sum()
    if loss == "dlr":
        if targeted:
            raise AttackError("loss 'dlr' is untargeted here; the targeted DLR loss is apgd(..., targets=k)")
        return dlr_loss(z, y).sum()
    raise AttackError(f"unknown attack loss {loss!r}; choose one of {', '.join(LOSSES)}")


def fooled_by(logits: torch.Tensor, y: torch.Tensor, targeted: bool = False) -> torch.Tensor:
    """Per-sample success of the attack: wrong class (untargeted) or the target class."""
    pred = logits.argmax(1)
    return pred == y if targeted else pred != y


def check_norm(norm: str) -> str:
    """The canonical norm name: "linf"/"l2", also accepted as AutoAttack and torchattacks spell
    them ("Linf", "L2"; any case)."""
    key = norm.lower() if isinstance(norm, str) else None
    if key not in NORMS:
        raise AttackError(f"unknown norm {norm!r}; choose one of {', '.join(NORMS)} (or Linf, L2)")
    return key


def check_count(name: str, value, low: int = 1) -> int:
    """An integer setting (steps, queries, ...) >= low, named in the error."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < low:
        raise AttackError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def check_batch(x, y) -> int:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise AttackError("images must be a float tensor in [0, 1]")
    if x.dim() < 2 or x.shape[0] == 0:
        raise AttackError(f"empty batch: images of shape {tuple(x.shape)}")
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.shape[0] != x.shape[0]:
        raise AttackError(f"labels must be a [{x.shape[0]}] integer tensor, got "
                          f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    if y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise AttackError(f"labels must be integers, got {y.dtype}")
    return x.shape[0]


def per_sample(value: Scalar, batch: int, device, name: str) -> Scalar:
    """A Python float (checked here, on the host) or a [B] float32 tensor on `device` (checked
    once here: the one host sync of an attack's setup, never inside its step loop)."""
    if isinstance(value, torch.Tensor):
        t = value.detach().to(device=device, dtype=torch.float32)
        if t.dim() == 0:
            return per_sample(float(t), batch, device, name)
        if t.shape != (batch,):
            raise AttackError(f"{name} must be a float or a [{batch}] tensor, got shape {tuple(t.shape)}")
        if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
            raise AttackError(f"{name} must be finite and >= 0, got min {float(t.min())}")
        return t
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise AttackError(f"{name} must be a number or a [B] tensor, got {value!r}") from None
    if not v >= 0 or v == float("inf"):
        raise AttackError(f"{name} must be finite and >= 0, got {v}")
    return v


def check_step(step: Scalar, eps: Scalar) -> None:
    """step > ε (where ε > 0) walks out of the ball every step and the projection does the work:
    almost always a unit mistake (e.g. step 0.1 with ε 8/255), so it is refused."""
    if isinstance(step, torch.Tensor) or isinstance(eps, torch.Tensor):
        s = step if isinstance(step, torch.Tensor) else torch.tensor(step)
        e = eps if isinstance(eps, torch.Tensor) else torch.tensor(eps)
        s, e = torch.broadcast_tensors(s.float().cpu(), e.float().cpu())
        bad = (s > e) & (e > 0)
        if bool(bad.any()):
            i = int(bad.nonzero()[0, 0]) if bad.dim() else 0
            raise AttackError(f"step {float(s.flatten()[i]):g} > eps {float(e.flatten()[i]):g}: the step "
                              "must not exceed the radius of the ball")
    elif eps > 0 and step > eps:
        raise AttackError(f"step {step:g} > eps {eps:g}: the step must not exceed the radius of the ball")


def resolve_clamp(clamp) -> Optional[Tuple[float, float]]:
    """True -> (0, 1) (inputs live in [0, 1]); False/None -> no box (the study's preset); or (lo, hi)."""
    if clamp is True:
        return (0.0, 1.0)
    if clamp is False or clamp is None:
        return None
    try:
        lo, hi = (float(v) for v in clamp)
    except (TypeError, ValueError):
        raise AttackError(f"clamp must be True, False or (lo, hi), got {clamp!r}") from None
    if lo > hi:
        raise AttackError(f"clamp must be (lo, hi) with lo <= hi, got {clamp!r}")
    return (lo, hi)


def check_image_range(x: torch.Tensor, box: Optional[Tuple[float, float]]) -> None:
    """Refuse images an attack would treat in the wrong units (one host read of min and max).

    With the default box [0, 1] or no box: negative values are normalised images (ε would be in
    normalised units: the normalisation belongs inside the model); otherwise values above 1.5 are
    0-255 pixels (an ε meant for [0, 1] would be 255x too small: divide by 255).  A custom box (lo, hi)
    states the range, so only leaving it is refused.
    """
    lo, hi = float(x.min()), float(x.max())
    if box is None or box == (0.0, 1.0):
        if lo < 0:
            raise AttackError(f"images go down to {lo:.4g}: they look normalised; put the normalisation "
                              "inside the model (aerl_fast.models.Normalize) and pass images in [0, 1]")
        if hi > 1.5:
            raise AttackError(f"images reach {hi:.4g}: they look like 0-255 pixel values; divide them by "
                              "255 (attacks take images in [0, 1], and eps is in those units)")
    if box is not None and (lo < box[0] or hi > box[1]):
        raise AttackError(f"images lie outside the clamp box {box} (min {lo:.4g}, max {hi:.4g}); "
                          "attacks take images in [0, 1]")


def check_sample_ids(sample_ids, batch: int, device) -> torch.Tensor:
    """[B] int64 ids keying each sample's random draws (default: the row index)."""
    if sample_ids is None:
        return torch.arange(batch, device=device)
    ids = torch.as_tensor(sample_ids, device=device, dtype=torch.int64)
    if ids.shape != (batch,) or bool((ids < 0).any()):
        raise AttackError(f"sample_ids must be a [{batch}] tensor of ids >= 0, got shape {tuple(ids.shape)} "
                          f"(min {int(ids.min()) if ids.numel() else 'none'})")
    return ids


def resolve_compact_every(compact_every: Optional[int], device) -> int:
    """How often early-stopping attacks drop broken samples (a host sync): every step on the CPU,
    where there is no device to wait for; every 5 on CUDA."""
    if compact_every is None:
        return 1 if torch.device(device).type == "cpu" else 5
    return check_count("compact_every", compact_every)


def index(v: Scalar, idx: torch.Tensor) -> Scalar:
    """Subset a per-sample value: floats stay floats."""
    return v[idx] if isinstance(v, torch.Tensor) else v


def as_column(v: Scalar, like: torch.Tensor) -> Scalar:
    """A per-sample value broadcastable against `like` [B, ...]."""
    if isinstance(v, torch.Tensor):
        return v.view(-1, *([1] * (like.dim() - 1)))
    return v
