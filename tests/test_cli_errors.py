"""Every command, driven with bad input the way a user would: one line that names the fault, a
non-zero exit, no traceback, and nothing of the user's changed."""

import hashlib
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.conftest import REPO

W = "work"  # an output directory each case may create


def _snapshot(root):
    """path -> sha256 of every file below `root`."""
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            path = os.path.join(d, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.fixture
def user_tree(tmp_path):
    """A working directory holding the user's own files: `user/` (notes, data) and `src/`, a
    directory that looks like a model source, and a model config with a wrong field type."""
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "notes.txt").write_text("mine\n")
    (tmp_path / "user" / "data.csv").write_text("a,b\n1,2\n")
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "weights.bin").write_bytes(b"\0" * 64)
    (tmp_path / "bad_model").mkdir()
    (tmp_path / "bad_model" / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": "384"}))
    save_file({"classifier.weight": np.zeros((2, 4), np.float32)}, str(tmp_path / "bad_model" / "model.safetensors"))
    (tmp_path / "bad_model" / "deebert_config.json").write_text(json.dumps({"num_hidden_layers": [2]}))
    return tmp_path


TINY = ["--config", str(REPO / "configs" / "tiny.py"), f"--config.workdir={W}"]

CASES = [
    # Config values, before any work
    ("train.train", TINY + ["--config.learning_rate=-0.001"], r"config\.learning_rate"),
    ("train.train", TINY + ["--config.per_device_batch_size=0"], r"config\.per_device_batch_size"),
    ("train.train", TINY + ["--config.max_seq_length=100000"], r"max_seq_length"),
    # A model directory whose config.json has a field of the wrong type
    ("train.convert", ["--pytorch", "bad_model", "--out", "converted"],
     r"bad_model/config\.json: field hidden_size='384' \(str\) must be an integer"),
    ("train.evaluate", ["--checkpoint", "bad_model", "--task", "synthetic", "--out", "r.json"],
     r"bad_model/deebert_config\.json: field num_hidden_layers=\[2\] \(list\) must be an integer"),
    # Directories that are not what the flag wants
    ("train.evaluate", ["--checkpoint", "user", "--task", "synthetic", "--out", "r.json"],
     r"user: not a deebert-jax checkpoint"),
    ("train.evaluate", ["--checkpoint", "user", "--task", "synthetic", "--out", "user"], r"user: is a directory"),
    ("train.probe_ramps", ["--checkpoint", "user", "--task", "synthetic"], r"user: not a deebert-jax checkpoint"),
    ("train.report", ["user", "--out", "R.md"], r"user: not a finished run"),
    # Outputs that would replace the user's files or the source
    ("train.convert", ["--pytorch", "src", "--out", "user"], r"user: refusing to replace a directory"),
    ("train.convert", ["--pytorch", "src", "--out", "src/converted", "--overwrite"], r"inside the source"),
    ("train.convert", ["--pytorch", "user", "--out", "converted"], r"user: no model\.safetensors or pytorch_model\.bin"),
    # Benchmark inputs
    ("train.benchmark", ["--random-model", "tiny", "--seq-len", "128", "--runs", "1", "--out", "b.json"],
     r"seq_len 128 exceeds max_position_embeddings"),
    ("train.benchmark", ["--random-model", "tiny", "--out", "user"], r"user: is a directory"),
    ("train.benchmark_train", ["--random-model", "tiny", "--steps", "1"],
     r"--seq-len 128 exceeds max_position_embeddings 64 of random tiny"),
    ("train.benchmark", ["--random-model", "tiny", "--precision", "bf16", "--dtype", "float32", "--out", "b.json"],
     r"--precision bf16 computes in bfloat16, but --dtype float32"),
    ("train.benchmark_exit_aware", ["--pool", "16", "--schedulers", "gpu", "--out", "ea.json"],
     r"--schedulers: unknown \['gpu'\]"),
    # Exit rules side by side: bad lists refused before the model is read; a file that is not a comparison
    ("train.compare_rules", ["--checkpoint", "user", "--task", "synthetic", "--rules", "entropy,gpu", "--out", "c.json"],
     r"--rules: unknown exit rule\(s\) \['gpu'\]"),
    ("train.compare_rules", ["--checkpoint", "user", "--task", "synthetic", "--budgets", "0.5,-1", "--out", "c.json"],
     r"--budgets: budget -1 must be a number of points >= 0"),
    ("train.report", ["--rules", "user/notes.txt", "--out", "R.md"], r"user/notes\.txt: not valid JSON"),
    # The demo's data folder
    ("train.demo", ["--config", str(REPO / "configs" / "demo.py"), "--config.glue_dir=user/notes.txt",
                    f"--config.workdir={W}"], r"user/notes\.txt is not a directory"),
]


@pytest.mark.parametrize("module, args, message", CASES, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(CASES)])
def test_bad_input_is_one_line_and_nothing_is_lost(user_tree, module, args, message):
    before = {name: _snapshot(user_tree / name) for name in ("user", "src", "bad_model")}
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    env.pop("DEEBERT_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=user_tree, env=env, capture_output=True,
                          text=True, timeout=300)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines and lines[-1].startswith("error: "), proc.stderr[-2000:]
    assert re.search(message, lines[-1]), lines[-1]
    assert {name: _snapshot(user_tree / name) for name in before} == before
    # Nothing else appeared either: a command that fails before its work leaves no output behind.
    assert sorted(os.listdir(user_tree)) == ["bad_model", "src", "user"]


def test_usage_errors_exit_2_with_the_flag_named(user_tree):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-m", "train.evaluate", "--checkpoint", "user", "--task", "sst2",
                           "--thresholds", "0,inf", "--out", "r.json"], cwd=user_tree, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "--thresholds: 'inf' must be finite" in proc.stderr.splitlines()[-1]


def test_every_user_facing_error_is_a_deebert_error_and_only_those_are_one_line(capsys):
    """The CLIs print a `DeeBertError` (or an `OSError` naming a file) as one line; any other
    exception is a bug and keeps its traceback."""
    import pytest

    import deebert_jax
    from deebert_jax.bench.harness import BenchmarkError
    from deebert_jax.bench.precision import PrecisionError
    from deebert_jax.core.errors import InputError
    from deebert_jax.evaluation.calibration import CalibrationError
    from deebert_jax.weights.checkpoint import DamagedCheckpointError
    from train import cli

    for error in (deebert_jax.ConfigError, deebert_jax.DataError, deebert_jax.CheckpointError, DamagedCheckpointError,
                  deebert_jax.OutputPathError, deebert_jax.NonFiniteLossError, CalibrationError, BenchmarkError,
                  PrecisionError, InputError):
        assert issubclass(error, deebert_jax.DeeBertError), error

        def fails(argv, error=error):
            raise error("bad value\nsecond line")
        assert cli.run(fails, []) == 1
        assert capsys.readouterr().err == "error: bad value | second line\n"

    def bug(argv):
        raise ValueError("a bug of ours")
    with pytest.raises(ValueError, match="a bug of ours"):
        cli.run(bug, [])
