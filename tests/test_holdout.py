"""A calibration holdout by design, off-ramps distilled from ramp L, and the policy left behind."""

import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deebert_jax.data import batching
from deebert_jax.data import glue as data
from deebert_jax.evaluation import calibration
from deebert_jax.training import loop as training
from deebert_jax.training.losses import OffRampLoss, distillation_kl, off_ramp_loss
from deebert_jax.training import run_config
from tests.test_training import _tiny as training_tiny


def _tiny(workdir, **overrides):
    """test_training's tiny run, 4 steps a stage, no checkpoints in between."""
    return training_tiny(workdir, **{"steps_per_stage": 4, "save_every_steps": 0, **overrides})


# ----------------------------------------------------------------------------------------------
# The distillation loss against numbers worked out by hand

def test_distillation_loss_matches_a_hand_computed_value():
    # One off-ramp, one example, two labels. Teacher logits (0, ln 3) at T = 1: p = (1/4, 3/4).
    # Student logits (0, 0): q = (1/2, 1/2). KL(p || q) = 1/4 ln(1/2) + 3/4 ln(3/2).
    # Label 0: CE = ln 2. Weight 0.25: 0.75 ln 2 + 0.25 * 1 * KL.
    student = jnp.zeros((1, 1, 2))
    teacher = jnp.array([[0.0, math.log(3.0)]])
    labels = jnp.array([0])
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    loss, metrics = off_ramp_loss(student, labels, teacher, OffRampLoss("distill", 1.0, 0.25))
    assert float(loss) == pytest.approx(0.75 * math.log(2) + 0.25 * kl, rel=1e-6)
    assert float(metrics["agreement"]) == 0.0   # argmax 0 (a tie goes to the first) vs the teacher's 1
    # At T = 2 the teacher is (0, ln 3 / 2): p = (1, sqrt 3) / (1 + sqrt 3), and T^2 scales the KL.
    p = np.array([1.0, math.sqrt(3.0)]) / (1 + math.sqrt(3.0))
    kl2 = float((p * np.log(p / 0.5)).sum())
    assert float(distillation_kl(student, teacher, 2.0)[0]) == pytest.approx(kl2, rel=1e-6)
    loss2, _ = off_ramp_loss(student, labels, teacher, OffRampLoss("distill", 2.0, 1.0))
    assert float(loss2) == pytest.approx(4.0 * kl2, rel=1e-6)
    # Weight 0 is the labels loss; two off-ramps add up.
    two = jnp.stack([student[0], jnp.array([[2.0, -1.0]])])
    labels_loss, _ = off_ramp_loss(two, labels)
    mixed0, _ = off_ramp_loss(two, labels, teacher, OffRampLoss("distill", 3.0, 0.0))
    assert float(mixed0) == pytest.approx(float(labels_loss), rel=1e-6)


def test_no_gradient_flows_into_the_teacher():
    teacher = jnp.array([[0.3, -0.2], [1.0, 0.5]])
    grad = jax.grad(lambda t: off_ramp_loss(jnp.zeros((1, 2, 2)), jnp.array([0, 1]), t,
                                            OffRampLoss("distill", 2.0, 1.0))[0])(teacher)
    assert np.all(np.asarray(grad) == 0)


@pytest.mark.parametrize("field, value, message", [
    ("offramp_loss", "kd", r"config.offramp_loss='kd'"),
    ("distill_temperature", 0.0, r"config.distill_temperature=0.0"),
    ("distill_weight", 1.5, r"config.distill_weight=1.5"),
    ("calibration_holdout", -3, r"config.calibration_holdout=-3"),
    ("calibration_confidence", 1.0, r"config.calibration_confidence=1.0"),
    ("calibration_rule", "margin", r"config.calibration_rule='margin'"),
])
def test_bad_loss_and_calibration_fields_fail_before_any_work(tmp_path, field, value, message):
    cfg = _tiny(tmp_path / "w", **{"offramp_loss": "distill", field: value})
    with pytest.raises(ValueError, match=message):
        run_config.validate_config(cfg)
    assert not (tmp_path / "w").exists()


# ----------------------------------------------------------------------------------------------
# The holdout

def test_holdout_rows_never_reach_a_training_batch_and_choose_the_policy(tmp_path, monkeypatch):
    holdout = 96
    cfg = _tiny(tmp_path / "w", train_limit=0, calibration_holdout=holdout, calibration_confidence=0.0,
                calibration_max_drop=100.0, offramp_loss="distill")
    full = data.load_split("synthetic", "train", vocab_size=100, max_seq_length=16, seed=int(cfg.seed))
    train_rows = {row.tobytes() for row in full["input_ids"][:-holdout]}
    # Synthetic sentences repeat; the held-out rows that no training row equals identify a leak.
    held_rows = {row.tobytes() for row in full["input_ids"][-holdout:]} - train_rows
    assert len(held_rows) > holdout // 2   # the check below could not pass by accident

    seen = []
    batch_fn = batching.train_batch

    def spy(arrays, *args, **kwargs):
        batch = batch_fn(arrays, *args, **kwargs)
        seen.extend(row.tobytes() for row in batch["input_ids"])
        return batch
    monkeypatch.setattr(batching, "train_batch", spy)
    result = training.train(cfg)

    assert len(seen) == 2 * 4 * cfg.per_device_batch_size * jax.device_count()   # every batch of both stages
    assert not set(seen) & held_rows
    assert set(seen) <= train_rows
    spec = json.loads((tmp_path / "w" / "checkpoints" / "stage1" / "run_spec.json").read_text())
    assert spec["train_examples"] == len(full["labels"]) - holdout

    # After stage 2 the held-out rows chose the threshold: a policy beside the model, on the
    # train-holdout split, reported on dev.
    policy = calibration.load_exit_policy(result["model"])
    assert result["calibration"]["policy"] == policy
    assert policy["calibration_split"] == "train-holdout" and policy["calibration_size"] == holdout
    assert policy["calibration"]["n"] == holdout and policy["reported"]["n"] == 37
    assert policy["max_seq_length"] == 16
    from deebert_jax.weights.checkpoint import training_length
    assert training_length(result["model"]) == 16   # predict and serve default to the training length
    records = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert any(r.get("event") == "calibration" and r["policy"]["threshold"] == policy["threshold"] for r in records)
    assert any("agreement" in r for r in records if r.get("event") == "train" and r["stage"] == 2)


def test_a_refused_calibration_writes_no_policy_and_says_so(tmp_path, caplog):
    # A zero budget at 95% confidence on 8 rows: no threshold can be certified.
    cfg = _tiny(tmp_path / "w", calibration_holdout=8, calibration_max_drop=0.0)
    result = training.train(cfg)
    assert result["calibration"]["policy"] is None
    assert "no threshold saves layers" in result["calibration"]["refused"]
    assert not os.path.exists(os.path.join(result["model"], calibration.POLICY_FILE))
    assert "has no exit_policy.json" in caplog.text


def test_a_holdout_as_large_as_the_training_set_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"config.calibration_holdout=512: the synthetic training split has 512 rows"):
        training.train(_tiny(tmp_path / "w", train_limit=0, calibration_holdout=512))


def test_a_finished_run_again_with_another_loss_is_refused_and_its_model_kept(tmp_path):
    cfg = _tiny(tmp_path / "w")
    result = training.train(cfg)
    model_params = os.path.join(result["model"], "deebert_config.json")
    before = os.stat(model_params).st_mtime_ns
    with pytest.raises(ValueError, match=r"finished stage was trained with different settings \(offramp_loss\)"):
        training.train(_tiny(tmp_path / "w", offramp_loss="distill"))
    with pytest.raises(ValueError, match=r"finished stage was trained with different settings \(dtype"):
        training.train(_tiny(tmp_path / "w", dtype="bfloat16"))
    again = training.train(_tiny(tmp_path / "w"))   # the same config: nothing to do, the model untouched
    assert again["eval"] == {} and os.stat(model_params).st_mtime_ns == before
