"""SL / RL / adversarial objectives against float64 references and the study's formulas."""
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from aerl_fast.kernels import pg_loss  # noqa: F401  (module of the reference)
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


def test_exploration_fraction_per_sample_within_bounds():
    """With a policy certain of class 0, a non-zero action can only come from exploration:
    P(a != 0) = ε (C-1)/C exactly."""
    n, c, eps = 20000, 10, 0.3
    logits = torch.zeros(n, c)
    logits[:, 0] = 100.0
    gen = torch.Generator().manual_seed(1)
    a = sample_actions(logits, eps, "sample", 0.0, gen)
    p = eps * (c - 1) / c
    frac = (a != 0).float().mean().item()
    assert abs(frac - p) < 4 * math.sqrt(p * (1 - p) / n)
    # exploration actions are uniform over the other classes
    counts = torch.bincount(a[a != 0], minlength=c)[1:].double()
    chi2 = float(((counts - counts.mean()) ** 2 / counts.mean()).sum())
    assert chi2 < 27.88  # p = 0.001, 8 dof


def test_exploration_per_batch_is_all_or_nothing():
    logits = torch.zeros(256, 10)
    logits[:, 3] = 100.0
    gen = torch.Generator().manual_seed(2)
    explored = []
    for _ in range(400):
        a = sample_actions(logits, 0.25, "batch", 0.0, gen)
        off = (a != 3).float().mean().item()
        assert off < 0.02 or off > 0.7  # either the whole batch explores or none of it
        explored.append(off > 0.7)
    frac = sum(explored) / len(explored)
    assert abs(frac - 0.25) < 4 * math.sqrt(0.25 * 0.75 / 400)


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


@pytest.mark.parametrize("kind", ["sl-adv", "rl-adv"])
def test_adversarial_step_equals_study_formula(kind):
    torch.manual_seed(0)
    model = _Counting().double()
    x = torch.rand(16, 3, 2, 2, dtype=torch.float64)
    y = torch.randint(0, 4, (16,))
    cfg = ObjectiveConfig(kind, explore_eps=0.2, adv_eps=0.05, adv_beta=0.7)
    gen = torch.Generator().manual_seed(5)
    out = train_step(model, x, y, cfg, adv_active=True, generator=gen)
    assert model.forwards == 2  # two forwards (and two backwards), not the study's four
    grads = [p.grad.clone() for p in model.parameters()]

    # the study's formula, computed independently: same random draws, FGSM from ∇x L(x)
    gen = torch.Generator().manual_seed(5)
    xr = x.clone().requires_grad_(True)
    l_clean, _ = objective_loss(cfg, model(xr), y, gen)
    gx, = torch.autograd.grad(l_clean, xr, retain_graph=True)
    x_adv = (x + 0.05 * gx.sign()).clamp(0, 1)
    l_adv, _ = objective_loss(cfg, model(x_adv), y, gen)
    total = l_clean + 0.7 * l_adv
    ref_grads = torch.autograd.grad(total, list(model.parameters()))
    torch.testing.assert_close(out.loss, total.detach())
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b)
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
