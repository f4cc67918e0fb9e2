"""Confidence intervals over documents: the unit that was sampled.

Tokens of one document are not independent draws (a document about one country is
predictable throughout, or not), so intervals resample *documents* with replacement
and recompute the statistic on each resample: the percentile bootstrap (Efron and
Tibshirani 1993, ch. 13). The statistic of an ablation is a ratio of sums,

    Δbpb = (Σ_d nll_variant[d] - Σ_d nll_kept[d]) / ln 2 / Σ_d bytes[d]

paired by document, so the variation that two variants share (hard documents are hard
in both) cancels. With few documents the bootstrap's intervals are too narrow (they
cannot see the documents that were not sampled), so below `MIN_DOCUMENTS` no interval
is given and the report says why instead.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

#: Fewer documents than this give no interval (the percentile bootstrap under-covers).
MIN_DOCUMENTS: int = 20
DEFAULT_RESAMPLES: int = 1000
DEFAULT_LEVEL: float = 0.95


@dataclasses.dataclass(frozen=True)
class Interval:
    """A paired difference of ratios and its bootstrap interval.

    Attributes:
        estimate: the difference on all documents (None when the denominator is 0).
        ci: `[low, high]`, or None with `reason` saying why.
        documents: how many documents carried the statistic (denominator > 0).
        resamples: bootstrap resamples drawn.
        level: coverage of the interval.
        reason: why there is no interval (too few documents, no resamples).
    """

    estimate: float | None
    ci: list[float] | None
    documents: int
    resamples: int
    level: float
    reason: str | None = None


def paired_ratio_difference(
    numerator_a: np.ndarray,
    numerator_b: np.ndarray,
    denominator: np.ndarray,
    *,
    scale: float = 1.0,
    resamples: int = DEFAULT_RESAMPLES,
    level: float = DEFAULT_LEVEL,
    seed: int = 0,
    min_documents: int = MIN_DOCUMENTS,
) -> Interval:
    """`scale * (Σ a - Σ b) / Σ den` over documents, with a percentile-bootstrap interval.

    Args:
        numerator_a, numerator_b, denominator: [docs] per-document sums (float).
        scale: multiplies the statistic (1 / ln 2 turns nats into bits).
        resamples: bootstrap resamples (0: no interval).
        level: coverage, e.g. 0.95.
        seed: resampling seed.
        min_documents: fewer documents with a positive denominator give no interval.
    """
    a, b, den = (np.asarray(x, np.float64) for x in (numerator_a, numerator_b, denominator))
    used = den > 0
    a, b, den = a[used], b[used], den[used]
    n = int(used.sum())
    if n == 0:
        return Interval(None, None, 0, 0, level, "no document has text")
    estimate = float(scale * (a.sum() - b.sum()) / den.sum())
    if n < min_documents:
        return Interval(estimate, None, n, 0, level,
                        f"too few documents for an interval ({n} < {min_documents}); evaluate more documents "
                        "(--data, a larger data.eval_fraction) before reading this number")
    if resamples <= 0:
        return Interval(estimate, None, n, 0, level, "no bootstrap resamples asked for")
    rng = np.random.default_rng(seed)
    diff = a - b
    stats = np.empty((resamples,))
    chunk = max(1, (1 << 22) // n)  # bounded memory: [chunk, n] indices at a time
    for start in range(0, resamples, chunk):
        idx = rng.integers(0, n, size=(min(chunk, resamples - start), n))
        stats[start:start + len(idx)] = scale * diff[idx].sum(1) / den[idx].sum(1)
    tail = (1.0 - level) / 2.0
    low, high = np.quantile(stats, [tail, 1.0 - tail])
    return Interval(estimate, [float(low), float(high)], n, resamples, level)


def excludes_zero(interval: Interval) -> bool | None:
    """Whether the interval lies on one side of 0 (None without an interval)."""
    if interval.ci is None:
        return None
    low, high = interval.ci
    return bool(low > 0 or high < 0) and not math.isnan(low)
