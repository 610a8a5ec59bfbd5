"""budget="fast": the rule that moves iterations away from points an attack is not going to break.

Most of AutoAttack's time goes to points that stay robust: APGD-T's 9 targets x 100 iterations and
Square's 5000 queries are spent on them in full.  Like A3 (Liu et al., CVPR 2022), the fast budget
watches each point's progress and stops spending on points that show none:

    the progress measure is the point's best margin m = min over the run's iterates of
    z_y - max_{j != y} z_j (the point breaks when it goes below 0);
    at each review (APGD's step-size checkpoints; every `square_every` queries in Square) the
    rate over the last window, r = (m_prev - m) / window, is extrapolated over the remaining
    iterations with a factor `optimism`; the point is *off course* when even that cannot reach 0:
        m - optimism * r * remaining > 0;
    a point off course at `patience` reviews in a row leaves the run, and in APGD-T it also
    skips its remaining target classes.

Progress of both attacks slows down as they go (APGD halves its step, Square shrinks its squares),
so a linear extrapolation of the latest window is already optimistic; `optimism` adds margin on
top.  budget="full" spends AutoAttack's whole budget on every point.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ._common import AttackError

BUDGETS = ("fast", "full")


@dataclass(frozen=True)
class StallRule:
    patience: int = 2
    optimism: float = 2.0
    square_every: int = 250

    def review(self, m_best: torch.Tensor, m_prev: torch.Tensor, window: int, remaining: int,
               strikes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(new strikes, stop mask) for the rows at one review; all [R] tensors."""
        rate = (m_prev - m_best).clamp_min(0) / max(window, 1)
        off = m_best - self.optimism * rate * remaining > 0
        strikes = torch.where(off, strikes + 1, torch.zeros_like(strikes))
        return strikes, strikes >= self.patience


def rule_for(budget: str) -> Optional[StallRule]:
    """The stall rule of a budget name (None: spend everything)."""
    if budget == "fast":
        return StallRule()
    if budget == "full":
        return None
    raise AttackError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
