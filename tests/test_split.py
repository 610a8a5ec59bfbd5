"""The stratified split against its closed form, computed independently in exact decimal
arithmetic, on class sizes where the rounding decides; partition and determinism properties."""
from decimal import ROUND_FLOOR, Decimal

import numpy as np
import pytest

from aerl_fast.data.split import stratified_split, val_count
from aerl_fast.errors import ConfigError


def _closed_form(frac: str, n: int) -> int:
    """floor(frac · n + 1/2) in exact decimals, at least 1 when frac > 0 and n > 1."""
    k = int((Decimal(frac) * n + Decimal("0.5")).to_integral_value(rounding=ROUND_FLOOR))
    return 1 if (k == 0 and Decimal(frac) > 0 and n > 1) else k


# halves (where float products fall either side: 0.1·25 = 2.5 exactly, 0.7·45 = 31.4999...), a floor
# that differs from rounding (1.9), tiny classes (the at-least-one rule), and plain cases
SIZES = [1, 2, 3, 5, 9, 11, 15, 19, 25, 35, 45, 50, 55, 65, 75, 90, 100, 1300, 5000]
FRACS = ["0.1", "0.25", "0.3", "0.7", "0.35", "0.29", "0.05", "0.15", "0"]


@pytest.mark.parametrize("frac", FRACS)
def test_val_count_is_the_closed_form(frac):
    for n in SIZES:
        assert val_count(float(frac), n) == _closed_form(frac, n), (frac, n)


def test_closed_form_cases_that_float_rounding_gets_wrong():
    assert round(0.1 * 25) == 2 and val_count(0.1, 25) == 3      # banker's rounding of an exact half
    assert int(0.7 * 45 + 0.5) == 31 and val_count(0.7, 45) == 32  # float product 31.4999...
    assert val_count(0.1, 19) == 2 and val_count(0.1, 14) == 1   # rounds, does not floor or ceil
    assert val_count(0.1, 1) == 0 and val_count(0.1, 2) == 1     # a single sample stays in training


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
