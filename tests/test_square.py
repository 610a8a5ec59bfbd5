"""Square attack against its paper's definitions: the p schedule and window sides, the L2 pattern
(against pyautoattack's own `eta_rectangles`), one window changed per iteration and at ±ε (L-inf),
ε-ball and [0, 1] at every proposal, a best margin that never grows, batch independence, bad input.
"""
import pytest
import torch

from aerl_fast.attacks import AttackError, margin, square
from aerl_fast.attacks.square_attack import eta, fraction, side
from attack_checks import assert_batch_independent, perturbation
from eval_fixtures import cpu_eval_env, held_out, tiny_models, tiny_runs  # noqa: F401 - fixtures

pytestmark = pytest.mark.usefixtures("cpu_eval_env")


@pytest.fixture(scope="module")
def rl(tiny_models):  # noqa: F811
    return tiny_models["rl"]


def test_p_schedule_is_the_papers():
    """p_init halves after iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 (of 10000)."""
    table = {0: 1, 10: 1, 11: 2, 50: 2, 51: 4, 200: 4, 201: 8, 500: 8, 501: 16, 1000: 16, 1001: 32,
             2000: 32, 2001: 64, 4000: 64, 4001: 128, 4999: 128}
    for it, div in table.items():
        assert fraction(it, 5000) == pytest.approx(0.8 / div), it
    assert fraction(9999, 10000) == pytest.approx(0.8 / 512)
    # rescaled to a 1000-query budget: iteration 101 is the paper's 1010
    assert fraction(101, 1000, rescale=True) == pytest.approx(0.8 / 32)
    assert fraction(100, 1000, rescale=True) == pytest.approx(0.8 / 16)


@pytest.mark.parametrize("p, h, norm, expected", [
    (0.8, 32, "linf", 29), (0.05, 32, "linf", 7), (0.8 / 512, 32, "linf", 1),
    (0.8, 32, "l2", 29), (0.05, 32, "l2", 7), (0.8 / 64, 32, "l2", 5), (0.8 / 512, 32, "l2", 3),  # sqrt(12.8) = 3.6 -> 4 -> 5
    (0.1, 32, "l2", 11),  # round(sqrt(102.4)) = 10, even: 11
    (0.8, 7, "l2", 7), (0.8, 5, "linf", 4),
])
def test_window_side(p, h, norm, expected):
    assert side(p, 3, h, h, norm) == expected


@pytest.mark.parametrize("s", [3, 4, 5, 7, 11, 29])
def test_eta_matches_pyautoattack_rectangles(s):
    pa = pytest.importorskip("pyautoattack.square")
    ref_attack = pa.SquareAttack(lambda t: t, norm="L2", eps=1.0, device="cpu")
    top = ref_attack.eta_rectangles(s // 2, s)
    bottom = -ref_attack.eta_rectangles(s - s // 2, s)
    ref = torch.cat([top, bottom], 0)
    ref = ref / ref.norm()
    torch.testing.assert_close(eta(s), ref.float(), atol=1e-6, rtol=0)
    assert eta(s).norm() == pytest.approx(1.0, abs=1e-6)
    assert (eta(s)[: s // 2] > 0).all() and (eta(s)[s // 2:] < 0).all()


def _record(model, x, y, **kw):
    rec = []

    def hook(i, rows, s):
        rec.append((i, rows.clone(), {k: v.clone() for k, v in s.items() if isinstance(v, torch.Tensor)}))
    res = square(model, x, y, hook=hook, **kw)
    return res, rec


def test_linf_changes_one_window_to_plus_minus_eps(rl, held_out):
    x, y = held_out
    eps = 6 / 255
    res, rec = _record(rl, x[:16], y[:16], eps=eps, norm="linf", queries=60)
    prev_best = {}
    for i, rows, s in rec:
        if i >= 0:
            p = fraction(i, 60)
            sd = side(p, 3, 32, 32, "linf")
            for r, row in enumerate(rows.tolist()):
                changed = (s["cand"][r] != prev_best[row]).any(0)          # [h, w]
                if changed.any():
                    hs, ws = changed.any(1).nonzero(), changed.any(0).nonzero()
                    assert int(hs.max() - hs.min()) < sd and int(ws.max() - ws.min()) < sd, (i, row)
                # every coordinate sits at x0 ± ε (stripes, then windows), unless the box cut it
                delta = (s["cand"][r] - x[row]).abs()
                at_box = (s["cand"][r] == 0) | (s["cand"][r] == 1)
                assert bool((((delta - eps).abs() < 1e-6) | at_box).all()), (i, row)
        for r, row in enumerate(rows.tolist()):
            prev_best[row] = s["x_best"][r]


@pytest.mark.parametrize("norm, eps", [("linf", 4 / 255), ("l2", 0.3)])
def test_ball_box_and_monotone_margin(rl, held_out, norm, eps):
    x, y = held_out
    x, y = x[:12], y[:12]
    eps_t = torch.linspace(0.5, 1.5, 12) * eps
    last = {}
    res, rec = _record(rl, x, y, eps=eps_t, norm=norm, queries=80)
    for i, rows, s in rec:
        for key in ("x_best",) + (("cand",) if i >= 0 else ()):
            d = perturbation(s[key], x[rows], norm)
            assert bool((d <= eps_t[rows].double() * (1 + 1e-5) + 1e-7).all()), (i, key)
            assert s[key].min() >= 0 and s[key].max() <= 1
        with torch.no_grad():
            torch.testing.assert_close(margin(rl(s["x_best"]), y[rows]), s["m_best"], atol=1e-4, rtol=1e-4)
        for r, row in enumerate(rows.tolist()):
            assert float(s["m_best"][r]) <= last.get(row, float("inf"))
            last[row] = float(s["m_best"][r])
    hit = res.fooled & (rl(x).argmax(1) == y)
    with torch.no_grad():
        assert bool((rl(res.x_adv[hit]).argmax(1) != y[hit]).all())
    if norm == "l2":  # the L2 start spends the whole radius (before the box clips it)
        assert (rec[0][2]["x_best"] - x[rec[0][1]]).flatten(1).norm(dim=1).max() > 0.9 * eps_t.min()


@pytest.mark.parametrize("norm, eps", [("linf", 5 / 255), ("l2", 0.4)])
def test_results_do_not_depend_on_the_batch(rl, held_out, norm, eps):
    x, y = held_out
    x, y = x[:20], y[:20]
    whole = assert_batch_independent(square, rl, x, y, 6, eps=eps, norm=norm, queries=40, seed=3)
    assert whole.fooled.any() and not whole.fooled.all()


def test_square_breaks_points_and_counts_queries(rl, held_out):
    x, y = held_out[0][:48], held_out[1][:48]
    res = square(rl, x, y, eps=8 / 255, norm="linf", queries=100)
    with torch.no_grad():
        clean = rl(x).argmax(1) == y
    assert int((res.fooled & clean).sum()) >= 1
    # clean pass + start + at most `queries` proposals, fewer for points that broke early
    assert int(res.forwards.max()) == 102
    assert bool((res.forwards[~clean] == 1).all())
    assert bool((res.forwards[res.fooled & clean] < 102).any())


@pytest.mark.parametrize("kwargs, match", [
    (dict(eps=0.1, queries=0), "queries must be"),
    (dict(eps=0.1, queries=2.5), "queries must be"),
    (dict(eps=-0.1), "eps must be"),
    (dict(eps=0.1, p_init=0.0), "p_init"),
    (dict(eps=0.1, norm="l1"), "unknown norm"),
])
def test_bad_input(rl, held_out, kwargs, match):
    x, y = held_out
    with pytest.raises(AttackError, match=match):
        square(rl, x[:4], y[:4], **kwargs)


def test_square_wants_images(rl):
    flat = torch.rand(4, 3 * 32 * 32)

    class Flat(torch.nn.Module):
        def forward(self, t):
            return rl(t.view(-1, 3, 32, 32))
    with pytest.raises(AttackError, match=r"\[B, C, H, W\]"):
        square(Flat(), flat, torch.zeros(4, dtype=torch.long), eps=0.1, queries=1)
