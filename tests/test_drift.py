"""What the server does when live traffic breaks the guarantee: the alarm, and each --on-drift action."""

import numpy as np
import pytest

from deebert_jax.core.errors import InputError
from deebert_jax.serving.drift import DriftCheck, safer_threshold

GRID = (0.001, 0.01, 0.05, 0.1, 0.15, 0.2)


def _stream(check, rate, rows, seed=0):
    rng = np.random.default_rng(seed)
    for disagree in rng.random(rows) < rate:
        check.record(1, 0 if disagree else 1, 2)


def test_the_next_safer_threshold_of_the_grid():
    assert safer_threshold("entropy", 0.15, GRID, 6) == 0.1
    assert safer_threshold("entropy", 0.001, GRID, 6) == 0.0      # past the safest: full depth
    assert safer_threshold("max_prob", 0.8, (0.6, 0.8, 0.9, 0.95), 6) == 0.9
    assert safer_threshold("patience", 4.0, (1.0, 2.0), 6) == 5.0


@pytest.mark.parametrize("on_drift", ["warn", "full-depth", "safer"])
def test_a_rate_over_the_budget_fires_once_and_acts(on_drift):
    said, set_to = [], []
    check = DriftCheck(rule="entropy", threshold=0.15, num_layers=6, grid=GRID, on_drift=on_drift,
                       set_threshold=set_to.append, say=said.append)
    _stream(check, 0.05, 3000)
    snap = check.snapshot()
    assert snap["alarm"] and len(check.alarms) >= 1 and check.alarms[0]["threshold"] == 0.15
    assert said[0].startswith("drift: the disagreement's lower bound") and "at threshold 0.15" in said[0]
    if on_drift == "warn":
        assert set_to == [] and len(said) == 1 and snap["threshold"] == 0.15
    elif on_drift == "full-depth":
        assert set_to == [0.0] and len(said) == 1 and snap["threshold"] == 0.0
    else:   # each alarm moves one step safer and checks anew; the stream keeps disagreeing
        assert set_to[:2] == [0.1, 0.05] and snap["threshold"] == set_to[-1]
        assert len(said) == len(set_to) == len(check.alarms)


def test_a_rate_under_the_budget_raises_no_alarm():
    check = DriftCheck(rule="entropy", threshold=0.15, num_layers=6, on_drift="warn", say=pytest.fail)
    _stream(check, 0.002, 5000)
    snap = check.snapshot()
    assert not snap["alarm"] and snap["rows"] == snap["shadow_rows"] == 5000
    assert snap["lower"] <= snap["observed"] <= snap["upper"] and snap["upper"] < 0.01


def test_bad_actions_are_refused():
    with pytest.raises(InputError, match="--on-drift 'later'"):
        DriftCheck(rule="entropy", threshold=0.1, num_layers=6, on_drift="later")
    with pytest.raises(InputError, match="needs an engine"):
        DriftCheck(rule="entropy", threshold=0.1, num_layers=6, on_drift="safer")
