"""The live check's statistics: a confidence sequence that stays valid however often it is read."""

import math

import numpy as np
import pytest

from deebert_jax.evaluation import monitoring
from deebert_jax.evaluation.monitoring import MonitorState, confidence_sequence, observe, simulate_streams

BUDGET, CONFIDENCE = 0.01, 0.95


def test_the_bounds_hold_the_observed_rate_and_sit_on_the_level():
    level = math.log(1 / (1 - CONFIDENCE))
    for n, k in [(1, 0), (1, 1), (50, 0), (1000, 10), (1000, 40), (20000, 150)]:
        lower, upper = confidence_sequence(n, k, CONFIDENCE, BUDGET)
        assert lower <= k / n <= upper
        for edge in (lower, upper):
            if 0 < edge < 1:
                assert monitoring.log_mixture_martingale(n, k, edge, BUDGET) == pytest.approx(level, abs=1e-5)
    assert confidence_sequence(0, 0, CONFIDENCE, BUDGET) == (0.0, 1.0)
    # More rows at the same rate: narrower.
    wide, narrow = confidence_sequence(1000, 10, CONFIDENCE, BUDGET), confidence_sequence(10000, 100, CONFIDENCE, BUDGET)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


def test_row_by_row_monitoring_matches_the_vectorised_alarm():
    rng = np.random.default_rng(3)
    streams = (rng.random((6, 3000)) < 0.03).astype(int)
    times = monitoring.alarm_times(streams, BUDGET, CONFIDENCE)
    for row, expected in zip(streams, times):
        state = MonitorState(BUDGET, CONFIDENCE)
        for x in row:
            state = observe(state, 1, int(x))
        assert (state.alarm_at or 0) == expected
        assert state.lower <= state.observed <= state.upper
    assert (times > 0).all()   # 3x the budget: every stream alarms within 3,000 rows


def test_batches_of_rows_give_the_counts_bounds():
    state = observe(observe(MonitorState(BUDGET, CONFIDENCE), 400, 3), 600, 7)
    assert (state.rows, state.disagreements) == (1000, 10)
    assert (state.lower, state.upper) == confidence_sequence(1000, 10, CONFIDENCE, BUDGET)
    with pytest.raises(ValueError, match="disagreements"):
        observe(state, 3, 4)


@pytest.mark.parametrize("rate", [0.5 * BUDGET, BUDGET])
def test_false_alarms_stay_under_one_minus_the_confidence(rate):
    result = simulate_streams(rate, BUDGET, CONFIDENCE, streams=2000, rows=5000, seed=1)
    assert result["alarm_share"] <= 1 - CONFIDENCE


def test_a_rate_over_the_budget_is_detected():
    result = simulate_streams(3 * BUDGET, BUDGET, CONFIDENCE, streams=500, rows=5000, seed=2)
    assert result["alarm_share"] >= 0.99 and result["median_delay"] < 1000


def test_repeating_a_fixed_sample_bound_after_every_row_is_not_valid():
    """Why the mixture: the one-sided Clopper-Pearson test redone after every row, at a true rate
    equal to the budget, alarms far more often than 1 - confidence."""
    repeated = simulate_streams(BUDGET, BUDGET, CONFIDENCE, streams=1000, rows=5000, seed=1, method="repeated")
    assert repeated["alarm_share"] > 2 * (1 - CONFIDENCE)


def test_bad_arguments_name_themselves():
    for call, message in [(lambda: confidence_sequence(3, 4, CONFIDENCE, BUDGET), "k=4, n=3"),
                          (lambda: confidence_sequence(3, 1, 1.0, BUDGET), "confidence=1.0"),
                          (lambda: confidence_sequence(3, 1, CONFIDENCE, 0.0), "budget=0.0"),
                          (lambda: monitoring.alarm_times(np.zeros((1, 3)), BUDGET, CONFIDENCE, method="x"),
                           "method='x'")]:
        with pytest.raises(ValueError, match=message):
            call()
