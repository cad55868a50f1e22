"""The binomial statistics a threshold is certified with (no scipy): the exact tail, the
Clopper-Pearson bound, and the power of the test (how many calibration examples certify a
threshold with k disagreements)."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np


def binomial_cdf(k: int, n: int, p: float) -> float:
    """P(Binomial(n, p) <= k), summed in log space: log C(n, i) from math.lgamma, the terms with numpy."""
    if k < 0:
        return 0.0
    if k >= n or p <= 0.0:
        return 1.0
    if p >= 1.0:
        return 0.0
    i = np.arange(k + 1, dtype=np.float64)
    # log C(n, i) = log C(n, k) + sum_{j=i}^{k-1} log((j + 1) / (n - j)): suffix sums, one lgamma triple
    steps = np.log((i[:-1] + 1) / (n - i[:-1]))
    log_choose = (math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                  + np.append(np.cumsum(steps[::-1])[::-1], 0.0))
    log_pmf = log_choose + i * math.log(p) + (n - i) * math.log1p(-p)
    top = log_pmf.max()
    return float(min(1.0, math.exp(top) * np.exp(log_pmf - top).sum()))


def binomial_upper_bound(k: int, n: int, confidence: float) -> float:
    """Clopper-Pearson one-sided upper confidence bound on a rate after k events in n trials:
    the largest p with P(Binomial(n, p) <= k) >= 1 - confidence (bisection, to 1e-10)."""
    if n <= 0 or k >= n:
        return 1.0
    delta = 1.0 - confidence
    lo, hi = k / n, 1.0
    while hi - lo > 1e-10:
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if binomial_cdf(k, n, mid) >= delta else (lo, mid)
    return hi


def calibration_size_needed(disagreements: int, max_drop: float, confidence: float, limit: int = 10 ** 7) -> int | None:
    """The fewest calibration examples with which a threshold showing `disagreements` of them is
    certified (exact binomial p-value <= 1 - confidence at rate max_drop / 100): the power of the
    test. None past `limit`."""
    alpha, delta = max_drop / 100.0, 1.0 - confidence
    if alpha <= 0:
        return None
    lo, hi = disagreements + 1, disagreements + 1
    while binomial_cdf(disagreements, hi, alpha) > delta:
        lo, hi = hi, hi * 2
        if hi > limit:
            return None
    while lo < hi:   # binomial_cdf(k, n, alpha) falls as n grows
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if binomial_cdf(disagreements, mid, alpha) > delta else (lo, mid)
    return lo


def format_power_table(max_drop: float, confidence: float, disagreements: Sequence[int] = (0, 1, 2, 5, 10, 20, 50)
                       ) -> str:
    """Markdown: for each k, the calibration size that certifies a threshold with k disagreements."""
    lines = [f"| disagreements k | calibration examples needed (budget {max_drop:g} points, confidence "
             f"{confidence:g}) | k / n |", "|---|---|---|"]
    for k in disagreements:
        n = calibration_size_needed(k, max_drop, confidence)
        lines.append(f"| {k} | {n if n else '-'} | {k / n:.2%} |" if n else f"| {k} | - | - |")
    return "\n".join(lines)


def certifiable_disagreements(n: int, max_drop: float, confidence: float) -> int | None:
    """The most disagreements among n calibration examples with which a threshold still passes;
    None when even 0 does not."""
    alpha, delta = max_drop / 100.0, 1.0 - confidence
    if alpha <= 0 or binomial_cdf(0, n, alpha) > delta:
        return None
    k = 0
    while k + 1 < n and binomial_cdf(k + 1, n, alpha) <= delta:
        k += 1
    return k
