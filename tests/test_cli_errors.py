"""Every command, driven with bad input the way a user would: one line that names the fault, a
non-zero exit, no traceback, and nothing of the user's changed."""

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.conftest import REPO, snapshot

W = "work"  # an output directory each case may create


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


def _run_failing(cwd, module, args):
    """`python -m module args` in `cwd` as a user runs it -> (process, its non-blank stderr lines),
    asserting exit status 1 and no traceback."""
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1")
    env.pop("DEEBERT_DEBUG", None)
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    return proc, [line for line in proc.stderr.splitlines() if line.strip()]


@pytest.mark.parametrize("module, args, message", CASES, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(CASES)])
def test_bad_input_is_one_line_and_nothing_is_lost(user_tree, module, args, message):
    before = {name: snapshot(user_tree / name) for name in ("user", "src", "bad_model")}
    proc, lines = _run_failing(user_tree, module, args)
    assert lines and lines[-1].startswith("error: "), proc.stderr[-2000:]
    assert re.search(message, lines[-1]), lines[-1]
    assert {name: snapshot(user_tree / name) for name in before} == before
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
    from benchmarks.harness import BenchmarkError
    from benchmarks.precision import PrecisionError
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


# ----------------------------------------------------------------------------------------------
# Inputs that look fine: outputs onto inputs, tokenizers that cannot tokenise, configs that
# disagree with their weights, lengths out of bounds

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "film", "was", "is", "good", "bad",
         "very", "not", "a", "plot", "."]


@pytest.fixture(scope="module")
def probe_base(tmp_path_factory):
    """Made once: `model/` (3 layers, 64 positions, a WordPiece tokenizer), `rob_src/` (a RoBERTa
    PyTorch directory whose only tokenizer file is tokenizer_config.json) and `rob_model/` (a
    RoBERTa model directory, pad_token_id 1, given the WordPiece tokenizer, which pads with 0)."""
    from transformers import BertTokenizerFast

    from deebert_jax.core.config import tiny_config
    from deebert_jax.weights.checkpoint import save_checkpoint
    from deebert_jax.weights.convert import export_pytorch_checkpoint
    from tests.conftest import initial_params

    root = tmp_path_factory.mktemp("probe")
    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)})
    write_tok = lambda tmp: tok.save_pretrained(os.path.join(tmp, "tokenizer"))
    config = tiny_config(vocab_size=len(WORDS), num_hidden_layers=3)
    save_checkpoint(root / "model", config, initial_params(config), write_extra=write_tok)
    roberta = tiny_config(vocab_size=len(WORDS), model_type="roberta", pad_token_id=1, max_position_embeddings=66)
    export_pytorch_checkpoint(roberta, initial_params(roberta), root / "rob_src")
    (root / "rob_src" / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "RobertaTokenizer"}))
    save_checkpoint(root / "rob_model", roberta, initial_params(roberta), write_extra=write_tok)
    return root


def _edit_json(path, **changes):
    path.write_text(json.dumps(dict(json.loads(path.read_text()), **changes)))


@pytest.fixture
def probe_tree(tmp_path, probe_base):
    """The user's files: texts (and a symlink and a hard link to them), a folder, a GLUE dev file,
    notes that are not JSON, a finished demo run, a pickle that would run code, and model
    directories whose config disagrees with their weights or whose tokenizer cannot tokenise."""
    import shutil

    from tests.test_report import _run_files

    for name in ("model", "rob_src", "rob_model"):
        shutil.copytree(probe_base / name, tmp_path / name)
    for name, changes in (("more_layers", {"num_hidden_layers": 4}), ("bigger_vocab", {"vocab_size": 40}),
                          ("wider", {"hidden_size": 64}), ("more_labels", {"num_labels": 3})):
        shutil.copytree(probe_base / "model", tmp_path / name)
        _edit_json(tmp_path / name / "deebert_config.json", **changes)
    shutil.copytree(probe_base / "model", tmp_path / "short_tok")
    _edit_json(tmp_path / "short_tok" / "tokenizer" / "tokenizer_config.json", model_max_length=16)
    shutil.copytree(probe_base / "model", tmp_path / "empty_tok")
    shutil.rmtree(tmp_path / "empty_tok" / "tokenizer")
    (tmp_path / "empty_tok" / "tokenizer").mkdir()
    (tmp_path / "empty_tok" / "tokenizer" / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "RobertaTokenizer"}))
    (tmp_path / "texts.txt").write_text("the movie was good\na very bad film\ngood\n")
    os.symlink("texts.txt", tmp_path / "link.txt")
    os.link(tmp_path / "texts.txt", tmp_path / "hard.txt")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "mine.txt").write_text("mine\n")
    (tmp_path / "glue" / "SST-2").mkdir(parents=True)
    (tmp_path / "glue" / "SST-2" / "dev.tsv").write_text("sentence\tlabel\nthe movie was good\t1\na bad film\t0\n")
    (tmp_path / "notes.txt").write_text("not JSON\n")
    (tmp_path / "preamble.md").write_text("# my notes\n")
    _run_files(tmp_path)   # workdirs/demo: run.json, results.json, bench.json and their plots
    (tmp_path / "evil").mkdir()
    shutil.copy(probe_base / "rob_src" / "config.json", tmp_path / "evil" / "config.json")
    import pickle

    class RunsCode:
        def __reduce__(self):
            return (os.system, ("touch PWNED",))
    (tmp_path / "evil" / "pytorch_model.bin").write_bytes(pickle.dumps(RunsCode()))
    return tmp_path


PREDICT = ["train.predict", "--checkpoint", "model", "--no-progress"]
TEXT = ["--text", "the movie was good"]

PROBE_CASES = [
    # An output that is an input, by name, symlink or hard link, or a file the command reads
    (*PREDICT, "--input", "texts.txt", "--out", "texts.txt",
     r"^error: texts\.txt: --out names the same file as --input texts\.txt; write the output somewhere else$"),
    (*PREDICT, "--input", "texts.txt", "--out", "link.txt", r"^error: link\.txt: --out names the same file as --input"),
    (*PREDICT, "--input", "texts.txt", "--out", "hard.txt", r"^error: hard\.txt: --out names the same file as --input"),
    (*PREDICT, "--input", "texts.txt", "--out", "model/deebert_config.json",
     r"^error: model/deebert_config\.json: --out would overwrite deebert_config\.json of --checkpoint model;"),
    ("train.evaluate", "--checkpoint", "model", "--task", "sst2", "--glue-dir", "glue", "--out", "glue/SST-2/dev.tsv",
     r"^error: glue/SST-2/dev\.tsv: --out names the same file as --glue-dir glue/SST-2/dev\.tsv"),
    ("train.evaluate", "--checkpoint", "model", "--task", "synthetic", "--out", "model/tokenizer/vocab.json",
     r"^error: model/tokenizer/vocab\.json: --out would overwrite tokenizer of --checkpoint model"),
    ("train.benchmark", "--checkpoint", "model", "--runs", "1", "--out", "model/deebert_config.json",
     r"^error: model/deebert_config\.json: --out would overwrite deebert_config\.json of --checkpoint model"),
    ("train.benchmark_train", "--model", "evil", "--out", "evil/config.json",
     r"^error: evil/config\.json: --out would overwrite config\.json of --model evil"),
    ("train.report", "workdirs/demo", "--preamble", "preamble.md", "--out", "preamble.md",
     r"^error: preamble\.md: --out names the same file as --preamble preamble\.md"),
    ("train.report", "workdirs/demo", "--out", "workdirs/demo/results.json",
     r"^error: workdirs/demo/results\.json: --out names the same file as run workdirs/demo: results\.json"),
    # A tokenizer that cannot tokenise: at convert time and at load time
    ("train.convert", "--pytorch", "rob_src", "--out", "converted",
     r"^error: rob_src: the tokenizer has no vocabulary, only its 5 special tokens"),
    ("train.predict", "--checkpoint", "empty_tok", *TEXT,
     r"^error: empty_tok/tokenizer: the tokenizer has no vocabulary, only its 5 special tokens"),
    ("train.predict", "--checkpoint", "rob_model", *TEXT,
     r"^error: rob_model/tokenizer: the tokenizer pads with id 0 \('\[PAD\]'\), the model's config has "
     r"pad_token_id=1; they are not of one model$"),
    # Lengths: longer than the model or its tokenizer supports, too short for the special tokens
    (*PREDICT, *TEXT, "--max-seq-length", "65",
     r"^error: --max-seq-length 65 is longer than the model's max_position_embeddings=64$"),
    ("train.predict", "--checkpoint", "short_tok", *TEXT, "--max-seq-length", "32",
     r"^error: --max-seq-length 32 is longer than the tokenizer's model_max_length=16$"),
    (*PREDICT, *TEXT, "--max-seq-length", "1",
     r"^error: --max-seq-length 1 is too short: the tokenizer adds 2 special tokens to a text, so at least 3 are needed$"),
    ("train.evaluate", "--checkpoint", "model", "--task", "sst2", "--glue-dir", "glue", "--max-seq-length", "1",
     "--out", "r.json", r"^error: --max-seq-length 1 is too short"),
    ("train.evaluate", "--checkpoint", "model", "--task", "synthetic", "--max-seq-length", "128", "--out", "r.json",
     r"^error: --max-seq-length 128 is longer than the model's max_position_embeddings=64$"),
    # A config that disagrees with its weights
    ("train.predict", "--checkpoint", "more_layers", *TEXT,
     r"^error: \S*more_layers/deebert_config\.json: num_hidden_layers=4, but params/ holds 3 layers"),
    ("train.predict", "--checkpoint", "bigger_vocab", *TEXT,
     r"^error: \S*bigger_vocab/deebert_config\.json: vocab_size=40, but params/ holds 17 token embeddings"),
    ("train.predict", "--checkpoint", "wider", *TEXT,
     r"^error: \S*wider/deebert_config\.json: hidden_size=64, but params/ holds 32 columns per embedding"),
    ("train.evaluate", "--checkpoint", "more_labels", "--task", "synthetic", "--out", "r.json",
     r"^error: \S*more_labels/deebert_config\.json: num_labels=3, but params/ holds 2 labels"),
    # Counts far too large
    ("train.benchmark", "--random-model", "tiny", "--num-labels", "100000000", "--out", "b.json",
     r"^error: num_labels=100000000 is too large: the model would have [\d,]+ parameters \([\d.]+ GiB in float32\)"),
    ("train.convert", "--pytorch", "rob_src", "--out", "converted", "--num-labels", "100000000",
     r"^error: rob_src/config\.json: num_labels=100000000 is too large"),
    # --out or --input naming a directory: refused before the work, no temporary file left
    (*PREDICT, *TEXT, "--out", "folder", r"^error: \S*folder: is a directory; name a file to write"),
    ("train.report", "workdirs/demo", "--out", "folder", r"^error: \S*folder: is a directory"),
    ("train.benchmark_exit_aware", "--random-model", "tiny", "--out", "folder", r"^error: \S*folder: is a directory"),
    (*PREDICT, "--input", "folder",
     r"^error: folder: is a directory; expected a \.txt, \.tsv, \.jsonl file of texts$"),
    # A file that is not what the flag reads
    ("train.benchmark", "--render", "notes.txt", r"^error: notes\.txt: not a bench\.json \(not valid JSON"),
    ("train.benchmark_train", "--model", "evil", "--steps", "1", "--seq-len", "8", "--batch-size", "8", "--out", "bt.json",
     r"^error: evil/pytorch_model\.bin: refused: the file holds objects other than tensors, which could run code"),
]


@pytest.mark.parametrize("case", PROBE_CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(PROBE_CASES)])
def test_probe_case_is_one_line_and_nothing_is_overwritten(probe_tree, case):
    module, *args, message = case
    before = snapshot(probe_tree)
    entries = sorted(os.listdir(probe_tree))
    proc, lines = _run_failing(probe_tree, module, args)
    assert lines and re.search(message, lines[-1]), proc.stderr[-2000:]
    # Nothing changed, nothing appeared anywhere below (no output, no hidden temporary file, no code run).
    assert snapshot(probe_tree) == before
    assert sorted(os.listdir(probe_tree)) == entries


@pytest.mark.parametrize("value", ["0", "-3"])
@pytest.mark.parametrize("module", ["train.benchmark", "train.benchmark_exit_aware"])
def test_seq_len_must_be_positive(tmp_path, module, value):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    args = ["--random-model", "tiny", "--seq-len", value, "--out", "b.json"]
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.splitlines()[-1].endswith(
        f"error: argument --seq-len: '{value}' must be positive"), proc.stderr
    assert os.listdir(tmp_path) == []
