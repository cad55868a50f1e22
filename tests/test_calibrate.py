"""`train.calibrate` and `deebert_jax.evaluation.calibration` on a tiny random checkpoint and the synthetic task."""

import json
import math
import os

import numpy as np
import pytest
from conftest import calibration_config

from deebert_jax.evaluation import calibration
from deebert_jax.data import glue as data
from deebert_jax.evaluation import sweep as evaluation
from deebert_jax.inference.early_exit import early_exit_predict
from train import calibrate as calibrate_cli
from train.cli import run

L, SEQ, N_DEV = 3, 16, 100
CONFIG = calibration_config()   # wide initialisation: exits land on every layer


@pytest.fixture(scope="module")
def checkpoint(calibration_checkpoint):
    return calibration_checkpoint


@pytest.fixture(scope="module")
def dev():
    return data.load_split("synthetic", "dev", max_seq_length=SEQ, vocab_size=CONFIG.vocab_size)


@pytest.fixture(scope="module")
def dev_logits(checkpoint, dev):
    return evaluation.all_ramp_logits(CONFIG, checkpoint[1], dev, 32)


def np_entropy(z):
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -(np.exp(logp) * logp).sum(-1)


def brute_stats(ramp_logits, labels, threshold):
    """Entropy-rule exits and their statistics, computed here without the library."""
    below = np_entropy(ramp_logits) < threshold
    below[-1] = True
    exit_layer = below.argmax(0) + 1
    preds = ramp_logits[exit_layer - 1, np.arange(len(labels))].argmax(-1)
    full = ramp_logits[-1].argmax(-1)
    return {"n": len(labels), "disagreement": np.mean(preds != full),
            "drop": 100 * (np.mean(full == labels) - np.mean(preds == labels)), "saving": 1 - exit_layer.mean() / L}


def calibrate(checkpoint_dir, *argv):
    return run(calibrate_cli.main, ["--checkpoint", str(checkpoint_dir), "--task", "synthetic",
                                    "--max-seq-length", str(SEQ), "--no-progress", *argv])


@pytest.mark.parametrize("rule", ["entropy", "max_prob", "patience"])
def test_numpy_exits_match_early_exit_predict(checkpoint, dev, dev_logits, rule):
    z = dev_logits.astype(np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    scores = {"entropy": np_entropy(z), "max_prob": (p / p.sum(-1, keepdims=True)).max(-1)}.get(rule)
    grid = {"entropy": np.linspace(0.02, math.log(2), 15), "max_prob": np.linspace(0.5, 0.99, 15),
            "patience": [0.0, 1.0, 2.0]}[rule]
    # Thresholds away from every score: float32 rounding cannot flip a comparison.
    thresholds = [t for t in grid if scores is None or np.abs(scores - t).min() > 1e-4][:5]
    spread = set()
    for t in thresholds:
        mine = calibration.exit_layers(dev_logits, t, rule)
        out = early_exit_predict(CONFIG, checkpoint[1], dev["input_ids"], dev["attention_mask"],
                                 dev["token_type_ids"], t, rule)
        np.testing.assert_array_equal(mine, np.asarray(out.exit_layer))
        np.testing.assert_allclose(calibration.exit_logits(dev_logits, mine), out.logits, atol=1e-4)
        spread.add(tuple(np.bincount(mine, minlength=L + 1)))
    assert len(spread) >= 2, "thresholds should give different exits"


def test_binomial_tail_against_brute_force_sum():
    for n in (1, 6, 40):
        for k in range(-1, n + 1):
            for p in (0.0, 0.02, 0.3, 0.5, 0.97, 1.0):
                exact = sum(math.comb(n, i) * p ** i * (1 - p) ** (n - i) for i in range(k + 1))
                assert calibration.binomial_cdf(k, n, p) == pytest.approx(exact, rel=1e-10, abs=1e-14)
    # Large n stays finite and matches the Poisson limit.
    assert calibration.binomial_cdf(0, 10 ** 6, 1e-6) == pytest.approx(math.exp(-1), rel=1e-5)
    for k, n in [(0, 50), (3, 50), (20, 400), (50, 50)]:
        ub = calibration.binomial_upper_bound(k, n, 0.9)
        if k == n:
            assert ub == 1.0
            continue
        assert ub > k / n and calibration.binomial_cdf(k, n, ub) == pytest.approx(0.1, abs=1e-6)
    assert calibration.binomial_upper_bound(0, 50, 0.9) == pytest.approx(1 - 0.1 ** (1 / 50), abs=1e-8)


def test_fixed_sequence_guarantee_holds_on_simulated_populations():
    """Early ramps that agree with the last one more often when confident; on many calibration
    draws the chosen threshold's disagreement on the whole population exceeds the budget in at
    most a (1 - confidence) share of draws."""
    rng = np.random.default_rng(0)
    pop, alpha, confidence, draws = 20000, 0.05, 0.9, 200
    final = rng.normal(0, 3, pop)
    ramps = np.stack([final * a + rng.normal(0, s, pop) for a, s in [(0.7, 2.5), (0.9, 1.2), (1.0, 0.0)]])
    logits = np.stack([np.zeros_like(ramps), ramps], -1).astype(np.float32)      # [3, pop, 2]
    labels = (final + rng.normal(0, 1, pop) > 0).astype(np.int32)
    true_rate = {t: calibration.threshold_stats("sst2", logits, labels, t)["disagreement"]
                 for t in calibration.candidate_thresholds("entropy", 3, 2)}
    assert min(true_rate.values()) < alpha < max(true_rate.values())
    violations, savings = 0, []
    for _ in range(draws):
        rows = rng.choice(pop, 400, replace=False)
        chosen, tested = calibration.choose_threshold("sst2", logits[:, rows], labels[rows], 100 * alpha,
                                                      confidence=confidence)
        assert all(s["rejected"] for s in tested[:-1]) and chosen["bound"] >= chosen["disagreement"]
        violations += true_rate[chosen["threshold"]] > alpha
        savings.append(chosen["saving"])
    assert violations <= (1 - confidence) * draws
    assert np.mean(savings) > 0.2, "the bound should still leave a useful saving"


def test_cli_picks_threshold_within_budget_and_writes_only_the_policy(checkpoint, dev, dev_logits, capsys):
    model_dir = checkpoint[0]
    before = sorted(os.listdir(model_dir))
    assert calibration.load_exit_policy(model_dir) is None
    assert calibrate(model_dir, "--max-drop", "20") == 0
    assert sorted(os.listdir(model_dir)) == sorted(before + [calibration.POLICY_FILE])
    policy = calibration.load_exit_policy(model_dir)
    out = capsys.readouterr().out
    assert "<- chosen" in out and "reported (50 other examples)" in out and calibration.POLICY_FILE in out

    cal_rows, rep_rows = calibration.split_indices(N_DEV, 0)
    assert len(cal_rows) == len(rep_rows) == N_DEV // 2 and not set(cal_rows) & set(rep_rows)
    labels = dev["labels"]
    t = policy["threshold"]
    assert (policy["rule"], policy["max_drop"], policy["confidence"]) == ("entropy", 20.0, None)
    # The chosen threshold's statistics, recomputed here on each half.
    for part, rows in (("calibration", cal_rows), ("reported", rep_rows)):
        mine = brute_stats(dev_logits[:, rows], labels[rows], t)
        assert {k: policy[part][k] for k in mine} == pytest.approx(mine)
    assert 0 < policy["calibration"]["drop"] <= 20 and policy["calibration"]["saving"] > 0
    assert policy["reported"]["drop"] <= 20
    # Largest saving within budget among the tested grid; every threshold was tested.
    within = [s for s in policy["tested"] if s["drop"] <= 20 and s["saving"] > 0]
    assert policy["calibration"]["saving"] == max(s["saving"] for s in within)
    assert [s["threshold"] for s in policy["tested"]] == calibration.candidate_thresholds("entropy", L, 2)


def test_cli_with_confidence_bounds_disagreement(checkpoint, dev_logits, tmp_path, capsys):
    out = tmp_path / "policies" / "p.json"
    assert calibrate(checkpoint[0], "--max-drop", "30", "--confidence", "0.9", "--out", str(out)) == 0
    policy = json.loads(out.read_text())
    cal = policy["calibration"]
    assert policy["confidence"] == 0.9 and "probability >= 0.9" in policy["guarantee"]
    assert cal["bound"] <= 0.30 and cal["p_value"] <= 0.1 and cal["bound"] >= cal["disagreement"]
    # Fixed-sequence testing: every tested threshold but the last was rejected; the last was not.
    assert all(s["bound"] <= 0.30 for s in policy["tested"][:-1]) and policy["tested"][-1]["bound"] > 0.30
    assert "guarantee:" in capsys.readouterr().out


def test_cli_train_holdout_split(checkpoint, capsys):
    assert calibrate(checkpoint[0], "--max-drop", "20", "--calibration-split", "train-holdout",
                     "--calibration-size", "200") == 0
    policy = calibration.load_exit_policy(checkpoint[0])
    assert policy["calibration"]["n"] == policy["calibration_size"] == 200
    assert policy["reported"]["n"] == N_DEV and policy["calibration_split"] == "train-holdout"


def test_refusals_are_one_clear_line(checkpoint, dev_logits, dev, capsys):
    # Budget 0: a threshold must save layers at no cost; every early exit here costs accuracy.
    assert calibrate(checkpoint[0], "--max-drop", "0") == 1
    # 50 calibration examples without --confidence: a warning line first, then the one error line.
    warning, err = capsys.readouterr().err.strip().split("\n")
    assert warning.startswith("warning: 50 calibration examples")
    assert err.startswith("error: no threshold saves layers within a drop of 0 points")
    assert "best: threshold" in err
    with pytest.raises(calibration.CalibrationError, match="at 95% confidence"):
        calibration.choose_threshold("synthetic", dev_logits, dev["labels"], 0.0, confidence=0.95)
    with pytest.raises(SystemExit) as exit_info:
        calibrate(checkpoint[0], "--max-drop", "-1")
    assert exit_info.value.code == 2 and "must be a number of points >= 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="max_drop=-1"):
        calibration.choose_threshold("synthetic", dev_logits, dev["labels"], -1.0)
    with pytest.raises(SystemExit):
        calibrate(checkpoint[0], "--max-drop", "1", "--confidence", "1.5")


def test_load_exit_policy_rejects_a_malformed_file(tmp_path):
    assert calibration.load_exit_policy(tmp_path) is None
    (tmp_path / calibration.POLICY_FILE).write_text("{not json")
    with pytest.raises(ValueError, match=str(tmp_path)):
        calibration.load_exit_policy(tmp_path)
    calibration.write_exit_policy(tmp_path, {"rule": "entropy", "threshold": -1})
    with pytest.raises(ValueError, match="threshold=-1"):
        calibration.load_exit_policy(tmp_path)
    assert os.listdir(tmp_path) == [calibration.POLICY_FILE]


def test_sweeps_gain_the_policy_threshold(tmp_path):
    sweep = evaluation.default_thresholds("entropy", L)
    assert calibration.with_policy_threshold(sweep, tmp_path) == sweep
    calibration.write_exit_policy(tmp_path, {"rule": "entropy", "threshold": 0.25})
    assert calibration.with_policy_threshold(sweep, tmp_path) == sorted(sweep + [0.25])
    assert calibration.with_policy_threshold([1.0, 0.9], tmp_path, "max_prob") == [1.0, 0.9]
    calibration.write_exit_policy(tmp_path, {"rule": "max_prob", "threshold": 0.95})
    assert calibration.with_policy_threshold([1.0, 0.9], tmp_path, "max_prob") == [1.0, 0.95, 0.9]
