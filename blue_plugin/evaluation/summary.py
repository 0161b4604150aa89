"""Aggregation of per-case scores: means with percentile bootstrap confidence intervals."""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

#: The per-case metrics of the BLUE paper (:mod:`blue_plugin.evaluation.metrics`).
METRICS = ("efficacy", "generalization", "specificity", "fluency", "consistency")


def mean_or_none(values: Sequence[float]) -> float | None:
    """The mean of ``values`` as a float, or None when there are none."""
    return float(sum(values) / len(values)) if values else None


def bootstrap_ci(
    values: Sequence[float], n_boot: int = 1000, alpha: float = 0.05, seed: int = 0
) -> tuple[float, float, float]:
    """Mean of ``values`` and a percentile bootstrap ``1 - alpha`` confidence interval for it.

    Resamples the values with replacement ``n_boot`` times (numpy Generator seeded by ``seed``)
    and takes the ``alpha/2`` and ``1 - alpha/2`` quantiles of the resampled means.

    Returns:
        ``(mean, ci_low, ci_high)`` as floats.
    """
    arr = np.asarray([float(v) for v in values], dtype=np.float64)
    if arr.size == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    if not np.all(np.isfinite(arr)):
        raise ValueError("bootstrap_ci got non-finite values; drop or fix them first")
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise ValueError(f"n_boot must be a positive integer, got {n_boot!r}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must lie in (0, 1), got {alpha!r}")
    if arr.min() == arr.max():  # degenerate bootstrap distribution: avoid float summation noise
        c = float(arr[0])
        return c, c, c
    rng = np.random.default_rng(seed)
    means = arr[rng.integers(0, arr.size, size=(n_boot, arr.size))].mean(axis=1)
    lo, hi = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(arr.mean()), float(lo), float(hi)


def summarize(
    case_scores: Sequence[dict[str, Any]],
    keys: Sequence[str] = METRICS,
    n_boot: int = 1000,
    alpha: float = 0.05,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """Mean and bootstrap CI of each metric over cases, skipping None / missing values.

    Returns:
        ``{key: {"mean", "ci_low", "ci_high", "n"}}``; a metric with no values (e.g. consistency)
        gets None for mean and bounds and ``n = 0``.
    """
    summary = {}
    for key in keys:
        values = [float(s[key]) for s in case_scores if s.get(key) is not None]
        if values:
            mean, lo, hi = bootstrap_ci(values, n_boot=n_boot, alpha=alpha, seed=seed)
            summary[key] = {"mean": mean, "ci_low": lo, "ci_high": hi, "n": len(values)}
        else:
            summary[key] = {"mean": None, "ci_low": None, "ci_high": None, "n": 0}
    return summary
