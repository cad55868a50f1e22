"""Two-stage training: pmap equivalence, stage-2 freezing, resume after a kill, NaN stop."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from configs import tiny as tiny_cfg
from deebert_jax.data import batching
from deebert_jax.data import glue as data
from deebert_jax.core import runtime
from deebert_jax.training import loop as training
from deebert_jax.training import steps as train_steps
from deebert_jax.weights import model_loading
from deebert_jax.training import run_config
from deebert_jax.core import errors
from deebert_jax.weights.checkpoint import TrainCheckpointManager, load_checkpoint
from deebert_jax.core.config import tiny_config
from tests.conftest import REPO

SEQ = 16


def _batches(n_steps, global_batch, vocab=100):
    arrays = data.load_split("synthetic", "train", vocab_size=vocab, max_seq_length=SEQ, limit=global_batch * n_steps)
    return [batching.train_batch(arrays, global_batch, seed=0, step=i) for i in range(n_steps)]


def _run_steps(config, params, stage, batches, devices, settings, dtype="float32"):
    p_step, tx = train_steps.pmapped_train_step(config, stage, settings, tuple(devices), dtype)
    state = runtime.replicate(train_steps.init_train_state(params, tx, stage, config.num_hidden_layers), devices)
    key = runtime.replicate(jax.random.PRNGKey(0), devices)
    for batch in batches:
        state, metrics = p_step(state, batching.shard(batch, len(devices)), key)
    return runtime.unreplicate(state.params), runtime.unreplicate(metrics)


def _leaves(tree):
    return jax.tree_util.tree_leaves_with_path(tree)


def test_pmap_8_devices_matches_1_device():
    assert jax.local_device_count() == 8, "conftest must simulate 8 CPU devices"
    config = tiny_config(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    params = model_loading.jitted_init_params(config, jax.random.PRNGKey(1))
    settings = train_steps.OptimizerSettings(1e-3, total_steps=3, warmup_steps=1, weight_decay=0.01)
    batches = _batches(3, 16)
    p8, m8 = _run_steps(config, params, 1, batches, jax.local_devices(), settings)
    p1, m1 = _run_steps(config, params, 1, batches, jax.local_devices()[:1], settings)
    moved = 0
    for (path, a), (_, b), (_, before) in zip(_leaves(p8), _leaves(p1), _leaves(params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5, err_msg=jax.tree_util.keystr(path))
        moved += not np.array_equal(a, before)
    assert moved > 10  # the steps really trained something
    np.testing.assert_allclose(m8["loss"], m1["loss"], rtol=1e-5)
    # Stage 1 does not touch the off-ramps (row 0 of every ramp leaf).
    for (path, a), (_, before) in zip(_leaves(p8["ramps"]), _leaves(params["ramps"])):
        np.testing.assert_array_equal(a[0], before[0], err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stage2_trains_only_offramps_bitwise(dtype):
    config = tiny_config(num_hidden_layers=3)  # two off-ramps; dropout on, as in real stage 2
    params = model_loading.jitted_init_params(config, jax.random.PRNGKey(2))
    settings = train_steps.OptimizerSettings(1e-3, total_steps=2, weight_decay=0.01)
    new, metrics = _run_steps(config, params, 2, _batches(2, 16), jax.local_devices(), settings, dtype)
    assert np.isfinite(metrics["loss"]) and metrics["finite"] == 1.0
    for key in ("embeddings", "layers"):
        for (path, a), (_, b) in zip(_leaves(new[key]), _leaves(params[key])):
            assert a.dtype == b.dtype and np.array_equal(a, b), f"{key}{jax.tree_util.keystr(path)} changed"
    L = config.num_hidden_layers
    for (path, a), (_, b) in zip(_leaves(new["ramps"]), _leaves(params["ramps"])):
        name = jax.tree_util.keystr(path)
        assert np.array_equal(a[L - 1], b[L - 1]), f"final ramp {name} changed in stage 2"
        for i in range(L - 1):
            assert not np.array_equal(a[i], b[i]), f"off-ramp {i + 1} {name} did not change"


def test_bfloat16_step_computes_in_bf16():
    """Mixed precision (config.dtype): the matmuls take bf16 operands; that the tiny task is still
    learnt and saved as float32 is checked end to end in test_train_cli.py."""
    config = tiny_config()
    settings = train_steps.OptimizerSettings(1e-3, total_steps=2)
    tx = settings.optimizer()
    step = train_steps.make_train_step(config, tx, settings.schedule(), 1, dtype=jax.numpy.bfloat16)
    state = train_steps.init_train_state(model_loading.jitted_init_params(config, jax.random.PRNGKey(0)), tx, 1, 2)
    batch = {k: v[:4] for k, v in _batches(1, 4)[0].items()}
    jaxpr = str(jax.make_jaxpr(step, axis_env=[(runtime.AXIS, 1)])(state, batch, jax.random.PRNGKey(0)))
    dots = [line for line in jaxpr.splitlines() if "dot_general" in line]
    assert dots and all("bf16" in line for line in dots), dots[:3]


def test_compute_dtype_is_part_of_the_run_spec(tmp_path):
    from deebert_jax.training.run_config import check_run_spec
    path = str(tmp_path / "run_spec.json")
    check_run_spec(path, {"seed": 1, "dtype": "bfloat16"}, resuming=False)
    with pytest.raises(ValueError, match=r"different settings \(dtype\)"):
        check_run_spec(path, {"seed": 1, "dtype": "float32"}, resuming=True)
    # A spec written before the field existed was a float32 run: it resumes as one, and only as one.
    (tmp_path / "run_spec.json").write_text(json.dumps({"seed": 1}))
    check_run_spec(path, {"seed": 1, "dtype": "float32"}, resuming=True)
    with pytest.raises(ValueError, match=r"\(dtype\)"):
        check_run_spec(path, {"seed": 1, "dtype": "bfloat16"}, resuming=True)


def test_split_merge_roundtrip_and_decay_mask():
    config = tiny_config(num_hidden_layers=3)
    params = model_loading.jitted_init_params(config, jax.random.PRNGKey(3))
    for stage in (1, 2):
        trainable, frozen = train_steps.split_params(params, stage, 3)
        merged = train_steps.merge_params(trainable, frozen, stage)
        for (_, a), (_, b) in zip(_leaves(merged), _leaves(params)):
            np.testing.assert_array_equal(a, b)
    rows = {1: (2, 3), 2: (0, 2)}
    for stage, (lo, hi) in rows.items():
        trainable, _ = train_steps.split_params(params, stage, 3)
        np.testing.assert_array_equal(trainable["ramps"]["classifier"]["kernel"],
                                      params["ramps"]["classifier"]["kernel"][lo:hi])
    mask = train_steps.decay_mask(params)
    assert mask["layers"]["query"]["kernel"] and mask["embeddings"]["word_embeddings"]["embedding"]
    assert not mask["layers"]["query"]["bias"] and not mask["layers"]["attention_LayerNorm"]["scale"]
    assert not mask["embeddings"]["LayerNorm"]["bias"] and not mask["ramps"]["pooler"]["bias"]


def test_schedule_warmup_then_linear_decay():
    schedule = train_steps.learning_rate_schedule(1.0, total_steps=10, warmup_steps=2)
    values = [float(schedule(i)) for i in range(11)]
    np.testing.assert_allclose(values[:3], [0.0, 0.5, 1.0], atol=1e-6)
    assert values[10] == pytest.approx(0.0, abs=1e-6)
    assert all(a > b for a, b in zip(values[2:10], values[3:11]))


def _tiny(workdir, **overrides):
    cfg = tiny_cfg.get_config()
    cfg.workdir = str(workdir)
    cfg.steps_per_stage = 6
    cfg.save_every_steps = 2
    cfg.log_every_steps = 2
    cfg.train_limit = 64
    cfg.eval_limit = 37
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


class Preempted(Exception):
    pass


def _records(workdir):
    """metrics.jsonl without the one field that depends on the clock."""
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k != "examples_per_second"} for line in lines]


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    ref = training.train(_tiny(tmp_path / "ref", log_every_steps=1))
    _, ref_params = load_checkpoint(ref["model"])

    def kill_at(when):
        def on_step(stage, step):
            if (stage, step) == when:  # after the checkpoint at step 2, before the next one
                raise Preempted()
        return on_step

    work = tmp_path / "resumed"
    with pytest.raises(Preempted):
        training.train(_tiny(work, log_every_steps=1), on_step=kill_at((1, 3)))
    with pytest.raises(Preempted):
        training.train(_tiny(work, log_every_steps=1), on_step=kill_at((2, 3)))
    assert not (work / "model").exists() and (work / "stage1").exists()
    assert TrainCheckpointManager(work / "checkpoints" / "stage2").latest_step() == 2
    resumed = training.train(_tiny(work, log_every_steps=1))
    _, params = load_checkpoint(resumed["model"])
    for (path, a), (_, b) in zip(_leaves(params), _leaves(ref_params)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert resumed["eval"][2] == {**ref["eval"][2]}
    assert resumed["eval"][2]["num_examples"] == 37
    # keep-last-k: only the 2 newest steps of each stage survive
    assert TrainCheckpointManager(work / "checkpoints" / "stage1").all_steps() == [4, 6]
    # Two resumes, each re-running a logged step: every step is logged once, as in the uninterrupted run.
    records = _records(work)
    assert [(r["event"], r["stage"], r["step"]) for r in records] == (
        [("train", 1, i) for i in range(1, 7)] + [("eval", 1, 6)] + [("train", 2, i) for i in range(1, 7)]
        + [("eval", 2, 6)])
    assert records == _records(tmp_path / "ref")


def test_damaged_newest_checkpoint_resumes_from_the_previous_one_bitwise(tmp_path, monkeypatch, caplog):
    """Killed while writing step 4 of stage 1 (its array data cut short) and once more mid-stage
    after an orbax temporary directory was left behind: the resumed run warns, sets step 4 aside,
    restarts from step 2 and ends bitwise where the uninterrupted run ends."""
    from tests.test_reliability import damage

    ref = training.train(_tiny(tmp_path / "ref", log_every_steps=1))
    _, ref_params = load_checkpoint(ref["model"])
    work = tmp_path / "resumed"
    real_save = TrainCheckpointManager.save

    def save_then_die_at_4(self, step, state):
        real_save(self, step, state)
        if step == 4 and self.directory.endswith("stage1"):
            damage(os.path.join(self.directory, "4"), "truncate")   # the kill landed mid-write
            raise Preempted()

    monkeypatch.setattr(TrainCheckpointManager, "save", save_then_die_at_4)
    with pytest.raises(Preempted):
        training.train(_tiny(work, log_every_steps=1))
    monkeypatch.setattr(TrainCheckpointManager, "save", real_save)
    stage1 = work / "checkpoints" / "stage1"
    (stage1 / "6.orbax-checkpoint-tmp-1").mkdir()   # an interrupted write of a later step
    with caplog.at_level("WARNING"):
        resumed = training.train(_tiny(work, log_every_steps=1))
    assert any("4" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
    assert (stage1 / "4.damaged").is_dir()          # set aside, not deleted
    _, params = load_checkpoint(resumed["model"])
    for (path, a), (_, b) in zip(_leaves(params), _leaves(ref_params)):
        np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))
    assert resumed["eval"][2] == ref["eval"][2]
    assert _records(work) == _records(tmp_path / "ref")


def test_metrics_log_drops_what_a_resume_logs_again(tmp_path):
    lines = [{"event": "train", "stage": 1, "step": 2}, {"event": "eval", "stage": 1, "step": 6},
             {"event": "train", "stage": 2, "step": 2}, {"event": "train", "stage": 2, "step": 4},
             {"event": "eval", "stage": 2, "step": 6}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"event": "tr')
    log = runtime.MetricsLog(str(tmp_path))
    log.drop_after(2, 2)  # stage 2 resumes from step 2; the line cut short by a kill goes too
    log.write({"event": "train", "stage": 2, "step": 3})
    log.close()
    assert _records(tmp_path) == lines[:3] + [{"event": "train", "stage": 2, "step": 3}]


def test_nan_loss_stops_with_last_good_checkpoint(tmp_path, monkeypatch):
    real_batch = batching.train_batch

    def poisoned(arrays, global_batch_size, seed, step, *args):
        batch = real_batch(arrays, global_batch_size, seed, step, *args)
        if step == 2:  # the third step: ids past the embedding table embed as NaN
            batch["input_ids"] = np.full_like(batch["input_ids"], 10_000)
        return batch

    monkeypatch.setattr(training.batching, "train_batch", poisoned)
    work = tmp_path / "nan"
    with pytest.raises(errors.NonFiniteLossError, match=r"stage 1, step 3: loss is nan") as err:
        training.train(_tiny(work, stages="1"))
    ckpt_dir = work / "checkpoints" / "stage1"
    assert str(ckpt_dir / "2") in str(err.value)
    manager = TrainCheckpointManager(ckpt_dir)
    assert manager.all_steps() == [2]
    tx = train_steps.OptimizerSettings(1e-3, 6).optimizer()
    like = train_steps.init_train_state(model_loading.jitted_init_params(tiny_config(), jax.random.PRNGKey(0)), tx, 1, 2)
    restored = manager.restore(2, like)
    assert int(restored.step) == 2
    assert all(np.isfinite(x).all() for x in jax.tree_util.tree_leaves(restored.params))
    assert not (work / "stage1").exists() and not (work / "model").exists()


def test_parse_stages():
    assert run_config.parse_stages("1,2") == (1, 2) and run_config.parse_stages("2") == (2,)
    assert run_config.parse_stages(1) == (1,) and run_config.parse_stages(" 2, 1 ") == (1, 2)
    for bad in ("3", "", "one", "1,3"):
        with pytest.raises(ValueError, match="expected '1', '2' or '1,2'"):
            run_config.parse_stages(bad)


def test_resume_with_different_settings_is_refused(tmp_path):
    def stop(stage, step):
        if step == 2:
            raise Preempted()

    with pytest.raises(Preempted):
        training.train(_tiny(tmp_path, stages="1"), on_step=stop)
    with pytest.raises(ValueError, match=r"run_spec.json: .*different settings \(optimizer.peak_learning_rate\)"):
        training.train(_tiny(tmp_path, stages="1", learning_rate=0.5))


def test_model_directory_holds_its_tokenizer(tmp_path, minilm_dir):
    tokenizer = data.load_tokenizer(minilm_dir)
    config = tiny_config()
    params = model_loading.jitted_init_params(config, jax.random.PRNGKey(0))
    ctx = training.RunContext(cfg=None, workdir=str(tmp_path), task="sst2", config=config, train={}, dev={},
                              tokenizer=tokenizer, devices=jax.local_devices(), log=None)
    training._save_model(ctx, str(tmp_path / "model"), params)
    loaded_config, loaded = load_checkpoint(tmp_path / "model")
    assert loaded_config == config
    np.testing.assert_array_equal(loaded["layers"]["key"]["kernel"], params["layers"]["key"]["kernel"])
    again = data.load_tokenizer(tmp_path / "model")
    assert again("a pair", "of sentences")["input_ids"] == tokenizer("a pair", "of sentences")["input_ids"]
    assert sorted(os.listdir(tmp_path)) == ["model"]  # no temporary directories left behind
    # The task's label names travel with the model: predictions say "positive", not "LABEL_1".
    from deebert_jax.inference.model_dir import label_names
    assert label_names(tmp_path / "model", config.num_labels) == ["negative", "positive"]


@pytest.mark.parametrize("field, value, message", [
    ("learning_rate", 0.0, "config.learning_rate=0.0: expected a finite number > 0"),
    ("learning_rate", float("nan"), "config.learning_rate=nan"),
    ("stage2_learning_rate", float("inf"), "config.stage2_learning_rate=inf"),
    ("per_device_batch_size", 0, "config.per_device_batch_size=0: expected an integer >= 1"),
    ("eval_batch_size", -8, "config.eval_batch_size=-8"),
    ("max_seq_length", 0, "config.max_seq_length=0"),
    ("stage1_epochs", -1.0, "config.stage1_epochs=-1.0: expected a number >= 0"),
    ("steps_per_stage", -2, "config.steps_per_stage=-2"),
    ("stages", "1,3", "config.stages='1,3': expected '1', '2' or '1,2'"),
    ("workdir", "", "config.workdir is empty"),
    ("warmup_ratio", 1.5, "config.warmup_ratio=1.5"),
    ("dtype", "float16", "config.dtype='float16': expected one of float32, bfloat16"),
])
def test_bad_config_fails_before_any_work(tmp_path, field, value, message):
    work = tmp_path / "run"
    cfg = _tiny(work)
    cfg[field] = value
    with pytest.raises(ValueError, match=re.escape(message)):
        training.train(cfg)
    assert not work.exists()


def test_no_steps_and_sequences_longer_than_the_model_are_refused(tmp_path):
    with pytest.raises(ValueError, match=re.escape("config.stage2_epochs=0 and config.steps_per_stage=0")):
        training.train(_tiny(tmp_path, steps_per_stage=0, stage2_epochs=0.0))
    run_config.validate_config(_tiny(tmp_path, steps_per_stage=0, stage2_epochs=0.0, stages="1"))  # stage 2 not run
    with pytest.raises(ValueError, match=re.escape("config.max_seq_length=65: expected an integer in [1, 64]")):
        training.train(_tiny(tmp_path, max_seq_length=65))  # the tiny model has 64 positions


HOLD_LOCK = """
import sys, time
from deebert_jax.core import runtime
with runtime.workdir_lock(sys.argv[1]):
    print("locked", flush=True)
    time.sleep(600)
"""


def test_one_run_per_workdir(tmp_path):
    work = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(work)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(REPO)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        start = time.perf_counter()
        with pytest.raises(ValueError, match=re.escape(f"{work}: another run (pid {holder.pid}) is using")):
            training.train(_tiny(work))
        assert time.perf_counter() - start < 10  # at once, not after loading the model and data
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    # The holder died without unlocking: its lock file (with its pid) no longer blocks.
    assert (work / ".lock").read_text().strip() == str(holder.pid)
    with runtime.workdir_lock(str(work)):
        assert (work / ".lock").read_text().strip() == str(os.getpid())
        with pytest.raises(ValueError, match=f"pid {os.getpid()}"):  # a second writer in this process too
            with runtime.workdir_lock(str(work)):
                pass


def test_cpu_speedups_leave_the_training_step_unchanged():
    """`cpu_rng` (same dropout bits) and `matmul` (kernel gradients as plain matmuls) against the
    step as JAX and Flax ship it: same loss bit for bit, parameters to float rounding."""
    from benchmarks.train_step import jax_defaults
    from deebert_jax.cpu.process import setup_process

    config = tiny_config(num_hidden_layers=2)   # dropout on: the masks must be the same draws
    params = model_loading.jitted_init_params(config, jax.random.PRNGKey(4))
    settings = train_steps.OptimizerSettings(1e-3, total_steps=2, weight_decay=0.01)
    batches = _batches(2, 8)
    devices = jax.local_devices()[:1]

    def run(kernels):
        tx = settings.optimizer()
        step = jax.pmap(train_steps.make_train_step(config, tx, settings.schedule(), 1, kernels=kernels),
                        axis_name=runtime.AXIS, devices=devices)
        state = runtime.replicate(train_steps.init_train_state(params, tx, 1, config.num_hidden_layers), devices)
        key = runtime.replicate(jax.random.PRNGKey(0), devices)
        losses = []
        for batch in batches:
            state, metrics = step(state, batching.shard(batch, 1), key)
            losses.append(float(runtime.unreplicate(metrics)["loss"]))
        return runtime.unreplicate(state.params), losses

    setup_process(keep_freed_memory=False)   # threefry's unrolled CPU lowering, as every command has it
    ours, our_losses = run("cpu_tuned")
    with jax_defaults() as kernels:
        assert kernels == "reference"
        theirs, their_losses = run(kernels)
    assert our_losses[0] == their_losses[0]           # same forward, same dropout masks
    np.testing.assert_allclose(our_losses, their_losses, rtol=1e-6)
    moved = 0
    for (path, a), (_, b), (_, before) in zip(_leaves(ours), _leaves(theirs), _leaves(params)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
        moved += not np.array_equal(a, before)
    assert moved > 10
