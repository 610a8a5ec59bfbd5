"""budget="fast": the rule that moves iterations away from points an attack is not going to break.

Most of AutoAttack's time goes to points that stay robust: APGD-T's 9 targets x 100 iterations and
Square's 5000 queries are spent on them in full.  Like A3 (Liu et al., CVPR 2022), the fast budget
watches each point's progress and stops spending on points that show none:

    the progress measure is the point's best margin m = min over the run's iterates of
    z_y - max_{j != y} z_j (the point breaks when it goes below 0);
    at each review (APGD's step-size checkpoints; every `square_every` queries in Square) the
    rate of the second half of the run so far, r = (m(i/2) - m(i)) / (i/2) (from the review
    nearest before i/2), is extrapolated over the remaining iterations with a factor
    `optimism`; the point is *off course* when even that cannot reach 0:
        m(i) - optimism * r * remaining > 0;
    a point off course at `patience` reviews in a row leaves the run.  In APGD-T that ends the
    run of the current target class only: the next target starts afresh (on our models most
    points that break under a later target do so within its first few iterations, but not all:
    a 6th-ranked target broke one at iteration 45).

Progress of both attacks slows down as they go (APGD halves its step, Square shrinks its squares),
so a linear extrapolation is already optimistic; `optimism` adds margin on top.  The rate spans half
the run, not the last window, because Square's progress comes in bursts: a point creeping to the
boundary over 4700 queries had single 250-query windows with almost no progress.
budget="full" spends AutoAttack's whole budget on every point.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ._common import AttackError

BUDGETS = ("fast", "full")


@dataclass(frozen=True)
class StallRule:
    patience: int = 1
    optimism: float = 2.0
    square_every: int = 250

    def review(self, m_hist: torch.Tensor, iters: List[int], remaining: int,
               strikes: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """(new strikes, stop mask) at one review.  m_hist [R, k]: each row's best margin at the
        start (column 0) and at each review so far (the last column is now); iters: the k
        iteration counts they were taken at."""
        now = iters[-1]
        ref = max(j for j in range(len(iters) - 1) if iters[j] <= now / 2) if len(iters) > 1 else 0
        rate = (m_hist[:, ref] - m_hist[:, -1]).clamp_min(0) / max(now - iters[ref], 1)
        off = m_hist[:, -1] - self.optimism * rate * remaining > 0
        strikes = torch.where(off, strikes + 1, torch.zeros_like(strikes))
        return strikes, strikes >= self.patience


def rule_for(budget: str) -> Optional[StallRule]:
    """The stall rule of a budget name (None: spend everything)."""
    if budget == "fast":
        return StallRule()
    if budget == "full":
        return None
    raise AttackError(f"unknown budget {budget!r}; choose one of {', '.join(BUDGETS)}")
