"""APGD against its paper's definitions: the checkpoints, the step-size rule (re-derived in float64
from the losses the attack saw), the DLR losses (a float64 formula), ε-ball and [0, 1] at every
iterate, per-sample ε, batch independence, bad input.

Models: the tiny SL/RL AliCNNs of eval_fixtures; images the models were not trained on.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from aerl_fast.attacks import AttackError, apgd, dlr_loss
from aerl_fast.attacks.apgd_attack import checkpoints, halve
from attack_checks import assert_batch_independent, perturbation
from eval_fixtures import cpu_eval_env, held_out, tiny_models, tiny_runs  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("cpu_eval_env")


@pytest.fixture(scope="module")
def sl(tiny_models):  # noqa: F811
    return tiny_models["sl"]


# ------------------------------------------------------------------------------- checkpoints

def test_checkpoints_follow_the_papers_recurrence_at_100_steps():
    p = [0.0, 0.22]
    while True:
        nxt = p[-1] + max(p[-1] - p[-2] - 0.03, 0.06)
        if nxt > 1:
            break
        p.append(nxt)
    assert checkpoints(100) == [math.ceil(round(q * 100, 6)) for q in p[1:]]


@pytest.mark.parametrize("steps", [1, 5, 10, 37, 250, 1000])
def test_checkpoints_match_autoattacks_counter_loop(steps):
    """AutoAttack reviews when a per-window counter reaches k, then shrinks k by max(int(.03N), 1)
    down to max(int(.06N), 1): replayed here iteration by iteration."""
    k, shrink, floor = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    counter, seen = 0, []
    for i in range(steps):
        counter += 1
        if counter == k:
            seen.append(i + 1)
            k, counter = max(k - shrink, floor), 0
    assert checkpoints(steps) == seen


def test_halving_conditions_at_their_boundaries():
    """Condition 1 is strict (fewer than rho * window increases); condition 2 fires on a best loss
    that is merely equal, and only when the last checkpoint did not halve."""
    window = 16  # rho * window = 12 exactly
    n_up = torch.tensor([11., 12., 13., 16., 16., 16., 16.])
    reduced = torch.tensor([False, False, False, False, True, False, False])
    then = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0, 2.0, 1.0])
    now = torch.tensor([5.0, 5.0, 5.0, 2.0, 2.0, 1.5, 2.5])
    expected = [True, False, False, True, False, True, False]
    assert halve(n_up, window, reduced, then, now).tolist() == expected


# ---------------------------------------------------------------------------------- DLR loss

@pytest.mark.parametrize("k", [4, 7, 13])
def test_dlr_matches_float64_formula(k):
    g = torch.Generator().manual_seed(k)
    z = torch.randn(257, k, generator=g) * 3
    y = torch.randint(0, k, (257,), generator=g)
    y[:20] = z[:20].argmax(1)  # the label on top for some rows
    t = (y + 1 + torch.randint(0, k - 1, (257,), generator=g)) % k
    zd = z.double()
    srt = zd.sort(1, descending=True).values
    z_y = zd.gather(1, y[:, None])[:, 0]
    other = torch.stack([torch.cat([zd[i, :y[i]], zd[i, y[i] + 1:]]).max() for i in range(257)])
    ref_u = -(z_y - other) / (srt[:, 0] - srt[:, 2] + 1e-12)
    ref_t = -(z_y - zd.gather(1, t[:, None])[:, 0]) / (srt[:, 0] - 0.5 * (srt[:, 2] + srt[:, 3]) + 1e-12)
    torch.testing.assert_close(dlr_loss(z, y).double(), ref_u, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dlr_loss(z, y, t).double(), ref_t, rtol=1e-5, atol=1e-5)
    # shift- and scale-invariant in the logits
    torch.testing.assert_close(dlr_loss(4 * z + 7, y), dlr_loss(z, y), rtol=1e-4, atol=1e-4)


def test_dlr_needs_enough_classes():
    z, y = torch.randn(5, 3), torch.zeros(5, dtype=torch.long)
    dlr_loss(z, y)                                     # 3 classes: untargeted is defined
    with pytest.raises(AttackError, match="targeted DLR loss needs at least 4 classes"):
        dlr_loss(z, y, torch.ones(5, dtype=torch.long))
    with pytest.raises(AttackError, match="DLR loss needs at least 3 classes .* has 2"):
        dlr_loss(z[:, :2], y)


# -------------------------------------------------------------------------- the iteration

def _trace(model, x, y, **kw):
    rec = {}

    def hook(i, rows, s):
        for r, row in enumerate(rows.tolist()):
            rec.setdefault(row, []).append({k: s[k][r].clone() for k in ("x", "x_best", "l_prev", "l_best", "step")}
                                           | {"i": i})
    res = apgd(model, x, y, hook=hook, **kw)
    return res, rec


@pytest.mark.parametrize("norm, eps", [("linf", 2 / 255), ("l2", 0.15)])
def test_step_size_rule_matches_the_paper(sl, held_out, norm, eps):
    """Re-derive every step size from the losses the attack saw: at checkpoint w_j the step halves
    when fewer than 0.75 of the window's steps increased the loss (against the previous iterate,
    the start for the first), or when it did not halve at w_{j-1} and the best loss has not grown
    since; a halving restarts from the best point."""
    x, y = held_out
    res, rec = _trace(sl, x[:12], y[:12], eps=eps, norm=norm, steps=100, loss="ce")
    full = [row for row, t in rec.items() if len(t) == 101]  # rows never fooled: all 100 iterations
    assert len(full) >= 3, "too few rows ran the whole schedule to check it"
    marks = checkpoints(100)
    for row in full:
        t = rec[row]
        losses = [float(e["l_prev"]) for e in t]   # start, then one per iteration
        step, reduced, best_check, last = 2 * eps, True, float(t[0]["l_best"]), 0
        halvings = 0
        for i in range(100):
            if i + 1 in marks:
                w = i + 1 - last
                ups = sum(losses[j + 1] > losses[j] for j in range(last, i + 1))
                best = float(t[i + 1]["l_best"])
                red = ups < 0.75 * w or (not reduced and best_check >= best)
                if red:
                    step /= 2
                    halvings += 1
                    assert torch.equal(t[i + 1]["x"], t[i + 1]["x_best"]), (row, i)
                reduced, best_check, last = red, best, i + 1
            assert float(t[i + 1]["step"]) == pytest.approx(step, rel=1e-6), (row, i)
        assert halvings >= 1
    assert not res.fooled[[r for r in full]].any()


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_every_iterate_stays_in_ball_and_box_with_per_sample_eps(sl, held_out, norm):
    x, y = held_out
    x, y = x[:10], y[:10]
    eps = torch.linspace(0.5, 2.0, 10) * (4 / 255 if norm == "linf" else 0.3)
    worst = []

    def hook(i, rows, s):
        for key in ("x", "x_best"):
            worst.append(float((perturbation(s[key], x[rows], norm) / eps[rows].double()).max()))
            assert s[key].min() >= 0 and s[key].max() <= 1
    res = apgd(sl, x, y, eps=eps, norm=norm, steps=15, loss="dlr", hook=hook)
    assert max(worst) <= 1 + 1e-5 and len(worst) > 15
    hit = res.fooled & (sl(x).argmax(1) == y)
    assert bool((perturbation(res.x_adv, x, norm)[hit] <= eps.double()[hit] * (1 + 1e-5)).all())
    with torch.no_grad():
        assert bool((sl(res.x_adv[hit]).argmax(1) != y[hit]).all())


def test_targeted_runs_go_through_the_ranked_classes(sl, held_out):
    """APGD-T: run r attacks the r+1-th largest clean logit with the targeted DLR loss."""
    x, y = held_out
    x, y = x[:8], y[:8]
    with torch.no_grad():
        order = sl(x).sort(1, descending=True).indices
    seen = {}

    def hook(i, rows, s):
        if i == -1:
            run = len(seen.setdefault("runs", []))
            seen["runs"].append((rows.clone(), s["target"].clone()))
            assert torch.equal(s["target"], order[rows, run + 1])
    apgd(sl, x, y, eps=0.02, norm="l2", steps=5, loss="dlr", targets=3, hook=hook)
    assert 1 <= len(seen["runs"]) <= 3


def test_results_do_not_depend_on_the_batch(sl, held_out):
    x, y = held_out[0][:24], held_out[1][:24]
    kw = dict(eps=3 / 255, norm="linf", steps=12, loss="ce", seed=5)
    whole = assert_batch_independent(apgd, sl, x, y, 7, **kw)
    other_seed = apgd(sl, x, y, **dict(kw, seed=6))
    assert not torch.equal(other_seed.x_adv, whole.x_adv)  # the seed does reach the draws


def test_apgd_breaks_more_than_pgd_at_the_same_cost(sl, held_out):
    """A sanity bound, not a paper figure: 20 APGD iterations are not weaker than 20 PGD steps of
    ε/4 from a random start (APGD is the stronger attack in its paper on every model)."""
    from aerl_fast.attacks import pgd
    x, y = held_out[0][:64], held_out[1][:64]
    ours = apgd(sl, x, y, eps=0.3, norm="l2", steps=20, loss="ce")
    theirs = pgd(sl, x, y, eps=0.3, step=0.075, steps=20, norm="l2", seed=0, early_stop=True, return_result=True)
    assert int(ours.fooled.sum()) >= int(theirs.fooled.sum())


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=0.0), "eps must be > 0"),
    (dict(eps=torch.tensor([0.1, 0.1, -0.1, 0.1])), "eps must be"),
    (dict(eps=0.1, loss="margin"), "unknown APGD loss"),
    (dict(eps=0.1, steps=0), "steps must be"),
    (dict(eps=0.1, targets=10), "needs at least 11 classes"),
    (dict(eps=0.1, norm="L1"), "unknown norm"),
    (dict(eps=0.1, seed=None), "seed must be an integer"),
    (dict(eps=0.1, budget="cheap"), "unknown budget"),
])
def test_bad_input(sl, held_out, kwargs, match):
    x, y = held_out
    with pytest.raises(AttackError, match=match):
        apgd(sl, x[:4], y[:4], **kwargs)


def test_ce_loss_is_the_per_sample_cross_entropy(sl, held_out):
    x, y = held_out
    seen = {}

    def hook(i, rows, s):
        if i == -1:
            with torch.no_grad():
                seen["ref"] = F.cross_entropy(sl(s["x"]).double(), y[rows].double().long(), reduction="none")
            seen["ours"] = s["l_best"].double()
    apgd(sl, x[:6], y[:6], eps=0.01, norm="l2", steps=1, hook=hook)
    torch.testing.assert_close(seen["ours"], seen["ref"], rtol=1e-4, atol=1e-5)
