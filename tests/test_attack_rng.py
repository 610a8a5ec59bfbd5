"""The attacks' counter-based random streams: the int64 tensor mixer equals the exact 64-bit one
on Python integers, draws depend only on (key, counter), and their distributions are right
(thresholds: 5 standard errors of the statistic under the null, so a correct generator fails one
check in ~3.5 million)."""
import math

import pytest
import torch

from aerl_fast.attacks import _rng


def test_tensor_mixer_equals_the_exact_64_bit_one():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 2 ** 62, (500,), generator=g)
    ids[:3] = torch.tensor([0, 1, 2 ** 62 - 1])
    for seed, stream in ((0, ()), (12345, (3, 7)), (2 ** 40 + 11, (1, 0, 99))):
        k = _rng.keys(seed, ids, *stream)
        got = [(v & ((1 << 64) - 1)) >> 1 for v in k.tolist()]
        want = [_rng.mix(seed, i, *stream) for i in ids.tolist()]
        assert got == want


def test_draws_depend_only_on_key_and_counter():
    ids = torch.arange(10)
    k = _rng.keys(7, ids, 3)
    a = _rng.uniform(k, 16, offset=5)
    b = _rng.uniform(k[[9, 2]], 16, offset=5)        # other rows, other batch
    assert torch.equal(b, a[[9, 2]])
    c = _rng.uniform(k, 8, offset=13)                 # counters 13..20 = columns 8..15
    assert torch.equal(c, a[:, 8:])
    assert not torch.equal(_rng.uniform(_rng.keys(8, ids, 3), 16, 5), a)   # the seed matters
    assert not torch.equal(_rng.uniform(_rng.keys(7, ids, 4), 16, 5), a)   # the stream matters


def test_uniform_and_normal_moments():
    n = 200_000
    k = _rng.keys(1, torch.arange(4), 2)
    u = _rng.uniform(k, n // 4).flatten().double()
    assert 0 <= float(u.min()) and float(u.max()) < 1
    assert abs(float(u.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / n)
    assert abs(float(u.var()) - 1 / 12) < 5 * math.sqrt(1 / 180 / n)      # var of (u - 1/2)^2 = 1/180
    z = _rng.normal(k, n // 4).flatten().double()
    assert abs(float(z.mean())) < 5 * math.sqrt(1 / n)
    assert abs(float(z.var()) - 1) < 5 * math.sqrt(2 / n)
    # neighbouring counters are uncorrelated
    a, b = u[:-1] - 0.5, u[1:] - 0.5
    assert abs(float((a * b).mean()) / (1 / 12)) < 5 / math.sqrt(n)


@pytest.mark.parametrize("high", [0, 1, 6, 31])
def test_integers_cover_the_inclusive_range_evenly(high):
    k = _rng.keys(3, torch.arange(20_000))
    v = _rng.integers(k, high, counter=9)
    assert int(v.min()) == 0 and int(v.max()) == high
    counts = torch.bincount(v, minlength=high + 1).double()
    p = 1 / (high + 1)
    sd = math.sqrt(20_000 * p * (1 - p)) if high else 1.0
    assert float((counts - 20_000 * p).abs().max()) <= 5 * sd


def test_signs_are_fair():
    s = _rng.signs(_rng.keys(5, torch.arange(50)), 2000).flatten()
    assert set(s.unique().tolist()) == {-1.0, 1.0}
    assert abs(float(s.double().mean())) < 5 / math.sqrt(s.numel())
