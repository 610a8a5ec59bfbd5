"""SL / RL / adversarial objectives against float64 references and the study's formulas."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import stats

from aerl_fast import objectives
from aerl_fast.kernels.pg_loss import pg_loss_given_actions, sample_actions
from aerl_fast.objectives import ObjectiveConfig, fgsm_from_grad, objective_loss, train_step


def _study_pg_loss(logits, labels, actions):
    """The study's formula in float64: p = softmax + 1e-6, renormalised; -mean(r · log(p[a] + 1e-6))."""
    p = torch.softmax(logits.double(), 1) + 1e-6
    p = p / p.sum(1, keepdim=True)
    logp = torch.log(p.gather(1, actions[:, None]).squeeze(1) + 1e-6)
    r = (actions == labels).double()
    return -(r * logp).mean()


@pytest.mark.parametrize("batch, classes", [(1, 2), (7, 10), (33, 100)])
def test_rl_loss_and_gradient_vs_float64(batch, classes):
    g = torch.Generator().manual_seed(batch * classes)
    logits = (3 * torch.randn(batch, classes, generator=g)).requires_grad_(True)
    labels = torch.randint(0, classes, (batch,), generator=g)
    actions = torch.where(torch.rand(batch, generator=g) < 0.5, labels,
                          torch.randint(0, classes, (batch,), generator=g))
    loss, rewards, logp = pg_loss_given_actions(logits, labels, actions)
    loss.backward()
    # float64 reference: loss = -mean(r log softmax[a]);  dL/dz = -(r/B)(onehot(a) - softmax)
    z = logits.detach().double()
    p = torch.softmax(z, 1)
    r = (actions == labels).double()
    ref_loss = -(r * torch.log(p.gather(1, actions[:, None]).squeeze(1))).mean()
    ref_grad = -(r / batch)[:, None] * (F.one_hot(actions, classes).double() - p)
    torch.testing.assert_close(loss.double(), ref_loss, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits.grad.double(), ref_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rewards.double(), r)


def test_prob_floor_equals_study_formula():
    g = torch.Generator().manual_seed(0)
    logits = 5 * torch.randn(64, 10, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 10, (64,), generator=g)
    actions = torch.randint(0, 10, (64,), generator=g)
    actions[:20] = labels[:20]
    loss, _, _ = pg_loss_given_actions(logits, labels, actions, prob_floor=1e-6)
    torch.testing.assert_close(loss.double(), _study_pg_loss(logits, labels, actions), rtol=1e-6, atol=1e-9)


ALPHA = 1e-4  # every statistical test below rejects a correct sampler with probability at most ALPHA


def test_exploration_fraction_per_sample_within_bounds():
    """With a policy certain of class 0, a non-zero action can only come from exploration:
    the count of non-zero actions is Binomial(n, ε (C-1)/C), and given that they are uniform over the
    C - 1 other classes, so their counts' Pearson statistic is χ² with C - 2 = 8 degrees of freedom."""
    n, c, eps = 20000, 10, 0.3
    logits = torch.zeros(n, c)
    logits[:, 0] = 100.0
    gen = torch.Generator().manual_seed(1)
    a = sample_actions(logits, eps, "sample", 0.0, gen)
    p = eps * (c - 1) / c
    lo, hi = stats.binom.ppf(ALPHA / 2, n, p), stats.binom.isf(ALPHA / 2, n, p)
    assert lo <= int((a != 0).sum()) <= hi
    counts = torch.bincount(a[a != 0], minlength=c)[1:].double()
    pearson = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert pearson < stats.chi2.isf(ALPHA, df=c - 2)


def test_exploration_per_batch_is_all_or_nothing():
    """One coin per batch: a batch that does not explore keeps the certain action in every row (the
    policy puts e^-100 on the others); one that explores draws uniformly, so its share of other
    actions is Binomial(256, 0.9) / 256; the number of exploring batches is Binomial(400, 0.25)."""
    logits = torch.zeros(256, 10)
    logits[:, 3] = 100.0
    gen = torch.Generator().manual_seed(2)
    floor = stats.binom.ppf(ALPHA / 400, 256, 0.9)   # per batch: ALPHA over the 400 batches
    explored = 0
    for _ in range(400):
        off = int((sample_actions(logits, 0.25, "batch", 0.0, gen) != 3).sum())
        assert off == 0 or off >= floor
        explored += off > 0
    assert stats.binom.ppf(ALPHA / 2, 400, 0.25) <= explored <= stats.binom.isf(ALPHA / 2, 400, 0.25)


def test_sl_objective_is_cross_entropy():
    logits = torch.randn(9, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (9,))
    loss, reward = objective_loss(ObjectiveConfig("sl"), logits, y)
    assert reward is None
    ref = -torch.log_softmax(logits, 1).gather(1, y[:, None]).mean()
    torch.testing.assert_close(loss.double(), ref)


class _Counting(nn.Module):
    """A tiny deterministic model (no dropout/BN) that counts its forward calls."""

    def __init__(self, classes=4, dim=12):
        super().__init__()
        self.lin = nn.Linear(dim, classes)
        self.forwards = 0

    def forward(self, x):
        self.forwards += 1
        return self.lin(torch.tanh(x.flatten(1)) * 3)


def _log_softmax64(z):
    z = z.double()
    return z - z.max(1, keepdim=True).values - (z - z.max(1, keepdim=True).values).exp().sum(1, keepdim=True).log()


@pytest.mark.parametrize("kind", ["sl-adv", "rl-adv"])
def test_adversarial_step_equals_study_formula(kind, monkeypatch):
    torch.manual_seed(0)
    model = _Counting().double()
    x = torch.rand(16, 3, 2, 2, dtype=torch.float64)
    y = torch.randint(0, 4, (16,))
    cfg = ObjectiveConfig(kind, explore_eps=0.2, adv_eps=0.05, adv_beta=0.7)
    drawn = []  # the actions sampled for the clean and the adversarial batch: the only shared input
    sampler = objectives.eps_greedy_pg_loss
    monkeypatch.setattr(objectives, "eps_greedy_pg_loss",
                        lambda *a, **k: (lambda out: drawn.append(out.actions) or out)(sampler(*a, **k)))
    out = train_step(model, x, y, cfg, adv_active=True, generator=torch.Generator().manual_seed(5))
    assert model.forwards == 2  # two forwards (and two backwards), not the study's four
    grads = [p.grad.clone() for p in model.parameters()]
    assert len(drawn) == (2 if kind == "rl-adv" else 0)

    # the study's formula, written out in float64: loss = −mean(log π(y)) (SL) or −mean(r · log π(a))
    # (RL, no floor), FGSM from ∇x L(x), total = L(x) + β · L(x_adv)
    def loss(logits, k):
        if kind == "sl-adv":
            return -_log_softmax64(logits).gather(1, y[:, None]).mean()
        a = drawn[k]
        return -((a == y).double() * _log_softmax64(logits).gather(1, a[:, None]).squeeze(1)).mean()
    xr = x.clone().requires_grad_(True)
    l_clean = loss(model(xr), 0)
    gx, = torch.autograd.grad(l_clean, xr, retain_graph=True)
    x_adv = (x + 0.05 * gx.sign()).clamp(0, 1)
    l_adv = loss(model(x_adv), 1)
    total = l_clean + 0.7 * l_adv
    ref_grads = torch.autograd.grad(total, list(model.parameters()))
    # cross-entropy runs on fp32 logits (objective_loss casts them): fp32 tolerances
    torch.testing.assert_close(out.loss.double(), total.detach(), rtol=1e-6, atol=1e-7)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert torch.equal(fgsm_from_grad(x, gx, 0.05), x_adv)


def test_adv_inactive_before_start_and_plain_objectives_one_forward():
    model = _Counting().double()
    x = torch.rand(8, 3, 2, 2, dtype=torch.float64)
    y = torch.randint(0, 4, (8,))
    out = train_step(model, x, y, ObjectiveConfig("rl-adv"), adv_active=False, generator=torch.Generator())
    assert model.forwards == 1 and out.loss_adv is None
    out = train_step(model, x, y, ObjectiveConfig("sl"), adv_active=True)
    assert model.forwards == 2 and out.reward is None


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="ppo"), "unknown objective"), (dict(explore_eps=-0.1), "explore_eps"),
    (dict(adv_eps=-1.0), "adv_eps"), (dict(adv_beta=-0.5), "adv_beta"), (dict(explore="row"), "explore")])
def test_bad_objective_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ObjectiveConfig(**kwargs)
