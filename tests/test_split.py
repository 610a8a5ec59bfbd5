"""The stratified split against its closed form, rounded independently in exact decimal arithmetic
(half to even on the float product's exact value), on class sizes where the rounding decides;
partition and determinism properties."""
from decimal import ROUND_HALF_EVEN, Decimal

import numpy as np
import pytest

from aerl_fast.data.split import stratified_split, val_count
from aerl_fast.errors import ConfigError


def _closed_form(frac: str, n: int) -> int:
    """The float product val_frac · n (one IEEE multiplication), its exact value rounded half to even
    in decimal arithmetic; at least 1 when frac > 0 and n > 1."""
    product = Decimal(np.float64(float(frac)) * np.float64(n))  # exact value of the double
    k = int(product.quantize(Decimal(1), rounding=ROUND_HALF_EVEN))
    return 1 if (k == 0 and Decimal(frac) > 0 and n > 1) else k


# halves (exact ones round to even: 0.1·25 = 2.5, 0.1·45 = 4.5; inexact ones go by their float
# value: 0.1·35 = 3.5000000000000004, 0.7·45 = 31.499999999999996), a floor that differs from
# rounding (1.9), tiny classes (the at-least-one rule), and plain cases
SIZES = [1, 2, 3, 5, 9, 11, 15, 19, 25, 35, 45, 50, 55, 65, 75, 90, 100, 1300, 5000]
FRACS = ["0.1", "0.25", "0.3", "0.7", "0.35", "0.29", "0.05", "0.15", "0"]


@pytest.mark.parametrize("frac", FRACS)
def test_val_count_is_the_closed_form(frac):
    for n in SIZES:
        assert val_count(float(frac), n) == _closed_form(frac, n), (frac, n)


def test_the_cases_where_the_rounding_rule_decides():
    assert val_count(0.1, 25) == 2 and val_count(0.1, 45) == 4 and val_count(0.1, 55) == 6  # halves to even
    assert val_count(0.1, 15) == 2 and val_count(0.1, 35) == 4     # products a hair above the half
    assert val_count(0.7, 45) == 31 and val_count(0.29, 50) == 14  # products a hair below the half
    assert val_count(0.1, 19) == 2 and val_count(0.1, 14) == 1     # rounds, does not floor or ceil
    assert val_count(0.1, 1) == 0 and val_count(0.1, 2) == 1 and val_count(0.1, 5) == 1  # at least one
    assert val_count(0.0, 50) == 0


@pytest.mark.parametrize("frac", ["0.1", "0.25", "0.7"])
def test_split_partitions_each_class_by_the_closed_form(frac):
    rng = np.random.default_rng(5)
    sizes = rng.permutation(SIZES[:14])
    labels = rng.permutation(np.repeat(np.arange(len(sizes)) * 3 + 7, sizes))  # sparse, shuffled labels
    train, val = stratified_split(labels, float(frac), seed=11)
    assert train.dtype == val.dtype == np.int64  # usable as indices
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)  # sorted, no index twice
    assert len(np.intersect1d(train, val)) == 0
    np.testing.assert_array_equal(np.union1d(train, val), np.arange(len(labels)))
    for cls, n in zip(np.arange(len(sizes)) * 3 + 7, sizes):
        assert (labels[val] == cls).sum() == _closed_form(frac, n), (cls, n)


def test_the_defaults_are_the_studys_90_10_split_with_seed_42():
    labels = np.repeat(np.arange(4), [30, 21, 17, 40])
    for got, want in zip(stratified_split(labels), stratified_split(labels, 0.1, 42)):
        np.testing.assert_array_equal(got, want)


def test_split_is_deterministic_per_seed_and_differs_between_seeds():
    labels = np.repeat(["cat", "dog", "emu"], [40, 33, 27])  # any label type
    a = stratified_split(labels, 0.1, seed=42)
    b = stratified_split(labels, 0.1, seed=42)
    c = stratified_split(labels, 0.1, seed=43)
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    assert [int((labels[a[1]] == k).sum()) for k in ("cat", "dog", "emu")] == [4, 3, 3]


def test_every_sample_is_equally_likely_to_be_held_out():
    """Over 3000 seeds, how often each of 10 samples of one class (1 held out per split) lands in
    validation is multinomial(3000, 1/10 each): Pearson's statistic is chi-square with 9 degrees of
    freedom; its 0.999 quantile is the threshold (a false alarm once in 1000 runs)."""
    from scipy.stats import chi2
    counts = np.zeros(10)
    for seed in range(3000):
        _, val = stratified_split(np.zeros(10, int), 0.1, seed)
        counts[val] += 1
    expected = 3000 / 10
    assert ((counts - expected) ** 2 / expected).sum() < chi2.ppf(0.999, df=9)


def test_edge_inputs():
    train, val = stratified_split(np.zeros(0, int), 0.1, 42)
    assert train.size == 0 and val.size == 0
    train, val = stratified_split(np.arange(5), 0.0, 42)
    np.testing.assert_array_equal(train, np.arange(5))
    assert val.size == 0
    for bad in (1.0, -0.1, float("nan"), 1.5):
        with pytest.raises(ConfigError, match="val_frac must be in"):
            stratified_split(np.arange(5), bad, 42)
