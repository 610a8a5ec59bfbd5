"""Gradient-masking checks, reported beside the robustness numbers.

A model can look robust because its gradients are useless (saturated softmax, shattered or
zero gradients) rather than because adversarial images do not exist. Four observable symptoms
(Athalye et al. 2018; Croce & Hein's AutoAttack checks):

- zero_gradients:  a share of samples has an exactly zero input gradient of the attack loss;
- transfer:        images crafted on *another* model fool this one more than its own white-box
                   attack does;
- epsilon_curve:   accuracy does not fall towards 0 as ε grows (rises with ε, or an attack with a
                   radius covering the whole image box leaves samples correct);
- gradient_free:   a gradient-free attack (AutoAttack's Square) beats the gradient attack.

Each check returns a `MaskingFlag` that says what it observed; `flagged` is None when the check
could not run (and `observed` says why).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import torch


@dataclass
class MaskingFlag:
    check: str
    flagged: Optional[bool]
    observed: str
    numbers: dict = field(default_factory=dict)  # what was measured, for metrics.json

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def label(self) -> str:
        return {True: "FLAG", False: "ok", None: "not run"}[self.flagged]


def zero_gradient_count(model, x, y, *, loss: str = "ce", batch_size: int = 256) -> int:
    """Number of samples whose input gradient of the summed attack loss is exactly zero at x."""
    from aerl_fast.attacks import attack_loss, attack_mode  # noqa: PLC0415

    zero = torch.zeros((), dtype=torch.int64, device=x.device)
    with attack_mode(model):
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].detach().requires_grad_(True)
            (g,) = torch.autograd.grad(attack_loss(model(xb), y[i:i + batch_size], loss), xb)
            zero += (g.flatten(1).abs().amax(1) == 0).sum()
    return int(zero)


def check_zero_gradients(zero: int, n: int, loss: str = "ce") -> MaskingFlag:
    share = zero / n if n else 0.0
    return MaskingFlag("zero_gradients", zero > 0,
                       f"{zero} of {n} samples ({share:.1%}) have an exactly zero input gradient of "
                       f"the {loss} loss at the clean image"
                       + (" (saturated softmax: CE-based attacks cannot move them; try --loss margin)"
                          if zero and loss == "ce" else ""))


def check_transfer(target: str, white_box: float, column: Dict[str, float],
                   tol: float = 0.01) -> MaskingFlag:
    """column: source model -> accuracy of `target` on images crafted on that source."""
    others = {s: a for s, a in column.items() if s != target}
    if not others:
        return MaskingFlag("transfer", None, "needs at least two models (--transfer)")
    src, best = min(others.items(), key=lambda kv: kv[1])
    flagged = best < white_box - tol
    return MaskingFlag("transfer", flagged,
                       f"strongest transfer (crafted on {src}) leaves {best:.1%} vs {white_box:.1%} "
                       f"white-box" + (": the model's own gradients are the weaker attack" if flagged else ""))


def check_epsilon_curve(eps: Sequence[float], acc: Sequence[float], large_eps: Optional[float],
                        large_acc: Optional[float], n_large: int = 0, tol: float = 0.01,
                        zero_tol: float = 0.02) -> MaskingFlag:
    """Flags accuracy rising with ε (beyond `tol`) or above `zero_tol` under the large-ε attack."""
    pairs = sorted(zip(eps, acc))
    rises = [(e0, a0, e1, a1) for (e0, a0), (e1, a1) in zip(pairs, pairs[1:]) if a1 > a0 + tol]
    parts = []
    if len(pairs) > 1:
        parts.append("accuracy " + " -> ".join(f"{a:.1%} (eps {e:g})" for e, a in pairs))
    if rises:
        e0, a0, e1, a1 = rises[0]
        parts.append(f"rises from {a0:.1%} at eps {e0:g} to {a1:.1%} at eps {e1:g}")
    large_bad = large_acc is not None and large_acc > zero_tol
    if large_acc is not None:
        parts.append(f"{large_acc:.1%} of {n_large} clean-correct samples survive PGD at eps {large_eps:g} "
                     "(a radius covering the whole image box)")
    if not parts:
        return MaskingFlag("epsilon_curve", None, "needs several eps values or the large-eps attack")
    return MaskingFlag("epsilon_curve", bool(rises) or large_bad, "; ".join(parts))


def large_epsilon(norm: str, sample_shape: Sequence[int]) -> float:
    """A radius that reaches every image of the [0, 1] box from any other: 1 for L-inf,
    sqrt(#pixels) for L2 (the box's diameter)."""
    return 1.0 if norm == "linf" else math.sqrt(float(torch.Size(sample_shape).numel()))


def large_epsilon_accuracy(model, x, y, *, norm: str, steps: int, clamp=True, loss: str = "ce",
                           batch_size: int = 256) -> float:
    """Robust accuracy of early-stopped PGD with a box-covering radius on clean-correct samples
    `x` (a masked model keeps some; an honest one keeps none). Step: radius / 10. No random
    start: at this radius a random start is a noise attack, and the question is whether the
    gradients alone lead out of the correct region."""
    from aerl_fast.attacks import pgd  # noqa: PLC0415

    eps = large_epsilon(norm, x.shape[1:])
    robust = 0
    for i in range(0, x.shape[0], batch_size):  # >= 20 steps of eps/10: the attack can cross the box twice
        res = pgd(model, x[i:i + batch_size], y[i:i + batch_size], eps=eps, step=eps / 10,
                  steps=max(20, steps), norm=norm, random_start=False, early_stop=True, clamp=clamp,
                  loss=loss, return_result=True)
        robust += int((~res.fooled).sum())
    return robust / max(1, x.shape[0])


def check_gradient_free(square_acc: Optional[float], grad_acc: Optional[float], n: int = 0,
                        why_not: str = "", tol: float = 0.01) -> MaskingFlag:
    if square_acc is None or grad_acc is None:
        return MaskingFlag("gradient_free", None, why_not or "Square attack not run")
    flagged = square_acc < grad_acc - tol
    return MaskingFlag("gradient_free", flagged,
                       f"Square (gradient-free) leaves {square_acc:.1%} vs {grad_acc:.1%} for the "
                       f"gradient attack on the same {n} samples")


def summarize(flags: List[MaskingFlag]) -> str:
    """'none' or the names of the raised flags, for a table cell."""
    raised = [f.check for f in flags if f.flagged]
    return ", ".join(raised) if raised else "none"


def gradient_health(model, x, y, *, loss: str = "ce", batch_size: int = 256, amp_dtype=None) -> dict:
    """Input gradients of the attack loss in the attack's precision (bf16 under `amp_dtype`): how
    many samples get an all-zero one (underflow or shattering), a non-finite one, and how many have a
    saturated softmax (probability of the label exactly 1 in fp32)."""
    from aerl_fast.attacks import attack_loss, attack_mode  # noqa: PLC0415

    zero = nonfinite = saturated = 0
    dev = x.device
    with attack_mode(model):
        for i in range(0, x.shape[0], batch_size):
            xb = x[i:i + batch_size].detach().requires_grad_(True)
            yb = y[i:i + batch_size]
            with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                z = model(xb)
            (g,) = torch.autograd.grad(attack_loss(z, yb, loss), xb)
            g = g.flatten(1)
            finite = torch.isfinite(g).all(1)
            nonfinite += int((~finite).sum())
            zero += int((finite & (g.abs().amax(1) == 0)).sum())
            with torch.no_grad():
                p = torch.softmax(z.detach().float(), 1).gather(1, yb[:, None]).squeeze(1)
            saturated += int((p == 1.0).sum())
    return {"n": int(x.shape[0]), "zero": zero, "nonfinite": nonfinite, "saturated": saturated,
            "precision": str(amp_dtype or torch.float32).replace("torch.", ""), "loss": loss}


def check_gradients(h: dict, threshold: int) -> MaskingFlag:
    bad = h["zero"] + h["nonfinite"]
    flagged = bad >= threshold
    return MaskingFlag("gradients", flagged,
                       f"{h['zero']} zero and {h['nonfinite']} non-finite input gradients of the {h['loss']} loss "
                       f"in {h['precision']} among {h['n']} samples"
                       + (": gradient attacks cannot move these points (shattered, saturated or underflowing "
                          "gradients)" if flagged else ""), dict(h, threshold=threshold))


def check_saturation(h: dict, max_share: float = 0.5) -> MaskingFlag:
    share = h["saturated"] / max(1, h["n"])
    flagged = share > max_share
    return MaskingFlag("saturation", flagged,
                       f"{share:.0%} of the samples have a softmax probability of exactly 1 for their label in "
                       "fp32" + (": cross-entropy gradients vanish there (try the margin/DLR losses)" if flagged
                                 else ""), {"saturated": h["saturated"], "n": h["n"], "max_share": max_share})


def check_randomness(disagree: int, max_diff: float, n: int) -> MaskingFlag:
    """Two forward passes of the same images must agree: a random model has no reproducible robust
    set, and attacking one draw of its randomness says little about the next."""
    flagged = max_diff > 1e-5
    return MaskingFlag("randomness", flagged,
                       f"two forward passes of the same {n} images change {disagree} predictions (largest logit "
                       f"difference {max_diff:.3g}, relative)" + (": randomised defence; evaluate its "
                                                                   "expectation (EOT)" if flagged else ""),
                       {"disagree": disagree, "max_diff": max_diff, "n": n})


def check_epsilon_to_zero(radii: Sequence[float], accs: Sequence[float], median_distance: Optional[float],
                          tol: float = 0.01) -> MaskingFlag:
    """Accuracy over an ε sweep that ends at a radius covering the image box must fall to <= 1%."""
    last = accs[-1]
    flagged = last > tol
    curve = ", ".join(f"{100 * a:.1f}% (eps {e:.3g})" for e, a in zip(radii, accs))
    med = "n/a" if median_distance is None else f"{median_distance:.3g}"
    return MaskingFlag("epsilon_to_zero", flagged,
                       f"accuracy {curve}; median minimal adversarial distance {med}"
                       + (": points survive a radius that reaches every image" if flagged else ""),
                       {"radii": list(radii), "acc": list(accs), "median_min_distance": median_distance, "tol": tol})
