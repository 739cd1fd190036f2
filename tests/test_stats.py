"""converter/stats.py against figures worked out by hand (Wilson 1927; McNemar's exact
test as a binomial tail), and its edges: no sample, no discordant pair, a constant
statistic."""

from __future__ import annotations

import numpy as np
import pytest

from converter.stats import bootstrap, gap_text, mcnemar, paired_difference, pct_ci, wilson


def _right(k: int, n: int) -> np.ndarray:
    return np.r_[np.ones(k, bool), np.zeros(n - k, bool)]


@pytest.mark.parametrize(("k", "n", "low", "high"), [
    (110, 114, 0.913242, 0.986272),  # the 96.5 % on 114 test samples
    (114, 114, 0.967401, 1.0),  # all right (n / (n + z²)): the interval still says how sure
    (0, 10, 0.0, 0.277533),
    (5, 10, 0.236593, 0.763407),
])
def test_wilson_intervals_by_hand(k: int, n: int, low: float, high: float) -> None:
    got = wilson(_right(k, n))
    assert got is not None
    assert (got["value"], got["n"]) == (k / n, n)
    assert (got["low"], got["high"]) == pytest.approx((low, high), abs=1e-6)


def test_wilson_of_no_sample_is_none() -> None:
    assert wilson(np.zeros(0, bool)) is None
    assert pct_ci(None) == "n/a"


@pytest.mark.parametrize(("a_only", "b_only", "p"), [
    (10, 2, 2 * (1 + 12 + 66) / 4096),  # 0.0386: significant
    (4, 0, 2 / 16),  # the 4 samples of 114: 0.125, within noise
    (3, 3, 1.0),
    (0, 0, 1.0),  # no discordant pair: nothing tells the two apart
    (0, 7, 2 / 128),
])
def test_mcnemar_exact_by_hand(a_only: int, b_only: int, p: float) -> None:
    both = 50  # samples both get right (or wrong) do not enter the test
    a = np.r_[np.ones(a_only, bool), np.zeros(b_only, bool), np.ones(both, bool)]
    b = np.r_[np.zeros(a_only, bool), np.ones(b_only, bool), np.ones(both, bool)]
    got = mcnemar(a, b)
    assert (got["a_only"], got["b_only"]) == (a_only, b_only)
    assert got["p_value"] == pytest.approx(p, rel=1e-12)
    assert got["significant"] is (p < 0.05)
    assert f"McNemar p = {p:.3g}" in gap_text(got)


def test_bootstrap_is_repeatable_and_honest_at_its_edges() -> None:
    x = np.random.default_rng(3).normal(size=400)
    one = bootstrap(lambda i: float(x[i].mean()), len(x))
    assert one is not None and one == bootstrap(lambda i: float(x[i].mean()), len(x))
    se = x.std() / np.sqrt(len(x))  # the normal interval of a mean, for scale
    assert one[0] == pytest.approx(x.mean() - 1.96 * se, abs=0.3 * se)
    assert one[1] == pytest.approx(x.mean() + 1.96 * se, abs=0.3 * se)
    assert bootstrap(lambda i: 1.0, 1) is None  # one sample: no interval
    assert bootstrap(lambda i: None, 20) is None  # undefined on every resample
    shifted = paired_difference(lambda i: float(x[i].mean() + 1 - x[i].mean()), len(x),
                                "shift")
    assert shifted is not None and shifted["significant"]
    same = paired_difference(lambda i: float(x[i].mean()), len(x), "mean")
    assert same is not None and not same["significant"]
    assert gap_text(same).startswith("mean: paired bootstrap 95 % interval [")
