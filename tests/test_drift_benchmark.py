"""The drift benchmark's replay: traffic like the calibration rows, then unlike them, through the
server's own live check and shadow draw."""

import numpy as np

from benchmarks import drift as bench


def _answers(n, disagree_share, seed):
    """Ramp logits [2, n, 2] whose first ramp is confident (exits at threshold 0.3) and disagrees
    with the last on `disagree_share` of the rows."""
    rng = np.random.default_rng(seed)
    final = rng.integers(0, 2, n)
    first = np.where(rng.random(n) < disagree_share, 1 - final, final)
    logits = np.zeros((2, n, 2), np.float32)
    logits[0, np.arange(n), first] = 6.0
    logits[1, np.arange(n), final] = 6.0
    return bench.Answers(logits, "entropy")


def test_a_shift_is_detected_after_it_and_each_action_serves_accordingly():
    calm, shifted = _answers(500, 0.0, 1), _answers(500, 0.1, 2)
    assert calm.disagreement(0.3) == 0.0 and abs(shifted.disagreement(0.3) - 0.1) < 0.05
    result = bench.run([("calm", calm, 3000), ("shifted", shifted, 20000)], rule="entropy", threshold=0.3,
                       num_layers=2, budget=0.01, confidence=0.95, grid=(0.1, 0.3), share=0.2, replays=3)
    for action, a in result["actions"].items():
        assert a["false_alarms"] == 0 and a["detected"] == 3, action
        assert 0 < a["requests_to_alarm"]["median"] < 20000
    assert result["actions"]["warn"]["after_alarm_disagreement"] > 0.05
    assert result["actions"]["full-depth"]["after_alarm_disagreement"] == 0.0
    assert result["actions"]["full-depth"]["final_thresholds"] == [0.0]
    # safer: 0.3 -> 0.1 (the grid's next) -> full depth; the served answers agree more each time.
    assert result["actions"]["safer"]["final_thresholds"][0] in (0.0, 0.1)
    assert result["actions"]["warn"]["runs"][0]["alarms"][0]["request"] == result["actions"]["safer"]["runs"][0][
        "alarms"][0]["request"]   # the same seeded draws for every action
    assert "| full-depth | 0 | 3 |" in bench.markdown(result, "python -m train.benchmark_drift", 2)
