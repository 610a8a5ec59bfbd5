"""aerl_fast.attacks: FGSM/PGD geometry, strength against torchattacks, early stop, per-sample ε,
model-state hygiene, the object API, AutoAttack wrapper, transfer matrix, bad input.

Models: the tiny SL/RL AliCNNs of eval_fixtures (trained once, cached in pytest's cache dir).
"""
import sys

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import aerl_fast
from aerl_fast.attacks import (FGSM, PGD, PGDL2, AttackError, AutoAttackMissing, TransferError,
                               autoattack, autoattack_available, fgsm, pgd, transfer_matrix)
from aerl_fast.errors import UserError
from aerl_fast.models import build_model
from eval_fixtures import cpu_eval_env, tiny_runs  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("cpu_eval_env")

N = 96
SETTINGS = {"linf": dict(eps=4 / 255, step=1 / 255), "l2": dict(eps=0.25, step=0.05)}


@pytest.fixture(scope="module")
def sl(tiny_runs):  # noqa: F811
    return aerl_fast.load_model(tiny_runs.dirs["sl"])


@pytest.fixture(scope="module")
def rl(tiny_runs):  # noqa: F811
    return aerl_fast.load_model(tiny_runs.dirs["rl"])


@pytest.fixture(scope="module")
def data(tiny_runs):  # noqa: F811
    return tiny_runs.x[:N].clone(), tiny_runs.y[:N].clone()


def robust_acc(model, x, x_adv, y):
    with torch.no_grad():
        return float(((model(x).argmax(1) == y) & (model(x_adv).argmax(1) == y)).double().mean())


def dist(x_adv, x, norm):
    d = (x_adv - x).flatten(1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


# ----------------------------------------------------------------------------------- geometry

@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("mode", ["last", "early", "restarts", "per_sample"])
def test_pgd_stays_in_ball_and_box(sl, data, norm, mode):
    x, y = data
    eps, step = SETTINGS[norm]["eps"], SETTINGS[norm]["step"]
    kw = dict(early_stop=mode == "early", restarts=3 if mode == "restarts" else 1)
    if mode == "per_sample":
        eps = torch.linspace(0.0, 2 * eps, x.shape[0])
        step = eps / 4
    x_adv = pgd(sl, x, y, eps=eps, step=step, steps=5, norm=norm, seed=0, **kw)
    limit = eps if isinstance(eps, torch.Tensor) else torch.full((x.shape[0],), eps)
    assert (dist(x_adv, x, norm) <= limit * (1 + 1e-5) + 1e-6).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert (x_adv != x).any()  # the attack moved something
    if mode == "per_sample":
        assert torch.equal(x_adv[0], x[0])  # ε = 0: the image itself


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_fgsm_in_ball_box_and_matches_definition(sl, data, norm):
    x, y = data
    eps = SETTINGS[norm]["eps"]
    x_adv = fgsm(sl, x, y, eps=eps, norm=norm)
    assert (dist(x_adv, x, norm) <= eps * (1 + 1e-5)).all()
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    # independent reference: one gradient of the summed CE, one step, clamp
    xr = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(F.cross_entropy(sl(xr), y, reduction="sum"), xr)
    d = g.sign() if norm == "linf" else g / g.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(x_adv, (x + eps * d).clamp(0, 1), atol=1e-6, rtol=0)


def test_no_clamp_is_the_study_preset(sl, data):
    x, y = data
    x_adv = pgd(sl, x, y, eps=1.0, step=0.25, steps=4, norm="l2", clamp=False, seed=0)
    assert (dist(x_adv, x, "l2") <= 1.0 + 1e-5).all()
    assert x_adv.min() < 0 or x_adv.max() > 1  # with ε = 1 some pixels leave the box


# ------------------------------------------------------------------------- strength and modes

@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_not_weaker_than_torchattacks(sl, rl, data, norm):
    torchattacks = pytest.importorskip("torchattacks")
    x, y = data
    s = SETTINGS[norm]
    for model in (sl, rl):
        torch.manual_seed(0)
        if norm == "linf":
            atk = torchattacks.PGD(model, eps=s["eps"], alpha=s["step"], steps=10, random_start=True)
        else:
            atk = torchattacks.PGDL2(model, eps=s["eps"], alpha=s["step"], steps=10, random_start=True)
        theirs = robust_acc(model, x, atk(x, y), y)
        # seed=None draws the random start from torch's global RNG in torchattacks' order, so
        # re-seeding it gives both attacks the same start: the same seed in the sense
        torch.manual_seed(0)
        ours_last = robust_acc(model, x, pgd(model, x, y, steps=10, norm=norm, seed=None, **s), y)
        torch.manual_seed(0)
        res = pgd(model, x, y, steps=10, norm=norm, seed=None, early_stop=True, return_result=True, **s)
        with torch.no_grad():
            ours_es = float(((model(x).argmax(1) == y) & ~res.fooled).double().mean())
        assert ours_last <= theirs + 0.01, (norm, ours_last, theirs)
        assert ours_es <= theirs + 0.01, (norm, ours_es, theirs)
        assert theirs < robust_acc(model, x, x, y)  # the setting does break something


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_early_stop_at_most_last_iterate_and_cheaper(sl, data, norm):
    x, y = data
    s = SETTINGS[norm]
    last = pgd(sl, x, y, steps=10, norm=norm, seed=3, return_result=True, **s)
    early = pgd(sl, x, y, steps=10, norm=norm, seed=3, early_stop=True, return_result=True, **s)
    # same random start: whatever the last iterate fools, some iterate of the early-stopped run did
    assert int(early.fooled.sum()) >= int(last.fooled.sum())
    assert bool((early.fooled | ~last.fooled).all())
    assert early.grad_evals < last.grad_evals == 10 * x.shape[0]
    # the returned images of broken samples do fool the model
    with torch.no_grad():
        pred = sl(early.x_adv).argmax(1)
    assert bool((pred[early.fooled] != y[early.fooled]).all())


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("early_stop", [False, True])
def test_per_sample_eps_batch_equals_separate_runs(sl, data, norm, early_stop):
    x, y = data
    x, y = x[:48], y[:48]
    n = x.shape[0]
    base = SETTINGS[norm]["eps"]
    eps_list = [base / 2, base, 2 * base]
    eps = torch.tensor(eps_list).repeat_interleave(n)
    step = eps / 4
    ids = torch.arange(n).repeat(len(eps_list))
    big = pgd(sl, x.repeat(len(eps_list), 1, 1, 1), y.repeat(len(eps_list)), eps=eps, step=step,
              steps=5, norm=norm, seed=7, early_stop=early_stop, sample_ids=ids, return_result=True)
    for k, e in enumerate(eps_list):
        one = pgd(sl, x, y, eps=e, step=e / 4, steps=5, norm=norm, seed=7, early_stop=early_stop,
                  return_result=True)
        rows = slice(k * n, (k + 1) * n)
        assert torch.equal(big.fooled[rows], one.fooled)
        torch.testing.assert_close(big.x_adv[rows], one.x_adv, atol=1e-5, rtol=0)


def test_restarts_never_weaker(sl, data):
    x, y = data
    one = pgd(sl, x, y, steps=3, norm="l2", seed=5, return_result=True, **SETTINGS["l2"])
    three = pgd(sl, x, y, steps=3, norm="l2", seed=5, restarts=3, return_result=True, **SETTINGS["l2"])
    assert bool((three.fooled | ~one.fooled).all())  # restart 0 is the same run
    assert three.grad_evals > one.grad_evals


def test_targeted_reaches_targets(sl, data):
    x, y = data
    target = (y + 1) % 10
    x_adv = pgd(sl, x, target, eps=8.0, step=1.0, steps=20, norm="l2", targeted=True, seed=0)
    with torch.no_grad():
        hit = (sl(x_adv).argmax(1) == target).double().mean()
    assert hit > 0.9


def test_margin_loss_also_attacks(sl, data):
    x, y = data
    ce = robust_acc(sl, x, pgd(sl, x, y, steps=10, norm="l2", seed=0, **SETTINGS["l2"]), y)
    margin = robust_acc(sl, x, pgd(sl, x, y, steps=10, norm="l2", seed=0, loss="margin",
                                   **SETTINGS["l2"]), y)
    assert margin < robust_acc(sl, x, x, y) and abs(margin - ce) < 0.15


# ------------------------------------------------------------------------ model-state hygiene

def test_attack_uses_eval_mode_no_param_grads_and_restores(sl, data):
    x, y = data
    model = build_model("alicnn", 10, width=0.25)
    model.load_state_dict(sl.state_dict())
    model.train()
    model[1].classifier.eval()  # a mixed-mode model comes back mixed
    seen = []
    hook = model.register_forward_hook(
        lambda m, i, o: seen.append((m.training, any(p.requires_grad for p in m.parameters()))))
    for kw in (dict(early_stop=False), dict(early_stop=True)):
        pgd(model, x, y, steps=3, norm="linf", seed=0, **SETTINGS["linf"], **kw)
    fgsm(model, x, y, eps=0.01)
    hook.remove()
    assert seen and all(not training and not grads for training, grads in seen)
    assert model.training and not model[1].classifier.training and model[1].features.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())


def test_state_restored_after_error(sl, data):
    x, y = data
    model = build_model("alicnn", 10, width=0.25).train()

    class Boom(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, z):
            raise RuntimeError("boom")

    wrapped = Boom(model).train()
    with pytest.raises(RuntimeError, match="boom"):
        pgd(wrapped, x, y, steps=2, norm="l2", **SETTINGS["l2"])
    assert wrapped.training and model.training and all(p.requires_grad for p in model.parameters())


_HOST_READS = ("item", "tolist", "cpu", "numpy", "nonzero", "__bool__", "__int__", "__float__",
               "__index__")


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_last_iterate_loop_reads_nothing_back(sl, data, norm, monkeypatch):
    """From the first forward on, a last-iterate PGD with gradient tracking never reads a tensor
    back to the host (the Python-visible ways: .item(), bool(), .tolist(), .cpu(), nonzero, ...),
    so on CUDA its step loop queues work without waiting."""
    x, y = data
    from aerl_fast.analysis import GradStatsTracker
    active, reads = [False], []

    class Spy(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, z):
            active[0] = True
            return self.inner(z)

    for name in _HOST_READS:
        original = getattr(torch.Tensor, name)

        def spy(self, *a, _name=name, _original=original, **k):
            if active[0]:
                reads.append(_name)
            return _original(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, spy)
    tracker = GradStatsTracker()
    pgd(Spy(sl), x[:16], y[:16], steps=4, norm=norm, seed=0, tracker=tracker, **SETTINGS[norm])
    active[0] = False
    monkeypatch.undo()
    assert reads == [] and tracker.steps == 4


# -------------------------------------------------------------------------------- object API

def test_object_api_matches_functional(sl, data):
    x, y = data
    a = PGD(sl, eps=4 / 255, alpha=1 / 255, steps=4, seed=2)(x, y)
    b = pgd(sl, x, y, eps=4 / 255, step=1 / 255, steps=4, norm="linf", seed=2)
    assert torch.equal(a, b)
    c = PGDL2(sl, eps=0.5, alpha=0.1, steps=4, seed=2, early_stop=True)(x, y)
    d = pgd(sl, x, y, eps=0.5, step=0.1, steps=4, norm="l2", seed=2, early_stop=True)
    assert torch.equal(c, d)
    assert torch.equal(FGSM(sl, eps=0.02)(x, y), fgsm(sl, x, y, eps=0.02))
    assert "eps=0.5" in repr(PGDL2(sl, eps=0.5))


# ------------------------------------------------------------------------------------- inputs

@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=-0.1, step=0.01), "eps must be"),
    (dict(eps=0.1, step=0.2), "step 0.2 > eps 0.1"),
    (dict(eps=torch.full((4,), 0.1), step=torch.full((4,), 0.5)), "step 0.5 > eps 0.1"),
    (dict(eps=0.1, step=0.01, norm="l1"), "unknown norm 'l1'"),
    (dict(eps=0.1, step=0.01, restarts=0), "restarts"),
    (dict(eps=0.1, step=0.01, loss="hinge"), "unknown attack loss"),
    (dict(eps=torch.full((3,), 0.1), step=0.01), r"\[4\] tensor"),
])
def test_bad_attack_inputs(sl, data, kwargs, match):
    x, y = data
    with pytest.raises(AttackError, match=match):
        pgd(sl, x[:4], y[:4], **kwargs)


def test_bad_batches(sl, data):
    x, y = data
    with pytest.raises(AttackError, match="empty batch"):
        pgd(sl, x[:0], y[:0], eps=0.1, step=0.01)
    with pytest.raises(AttackError, match="fixed batch"):
        from aerl_fast.analysis import GradStatsTracker
        pgd(sl, x[:4], y[:4], eps=0.1, step=0.01, early_stop=True, tracker=GradStatsTracker())
    assert issubclass(AttackError, UserError)


# ------------------------------------------------------------------------------------ transfer

def test_transfer_diagonal_equals_white_box(sl, rl, data):
    x, y = data

    def attack(model, xb, yb):
        return pgd(model, xb, yb, steps=5, norm="l2", seed=0, **SETTINGS["l2"])

    res = transfer_matrix({"sl": sl, "rl": rl}, x, y, attack, batch_size=N)
    assert res.names == ["sl", "rl"] and res.accuracy.shape == (2, 2)
    for i, model in enumerate((sl, rl)):
        white = robust_acc(model, x, attack(model, x, y), y)
        assert res.accuracy[i, i] == pytest.approx(white, abs=1e-12)
        with torch.no_grad():
            assert res.clean[i] == pytest.approx(float((model(x).argmax(1) == y).double().mean()))
    assert (res.accuracy <= res.clean[None, :] + 1e-12).all()


def test_transfer_rejects_class_mismatch(sl, data):
    x, y = data
    other = build_model("alicnn", 5, width=0.25).eval()
    with pytest.raises(TransferError, match="class counts differ"):
        transfer_matrix({"sl": sl, "five": other}, x, y, lambda m, a, b: a)


# ---------------------------------------------------------------------------------- AutoAttack

@pytest.mark.skipif(not autoattack_available(), reason="pyautoattack not installed")
def test_autoattack_custom_apgd_and_log(sl, data, tmp_path):
    x, y = data
    x, y = x[:24], y[:24]
    log = tmp_path / "aa.log"
    res = autoattack(sl, x, y, eps=0.25, norm="l2", version="custom", attacks=["apgd-ce"],
                     apgd_iters=10, batch_size=24, seed=0, log_path=log)
    assert (dist(res.x_adv, x, "l2") <= 0.25 + 1e-4).all()
    assert res.x_adv.min() >= 0 and res.x_adv.max() <= 1
    assert log.read_text() == res.log and "apgd-ce" in res.log.lower()
    assert res.per_attack["apgd-ce"] == pytest.approx(float(res.robust.double().mean()), abs=1e-4)  # log: 0.01%
    with torch.no_grad():
        clean = float((sl(x).argmax(1) == y).double().mean())
    assert float(res.robust.double().mean()) < clean


def test_autoattack_missing_says_how_to_install(monkeypatch, sl, data):
    monkeypatch.setitem(sys.modules, "pyautoattack", None)
    monkeypatch.setitem(sys.modules, "autoattack", None)
    x, y = data
    with pytest.raises(AutoAttackMissing, match=r"pip install 'aerl_fast\[autoattack\]'"):
        autoattack(sl, x[:4], y[:4], eps=0.5, norm="l2")
    assert issubclass(AutoAttackMissing, UserError)


def test_random_start_moves_the_first_iterate_and_the_default_is_ten_steps():
    """A model whose decision never changes: the random start alone separates the two runs, and the
    documented defaults (10 steps, L∞, random start) decide the pass count and the ball."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 3))
    x, y = torch.rand(5, 3, 2, 2), torch.tensor([0, 1, 2, 0, 1])
    with_start = pgd(model, x, y, eps=0.1, step=0.0, steps=1, seed=0, return_result=True)
    without = pgd(model, x, y, eps=0.1, step=0.0, steps=1, random_start=False, return_result=True)
    assert torch.equal(without.x_adv, x)                       # step 0 and no start: the images themselves
    assert not torch.equal(with_start.x_adv, x)
    assert float((with_start.x_adv - x).abs().max()) <= 0.1 + 1e-6
    default = pgd(model, x, y, eps=0.1, step=0.01, return_result=True)
    assert default.grad_evals == 10 * x.shape[0]
    assert float((default.x_adv - x).abs().max()) <= 0.1 + 1e-6 and not torch.equal(default.x_adv, x)
