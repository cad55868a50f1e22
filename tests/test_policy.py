"""`exit_policy.json`: what it records, the checks on loading it, and what a refusal leaves."""

import json
import os
import shutil

import numpy as np
import pytest
from conftest import calibration_config

from deebert_jax.evaluation import calibration
from deebert_jax.inference import model_dir as model_dir_lib
from deebert_jax.weights.checkpoint import load_checkpoint, model_fingerprint
from train import calibrate as calibrate_cli
from train import predict as predict_cli
from train.cli import run

SEQ = 16
CONFIG = calibration_config()


@pytest.fixture()
def model_dir(calibration_checkpoint, tmp_path):
    """A private copy of the session's random checkpoint (the tests here write policies into it)."""
    path = tmp_path / "model"
    shutil.copytree(calibration_checkpoint[0], path)
    policy = path / calibration.POLICY_FILE
    if policy.exists():
        policy.unlink()
    return path


def calibrate(model_dir, *argv):
    return run(calibrate_cli.main, ["--checkpoint", str(model_dir), "--task", "synthetic",
                                    "--max-seq-length", str(SEQ), "--no-progress", *argv])


def test_policy_records_what_it_was_calibrated_on_and_loading_checks_it(model_dir, tmp_path, capsys):
    assert calibrate(model_dir, "--max-drop", "30", "--confidence", "0.9") == 0
    out = capsys.readouterr().out
    assert "population: examples distributed like the task's dev set" in out and "power: with 50" in out
    config, params = load_checkpoint(model_dir)
    policy = calibration.load_exit_policy(model_dir, model=(config, params), max_seq_length=SEQ, task="synthetic")
    assert policy["model_fingerprint"] == model_fingerprint(config, params) and len(policy["model_fingerprint"]) == 16
    assert policy["max_seq_length"] == SEQ and policy["chosen_at"].endswith("Z")
    assert any("metric: accuracy" in line for line in policy["guarantee_scope"])

    # Other weights: one changed number is another model.
    other = dict(params, ramps=dict(params["ramps"]))
    other["ramps"]["classifier"] = dict(other["ramps"]["classifier"])
    other["ramps"]["classifier"]["bias"] = np.asarray(other["ramps"]["classifier"]["bias"]) + 1e-3
    with pytest.raises(ValueError, match=r"exit_policy.json: calibrated on other weights \(model_fingerprint "):
        calibration.load_exit_policy(model_dir, model=(config, other))
    with pytest.raises(ValueError, match=r"calibrated at max_seq_length 16, this run uses 32: pass --max-seq-length 16"):
        calibration.load_exit_policy(model_dir, max_seq_length=32)
    with pytest.raises(ValueError, match=r"calibrated for task synthetic, not sst2"):
        calibration.load_exit_policy(model_dir, task="sst2")
    with pytest.raises(ValueError, match=r"calibrated on a 3-layer model, this one has 2"):
        calibration.load_exit_policy(model_dir, model=(config.replace(num_hidden_layers=2), params))

    # train.predict and the server say which policy they use (resolve_threshold's note) ...
    _, _, note = model_dir_lib.resolve_threshold(model_dir, None, None, 3, model=(config, params), max_seq_length=SEQ)
    assert (f"threshold {policy['threshold']:g} from " in note and "budget 30 points of accuracy at confidence 0.9" in note
            and "calibrated on dev-half (50 examples)" in note and f"chosen {policy['chosen_at']}" in note)
    # ... and train.predict refuses one left behind by other weights, in one line, before any work.
    from transformers import BertTokenizerFast

    copied = tmp_path / "other"
    shutil.copytree(model_dir, copied)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "1", "2", "3"]
    BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}).save_pretrained(copied / "tokenizer")
    stale = json.loads((copied / calibration.POLICY_FILE).read_text())
    stale["model_fingerprint"] = "0123456789abcdef"
    (copied / calibration.POLICY_FILE).write_text(json.dumps(stale))
    capsys.readouterr()
    assert run(predict_cli.main, ["--checkpoint", str(copied), "--text", "1 2 3", "--max-seq-length", str(SEQ)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "calibrated on other weights (model_fingerprint 0123456789abcdef" in err
    # A given threshold does not read the policy at all.
    assert model_dir_lib.resolve_threshold(copied, 0.2, None, 3, model=(config, params))[:2] == (0.2, "entropy")


@pytest.mark.parametrize("field, value, message", [
    ("threshold", True, r'"threshold" is true, expected a number'),
    ("threshold", "0.7", r'"threshold" is "0.7", expected a number'),
    ("rule", 3, r'"rule" is 3, expected one of'),
    ("confidence", 1.5, r'"confidence" is 1.5, expected null or a number in \(0, 1\)'),
    ("max_seq_length", "64", r'"max_seq_length" is "64", expected an integer >= 1'),
    ("num_layers", 0, r'"num_layers" is 0, expected an integer >= 1'),
    ("max_drop", None, r'"max_drop" is null, expected a number >= 0'),
])
def test_policy_fields_are_type_checked(tmp_path, field, value, message):
    policy = {"format": 1, "rule": "entropy", "threshold": 0.3, "max_drop": 1.0, "confidence": 0.95,
              "num_layers": 3, "max_seq_length": 16, field: value}
    (tmp_path / calibration.POLICY_FILE).write_text(json.dumps(policy))
    with pytest.raises(ValueError, match=message):
        calibration.load_exit_policy(tmp_path)
    with pytest.raises(ValueError, match=message):
        model_dir_lib.resolve_threshold(tmp_path, None, None, 3)


def test_a_refused_calibration_leaves_the_old_policy_byte_for_byte_and_says_so(model_dir, capsys):
    assert calibrate(model_dir, "--max-drop", "30") == 0
    path = model_dir / calibration.POLICY_FILE
    before, stat, listing = path.read_bytes(), os.stat(path), sorted(os.listdir(model_dir))
    old = json.loads(before)
    capsys.readouterr()
    assert calibrate(model_dir, "--max-drop", "0", "--confidence", "0.95") == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: no threshold saves layers")
    assert (f"{path} left as it was (rule entropy, threshold {old['threshold']:g}, budget 30.0 points, chosen "
            f"{old['chosen_at']}), and train.predict and the server keep using it") in err
    assert path.read_bytes() == before and os.stat(path).st_mtime_ns == stat.st_mtime_ns
    assert sorted(os.listdir(model_dir)) == listing   # nothing else appeared (no temp file)
    path.unlink()
    assert calibrate(model_dir, "--max-drop", "0", "--confidence", "0.95") == 1
    assert "nothing written" in capsys.readouterr().err and not path.exists()


def test_few_calibration_examples_without_confidence_warn(model_dir, capsys):
    assert calibrate(model_dir, "--max-drop", "50", "--limit", "4") == 0
    err = capsys.readouterr().err
    assert "warning: 2 calibration examples: the empirical choice on so few is noise" in err


def test_power_table_matches_the_binomial_tail():
    for k in (0, 1, 5, 20):
        n = calibration.calibration_size_needed(k, 1.0, 0.95)
        assert calibration.binomial_cdf(k, n, 0.01) <= 0.05 < calibration.binomial_cdf(k, n - 1, 0.01)
        assert calibration.certifiable_disagreements(n, 1.0, 0.95) >= k
    assert calibration.calibration_size_needed(0, 1.0, 0.95) == 299   # 0.99^299 < 0.05 < 0.99^298
    assert calibration.certifiable_disagreements(298, 1.0, 0.95) is None


def test_calibration_draws_repeat_the_choice_and_report_on_unseen_rows():
    from research import calibration_draws

    rng = np.random.default_rng(0)
    L, K = 3, 2

    def logits(n):
        # Off-ramps agree with ramp L and are confident on 90% of rows; elsewhere they are unsure.
        final = rng.normal(0, 3, (n, K))
        ramps = np.stack([final + rng.normal(0, 0.1, (n, K)) for _ in range(L - 1)] + [final])
        unsure = rng.random(n) < 0.1
        ramps[:-1, unsure] = 0.0
        return ramps.astype(np.float32), final.argmax(-1)
    pool, dev = logits(3000), logits(500)
    records = calibration_draws.run_draws("sst2", "train-holdout", pool, dev, draws=5, draw_size=1000,
                                          max_drop=1.0, confidence=0.95)
    assert len(records) == 5 and all(not r["refused"] for r in records)
    for r in records:   # each draw's threshold, measured again on dev by the library
        stats = calibration.threshold_stats("sst2", *dev, r["threshold"])
        assert (r["saving"], r["drop"]) == (stats["saving"], stats["drop"]) and r["saving"] > 0.4
    summary = calibration_draws.summarize(records, 1.0)
    assert summary["draws"] == 5 and summary["saving"]["min"] <= summary["saving"]["mean"] <= summary["saving"]["max"]
    halves = calibration_draws.run_draws("sst2", "dev-half", dev, None, draws=3, draw_size=None, max_drop=0.0,
                                         confidence=0.95)
    assert all(r["refused"] and r["saving"] == 0.0 for r in halves)   # a zero budget certifies nothing


def test_a_model_without_training_json_defaults_to_its_policys_length(model_dir):
    config, _ = load_checkpoint(model_dir)
    assert model_dir_lib.resolve_max_seq_length(None, config, model_dir)[0] == config.max_sequence_length
    calibration.write_exit_policy(model_dir, {"rule": "entropy", "threshold": 0.3, "max_seq_length": SEQ})
    length, why = model_dir_lib.resolve_max_seq_length(None, config, model_dir)
    assert (length, why) == (SEQ, "the length its exit policy was calibrated at (exit_policy.json)")
    assert model_dir_lib.resolve_max_seq_length(32, config, model_dir) == (32, "given")
