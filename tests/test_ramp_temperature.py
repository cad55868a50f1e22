"""Off-ramp temperatures fitted to agree with ramp L, folded into the classifiers after training."""

import json
import math
import os

import numpy as np
import pytest

from deebert_jax.core.errors import InputError
from deebert_jax.evaluation import calibration, ramp_temperature
from research import calibration_draws
from deebert_jax.evaluation.sweep import all_ramp_logits
from deebert_jax.training import loop as training
from deebert_jax.training import run_config
from deebert_jax.weights.checkpoint import TRAINING_FILE, load_checkpoint
from tests.conftest import calibration_config, initial_params, ragged_batch
from tests.test_holdout import _tiny


def _binary_case(agree: int, disagree: int, margin: float):
    """Off-ramp logits (margin/2, -margin/2) on every row; ramp L predicts class 0 on `agree`
    rows and class 1 on `disagree` rows. The cross-entropy of ramp L's class under
    softmax(logits / T) is least where sigmoid(margin / T) = agree / (agree + disagree)."""
    n = agree + disagree
    off_ramp = np.tile([margin / 2, -margin / 2], (n, 1))
    final = np.array([[1.0, 0.0]] * agree + [[0.0, 1.0]] * disagree)
    return np.stack([off_ramp, final]).astype(np.float32)


def test_the_fitted_temperature_is_the_closed_form_optimum():
    # margin 2, 80% agreement: sigmoid(2 / T) = 0.8 -> T = 2 / ln 4.
    logits = _binary_case(80, 20, 2.0)
    assert ramp_temperature.fit_temperature(logits[0], logits[1].argmax(-1)) == pytest.approx(2 / math.log(4), rel=1e-4)
    temps = ramp_temperature.fit_ramp_temperatures(logits)
    assert temps.dtype == np.float32 and temps[1] == 1.0   # ramp L keeps its own scale
    assert temps[0] == pytest.approx(2 / math.log(4), rel=1e-4)
    # 95% agreement: sharper, T = 2 / ln 19 < 1.
    assert ramp_temperature.fit_ramp_temperatures(_binary_case(95, 5, 2.0))[0] == pytest.approx(2 / math.log(19),
                                                                                                rel=1e-4)
    with pytest.raises(ValueError, match=r"expected \[N, K\] logits"):
        ramp_temperature.fit_temperature(np.zeros((0, 2)), np.zeros(0, int))


def test_folded_temperatures_divide_the_logits_and_keep_every_prediction():
    config = calibration_config()
    params = initial_params(config)
    ids, mask, types = ragged_batch(24, 12, config.vocab_size, seed=3)
    arrays = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types, "labels": np.zeros(24, np.int32)}
    before = all_ramp_logits(config, params, arrays, 8)
    temps = np.array([0.25, 3.0, 1.0], np.float32)
    scaled = ramp_temperature.apply_ramp_temperatures(params, temps)
    after = all_ramp_logits(config, scaled, arrays, 8)
    np.testing.assert_allclose(after, ramp_temperature.scale_ramp_logits(before, temps), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(after.argmax(-1), before.argmax(-1))
    assert not np.allclose(after[0], before[0])   # the exit rule sees another confidence
    assert scaled["layers"] is params["layers"] and scaled["ramps"]["pooler"] is params["ramps"]["pooler"]
    for bad in ([1.0, 1.0], [1.0, 0.0, 1.0], [1.0, float("nan"), 1.0]):
        with pytest.raises(ValueError, match="positive finite temperatures"):
            ramp_temperature.apply_ramp_temperatures(params, np.array(bad, np.float32))


def test_training_folds_the_temperatures_and_calibrates_on_the_other_held_out_rows(tmp_path):
    cfg = _tiny(tmp_path / "w", train_limit=0, calibration_holdout=96, calibration_confidence=0.0,
                calibration_max_drop=100.0, ramp_temperature="agreement", temperature_rows=32)
    result = training.train(cfg)
    info = json.loads((tmp_path / "w" / "model" / TRAINING_FILE).read_text())
    record = info["ramp_temperatures"]
    assert isinstance(info["train_rows"], int) and info["train_rows"] > 0   # which rows train-holdout must avoid
    assert record["rows"] == 32 and record["holdout"] == 96 and record["fit"] == "agreement"
    temps = np.array(record["temperatures"], np.float32)
    assert temps.shape == (cfg.model.num_hidden_layers,) and temps[-1] == 1.0 and np.all(temps > 0)

    # The model directory holds stage 2's weights with the off-ramp classifiers divided by them.
    _, stage2 = load_checkpoint(str(tmp_path / "w" / "stage2"))
    config, model = load_checkpoint(result["model"])
    expected = ramp_temperature.apply_ramp_temperatures(stage2, temps)["ramps"]["classifier"]
    for leaf in ("kernel", "bias"):
        np.testing.assert_allclose(model["ramps"]["classifier"][leaf], expected[leaf], rtol=1e-6)
    np.testing.assert_array_equal(model["layers"]["query"]["kernel"], stage2["layers"]["query"]["kernel"])

    # The threshold was chosen on the 64 rows the fit did not see, for the weights on disk.
    policy = calibration.load_exit_policy(result["model"], model=(config, model))
    assert policy["calibration_size"] == 64 and policy["calibration"]["n"] == 64
    assert policy["ramp_temperatures"] == record
    assert "off-ramp temperatures fitted on 32 other held-out rows" in calibration.describe_policy(policy)
    events = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "ramp_temperatures" and e["temperatures"] == record["temperatures"] for e in events)

    # train.calibrate (and train.calibration_draws) on train-holdout may not reach back into the
    # rows that fitted them.
    calibration.check_clear_of_temperature_rows(result["model"], 64)
    with pytest.raises(InputError, match=r"--calibration-size 65: .* fitted on the first 32 of the last 96 training "
                                         r"rows .* use at most --calibration-size 64"):
        calibration.check_clear_of_temperature_rows(result["model"], 65)
    from train.calibration_draws import main as draws
    with pytest.raises(InputError, match=r"--pool-size 96: .* use at most --pool-size 64"):
        draws(["--checkpoint", result["model"], "--task", "synthetic", "--max-drop", "1", "--splits", "train-holdout",
               "--pool-size", "96"])


def test_without_the_option_nothing_is_fitted_and_asking_later_is_refused(tmp_path):
    cfg = dict(calibration_holdout=16, calibration_confidence=0.0, calibration_max_drop=100.0)
    result = training.train(_tiny(tmp_path / "w", **cfg))
    assert "ramp_temperatures" not in json.loads(open(os.path.join(result["model"], TRAINING_FILE)).read())
    assert "ramp_temperatures" not in result["calibration"]["policy"]
    calibration.check_clear_of_temperature_rows(result["model"], 10 ** 6)   # nothing to collide with

    # The finished run again, now asking for temperatures, would keep the model as it is: refused.
    files = {p: (tmp_path / "w" / "model" / p).read_bytes() for p in ("training.json", "exit_policy.json")}
    with pytest.raises(InputError, match=r"model was written with config.ramp_temperature='none', this run asks "
                                         r"for 'agreement'.*move .*model away"):
        training.train(_tiny(tmp_path / "w", ramp_temperature="agreement", temperature_rows=8, **cfg))
    assert files == {p: (tmp_path / "w" / "model" / p).read_bytes() for p in files}
    assert training.train(_tiny(tmp_path / "w", **cfg))["eval"] == {}   # the same config: nothing to do


@pytest.mark.parametrize("overrides, message", [
    ({"ramp_temperature": "platt"}, r"config.ramp_temperature='platt': expected one of none, agreement"),
    ({"ramp_temperature": "agreement", "calibration_holdout": 0},
     r"config.temperature_rows=1000 of the config.calibration_holdout=0 held-out rows"),
    ({"ramp_temperature": "agreement", "calibration_holdout": 40, "temperature_rows": 40},
     r"config.temperature_rows=40 of the config.calibration_holdout=40 .* hold out more than 40 rows"),
    ({"ramp_temperature": "agreement", "calibration_holdout": 40, "temperature_rows": 0},
     r"config.temperature_rows=0"),
])
def test_bad_temperature_fields_fail_before_any_work(tmp_path, overrides, message):
    cfg = _tiny(tmp_path / "w", **overrides)
    with pytest.raises(ValueError, match=message):
        run_config.validate_config(cfg)
    assert not (tmp_path / "w").exists()


def test_draws_fit_on_the_first_pool_rows_and_draw_from_the_rest():
    pool = np.concatenate([_binary_case(80, 20, 2.0), _binary_case(90, 10, 2.0)], axis=1)
    labels = pool[-1].argmax(-1)
    dev = (_binary_case(5, 5, 2.0), np.zeros(10, np.int64))
    (rest, rest_labels), (dev_scaled, dev_labels), temps = calibration_draws.fit_temperatures_on_pool(
        (pool, labels), dev, 100)
    assert temps[0] == pytest.approx(2 / math.log(4), rel=1e-4)   # fitted on the first 100 rows only
    assert rest.shape == (2, 100, 2) and np.array_equal(rest_labels, labels[100:])
    np.testing.assert_allclose(rest[0], pool[0, 100:] / temps[0], rtol=1e-6)
    np.testing.assert_allclose(dev_scaled[0], dev[0][0] / temps[0], rtol=1e-6)
    assert dev_labels is dev[1]
    with pytest.raises(ValueError, match="expected 1 to 199"):
        calibration_draws.fit_temperatures_on_pool((pool, labels), dev, 200)
