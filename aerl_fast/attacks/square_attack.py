"""Square Attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020): score-based random search,
forward passes only, L-inf and L2.

    res = square(model, x, y, eps=8/255, norm="linf", queries=5000)
    res.fooled, res.x_adv, res.forwards

Each iteration changes one random s x s window of the current best perturbation and keeps the
change when the margin loss z_y - max_{j != y} z_j decreases (AutoAttack's settings: margin loss,
p_init = 0.8, the schedule of `fraction` without rescaling to the query budget):

    L-inf  start: vertical stripes x0 ± ε (one sign per column and channel);
           step:  the window becomes x0 ± ε (one sign per channel);  s = round(sqrt(p·h·w)) >= 1.
    L2     start: a 5 x 5 grid of squares, each ±`eta` per channel, scaled to ‖δ‖ = ε;
           step:  window 1 gets ±`eta` plus its old content (normalised), window 2 is emptied and
           its energy moved into window 1, then δ is rescaled to ε;  s odd and >= 3.

Differences from AutoAttack's implementation, on purpose: every draw (windows, signs, the
orientation of `eta`) is the point's own (counter-based streams keyed by seed, sample id and
iteration, `_rng`), where AutoAttack draws one window for the whole batch; a window's corner is
uniform over all valid positions (AutoAttack never draws the last one); a point leaves the batch
as soon as it is fooled.  Per-point results do not depend on the batch.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional

import torch

from . import _rng
from ._active import Rows, Target, attack_clean_correct
from ._common import AttackError, check_count, margin
from .budget import StallRule, rule_for

STREAM = 3
_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)  # p halves after each (of 10000)


class SquareResult(NamedTuple):
    """x_adv: the fooling point of each fooled sample, the clean image elsewhere; fooled [B] bool;
    forwards [B] int64 (the queries spent on each sample, the first one included)."""
    x_adv: torch.Tensor
    fooled: torch.Tensor
    forwards: torch.Tensor


def fraction(it: int, queries: int, p_init: float = 0.8, rescale: bool = False) -> float:
    """The paper's p (fraction of the image a window covers) at iteration `it`: p_init halved at
    iterations 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000 of a 10000-query budget; `rescale`
    stretches that schedule to `queries` (AutoAttack does not)."""
    if rescale:
        it = int(it / queries * 10000)
    return p_init / 2 ** sum(1 for b in _SCHEDULE if it > b)


def side(p: float, c: int, h: int, w: int, norm: str) -> int:
    """Window side for fraction p of an h x w image: round(sqrt(p * n_features / c))."""
    s = int(round(math.sqrt(p * h * w)))
    if norm == "linf":
        return min(max(s, 1), h, w)
    s = max(s, 3)
    return min(s + 1 if s % 2 == 0 else s, h, w)


def _rectangle(a: int, b: int) -> torch.Tensor:
    """Concentric rectangles: entry (i, j) = sum over n >= d(i, j) of 1/(n+1)^2, d the Chebyshev
    distance to the centre (a//2, b//2), n < max(a//2, b//2) + 1; unit L2 norm."""
    i = torch.arange(a, dtype=torch.float64)[:, None]
    j = torch.arange(b, dtype=torch.float64)[None, :]
    d = torch.maximum((i - a // 2).abs(), (j - b // 2).abs()).long()
    n_max = max(a // 2, b // 2) + 1
    tail = torch.tensor([sum(1.0 / (n + 1) ** 2 for n in range(k, n_max)) for k in range(n_max + 1)],
                        dtype=torch.float64)
    r = tail[d.clamp(max=n_max)]
    return r / r.norm()


@functools.lru_cache(maxsize=None)
def eta(s: int) -> torch.Tensor:
    """The L2 update pattern of side s: +rectangles on the top half, - on the bottom, unit norm
    (fp32, CPU; callers move it)."""
    top = _rectangle(s // 2, s) if s // 2 else torch.zeros(0, s, dtype=torch.float64)
    e = torch.cat([top, -_rectangle(s - s // 2, s)], 0)
    return (e / e.norm()).float()


def _window_masks(v_h, v_w, s, h, w):
    rh = torch.arange(h, device=v_h.device)[None, :]
    rw = torch.arange(w, device=v_w.device)[None, :]
    in_h = (rh >= v_h[:, None]) & (rh < v_h[:, None] + s)
    in_w = (rw >= v_w[:, None]) & (rw < v_w[:, None] + s)
    return in_h[:, None, :, None] & in_w[:, None, None, :]          # [R, 1, h, w]


def _index(v, s):
    """[R, s]: the s positions of each row's window along one axis."""
    return v[:, None] + torch.arange(s, device=v.device)[None, :]


def _take(t, v_h, v_w, s):
    """t[r, :, v_h[r]:v_h[r]+s, v_w[r]:v_w[r]+s] for every row r: [R, c, s, s]."""
    R, c, h, w = t.shape
    ih = _index(v_h, s)[:, None, :, None].expand(R, c, s, w)
    iw = _index(v_w, s)[:, None, None, :].expand(R, c, s, s)
    return t.gather(2, ih).gather(3, iw)


def _put(win, v_h, v_w, h, w):
    """An [R, c, h, w] zero tensor holding `win` [R, c, s, s] at each row's window."""
    R, c, s, _ = win.shape
    iw = _index(v_w, s)[:, None, None, :].expand(R, c, s, s)
    ih = _index(v_h, s)[:, None, :, None].expand(R, c, s, w)
    band = win.new_zeros(R, c, s, w).scatter_(3, iw, win)
    return win.new_zeros(R, c, h, w).scatter_(2, ih, band)


def _oriented(e: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """[R, 1, s, s]: eta or its transpose per row."""
    return torch.where(flip.view(-1, 1, 1, 1), e.t()[None, None], e[None, None])


def _l2_project(x0, delta, eps, box):
    d = delta / (delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-12)
    x = x0 + eps.view(-1, 1, 1, 1) * d
    return x.clamp_(*box) if box is not None else x


def _init(tg: Target, x0, eps, key):
    R, c, h, w = x0.shape
    if tg.norm == "linf":
        sgn = _rng.signs(key, c * w).view(R, c, 1, w)
        x = x0 + eps.view(-1, 1, 1, 1) * sgn
        return x.clamp_(*tg.box) if tg.box is not None else x
    s0 = max(h // 5, 1)
    e = eta(s0).to(x0.device)
    sp = (h - 5 * s0) // 2 if h >= 5 * s0 else 0
    starts_h = [v for v in range(sp, h - s0 + 1, s0)]
    starts_w = [v for v in range(sp, w - s0 + 1, s0)]
    delta = torch.zeros_like(x0)
    draw = 0
    for vh in starts_h:
        for vw in starts_w:
            flip = _rng.uniform(key, 1, draw)[:, 0] < 0.5
            sgn = _rng.signs(key, c, draw + 1).view(R, c, 1, 1)
            delta[:, :, vh:vh + s0, vw:vw + s0] += _oriented(e, flip) * sgn
            draw += c + 1
    return _l2_project(x0, delta, eps, tg.box)


def _candidate(tg: Target, x0, x_best, eps, u, s):
    """Each row's proposal with window side s, from its draws u [R, c + 8] for this iteration
    (0-3: window corners, 4: orientation, 5..: signs per channel)."""
    R, c, h, w = x0.shape
    v_h, v_w = _rng.scale_int(u[:, 0], h - s), _rng.scale_int(u[:, 1], w - s)
    sgn = torch.where(u[:, 5:5 + c] < 0.5, -1.0, 1.0).view(R, c, 1, 1)
    m1 = _window_masks(v_h, v_w, s, h, w)
    if tg.norm == "linf":
        x = torch.where(m1, x0 + eps.view(-1, 1, 1, 1) * sgn, x_best)
        return x.clamp_(*tg.box) if tg.box is not None else x
    v_h2, v_w2 = _rng.scale_int(u[:, 2], h - s), _rng.scale_int(u[:, 3], w - s)
    m2 = _window_masks(v_h2, v_w2, s, h, w)
    delta = x_best - x0
    old = _take(delta, v_h, v_w, s)
    n_old = old.square().sum((-2, -1), keepdim=True).sqrt()
    n_img = delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    n_win = (delta * (m1 | m2)).square().sum((-2, -1), keepdim=True).sqrt()
    new = _oriented(eta(s).to(x0.device), u[:, 4] < 0.5) * sgn + old / (1e-12 + n_old)
    budget = ((eps.view(-1, 1, 1, 1) ** 2 - n_img ** 2).clamp_min(0) / c + n_win ** 2).sqrt()
    new = new / (1e-12 + new.square().sum((-2, -1), keepdim=True).sqrt()) * budget
    delta = torch.where(m1, _put(new, v_h, v_w, h, w), torch.where(m2, torch.zeros_like(delta), delta))
    return _l2_project(x0, delta, eps, tg.box)


_BLOCK = 64  # iterations whose draws are made at once (the same numbers: counters it * (c + 8) + d)


def run_square(tg: Target, idx: torch.Tensor, out: torch.Tensor, fooled: torch.Tensor, *,
               queries: int, p_init: float = 0.8, rescale: bool = False, restart: int = 0,
               rule: Optional[StallRule] = None, hook=None) -> None:
    """One Square run (`queries` iterations after the start) on the samples `idx` of `tg`;
    fills `out`/`fooled`; `rule` ends it early for points off course.  `hook(i, rows,
    state)` sees the state after the start (i = -1) and after every iteration (state["cand"]:
    that iteration's proposals)."""
    if tg.x0.dim() != 4:
        raise AttackError(f"Square attacks [B, C, H, W] images, got shape {tuple(tg.x0.shape)}")
    rows = Rows(tg, idx, out, fooled)
    x0, eps = tg.x0[idx], tg.eps[idx]
    rows["x0"], rows["y"], rows["eps"] = x0, tg.y[idx], eps
    rows["key"] = _rng.keys(tg.seed, tg.ids[idx], STREAM, restart)
    x = _init(tg, x0, eps, _rng.keys(tg.seed, tg.ids[idx], STREAM, restart, 1))
    z = tg.logits(x, rows.idx)
    rows.hit(z, x)
    m = margin(z, rows["y"])
    rows.state.update(x_best=x, m_best=m, m_hist=m[:, None],
                      strikes=torch.zeros(len(rows), dtype=torch.int32, device=m.device))
    reviewed = [0]
    if hook is not None:
        hook(-1, rows.idx, rows.state)
    if not rows.compact(0):
        return
    _, c, h, w = x0.shape
    for i in range(queries):
        s = rows.state
        j = i % _BLOCK
        if j == 0:
            s["u"] = _rng.uniform(s["key"], _BLOCK * (c + 8), offset=i * (c + 8))
        cand = _candidate(tg, s["x0"], s["x_best"], s["eps"], s["u"][:, j * (c + 8):(j + 1) * (c + 8)],
                          side(fraction(i, queries, p_init, rescale), c, h, w, tg.norm))
        z = tg.logits(cand, rows.idx)
        hit = rows.hit(z, cand)
        m = margin(z, s["y"])
        take = (m < s["m_best"]) | hit
        s["x_best"] = torch.where(take.view(-1, 1, 1, 1), cand, s["x_best"])
        s["m_best"] = torch.where(take, m, s["m_best"])
        drop = None
        if rule is not None and (i + 1) % rule.square_every == 0:
            s["m_hist"] = torch.cat([s["m_hist"], s["m_best"][:, None]], 1)
            reviewed.append(i + 1)
            s["strikes"], drop = rule.review(s["m_hist"], reviewed, queries - i - 1, s["strikes"])
        if hook is not None:
            hook(i, rows.idx, dict(s, cand=cand))
        if not rows.compact(i + 1, drop=drop):
            return
    rows.finish()


def square(model, x, y, *, eps, norm: str = "linf", queries: int = 5000, p_init: float = 0.8,
           rescale_schedule: bool = False, seed: int = 0, sample_ids=None, clamp=True,
           budget: str = "full", amp: bool = False, compact_every: Optional[int] = None,
           hook=None) -> SquareResult:
    """Square attack on the clean-correct samples of x ([B, C, H, W] in [0, 1]); eps a float or a
    [B] tensor (> 0).  queries: iterations after the start (AutoAttack: 5000).  seed / sample_ids
    key each sample's draws.  budget "fast" stops points that make no progress
    (`aerl_fast.attacks.budget`).  hook(i, rows, state): see `run_square`."""
    queries = check_count("queries", queries)
    if not 0 < p_init <= 1:
        raise AttackError(f"p_init must be in (0, 1], got {p_init}")
    rule = rule_for(budget)

    def run(tg, idx, out, fooled, clean):
        run_square(tg, idx, out, fooled, queries=queries, p_init=float(p_init), rescale=rescale_schedule,
                   rule=rule, hook=hook)

    tg, out, fooled = attack_clean_correct(model, x, y, run, eps=eps, norm=norm, seed=seed,
                                           sample_ids=sample_ids, clamp=clamp, amp=amp,
                                           compact_every=compact_every)
    return SquareResult(out, fooled, tg.forwards)
