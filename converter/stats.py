"""Figures with their uncertainty: how far a test split's figure can be trusted.

- An accuracy (a share of samples right) gets its 95 % Wilson score interval, which stays
  inside [0, 1] and is honest at small n and near 100 % where the normal approximation is
  not (scipy's `binomtest(...).proportion_ci(method="wilson")`).
- An error metric (NRMSE, MAE, RMSE, R², anomaly AUC) gets a 95 % percentile bootstrap
  interval: the samples resampled with replacement `RESAMPLES` times with a fixed seed
  (scipy's `stats.bootstrap`), so the same run gives the same interval.
- A gap between two models on the same samples (student against teacher, int8 against
  fp32) is judged on the paired predictions: McNemar's exact test for classifiers (a
  binomial test on the samples exactly one of the two gets right; the samples both get
  right or wrong say nothing about the gap), a paired bootstrap interval of the
  difference for error metrics. A gap is significant when p < 0.05 (or the interval
  leaves out 0).

The gates decide on point estimates against their tolerances; these figures say whether a
gap the report shows is larger than what the split's size can tell from noise.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

LEVEL = 0.95
RESAMPLES = 1000
SEED = 0


def wilson(correct: np.ndarray) -> dict[str, float] | None:
    """The share of True in `correct` with its 95 % Wilson interval (None for no sample)."""
    from scipy.stats import binomtest  # noqa: PLC0415  # heavy: loaded only when used

    n, k = len(correct), int(np.count_nonzero(correct))
    if n == 0:
        return None
    ci = binomtest(k, n).proportion_ci(confidence_level=LEVEL, method="wilson")
    return {"value": k / n, "low": float(ci.low), "high": float(ci.high), "n": n}


def bootstrap(stat: Callable[[np.ndarray], float | None], n: int
              ) -> tuple[float, float] | None:
    """The 95 % percentile bootstrap interval of `stat(indices)` over `n` samples (None
    when it cannot be computed: too few samples, or the statistic undefined on them)."""
    from scipy.stats import bootstrap as scipy_bootstrap  # noqa: PLC0415  # heavy

    if n < 2:
        return None

    def defined(idx: np.ndarray) -> float:
        v = stat(idx)
        return np.nan if v is None else float(v)

    with warnings.catch_warnings():  # a constant statistic warns, and gives no interval
        warnings.simplefilter("ignore")
        res = scipy_bootstrap((np.arange(n),), defined, vectorized=False,
                              n_resamples=RESAMPLES, confidence_level=LEVEL,
                              method="percentile", rng=np.random.default_rng(SEED))
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    return None if np.isnan(low) or np.isnan(high) else (low, high)


def mcnemar(a_correct: np.ndarray, b_correct: np.ndarray) -> dict[str, Any]:
    """McNemar's exact test of whether two classifiers' accuracies on the same samples
    differ: `a_only` samples only the first gets right, `b_only` only the second;
    p is the two-sided binomial probability of a split at least that uneven."""
    from scipy.stats import binomtest  # noqa: PLC0415  # heavy: loaded only when used

    a, b = np.asarray(a_correct, bool), np.asarray(b_correct, bool)
    a_only, b_only = int((a & ~b).sum()), int((b & ~a).sum())
    p = 1.0 if a_only + b_only == 0 else float(binomtest(a_only, a_only + b_only).pvalue)
    return {"test": "McNemar exact", "a_only": a_only, "b_only": b_only, "p_value": p,
            "significant": p < 1 - LEVEL}


def paired_difference(stat: Callable[[np.ndarray], float | None], n: int, what: str
                      ) -> dict[str, Any] | None:
    """The 95 % paired bootstrap interval of a difference `stat(indices)` between two
    models' figures on the same resampled samples (`what` says which difference);
    significant when it leaves out 0."""
    ci = bootstrap(stat, n)
    if ci is None:
        return None
    return {"test": "paired bootstrap", "of": what, "low": ci[0], "high": ci[1],
            "significant": ci[0] > 0 or ci[1] < 0}


def pct_ci(p: dict[str, float] | None) -> str:
    """An accuracy with its interval: `94.74 % [88.9, 97.6]`."""
    if p is None:
        return "n/a"
    return f"{p['value']:.2%} [{p['low'] * 100:.1f}, {p['high'] * 100:.1f}]"


def value_ci(v: float | None, ci: list[float] | tuple[float, float] | None,
             fmt: str = ".4g") -> str:
    """An error metric with its interval, `0.812 [0.78, 0.84]` (no interval: the value)."""
    if v is None:
        return ""
    return f"{v:{fmt}}" + ("" if ci is None else f" [{ci[0]:{fmt}}, {ci[1]:{fmt}}]")


def gap_text(test: dict[str, Any] | None) -> str:
    """How a paired test reads: 'McNemar p = 0.25, within noise'."""
    if test is None:
        return "no paired test (too few samples)"
    if test["test"] == "interval":  # an error against fp32: its own interval is the test
        return f"bootstrap 95 % interval [{test['low']:.4g}, {test['high']:.4g}]"
    verdict = "significant" if test["significant"] else "within noise"
    if test["test"] == "McNemar exact":
        return (f"McNemar p = {test['p_value']:.3g} ({test['a_only']} vs {test['b_only']} "
                f"samples only one of the two gets right), {verdict}")
    return (f"{test['of']}: paired bootstrap 95 % interval [{test['low']:.4g}, "
            f"{test['high']:.4g}], {verdict}")
