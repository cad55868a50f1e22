"""`python -m train.train --config configs/tiny.py` end to end, as a user runs it."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from deebert_jax.weights.checkpoint import load_checkpoint
from tests.conftest import REPO


def test_tiny_config_end_to_end(tmp_path):
    """In bf16 mixed precision (float32 training runs through the CLI in test_demo.py)."""
    workdir = tmp_path / "tiny"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    proc = subprocess.run([sys.executable, "-m", "train.train", "--config", "configs/tiny.py",
                           f"--config.workdir={workdir}", "--config.dtype=bfloat16"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "stage 2: dev accuracy of the final ramp" in proc.stdout and "ramp 1: accuracy" in proc.stdout

    config, params = load_checkpoint(workdir / "model")
    assert config.num_hidden_layers == 2 and params["ramps"]["classifier"]["kernel"].shape == (2, 32, 2)
    assert {str(leaf.dtype) for leaf in jax.tree_util.tree_leaves(params)} == {"float32"}   # saved as float32
    for stage in (1, 2):
        spec = json.loads((workdir / "checkpoints" / f"stage{stage}" / "run_spec.json").read_text())
        assert spec["dtype"] == "bfloat16"
    _, stage1 = load_checkpoint(workdir / "stage1")
    # stage 2 changed only the off-ramp
    np.testing.assert_array_equal(params["layers"]["query"]["kernel"], stage1["layers"]["query"]["kernel"])
    assert not np.array_equal(params["ramps"]["pooler"]["kernel"][0], stage1["ramps"]["pooler"]["kernel"][0])

    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["event"] == "train"]
    evals = {r["stage"]: r for r in records if r["event"] == "eval"}
    assert {r["stage"] for r in train} == {1, 2}
    assert all(np.isfinite(r["loss"]) and r["examples_per_second"] > 0 for r in train)
    assert [r["step"] for r in train if r["stage"] == 1][-1] == 64
    assert evals[1]["num_examples"] == evals[2]["num_examples"] == 100  # 100 is not a multiple of 8 x 8
    assert "ramps" not in evals[1] and [r["layer"] for r in evals[2]["ramps"]] == [1, 2]
    # the synthetic rule is learnable: both the final ramp and the off-ramp get it
    assert evals[1]["final"]["accuracy"] > 0.8 and evals[2]["ramps"][0]["accuracy"] > 0.8
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(workdir / "tensorboard"))
    assert sorted(os.listdir(workdir / "checkpoints" / "stage1")) == ["60", "64", "run_spec.json"]  # last 2 kept


MULTIHOST_SCRIPT = """
import os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
jax.config.update("jax_cpu_collectives_implementation", "gloo")
jax.distributed.initialize(coordinator_address=sys.argv[2], num_processes=2, process_id=int(sys.argv[1]))
from configs import tiny
from deebert_jax.training import loop as training
from deebert_jax.training import run_config
c = tiny.get_config(); c.workdir = sys.argv[3]; c.steps_per_stage = 4; c.save_every_steps = 2; c.multihost = "false"
r = training.train(c)
print("RESULT", jax.process_count(), jax.device_count(), r["eval"][2]["num_examples"], flush=True)
"""


@pytest.mark.slow   # about 90 s: `pytest -m slow`
def test_two_process_multihost_run(tmp_path):
    """Two processes x 2 CPU devices through jax.distributed: the multi-host code path, one machine."""
    import socket

    with socket.socket() as s:
        s.bind(("localhost", 0))
        address = f"localhost:{s.getsockname()[1]}"
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = str(REPO)
    procs = [subprocess.Popen([sys.executable, "-c", MULTIHOST_SCRIPT, str(i), address, str(tmp_path / "mh")],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for i in range(2)]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
        assert "RESULT 2 4 100" in out  # both hosts see the whole dev set's count after the gather
    assert sorted(os.listdir(tmp_path / "mh" / "checkpoints" / "stage2")) == ["2", "4", "run_spec.json"]
    load_checkpoint(tmp_path / "mh" / "model")


def test_configs_load_and_accept_overrides():
    import importlib

    from deebert_jax.data import glue as data
    from deebert_jax.training import run_config

    for name in ("tiny", "glue_minilm", "glue_bert_base", "glue_roberta_base", "demo", "sst2_full", "glue"):
        cfg = importlib.import_module(f"configs.{name}").get_config()
        cfg.workdir = "unused"
        assert run_config.validate_config(cfg) == (1, 2)
        data.canonical_task(cfg.task)
        assert run_config.parse_stages(cfg.stages) == (1, 2)
        cfg.train_limit, cfg.max_seq_length, cfg.stage1_epochs, cfg.eval_batch_size = 100, 64, 1.0, 16
        assert run_config.stage_steps(cfg, 1, n_train=100, global_batch=10) == 10
    bert = importlib.import_module("configs.glue_bert_base").get_config()
    assert (bert.learning_rate, bert.per_device_batch_size, bert.stage1_epochs, bert.max_seq_length) == (2e-5, 8, 3.0, 128)


def _train_cli(*args):
    env = {**{k: v for k, v in os.environ.items() if k != "DEEBERT_DEBUG"}, "JAX_PLATFORMS": "cpu"}
    return subprocess.run([sys.executable, "-m", "train.train", *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("args, message", [
    (["--config", "configs/tiny.py", "--config.learning_rate=-1"], "error: config.learning_rate=-1.0: expected"),
    (["--config", "configs/tiny.py", "--config.task=sst9"], "error: unknown task 'sst9'"),
    (["--config", "configs/glue.py:model=roberta"], "error: configs/glue.py:model=roberta: model='roberta'"),
    (["--config", "configs/tiny.py", "--config.no_such_field=1"], "error: the config has no field 'no_such_field'"),
    (["--config", "configs/tiny.py", "--config.per_device_batch_size=x"], "error: flag --config.per_device_batch_size"),
])
def test_config_and_data_errors_are_one_line(tmp_path, args, message):
    proc = _train_cli(*args, f"--config.workdir={tmp_path / 'run'}")
    assert proc.returncode == 1, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(message), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr


def test_debug_shows_the_traceback(tmp_path):
    proc = _train_cli("--config", "configs/tiny.py", "--config.learning_rate=0", f"--config.workdir={tmp_path}",
                      "--debug")
    assert proc.returncode != 0 and "Traceback" in proc.stderr
    assert "InputError: config.learning_rate=0.0" in proc.stderr   # a DeeBertError and a ValueError
