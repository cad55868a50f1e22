"""Anytime-valid bounds on a live disagreement rate: a confidence sequence for a Bernoulli rate.

A server compares the answer it sent with the full model's on a share of rows (shadow rows) and
wants to know, after every row, whether the calibrated guarantee (disagreement <= budget) still
holds. Repeating a fixed-sample bound (Clopper-Pearson) after every row is not valid: each look
spends the error again, and under the law of the iterated logarithm a true rate at the budget
crosses it eventually with probability 1 (`simulate_streams(..., method="repeated")` shows how
often within a horizon).

The bounds here come from Robbins' beta-binomial mixture martingale. For a rate m,

    M_n(m) = B(a + k, b + n - k) / B(a, b) / (m^k (1 - m)^(n - k))

(k disagreements in n rows) is a nonnegative martingale with mean 1 when the true rate is m, so by
Ville's inequality P(exists n: M_n(m) >= 1/alpha) <= alpha. The set {m : M_n(m) < 1/alpha} is
then a confidence sequence: with probability >= 1 - alpha it holds the true rate at every n at
once, however often it is looked at and whenever the stream stops. It is an interval (log M_n is
convex in m), found by bisection. The prior Beta(a, b) only decides where the bounds are tight:
its mean is the budget and its strength `PRIOR_STRENGTH` pseudo-rows.

The alarm is the lower bound above the budget: if the true rate is at most the budget, that
happens with probability <= alpha over the whole stream (the false-alarm rate).
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from deebert_jax.evaluation.binomial import binomial_cdf

# Pseudo-rows of the Beta prior centred on the budget: tight bounds for rates near the budget
# after a few hundred shadow rows (the coverage simulation in tests, and docs/serving.md, show the
# detection delays it gives).
PRIOR_STRENGTH = 100.0


def _prior(budget: float, strength: float) -> tuple[float, float]:
    if not 0.0 < budget < 1.0:
        raise ValueError(f"budget={budget!r}: expected a rate in (0, 1)")
    return budget * strength, (1.0 - budget) * strength


def _log_beta(a: float, b: float) -> float:
    return math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)


def log_mixture_martingale(n: int, k: int, m: float, budget: float, strength: float = PRIOR_STRENGTH) -> float:
    """log M_n(m) after k disagreements in n rows (the mixture over Beta(budget * s, (1 - budget) * s))."""
    a, b = _prior(budget, strength)
    if m <= 0.0:
        return math.inf if k > 0 else _log_beta(a, b + n) - _log_beta(a, b)
    if m >= 1.0:
        return math.inf if k < n else _log_beta(a + n, b) - _log_beta(a, b)
    return (_log_beta(a + k, b + n - k) - _log_beta(a, b) - k * math.log(m) - (n - k) * math.log1p(-m))


def confidence_sequence(n: int, k: int, confidence: float, budget: float,
                        strength: float = PRIOR_STRENGTH) -> tuple[float, float]:
    """(lower, upper) bounds on the rate after k disagreements in n rows, valid at every n at
    once with probability `confidence` (to 1e-9)."""
    if not 0 <= k <= n:
        raise ValueError(f"k={k}, n={n}: expected 0 <= k <= n")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence={confidence!r}: expected a level in (0, 1)")
    if n == 0:
        return 0.0, 1.0
    level = math.log(1.0 / (1.0 - confidence))
    inside = lambda m: log_mixture_martingale(n, k, m, budget, strength) < level
    centre = k / n   # where log M_n is smallest: it is in the set whenever the set is not empty

    def edge(outer: float) -> float:
        if inside(outer):
            return outer
        lo, hi = centre, outer   # inside(lo), not inside(hi)
        while abs(hi - lo) > 1e-9:
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if inside(mid) else (lo, mid)
        return lo
    return edge(0.0), edge(1.0)


@dataclasses.dataclass(frozen=True)
class MonitorState:
    """What a live check knows: shadow rows compared, disagreements among them, the bounds, and
    the alarm (sticky: the row count at which the lower bound first rose above the budget)."""
    budget: float
    confidence: float
    rows: int = 0
    disagreements: int = 0
    lower: float = 0.0
    upper: float = 1.0
    alarm_at: int | None = None

    @property
    def alarm(self) -> bool:
        return self.alarm_at is not None

    @property
    def observed(self) -> float | None:
        return self.disagreements / self.rows if self.rows else None


def observe(state: MonitorState, rows: int, disagreements: int) -> MonitorState:
    """`state` after `rows` more shadow rows, `disagreements` of them answered otherwise than the
    full model answers them."""
    if rows < 0 or not 0 <= disagreements <= rows:
        raise ValueError(f"rows={rows}, disagreements={disagreements}: expected 0 <= disagreements <= rows")
    n, k = state.rows + rows, state.disagreements + disagreements
    lower, upper = confidence_sequence(n, k, state.confidence, state.budget)
    alarm_at = state.alarm_at if state.alarm_at is not None else (n if lower > state.budget else None)
    return dataclasses.replace(state, rows=n, disagreements=k, lower=lower, upper=upper, alarm_at=alarm_at)


def alarm_times(disagreed: np.ndarray, budget: float, confidence: float, strength: float = PRIOR_STRENGTH,
                method: str = "mixture") -> np.ndarray:
    """First row (1-based) at which each stream's alarm fires, or 0 if it never does.

    disagreed: [streams, rows] of 0/1. "mixture": the lower bound of `confidence_sequence` above
    the budget, i.e. M_n(budget) >= 1/alpha with k/n above the budget (M_n updated row by row with
    the mixture's predictive probabilities, exactly as the closed form). "repeated": the one-sided
    Clopper-Pearson test at the budget redone after every row (not anytime-valid; for comparison)."""
    x = np.asarray(disagreed, dtype=np.float64)
    streams, horizon = x.shape
    k = np.cumsum(x, axis=1)
    n = np.arange(1, horizon + 1, dtype=np.float64)
    alpha = 1.0 - confidence
    if method == "mixture":
        a, b = _prior(budget, strength)
        k_before = k - x
        n_before = n - 1
        predictive = np.where(x > 0, (a + k_before) / (a + b + n_before), (b + n_before - k_before) / (a + b + n_before))
        null = np.where(x > 0, budget, 1.0 - budget)
        log_m = np.cumsum(np.log(predictive) - np.log(null), axis=1)
        fired = (log_m >= math.log(1.0 / alpha)) & (k / n > budget)
    elif method == "repeated":
        fired = k >= _clopper_pearson_critical_counts(horizon, budget, alpha)[None, :]
    else:
        raise ValueError(f"method={method!r}: expected 'mixture' or 'repeated'")
    first = np.argmax(fired, axis=1) + 1
    return np.where(fired.any(axis=1), first, 0)


def _clopper_pearson_critical_counts(horizon: int, budget: float, alpha: float) -> np.ndarray:
    """[horizon]: for n = 1..horizon the fewest disagreements k with P(Binomial(n, budget) >= k)
    <= alpha (the one-sided exact test rejects the budget); nondecreasing in n."""
    from deebert_jax.evaluation.binomial import binomial_cdf
    critical, k = np.empty(horizon, dtype=np.int64), 1
    for n in range(1, horizon + 1):
        while k <= n and 1.0 - binomial_cdf(k - 1, n, budget) > alpha:
            k += 1
        critical[n - 1] = k   # k = n + 1: no count rejects yet
    return critical


def simulate_streams(rate: float, budget: float, confidence: float, streams: int = 2000, rows: int = 20000,
                     seed: int = 0, method: str = "mixture") -> dict:
    """Streams of i.i.d. disagreements at `rate`: the share whose alarm fires within `rows`
    (a false alarm when rate <= budget) and the median row at which it fires."""
    rng = np.random.default_rng(seed)
    times = alarm_times(rng.random((streams, rows)) < rate, budget, confidence, method=method)
    fired = times[times > 0]
    return {"rate": rate, "budget": budget, "confidence": confidence, "streams": streams, "rows": rows,
            "method": method, "alarm_share": float(len(fired) / streams),
            "median_delay": float(np.median(fired)) if len(fired) else None}
