"""One clear line each: lengths from training.json in calibration_draws and benchmark_serve, a bad
--port / --seed / --limit, a full disk under a storage library, a training.json length that is
not a flag, and a config too large blamed on the field at fault."""

import errno
import json
import logging

import pytest

from deebert_jax.core.config import ConfigError, DeeBertConfig, tiny_config
from deebert_jax.core.errors import InputError
from deebert_jax.core.fileutil import storage_errors

from tests.conftest import word_model_and_glue


@pytest.fixture(scope="module")
def trained_at_16(tmp_path_factory):
    """M: a 3-layer model (64 positions) whose training.json says length 16; G: a small SST-2."""
    return word_model_and_glue(tmp_path_factory.mktemp("len"), train_rows=4, length=16, rows=12)


def test_calibration_draws_runs_at_the_training_length(trained_at_16, tmp_path, capsys):
    from train.calibration_draws import entry
    out = tmp_path / "draws.json"
    assert entry(["--checkpoint", str(trained_at_16 / "M"), "--task", "sst2", "--glue-dir", str(trained_at_16 / "G"),
                  "--max-drop", "1", "--splits", "dev-half,train-holdout", "--pool-size", "6", "--draw-size", "4",
                  "--draws", "2", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["max_seq_length"] == 16
    assert "max sequence length 16: the length the model was trained at (training.json)" in capsys.readouterr().err


def test_benchmark_serve_takes_and_checks_the_model_length(trained_at_16, tmp_path, monkeypatch, capsys):
    import benchmarks.serving
    from train.benchmark_serve import entry
    seen = {}

    def run(model_dir, texts, labels, **kwargs):
        seen["max_seq_length"] = kwargs["max_seq_length"]
        raise InputError("stopped here by the test")
    monkeypatch.setattr(benchmarks.serving, "run", run)
    args = ["--checkpoint", str(trained_at_16 / "M"), "--glue-dir", str(trained_at_16 / "G"),
            "--out", str(tmp_path / "s.json")]
    assert entry(args) == 1 and seen["max_seq_length"] == 16
    capsys.readouterr()
    seen.clear()
    assert entry(args + ["--max-seq-length", "128"]) == 1 and not seen   # refused before any server starts
    err = capsys.readouterr().err.strip()
    assert err == "error: --max-seq-length 128 is longer than the model's max_position_embeddings=64"


@pytest.mark.parametrize("module, argv, message", [
    ("train.serve", ["--checkpoint", "M", "--port", "70000"], "--port 70000: a TCP port is 0 to 65535"),
    ("train.calibration_draws", ["--checkpoint", "M", "--task", "sst2", "--max-drop", "1", "--seed", "-1"],
     "argument --seed: '-1' must be an integer from 0 to 2**63 - 1"),
    ("train.calibration_draws", ["--checkpoint", "M", "--task", "sst2", "--max-drop", "1", "--limit", "1"],
     "--limit 1: the dev-half split halves dev, so it needs at least 2 rows"),
])
def test_bad_flag_values_are_usage_errors_naming_the_flag(capsys, module, argv, message):
    import importlib
    with pytest.raises(SystemExit) as exit_:
        importlib.import_module(module).parse_args(argv)
    assert exit_.value.code == 2
    assert message in capsys.readouterr().err.strip().splitlines()[-1]


def test_a_full_disk_under_a_storage_library_is_one_line_naming_the_file(tmp_path, caplog):
    from deebert_jax.commands.cli import one_line
    target = tmp_path / "model"
    with pytest.raises(OSError) as raised:
        with storage_errors(target, "writing the model"):
            logging.getLogger("absl").error("thread raised: RESOURCE_EXHAUSTED ... [os_error_code='28']")
            raise ValueError("RESOURCE_EXHAUSTED: Error writing \"x/0\": Failed to write 4096 bytes to file 11: "
                             "No space left on device [os_error_code='28']")
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    assert one_line(raised.value) == f"[Errno 28] No space left on device (writing the model): '{target}'"
    assert "os_error_code" not in caplog.text   # the library's own log of it is dropped
    with pytest.raises(OSError) as raised:   # an OSError with no file name gets one
        with storage_errors(target):
            raise OSError(errno.ENOSPC, "No space left on device")
    assert raised.value.filename == str(target)
    with pytest.raises(ValueError, match="unrelated"):   # anything else passes through
        with storage_errors(target):
            raise ValueError("unrelated")


def test_atomic_writes_on_a_full_disk_name_the_file(tmp_path, monkeypatch):
    from deebert_jax.core import fileutil

    def full(path, write, mode, encoding, unnamed):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(fileutil, "_write_and_rename", full)
    with pytest.raises(OSError, match=r"No space left on device \(writing\): '.*out\.json'"):
        fileutil.atomic_write_text(tmp_path / "out.json", "{}")


def test_a_training_json_length_is_blamed_on_training_json(trained_at_16, tmp_path):
    import shutil

    from deebert_jax.data.glue import load_tokenizer
    from deebert_jax.inference.model_dir import resolve_max_seq_length
    from deebert_jax.weights.checkpoint import read_model_config
    shutil.copytree(trained_at_16 / "M", tmp_path / "M")
    (tmp_path / "M" / "training.json").write_text(json.dumps({"max_seq_length": 2}))
    config = read_model_config(tmp_path / "M")
    with pytest.raises(InputError, match=r"^\S+/M/training\.json: max_seq_length=2 is too short: the tokenizer adds 2 "):
        resolve_max_seq_length(None, config, tmp_path / "M", load_tokenizer(tmp_path / "M", config))
    with pytest.raises(InputError, match=r"^--max-seq-length 2 is too short"):   # given: the flag is named
        resolve_max_seq_length(2, config, tmp_path / "M", load_tokenizer(tmp_path / "M", config))


@pytest.mark.parametrize("config, field", [
    (lambda: DeeBertConfig(num_hidden_layers=2000), "num_hidden_layers"),   # bert-base width: was intermediate_size
    (lambda: tiny_config(num_hidden_layers=1_000_000), "num_hidden_layers"),   # was hidden_size
    (lambda: DeeBertConfig(intermediate_size=1_000_000), "intermediate_size"),
    (lambda: DeeBertConfig(hidden_size=24_000), "hidden_size"),
    (lambda: tiny_config(num_labels=100_000_000), "num_labels"),
])
def test_a_config_too_large_blames_the_field_out_of_line(config, field):
    with pytest.raises(ConfigError, match=rf"^{field}=\d+ is too large"):
        config()
