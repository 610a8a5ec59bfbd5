"""autoattack_fast: batch-size independence, the result's bookkeeping against independent checks,
the fp32 re-check (on a model built to fool bf16 only, and on one that must not), the fast budget
against the full one, the model checks, FAB-T through pyautoattack, bad input.

Small budgets (steps, queries) keep this file fast: the properties do not depend on them.  The
agreement with pyautoattack at AutoAttack's budget is tests/test_aa_reference.py.
"""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

from aerl_fast import runtime
from aerl_fast.attacks import AttackError, AttackWarning, autoattack_available, autoattack_fast
from aerl_fast.models import build_model
from attack_checks import perturbation
from eval_fixtures import cpu_eval_env, held_out, tiny_models, tiny_runs  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("cpu_eval_env")
SMALL = dict(steps=10, queries=60)


@pytest.fixture(scope="module")
def rl(tiny_models):  # noqa: F811
    return tiny_models["rl"]


def test_batch_64_equals_batch_256_sample_by_sample(rl, held_out):
    x, y = held_out[0][:256], held_out[1][:256]
    kw = dict(eps=0.5, norm="L2", seed=11, **SMALL)
    a = autoattack_fast(rl, x, y, batch_size=64, **kw)
    b = autoattack_fast(rl, x, y, batch_size=256, **kw)
    assert a.stages[0].broken and a.robust.any()  # there was something to break and to keep
    for name in ("robust", "clean", "broken_by", "forwards", "backwards"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    torch.testing.assert_close(a.x_adv, b.x_adv, atol=1e-6, rtol=0)


@pytest.mark.parametrize("norm, eps", [("linf", 6 / 255), ("l2", 0.4)])
def test_result_bookkeeping_against_independent_checks(rl, held_out, norm, eps):
    x, y = held_out[0][:48], held_out[1][:48]
    model = copy.deepcopy(rl).train()
    model.eval()
    flags = [(p.requires_grad, p.is_contiguous()) for p in model.parameters()]
    res = autoattack_fast(model, x, y, eps=eps, norm=norm, **SMALL)
    assert [(p.requires_grad, p.is_contiguous()) for p in model.parameters()] == flags
    assert not model.training
    with torch.no_grad():
        clean = model(x).argmax(1) == y
        adv_pred = model(res.x_adv).argmax(1)
    assert torch.equal(res.clean, clean)
    broken = res.broken_by >= 0
    assert torch.equal(res.robust, clean & ~broken)
    assert bool((adv_pred[broken] != y[broken]).all())            # every break holds in fp32
    assert bool((perturbation(res.x_adv, x, norm)[broken] <= eps * (1 + 1e-5)).all())
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert torch.equal(res.x_adv[~broken], x[~broken])
    assert res.stage_names == ["apgd-ce", "apgd-t", "square"]
    attacked = int(clean.sum())
    for k, st in enumerate(res.stages):
        assert st.attacked == attacked and st.broken == int((res.broken_by == k).sum())
        assert 1 <= st.calls <= (SMALL["queries"] + 1 if st.name == "square" else
                                 (SMALL["steps"] + 1) * (9 if st.name == "apgd-t" else 1)) if attacked else st.calls == 0
        attacked -= st.broken
    assert sum(s.forwards for s in res.stages) + x.shape[0] == int(res.forwards.sum())
    assert sum(s.backwards for s in res.stages) == int(res.backwards.sum())
    assert res.stages[2].backwards == 0                           # Square is forward-only
    assert bool((res.forwards[~clean] == 1).all()) and bool((res.backwards[~clean] == 0).all())
    assert res.disagreements == 0                                 # fp32 attack: nothing to overturn
    assert res.summary()["robust_accuracy"] == pytest.approx(float(res.robust.double().mean()))
    assert res.broken_by_name()[int(broken.nonzero()[0])] in res.stage_names


class Bf16Liar(nn.Module):
    """Classifies like `base` in fp32; under autocast its top class is pushed down, so every
    attacked point looks broken there and the fp32 re-check must overturn it."""

    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        z = self.base(x)
        if torch.is_autocast_enabled(x.device.type):
            z = z.float().scatter(1, z.argmax(1, keepdim=True), -1e4)
        return z


def test_amp_decisions_are_rechecked_in_fp32(rl, held_out):
    if runtime.amp_dtype(torch.device("cpu"), True, log=lambda m: None) is None:
        pytest.skip("no bf16 on this CPU: amp falls back to fp32")
    x, y = held_out[0][:24], held_out[1][:24]
    liar = Bf16Liar(rl).eval()
    res = autoattack_fast(liar, x, y, eps=0.05, norm="l2", amp=True, **SMALL)
    assert res.settings["precision"] == "bfloat16"
    with torch.no_grad():
        clean = rl(x).argmax(1) == y
        truly = rl(res.x_adv).argmax(1) != y
    assert res.disagreements >= int(clean.sum()) - int(truly.sum())  # each stage overturned its false breaks
    assert res.stages[0].disagreements > 0
    assert torch.equal(res.robust, clean & ~truly)
    honest = autoattack_fast(rl, x, y, eps=0.05, norm="l2", amp=True, **SMALL)
    assert honest.settings["precision"] == "bfloat16"
    with torch.no_grad():
        assert bool((rl(honest.x_adv[honest.broken_by >= 0]).argmax(1) != y[honest.broken_by >= 0]).all())


def test_fast_budget_breaks_a_subset_of_the_full_budget(rl, held_out):
    """Both budgets draw the same random numbers: a point's trajectory is the same until the fast
    rule stops it, so whatever the fast budget breaks, the full one breaks too, at more cost."""
    x, y = held_out[0][:40], held_out[1][:40]
    kw = dict(eps=0.35, norm="l2", steps=30, queries=500)
    fast = autoattack_fast(rl, x, y, budget="fast", **kw)
    full = autoattack_fast(rl, x, y, budget="full", **kw)
    assert bool((fast.robust | ~full.robust).all())
    assert bool((full.forwards >= fast.forwards).all())
    assert int(full.forwards.sum()) > 1.5 * int(fast.forwards.sum())


class Softmaxed(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(x).softmax(1)


class Noisy(nn.Module):
    def __init__(self, base):
        super().__init__()
        self.base = base

    def forward(self, x):
        return self.base(x + 0.01 * torch.randn_like(x))


def test_model_checks_warn_and_refuse(rl, held_out):
    x, y = held_out[0][:8], held_out[1][:8]
    kw = dict(eps=0.1, norm="l2", steps=2, queries=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")             # a plain eval-mode logit model: no warning
        autoattack_fast(rl, x, y, **kw)
    with pytest.warns(AttackWarning, match="look like probabilities"):
        autoattack_fast(Softmaxed(rl).eval(), x, y, **kw)
    with pytest.raises(AttackError, match="random in eval mode: two forward passes .* differ by up to"):
        autoattack_fast(Noisy(rl).eval(), x, y, **kw)

    dropout = build_model("alicnn", 10, width=0.25).train()   # AliCNN has dropout and BatchNorm
    stats = {k: v.clone() for k, v in dropout.state_dict().items()}
    with pytest.warns(AttackWarning, match=r"training mode .* random there .* differ by up to .* attacked in eval mode"):
        autoattack_fast(dropout, x, y, **kw)
    assert dropout.training and all(m.training for m in dropout.modules())
    assert all(torch.equal(v, dropout.state_dict()[k]) for k, v in stats.items())  # BN untouched
    no_dropout = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(10))
    no_dropout(x)
    no_dropout.train()
    with pytest.warns(AttackWarning) as seen:
        autoattack_fast(no_dropout, x, y, **kw)
    text = " ".join(str(w.message) for w in seen)
    assert "training mode" in text and "random there" not in text


@pytest.mark.parametrize("kwargs, match", [
    (dict(stages=("apgd-ce", "apgd")), "unknown: 'apgd'"),
    (dict(stages=("apgd-ce", "apgd-ce")), "distinct"),
    (dict(stages=()), "stages must be"),
    (dict(eps=0.0), "eps must be > 0"),
    (dict(eps=-1.0), "eps must be"),
    (dict(queries=0), "queries must be an integer >= 1"),
    (dict(steps=0), "steps must be"),
    (dict(batch_size=0), "batch_size must be"),
    (dict(budget="half"), "unknown budget 'half'"),
    (dict(norm="l1"), "unknown norm 'l1'"),
])
def test_bad_input_names_the_value(rl, held_out, kwargs, match):
    x, y = held_out[0][:4], held_out[1][:4]
    kw = dict(dict(eps=0.1, norm="l2", steps=1, queries=1), **kwargs)
    with pytest.raises(AttackError, match=match):
        autoattack_fast(rl, x, y, **kw)


def test_per_sample_eps_must_be_positive_everywhere(rl, held_out):
    x, y = held_out[0][:4], held_out[1][:4]
    with pytest.raises(AttackError, match="eps must be > 0, got 0"):
        autoattack_fast(rl, x, y, eps=torch.tensor([0.1, 0.2, 0.0, 0.1]), norm="l2", steps=1, queries=1)


def test_too_few_classes_for_the_targeted_stage(held_out):
    x, y = held_out[0][:4], held_out[1][:4] % 3
    three = build_model("alicnn", 3, width=0.25).eval()
    with pytest.raises(AttackError, match="needs at least 10 classes .* has 3"):
        autoattack_fast(three, x, y, eps=0.1, norm="l2", steps=1, queries=1)
    res = autoattack_fast(three, x, y, eps=0.1, norm="l2", steps=1, queries=1, stages=("apgd-ce", "square"))
    assert res.stage_names == ["apgd-ce", "square"]


@pytest.mark.skipif(not autoattack_available(), reason="pyautoattack not installed")
def test_fab_t_stage_through_pyautoattack(rl, held_out):
    x, y = held_out[0][:12], held_out[1][:12]
    state = torch.random.get_rng_state()
    res = autoattack_fast(rl, x, y, eps=0.4, norm="l2", stages=("apgd-ce", "fab-t"), steps=5, targets=2)
    assert torch.equal(torch.random.get_rng_state(), state)    # FAB's reseeding did not leak
    assert res.stage_names == ["apgd-ce", "fab-t"]
    fab = res.stages[1]
    assert fab.attacked == 0 or (fab.forwards > 0 and fab.backwards > 0)
    broken = res.broken_by >= 0
    with torch.no_grad():
        assert bool((rl(res.x_adv[broken]).argmax(1) != y[broken]).all())
    assert bool((perturbation(res.x_adv, x, "l2")[broken] <= 0.4 * (1 + 1e-4)).all())
