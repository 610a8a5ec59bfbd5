"""The robustness verdict of one model: is it robust, or does it only hide its gradients?

Pure logic on per-sample outcomes (which attack broke which test point) and on the numbers the
extra checks measured; `aerl_fast.evaluate.verdict_run` runs those attacks and checks.

- Worst case per sample: a point counts as robust only if it is clean-correct and no attack of the
  set broke it (white-box CE and DLR/margin, the APGD stages, transfer from every other model,
  Square); the table says which attack alone broke how many points.
- Ordering (per sample): white-box breaks must contain the transfer breaks, the gradient-free
  (Square) breaks and the single-step (FGSM) breaks; a point one of those breaks while the
  white-box attacks miss it is the textbook sign of gradient masking.
- Convergence, ε to zero, gradients, saturation, randomness: see `aerl_fast.analysis.masking`.
- Attack self-test: the attack must break a model built to be breakable; if it cannot, it is the
  attack, not the model, that fails.

Label: "attack failure" when the self-test fails (no number of that attack can be trusted);
otherwise "masking likely" when any masking check flagged; otherwise "no masking signs".
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence

import torch

from .masking import MaskingFlag

LABELS = ("no masking signs", "masking likely", "attack failure")
WHITE_BOX, TRANSFER, GRADIENT_FREE, SINGLE_STEP = "white-box", "transfer", "gradient-free", "single-step"


def min_count(n: int, share: float = 0.005) -> int:
    """Points that must disagree before a per-sample check flags: `share` of the set, and at least
    two, so that one point of a small set is not a verdict."""
    return max(2, math.ceil(share * n))


@dataclass
class AttackBreaks:
    """Which clean-correct points one attack broke."""
    name: str
    kind: str                  # white-box | transfer | gradient-free | single-step
    broken: torch.Tensor       # [n] bool, on the CPU


@dataclass
class WorstCase:
    n: int
    clean: int
    robust: int                          # clean-correct and broken by no attack
    broken_by: Dict[str, int]            # points each attack broke
    only_by: Dict[str, int]              # points each attack broke and no other did
    robust_mask: torch.Tensor = field(repr=False, default=None)

    @property
    def accuracy(self) -> float:
        return self.robust / self.n if self.n else float("nan")

    def to_json(self) -> dict:
        d = asdict(self)
        d.pop("robust_mask")
        d["accuracy"] = self.accuracy
        return d


def worst_case(clean_ok: torch.Tensor, attacks: Sequence[AttackBreaks]) -> WorstCase:
    """The per-sample union of every attack's breaks (never the best single attack's number)."""
    clean_ok = clean_ok.bool().cpu()
    n = int(clean_ok.numel())
    # no attack: one row that breaks nothing
    stack = torch.stack([a.broken.bool().cpu() & clean_ok for a in attacks] or [torch.zeros_like(clean_ok)])
    any_broken = stack.any(0)
    hits = stack.sum(0)
    robust = clean_ok & ~any_broken
    return WorstCase(n, int(clean_ok.sum()), int(robust.sum()),
                     {a.name: int(stack[i].sum()) for i, a in enumerate(attacks)},
                     {a.name: int((stack[i] & (hits == 1)).sum()) for i, a in enumerate(attacks)}, robust)


def check_ordering(attacks: Sequence[AttackBreaks], n: int) -> List[MaskingFlag]:
    """White-box ⊇ transfer, white-box ⊇ gradient-free, iterative ⊇ single-step, per sample."""
    def union(kind):
        rows = [a.broken.bool().cpu() for a in attacks if a.kind == kind]
        return torch.stack(rows).any(0) if rows else None
    white = union(WHITE_BOX)
    flags = []
    for kind, check, what in ((TRANSFER, "ordering_transfer", "transfer from other models"),
                              (GRADIENT_FREE, "ordering_gradient_free", "the gradient-free Square attack"),
                              (SINGLE_STEP, "ordering_single_step", "single-step FGSM")):
        other = union(kind)
        if other is None or white is None:
            flags.append(MaskingFlag(check, None, f"needs {what} and a white-box attack", {}))
            continue
        missed = int((other & ~white).sum())
        by = {a.name: int((a.broken.bool().cpu() & ~white).sum()) for a in attacks if a.kind == kind}
        worst = max(by, key=by.get)
        flagged = missed >= min_count(n)
        flags.append(MaskingFlag(
            check, flagged,
            f"{missed} of {n} points are broken by {what} but by no white-box attack"
            + (f" (most by {worst}: {by[worst]})" if missed else "")
            + (": the model's own gradients are the weaker attack" if flagged else ""),
            {"missed_by_white_box": missed, "by_attack": by, "threshold": min_count(n)}))
    return flags


def check_convergence(extra_broken: int, attacked: int, n: int, what: str) -> MaskingFlag:
    """The strongest white-box attack rerun with twice the steps and more restarts on the points
    still robust must break almost none of them (more than 0.5% of the set: not converged)."""
    flagged = extra_broken >= min_count(n)
    return MaskingFlag("convergence", flagged,
                       f"{what} broke {extra_broken} more of the {attacked} points still robust "
                       f"({extra_broken / n:.1%} of {n})" + (": the attack had not converged" if flagged else ""),
                       {"extra_broken": extra_broken, "attacked": attacked, "n": n, "threshold": min_count(n)})


def check_self_test(broken: int, attempted: int, min_rate: float = 0.95) -> MaskingFlag:
    """The attack must break (almost) every point of a model built to be breakable inside the ball."""
    if attempted == 0:
        return MaskingFlag("attack_self_test", None, "no clean-correct point to build the breakable model on", {})
    rate = broken / attempted
    flagged = rate < min_rate
    return MaskingFlag("attack_self_test", flagged,
                       f"the attack broke {broken} of {attempted} points of the same model with a shortcut to a "
                       f"wrong class inside the ε-ball ({rate:.0%}; needs {min_rate:.0%})"
                       + (": the ATTACK fails, so its numbers say nothing about the model" if flagged else ""),
                       {"broken": broken, "attempted": attempted, "rate": rate, "min_rate": min_rate})


@dataclass
class Verdict:
    label: str
    sentence: str
    worst: WorstCase
    checks: List[MaskingFlag]
    settings: dict

    def to_json(self) -> dict:
        return {"label": self.label, "sentence": self.sentence, "worst_case": self.worst.to_json(),
                "checks": [c.to_dict() for c in self.checks], "settings": self.settings}


def decide(worst: WorstCase, checks: List[MaskingFlag], settings: dict, name: str = "the model") -> Verdict:
    """The label and the sentence a paper would write."""
    failed = [c for c in checks if c.check == "attack_self_test" and c.flagged]
    raised = [c for c in checks if c.flagged]   # read only when the self-test passed
    threat = f"{settings.get('norm_name', settings.get('norm', ''))} ε = {settings.get('eps', math.nan):g}"
    acc = f"{100 * worst.accuracy:.1f}% of {worst.n} test images"
    if failed:
        label = "attack failure"
        sentence = (f"The white-box attack failed its self-test on {name} ({failed[0].observed}); no robustness "
                    f"claim at {threat} can rest on it.")
    elif raised:
        label = "masking likely"
        names = ", ".join(c.check for c in raised)
        sentence = (f"At {threat}, the worst case over {len(worst.broken_by)} attacks leaves {acc} correct, but "
                    f"the gradient-masking checks {names} fired ({raised[0].observed}); this number is an upper "
                    "bound that adaptive or gradient-free attacks may lower further, not evidence of robustness.")
    else:
        label = "no masking signs"
        sentence = (f"At {threat}, the worst case over {len(worst.broken_by)} attacks (white-box, transfer and "
                    f"gradient-free) leaves {acc} correct, and none of {len(checks)} gradient-masking and "
                    "attack checks fired.")
    return Verdict(label, sentence, worst, checks, settings)


def label_counts(verdicts: Sequence[Optional[Verdict]]) -> Dict[str, int]:
    out = {k: 0 for k in LABELS}
    for v in verdicts:
        if v is not None:
            out[v.label] += 1
    return out
