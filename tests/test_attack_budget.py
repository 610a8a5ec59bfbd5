"""budget="fast"'s rule on margin histories built to trigger it and built not to."""
import pytest
import torch

from aerl_fast.attacks import AttackError, StallRule
from aerl_fast.attacks.budget import rule_for

# a Square run on the RL fixture at L2 0.5 (sample 1544), best margin every 250 queries; it broke
# at query 4740 after windows of almost no progress (2500-3000)
CREEPING = [2.0565, 0.8078, 0.4536, 0.3018, 0.2636, 0.2279, 0.2051, 0.1856, 0.1269, 0.1111, 0.0938,
            0.0909, 0.0895, 0.0792, 0.0663, 0.0555, 0.0506, 0.0214, 0.0135]


def _replay(rule, margins, every, total):
    """Reviews after every `every` iterations; returns the iteration where the rule stops, or None."""
    strikes = torch.zeros(1, dtype=torch.int32)
    for k in range(1, len(margins)):
        hist = torch.tensor([margins[: k + 1]])
        strikes, stop = rule.review(hist, [j * every for j in range(k + 1)], total - k * every, strikes)
        if bool(stop):
            return k * every
    return None


def test_a_creeping_point_is_kept_to_the_end():
    assert _replay(StallRule(), CREEPING, 250, 5000) is None


def test_a_plateau_is_stopped_at_the_first_review_after_it():
    plateau = [2.0, 1.2, 1.0, 0.99, 0.985, 0.984, 0.984, 0.984]
    stop = _replay(StallRule(), plateau, 250, 5000)
    assert stop is not None and stop <= 5 * 250
    assert _replay(StallRule(patience=3), plateau, 250, 5000) > stop   # patience delays it


def test_rate_spans_the_second_half_of_the_run():
    """One flat window after steady progress: the half-run rate still reaches 0, the last window's
    alone would not."""
    margins = [1.0, 0.8, 0.6, 0.4, 0.399]
    rule = StallRule(optimism=1.0)
    strikes, stop = rule.review(torch.tensor([margins]), [0, 10, 20, 30, 40], 60, torch.zeros(1, dtype=torch.int32))
    # rate from iteration 20 (<= 40/2): (0.6 - 0.399) / 20; 0.399 - 0.01005 * 60 < 0: on course
    assert int(strikes) == 0 and not bool(stop)
    strikes, stop = rule.review(torch.tensor([margins]), [0, 10, 20, 30, 40], 30, torch.zeros(1, dtype=torch.int32))
    assert int(strikes) == 1 and bool(stop)        # 30 iterations left are not enough


def test_optimism_scales_the_extrapolation():
    hist, iters = torch.tensor([[1.0, 0.5]]), [0, 50]
    zero = torch.zeros(1, dtype=torch.int32)
    # rate 0.01 per iteration, 40 left: 0.5 - 0.4 * optimism
    assert bool(StallRule(optimism=1.0).review(hist, iters, 40, zero)[1])
    assert not bool(StallRule(optimism=1.5).review(hist, iters, 40, zero)[1])


def test_budget_names():
    assert rule_for("full") is None
    assert isinstance(rule_for("fast"), StallRule)
    with pytest.raises(AttackError, match="unknown budget 'quick'"):
        rule_for("quick")
