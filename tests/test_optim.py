"""aerl_fast.optim: the learning-rate factor at the points where its closed forms are known by hand
(warm-up, start and end of the decay, the cosine's quarter and half points), and the rates the
scheduler of `build_optimizer` actually hands the optimizer, step by step."""
import math

import pytest
import torch

from aerl_fast.config import TrainConfig
from aerl_fast.optim import build_optimizer, lr_factor

SPE = 4  # optimizer steps per epoch


def cfg(schedule, epochs=5, warmup=1.0, final=0.1, **kw):
    return TrainConfig(schedule=schedule, epochs=epochs, warmup_epochs=warmup, final_lr_frac=final, **kw)


# 5 epochs of 4 steps, 1 epoch of warm-up (4 steps), then 16 steps of decay towards 0.1
@pytest.mark.parametrize("schedule, step, factor", [
    ("warmup-linear", 0, 0.25), ("warmup-linear", 1, 0.5), ("warmup-linear", 3, 1.0),
    ("warmup-linear", 4, 1.0),                      # the decay starts at the full rate
    ("warmup-linear", 8, 1 - 0.9 / 4),              # a quarter of the decay
    ("warmup-linear", 12, 0.55),                    # half way
    ("warmup-linear", 19, 1 - 0.9 * 15 / 16),       # the last step
    ("warmup-linear", 20, 0.1),                     # after it: the final fraction
    ("warmup-linear", 25, 0.1),                     # and no lower
    ("cosine", 0, 0.25), ("cosine", 3, 1.0), ("cosine", 4, 1.0),
    ("cosine", 8, 0.1 + 0.9 * (1 + math.sqrt(0.5)) / 2),   # cos(π/4)
    ("cosine", 12, 0.55),                                   # cos(π/2) = 0
    ("cosine", 16, 0.1 + 0.9 * (1 - math.sqrt(0.5)) / 2),  # cos(3π/4)
    ("cosine", 20, 0.1), ("cosine", 30, 0.1),
    ("constant", 0, 1.0), ("constant", 3, 1.0), ("constant", 20, 1.0),   # constant ignores the warm-up
])
def test_lr_factor_at_points_known_by_hand(schedule, step, factor):
    assert lr_factor(cfg(schedule), step, SPE) == pytest.approx(factor, rel=1e-12)


@pytest.mark.parametrize("schedule", ["warmup-linear", "cosine"])
@pytest.mark.parametrize("final", [0.0, 0.1, 0.5, 1.0])
def test_the_decay_ends_at_the_final_fraction_and_never_rises(schedule, final):
    c = cfg(schedule, final=final)
    f = [lr_factor(c, s, SPE) for s in range(4, 21)]
    assert f[0] == pytest.approx(1.0) and f[-1] == pytest.approx(final, abs=1e-12)
    assert all(b <= a + 1e-15 for a, b in zip(f, f[1:]))
    if schedule == "warmup-linear":   # equal decrements: a straight line
        assert [a - b for a, b in zip(f, f[1:])] == pytest.approx([(1 - final) / 16] * 16)


def test_warm_up_length_is_rounded_to_whole_steps_and_zero_means_none():
    assert [lr_factor(cfg("warmup-linear", warmup=0.75), s, SPE) for s in range(3)] == pytest.approx([1 / 3, 2 / 3, 1.0])
    assert lr_factor(cfg("warmup-linear", warmup=0.0), 0, SPE) == 1.0
    assert lr_factor(cfg("cosine", warmup=0.0), 0, SPE) == 1.0
    # no warm-up: the decay spans all 20 steps, half way at step 10
    assert lr_factor(cfg("warmup-linear", warmup=0.0), 10, SPE) == pytest.approx(0.55)
    assert lr_factor(cfg("cosine", warmup=0.0), 10, SPE) == pytest.approx(0.55)


@pytest.mark.parametrize("schedule", ["constant", "warmup-linear", "cosine"])
def test_the_scheduler_hands_the_optimizer_these_rates(schedule):
    c = cfg(schedule, epochs=3, warmup=0.5, final=0.2, lr=3e-3, weight_decay=0.05)
    model = torch.nn.Linear(3, 2)
    opt, sched = build_optimizer(model, c, torch.device("cpu"), SPE)
    assert opt.defaults["weight_decay"] == 0.05 and isinstance(opt, torch.optim.AdamW)
    seen = []
    for _ in range(3 * SPE):
        seen.append(opt.param_groups[0]["lr"])
        model(torch.ones(1, 3)).sum().backward()
        opt.step()
        sched.step()
    seen.append(opt.param_groups[0]["lr"])
    warm, decay = 2, 3 * SPE - 2
    for s, lr in enumerate(seen):
        if schedule == "constant":
            expected = 1.0
        elif s < warm:
            expected = (s + 1) / warm
        else:
            frac = (s - warm) / decay
            expected = 1 - 0.8 * frac if schedule == "warmup-linear" else 0.2 + 0.4 * (1 + math.cos(math.pi * frac))
        assert lr == pytest.approx(3e-3 * expected, rel=1e-9), s
    assert seen[-1] == pytest.approx(3e-3 if schedule == "constant" else 6e-4)


@pytest.mark.parametrize("schedule", ["warmup-linear", "cosine"])
def test_a_decay_of_one_step_ends_at_the_final_fraction(schedule):
    """Two epochs of one step, the first a warm-up: the decay lasts one step and ends on the final rate."""
    c = cfg(schedule, epochs=2, warmup=1.0, final=0.1)
    assert [lr_factor(c, s, 1) for s in range(3)] == pytest.approx([1.0, 1.0, 0.1])
    single = cfg(schedule, epochs=1, warmup=0.0, final=0.1)   # one step in all
    assert [lr_factor(single, s, 1) for s in range(2)] == pytest.approx([1.0, 0.1])


def test_the_fused_optimizer_is_asked_for_only_where_it_is_supported():
    """torch has a fused AdamW for CUDA and the CPU (one kernel per step); elsewhere the default."""
    from aerl_fast.optim import fused_adamw_supported
    assert fused_adamw_supported(torch.device("cuda")) and fused_adamw_supported(torch.device("cuda", 1))
    for device, fused in ((torch.device("cpu"), True), (torch.device("meta"), False)):
        assert fused_adamw_supported(device) is fused
        opt, _ = build_optimizer(torch.nn.Linear(3, 2), cfg("constant"), device, SPE)
        assert bool(opt.defaults.get("fused")) is fused
