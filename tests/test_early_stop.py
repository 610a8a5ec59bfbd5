"""Early stopping, untargeted and targeted, through every public entry point, against a float64
reference: on a linear model the PGD trajectory of each sample is known in closed form (gradient
Wᵀ(softmax − e_y)), so which iterate first fools the model, that iterate itself, and the passes
spent until the sample leaves the batch are all computed independently of aerl_fast.

Targeted success is reaching the target (pgd, PGD objects); APGD-T and autoattack_fast's APGD-T
stage aim at a target but succeed on any wrong class (AutoAttack's definition), checked on a
model whose path to the target crosses a third class first."""
import pytest
import torch
import torch.nn as nn

from aerl_fast.attacks import PGD, PGDL2, apgd, autoattack_fast, pgd

STEPS = 6
# a problem per setting whose samples cover every case: broken at the start (untargeted only),
# in between (also off the compaction grid of compact_every=3), at the last iterate, never
SEEDS = {("l2", False): 83, ("l2", True): 228, ("linf", False): 174, ("linf", True): 111}


def problem(seed, norm):
    """A linear 4-class model on 6 pixels, 24 images (two of them misclassified), per-sample radii."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(4, 6, generator=g) * 2
    b = torch.randn(4, generator=g) * 0.5
    x = 0.2 + 0.6 * torch.rand(24, 1, 2, 3, generator=g)
    y = (x.flatten(1) @ w.t() + b).argmax(1)
    y[:2] = (y[:2] + 1) % 4
    eps = 0.05 + 0.6 * torch.rand(24, generator=g)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 4))
    with torch.no_grad():
        model[1].weight.copy_(w)
        model[1].bias.copy_(b)
    return model.eval(), w, b, x, y, eps if norm == "l2" else eps / 3


def reference(w, b, x0, y, eps, step, norm, targeted):
    """Per sample in float64: the iterate returned (first fooling one, else the last), whether any
    iterate fooled, the index of the first fooling iterate (STEPS: only the last, or none), and the
    smallest |margin| met (how far every decision is from a tie)."""
    w, b = w.double(), b.double()
    out, fooled, first, near = [], [], [], float("inf")
    for i in range(x0.shape[0]):
        c = x0[i].flatten().double()
        x, e, s, k = c.clone(), float(eps[i]), float(step[i]), int(y[i])
        hit = None
        for t in range(STEPS + 1):
            z = w @ x + b
            margin = float(z[k] - torch.cat([z[:k], z[k + 1:]]).max())   # > 0: class k wins
            near = min(near, abs(margin))
            if (margin > 0) if targeted else (margin < 0):
                hit = t
                break
            if t == STEPS:
                break
            g = w.t() @ (torch.softmax(z, 0) - torch.eye(4, dtype=torch.float64)[k])
            g = -g if targeted else g
            d = x - c + s * (torch.sign(g) if norm == "linf" else g / g.norm())
            d = d.clamp(-e, e) if norm == "linf" else d * min(1.0, e / float(d.norm()))
            x = (c + d).clamp(0, 1)
        out.append(x)
        fooled.append(hit is not None)
        first.append(STEPS if hit is None else hit)
    return torch.stack(out).float().view(x0.shape), torch.tensor(fooled), torch.tensor(first), near


def passes(fooled, first, compact_every):
    """(gradient evaluations, forwards): a sample first fooled at iterate t < STEPS leaves at the first
    compaction step t' >= t (t' divisible by compact_every), after t' + 1 gradients; one that stays
    to the end spends STEPS gradients and one more forward (the last iterate's check)."""
    grads = forwards = 0
    for f, t in zip(fooled.tolist(), first.tolist()):
        leave = -(-t // compact_every) * compact_every
        if f and t < STEPS and leave < STEPS:
            grads, forwards = grads + leave + 1, forwards + leave + 1
        else:
            grads, forwards = grads + STEPS, forwards + STEPS + 1
    return grads, forwards


@pytest.mark.parametrize("compact_every", [1, 2, 3])
@pytest.mark.parametrize("norm, targeted", list(SEEDS))
def test_pgd_keeps_the_first_fooling_iterate_and_pays_until_it_leaves(norm, targeted, compact_every):
    model, w, b, x, y, eps = problem(SEEDS[norm, targeted], norm)
    goal = (y + 1) % 4 if targeted else y
    ref_x, ref_fooled, first, near = reference(w, b, x, goal, eps, eps / 3, norm, targeted)
    assert near > 1e-3                                           # no decision is a float32 tie
    last = ref_fooled & (first == STEPS)
    assert bool(last.any()) and bool((~ref_fooled).any())       # fooled only at the last iterate; never
    assert bool(((first % 3 != 0) & ref_fooled & (first < STEPS)).any())
    assert bool((first[ref_fooled & (first < STEPS)] > 0).any())
    res = pgd(model, x, goal, eps=eps, step=eps / 3, steps=STEPS, norm=norm, random_start=False,
              early_stop=True, targeted=targeted, compact_every=compact_every, return_result=True)
    assert torch.equal(res.fooled, ref_fooled)
    torch.testing.assert_close(res.x_adv, ref_x, atol=1e-5, rtol=0)
    assert (res.grad_evals, res.forwards) == passes(ref_fooled, first, compact_every)
    if not targeted:
        assert bool((first[:2] == 0).all()) and torch.equal(res.x_adv[:2], x[:2])   # misclassified: the image itself
    with torch.no_grad():
        pred = model(res.x_adv).argmax(1)
    assert torch.equal((pred == goal) if targeted else (pred != y), ref_fooled)


@pytest.mark.parametrize("norm, targeted", list(SEEDS))
def test_last_iterate_mode_returns_the_last_iterate(norm, targeted):
    """early_stop=False: every sample runs every step; fooled is judged on the returned image."""
    model, w, b, x, y, eps = problem(SEEDS[norm, targeted], norm)
    goal = (y + 1) % 4 if targeted else y
    res = pgd(model, x, goal, eps=eps, step=eps / 3, steps=STEPS, norm=norm, random_start=False,
              targeted=targeted, return_result=True)
    with torch.no_grad():
        pred = model(res.x_adv).argmax(1)
    assert torch.equal(res.fooled, (pred == goal) if targeted else (pred != y))
    assert res.grad_evals == STEPS * x.shape[0]
    ref_x, ref_fooled, _, _ = reference(w, b, x, goal, eps, eps / 3, norm, targeted)
    never = ~ref_fooled                                           # never fooled: the same last iterate
    torch.testing.assert_close(res.x_adv[never], ref_x[never], atol=1e-5, rtol=0)


@pytest.mark.parametrize("norm, targeted", list(SEEDS))
def test_pgd_objects_stop_early_as_the_function_does(norm, targeted):
    model, w, b, x, y, eps = problem(SEEDS[norm, targeted], norm)
    goal = (y + 1) % 4 if targeted else y
    ref_x = reference(w, b, x, goal, eps, eps / 3, norm, targeted)[0]
    cls = PGDL2 if norm == "l2" else PGD
    atk = cls(model, eps=eps, alpha=eps / 3, steps=STEPS, random_start=False, early_stop=True, targeted=targeted)
    torch.testing.assert_close(atk(x, goal), ref_x, atol=1e-5, rtol=0)


class Detour(nn.Module):
    """Four classes on one feature s = Σx − 1 (0 at the grey image 0.25): z = (0, −1 + s/2, −3 + 2s, −10).
    The label (class 0) wins for s < 1.5, class 2 beyond; class 1 ranks second at the start (APGD-T's
    first target) and never wins: a targeted ascent towards it crosses class 2 first."""

    def __init__(self):
        super().__init__()
        self.slope = nn.Parameter(torch.tensor([0.0, 0.5, 2.0, 0.0]))
        self.offset = nn.Parameter(torch.tensor([0.0, -1.0, -3.0, -10.0]))

    def forward(self, x):
        s = x.flatten(1).sum(1, keepdim=True) - 1
        return s * self.slope + self.offset


def detour_images():
    """Row 0 starts at s = 0 (class 2 is 0.75 away in L2, 0.375 per pixel in L-inf); row 1 at s = −0.8
    (1.15 and 0.575 away: out of reach of ε = 1 / 0.5)."""
    x = torch.full((2, 1, 2, 2), 0.25)
    x[1] = 0.05
    return x, torch.zeros(2, dtype=torch.long)


EPS = {"l2": 1.0, "linf": 0.5}


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_targeted_pgd_succeeds_only_on_the_target(norm):
    model, (x, _) = Detour().eval(), detour_images()
    target = torch.ones(2, dtype=torch.long)
    res = pgd(model, x, target, eps=EPS[norm], step=EPS[norm] / 4, steps=10, norm=norm, random_start=False,
              early_stop=True, targeted=True, return_result=True)
    assert res.fooled.tolist() == [False, False]
    assert res.grad_evals == 20


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_apgd_t_and_its_autoattack_stage_stop_on_any_wrong_class(norm):
    model, (x, y) = Detour().eval(), detour_images()
    res = apgd(model, x, y, eps=EPS[norm], norm=norm, steps=20, loss="dlr", targets=1, seed=0)
    assert res.fooled.tolist() == [True, False]
    with torch.no_grad():
        assert model(res.x_adv).argmax(1).tolist() == [2, 0]      # broken into class 2, not the target
    assert torch.equal(res.x_adv[1], x[1])
    aa = autoattack_fast(model, x, y, eps=EPS[norm], norm=norm, stages=("apgd-t",), targets=1, steps=20,
                         budget="full")
    assert aa.robust.tolist() == [False, True] and aa.broken_by.tolist() == [0, -1]
    with torch.no_grad():
        assert model(aa.x_adv).argmax(1).tolist() == [2, 0]


class Window(nn.Module):
    """Two classes; class 1 (wrong for label 0) while pixel 0 lies in (0.32, 0.36), through a step
    function with no gradient, or above 0.5. The CE gradient always pushes pixel 0 up, so an L∞ PGD
    from 0.20 with steps of 0.07 crosses the window (0.34 at iterate 2) and leaves it again."""

    def forward(self, x):
        p = x.flatten(1)[:, 0]
        window = ((p > 0.32) & (p < 0.36)).float().detach()
        return torch.stack([torch.full_like(p, 0.5), p + 10 * window], 1)


@pytest.mark.parametrize("compact_every, grads", [(1, 3), (2, 3), (3, 4)])
def test_a_sample_fooled_between_compactions_keeps_its_fooling_iterate_and_leaves(compact_every, grads):
    """Sample 0 is fooled only at iterate 2 and must leave, fooled, with that iterate at the next
    compaction; sample 1 (from 0.0) is never fooled and runs all 4 steps to 0.28."""
    x = torch.zeros(2, 1, 1, 2)
    x[0, 0, 0, 0] = 0.20
    y = torch.zeros(2, dtype=torch.long)
    res = pgd(Window(), x, y, eps=0.5, step=0.07, steps=4, norm="linf", random_start=False, clamp=True,
              early_stop=True, compact_every=compact_every, return_result=True)
    assert res.fooled.tolist() == [True, False]
    torch.testing.assert_close(res.x_adv[:, 0, 0, 0], torch.tensor([0.34, 0.28]), atol=1e-6, rtol=0)
    assert torch.equal(res.x_adv[:, 0, 0, 1], x[:, 0, 0, 1])
    assert res.grad_evals == grads + 4    # sample 0 leaves after `grads` gradients, sample 1 spends all 4
    assert res.forwards == grads + 5      # and sample 1 one forward more: the last iterate's check
