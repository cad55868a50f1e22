"""Bad inputs at the library's edges: nothing a user owns is lost, every error is one clear line.

Grouped as: outputs that would replace what we did not write; damaged checkpoints; config field
types; model inputs.
"""

import hashlib
import json
import logging
import os
import stat
import subprocess
import sys

import jax
import numpy as np
import pytest

from deebert_jax.cpu.process import silence_closed_loop_noise
from deebert_jax.weights.checkpoint import DamagedCheckpointError, TrainCheckpointManager, load_checkpoint, save_checkpoint
from deebert_jax.core.config import ConfigError, DeeBertConfig, tiny_config
from deebert_jax.weights.convert import export_pytorch_checkpoint, load_pytorch_checkpoint
from deebert_jax.core.fileutil import OutputPathError, atomic_directory, check_output_path
from tests.conftest import initial_params  # tests.: a command below imports this module

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = tiny_config(num_labels=3)


@pytest.fixture(scope="module")
def params():
    return initial_params(CONFIG)


def snapshot(root):
    """{relative path: (mode, sha1 of content)} for every file and directory under `root`."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            digest = hashlib.sha1(open(path, "rb").read()).hexdigest() if stat.S_ISREG(st.st_mode) else None
            out[os.path.relpath(path, root)] = (st.st_mode, digest)
    return out


def user_dir(path):
    """A directory of the user's own files (nothing deebert-jax wrote)."""
    (path / "notes").mkdir(parents=True)
    (path / "notes" / "todo.txt").write_text("mine\n")
    (path / "data.csv").write_text("a,b\n1,2\n")
    return path


# ----------------------------------------------------------------------------------------------
# Outputs: a directory we did not write is never replaced

def run_convert(*args, cwd=REPO):
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    return subprocess.run([sys.executable, "-m", "train.convert", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture
def source(tmp_path, params):
    return export_pytorch_checkpoint(CONFIG, params, tmp_path / "src")


@pytest.mark.parametrize("case, message", [
    ("user_dir", "refusing to replace a directory that is not an output of deebert-jax (2 entries, e.g. 'data.csv')"),
    ("file", "exists and is not a directory"),
    ("same_as_source", "output directory is the source"),
    ("inside_source", "output directory is inside the source"),
    ("contains_source", "output directory contains the source"),
])
def test_convert_cli_refuses_outputs_that_lose_data(tmp_path, source, case, message):
    out = {"user_dir": lambda: user_dir(tmp_path / "mine"),
           "file": lambda: (tmp_path / "model.bin").write_bytes(b"weights") and tmp_path / "model.bin",
           "same_as_source": lambda: source,
           "inside_source": lambda: os.path.join(source, "converted"),
           "contains_source": lambda: tmp_path}[case]()
    before = snapshot(tmp_path)
    args = ["--pytorch", source, "--out", out] + (["--overwrite"] if case.endswith("source") else [])
    proc = run_convert(*args)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and str(os.path.abspath(out)) in last and message in last, proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(tmp_path) == before


def test_convert_cli_refuses_the_current_directory(tmp_path, source):
    work = user_dir(tmp_path / "work")
    before = snapshot(tmp_path)
    proc = run_convert("--pytorch", source, "--out", ".", "--overwrite", cwd=work)
    assert proc.returncode != 0
    assert f"error: {work}: output directory is (or contains) the current directory" in proc.stderr
    assert snapshot(tmp_path) == before


def test_convert_cli_replaces_only_its_own_output(tmp_path, source, params):
    out = tmp_path / "out"
    assert run_convert("--pytorch", source, "--out", out).returncode == 0
    (out / "stale.txt").write_text("from an earlier run")
    proc = run_convert("--pytorch", source, "--out", out)  # an earlier output: replaced
    assert proc.returncode == 0, proc.stderr
    assert not (out / "stale.txt").exists() and load_checkpoint(out)[0] == CONFIG
    mine = user_dir(tmp_path / "mine")
    proc = run_convert("--pytorch", source, "--out", mine, "--overwrite")  # said so: replaced
    assert proc.returncode == 0, proc.stderr
    assert not (mine / "data.csv").exists() and load_checkpoint(mine)[0] == CONFIG
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n or ".old-" in n]


def test_library_writers_refuse_user_directories(tmp_path, params):
    mine = user_dir(tmp_path / "mine")
    before = snapshot(tmp_path)
    with pytest.raises(OutputPathError, match=f"{mine}: refusing to replace"):
        save_checkpoint(mine, CONFIG, params)
    with pytest.raises(OutputPathError, match=f"{mine}: refusing to replace"):
        export_pytorch_checkpoint(CONFIG, params, mine)
    assert snapshot(tmp_path) == before
    # Empty directories and earlier outputs of the same writer are replaced.
    (tmp_path / "empty").mkdir()
    save_checkpoint(tmp_path / "empty", CONFIG, params)
    save_checkpoint(tmp_path / "empty", CONFIG, params)
    export_pytorch_checkpoint(CONFIG, params, tmp_path / "pt")
    export_pytorch_checkpoint(CONFIG, params, tmp_path / "pt")
    assert load_pytorch_checkpoint(tmp_path / "pt")[0] == CONFIG
    # ... but not each other's: an export is not an orbax checkpoint.
    with pytest.raises(OutputPathError, match="refusing to replace"):
        save_checkpoint(tmp_path / "pt", CONFIG, params)


def test_output_directory_follows_the_umask(tmp_path, params):
    old = os.umask(0o027)
    try:
        path = save_checkpoint(tmp_path / "model", CONFIG, params)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o750


def test_check_output_path_rechecks_before_the_rename(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(OutputPathError, match="refusing to replace"):
        with atomic_directory(target) as tmp:
            open(os.path.join(tmp, "x"), "w").close()
            user_dir(target)  # someone else filled the path meanwhile
    assert (target / "data.csv").exists()
    assert not [n for n in os.listdir(tmp_path) if ".tmp-" in n]
    assert check_output_path(tmp_path / "absent") == str(tmp_path / "absent")


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints

def damage(step_dir, how):
    """Truncates (to half) or deletes the largest array-data file under `step_dir`."""
    files = [os.path.join(d, f) for d, _, fs in os.walk(step_dir) for f in fs
             if os.path.basename(d) == "d"]
    victim = max(files, key=os.path.getsize)
    if how == "truncate":
        data = open(victim, "rb").read()
        open(victim, "wb").write(data[: len(data) // 2])
    else:
        os.remove(victim)
    return victim


def train_state(config, value):
    from deebert_jax.training import steps as train_steps
    tx = train_steps.OptimizerSettings(1e-3, 6).optimizer()
    # Random (incompressible) weights: each array has its own bytes in the data files.
    p = jax.tree_util.tree_map(lambda x: x + value, initial_params(config))
    return train_steps.init_train_state(p, tx, 1, config.num_hidden_layers)


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_restore_latest_falls_back_past_a_damaged_step(tmp_path, how, caplog):
    config = tiny_config()
    manager = TrainCheckpointManager(tmp_path / "ckpt", max_to_keep=3)
    for step in (2, 4, 6):
        manager.save(step, train_state(config, step))
    damage(tmp_path / "ckpt" / "6", how)
    like = train_state(config, 0)
    with pytest.raises(DamagedCheckpointError, match=f"{tmp_path / 'ckpt' / '6'}: damaged checkpoint"):
        manager.restore(6, like)
    with caplog.at_level(logging.WARNING, logger="deebert_jax.weights.checkpoint"):
        step, state = manager.restore_latest(like)
    assert step == 4 and float(state.params["embeddings"]["LayerNorm"]["bias"][0]) == 4
    assert any(str(tmp_path / "ckpt" / "6") in r.getMessage() for r in caplog.records)
    # Set aside, not deleted; the run can save step 6 again.
    assert manager.all_steps() == [2, 4] and (tmp_path / "ckpt" / "6.damaged").is_dir()
    manager.save(6, train_state(config, 7))
    assert manager.restore_latest(like)[0] == 6


def test_restore_latest_mismatch_is_an_error_not_a_fallback(tmp_path):
    manager = TrainCheckpointManager(tmp_path / "ckpt")
    for step in (1, 2):
        manager.save(step, train_state(tiny_config(), step))
    other = train_state(tiny_config(hidden_size=48, num_attention_heads=4), 0)
    with pytest.raises(ValueError, match=r"ckpt/2: checkpoint does not match this run's state \(.* has shape"):
        manager.restore_latest(other)
    # A different structure: also a mismatch, whether or not the newest step is damaged.
    damage(tmp_path / "ckpt" / "2", "truncate")
    with pytest.raises(ValueError, match="does not match this run's state"):
        manager.restore_latest({"step": np.zeros((), np.int32), "extra": np.zeros(3, np.float32)})
    assert manager.all_steps() == [1, 2]


def test_restore_latest_every_step_damaged_and_empty(tmp_path):
    manager = TrainCheckpointManager(tmp_path / "ckpt")
    assert manager.restore_latest(train_state(tiny_config(), 0)) == (None, None)
    manager.save(1, train_state(tiny_config(), 1))
    damage(tmp_path / "ckpt" / "1", "delete")
    with pytest.raises(DamagedCheckpointError, match=r"ckpt: every checkpoint is damaged \(steps 1\)"):
        manager.restore_latest(train_state(tiny_config(), 0))


@pytest.mark.parametrize("how", ["truncate", "delete"])
def test_load_checkpoint_of_a_damaged_model_is_one_line(tmp_path, params, how):
    path = save_checkpoint(tmp_path / "model", CONFIG, params)
    damage(os.path.join(path, "params"), how)
    with pytest.raises(DamagedCheckpointError, match=f"{path}: damaged checkpoint, cannot read params/") as e:
        load_checkpoint(path)
    assert "\n" not in str(e.value)


def test_load_checkpoint_bad_config_file(tmp_path, params):
    path = save_checkpoint(tmp_path / "model", CONFIG, params)
    config_file = os.path.join(path, "deebert_config.json")
    d = json.load(open(config_file))
    json.dump(dict(d, hidden_size="32"), open(config_file, "w"))
    with pytest.raises(ConfigError, match=f"{config_file}: field hidden_size='32' \\(str\\) must be an integer"):
        load_checkpoint(path)
    open(config_file, "w").write('{"hidden_size": 3')
    with pytest.raises(DamagedCheckpointError, match=f"{config_file}: not valid JSON .*\\(damaged checkpoint\\)$"):
        load_checkpoint(path)


def test_closed_event_loop_noise_is_dropped_and_nothing_else():
    import asyncio
    import types

    def unraisable(exc):
        try:
            raise exc
        except Exception as e:
            return types.SimpleNamespace(exc_type=type(e), exc_value=e, exc_traceback=e.__traceback__,
                                         err_msg=None, object=None)

    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as e:
        noise = types.SimpleNamespace(exc_type=RuntimeError, exc_value=e, exc_traceback=e.__traceback__,
                                      err_msg=None, object=None)
    seen = []
    saved = sys.unraisablehook
    sys.unraisablehook = lambda u: seen.append(u.exc_value)
    try:
        silence_closed_loop_noise()
        silence_closed_loop_noise()  # idempotent: one filter
        sys.unraisablehook(noise)
        other = unraisable(RuntimeError("Event loop is closed"))  # not from call_soon_threadsafe
        sys.unraisablehook(other)
        sys.unraisablehook(unraisable(ValueError("x")))
    finally:
        sys.unraisablehook = saved
    assert [str(e) for e in seen] == ["Event loop is closed", "x"]
    # asyncio's report of a second failed read, collected after the loop closed; others still pass.
    asyncio_log = logging.getLogger("asyncio")

    def record(message, exc):
        return logging.LogRecord("asyncio", logging.ERROR, __file__, 1, message, None, (type(exc), exc, None))

    assert not asyncio_log.filter(record("Future exception was never retrieved\nfuture: <Future>",
                                         ValueError("NOT_FOUND: Error reading 'a/0.0'")))
    assert asyncio_log.filter(record("Future exception was never retrieved", ValueError("a bug of ours")))
    assert asyncio_log.filter(record("Task was destroyed but it is pending!", ValueError("NOT_FOUND: x")))


def test_damaged_restore_prints_no_event_loop_tracebacks(tmp_path):
    script = f"""
import numpy as np
from deebert_jax.weights.checkpoint import TrainCheckpointManager
from tests.test_reliability import damage
m = TrainCheckpointManager({str(tmp_path / 'ckpt')!r})
tree = {{k: np.random.default_rng(0).random((64, 64), np.float32) for k in "abcdefgh"}}
for step in (1, 2):
    m.save(step, tree)
for _ in range(10):  # the noise came from a race: about one read in two printed it
    damage({str(tmp_path / 'ckpt' / '2')!r}, "delete")
    print(m.restore_latest(tree)[0])
    m.save(2, tree)
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1"] * 10
    assert "Event loop is closed" not in proc.stderr and "Traceback" not in proc.stderr


# ----------------------------------------------------------------------------------------------
# Config field types

@pytest.mark.parametrize("field, value, message", [
    ("hidden_size", "384", "field hidden_size='384' (str) must be an integer"),
    ("num_hidden_layers", [2], "field num_hidden_layers=[2] (list) must be an integer"),
    ("num_labels", True, "field num_labels=True (bool) must be an integer"),
    ("layer_norm_eps", "1e-12", "field layer_norm_eps='1e-12' (str) must be a number"),
    ("hidden_dropout_prob", None, "field hidden_dropout_prob=None (NoneType) must be a number"),
    ("vocab_size", 100.5, "field vocab_size=100.5 (float) must be an integer"),
    ("ramp_pooling", 1, "field ramp_pooling=1 (int) must be a string"),
])
def test_config_field_types_name_file_and_field(tmp_path, field, value, message):
    d = dict(tiny_config().to_dict(), **{field: value})
    with pytest.raises(ConfigError) as e:
        DeeBertConfig.from_dict(d, source="model/deebert_config.json")
    assert str(e.value) == f"model/deebert_config.json: {message}"
    with pytest.raises(ConfigError, match=f"^field {field}="):
        DeeBertConfig.from_dict(d)
    if value is None:
        return  # a null in a Hugging Face config means "the default"
    hf = dict(tiny_config().to_hf_config(), **{field: value})
    path = tmp_path / "config.json"
    path.write_text(json.dumps(hf))
    with pytest.raises(ConfigError) as e:
        DeeBertConfig.from_hf_config(tmp_path)
    assert str(e.value) == f"{path}: {message}"


def test_config_types_that_are_fine():
    d = dict(tiny_config().to_dict(), hidden_size=32.0, hidden_dropout_prob=0, layer_norm_eps=np.float32(1e-5))
    c = DeeBertConfig.from_dict(d)
    assert c == tiny_config(layer_norm_eps=float(np.float32(1e-5)), hidden_dropout_prob=0.0)
    assert type(c.hidden_size) is int and type(c.hidden_dropout_prob) is float
    with pytest.raises(ConfigError, match="expected a JSON object"):
        DeeBertConfig.from_dict([1, 2], source="x.json")


# ----------------------------------------------------------------------------------------------
# Outputs that are inputs; writes that are interrupted

def test_check_outputs_apart_by_name_link_and_read_files(tmp_path):
    from deebert_jax.core.fileutil import check_outputs_apart, same_path

    (tmp_path / "in.txt").write_text("mine\n")
    os.symlink("in.txt", tmp_path / "sym.txt")
    os.link(tmp_path / "in.txt", tmp_path / "hard.txt")
    (tmp_path / "model" / "tokenizer").mkdir(parents=True)
    for out in ("in.txt", "sym.txt", "hard.txt", "./sub/../in.txt"):
        with pytest.raises(OutputPathError, match=f"--out names the same file as --input {tmp_path / 'in.txt'}"):
            check_outputs_apart({"--out": tmp_path / out}, {"--input": tmp_path / "in.txt"})
    for out in ("model/deebert_config.json", "model/tokenizer/vocab.txt", "model/params/x"):
        with pytest.raises(OutputPathError, match="--out would overwrite .* of --checkpoint"):
            check_outputs_apart({"--out": tmp_path / out}, {"--checkpoint": tmp_path / "model"},
                                reads={"--checkpoint": ("deebert_config.json", "tokenizer", "params")})
    # Apart: another file, a new file in the model directory, inputs not given or absent.
    check_outputs_apart({"--out": tmp_path / "preds.jsonl", "--plot": None},
                        {"--input": tmp_path / "in.txt", "--glue-dir": None, "--other": tmp_path / "absent"})
    check_outputs_apart({"--out": tmp_path / "model" / "results.json"}, {"--checkpoint": tmp_path / "model"},
                        reads={"--checkpoint": ("deebert_config.json",)})
    assert same_path(tmp_path / "sym.txt", tmp_path / "hard.txt") and not same_path(tmp_path / "in.txt", tmp_path / "x")
    assert (tmp_path / "in.txt").read_text() == "mine\n"


def test_atomic_write_refuses_a_directory_before_making_a_temporary_file(tmp_path):
    from deebert_jax.core.fileutil import atomic_write_text

    (tmp_path / "out").mkdir()
    with pytest.raises(OutputPathError, match=r"out: is a directory; name a file to write"):
        atomic_write_text(tmp_path / "out", "x")
    assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(tmp_path / "out") == []


@pytest.mark.parametrize("unnamed", [True, False])
def test_a_write_killed_halfway_leaves_the_old_file_and_nothing_hidden(tmp_path, unnamed):
    """The process dies (SIGKILL, no cleanup can run) in the middle of writing: the old file is
    whole, and with an unnamed temporary file (Linux) no hidden file is left either."""
    from deebert_jax.core import fileutil

    if unnamed and not fileutil._can_write_unnamed():
        pytest.skip("no O_TMPFILE here")
    (tmp_path / "preds.jsonl").write_text("old\n")
    script = f"""
import os, signal
from deebert_jax.core import fileutil
fileutil._can_write_unnamed = lambda: {unnamed}
real = os.fdopen
class Dying:
    def __init__(self, f): self.f = f
    def __enter__(self): return self
    def __exit__(self, *a): return False
    def write(self, text):
        self.f.write(text[:3]); self.f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
os.fdopen = lambda *a, **k: Dying(real(*a, **k))
fileutil.atomic_write_text({str(tmp_path / 'preds.jsonl')!r}, "new\\n" * 1000)
"""
    env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, timeout=60)
    assert proc.returncode == -9, proc.stderr
    assert (tmp_path / "preds.jsonl").read_text() == "old\n"
    hidden = [n for n in os.listdir(tmp_path) if n != "preds.jsonl"]
    # Without O_TMPFILE the named temporary file stays (what the unnamed one is for).
    assert hidden == [] if unnamed else [n.startswith(".preds.jsonl.") for n in hidden] == [True]
    # A write that is not interrupted leaves only its file, with the umask's mode.
    fileutil.atomic_write_text(tmp_path / "new.txt", "x")
    assert (tmp_path / "new.txt").read_text() == "x" and stat.S_IMODE(os.stat(tmp_path / "new.txt").st_mode) == \
        0o666 & ~fileutil._umask()


# ----------------------------------------------------------------------------------------------
# A config that disagrees with its weights; sizes out of bounds; the training length

@pytest.mark.parametrize("field, value, message", [
    ("num_hidden_layers", 3, "num_hidden_layers=3, but params/ holds 2 layers"),
    ("num_hidden_layers", 1, "num_hidden_layers=1, but params/ holds 2 layers"),
    ("vocab_size", 200, "vocab_size=200, but params/ holds 100 token embeddings"),
    ("hidden_size", 64, "hidden_size=64, but params/ holds 32 columns per embedding"),
    ("num_labels", 2, "num_labels=2, but params/ holds 3 labels"),
    ("max_position_embeddings", 128, "max_position_embeddings=128, but params/ holds 64 positions"),
    ("intermediate_size", 128, "intermediate_size=128, but params/ holds 64 intermediate units"),
])
def test_config_that_disagrees_with_its_params_is_one_line(tmp_path, params, field, value, message):
    path = save_checkpoint(tmp_path / "model", CONFIG, params)
    config_file = os.path.join(path, "deebert_config.json")
    json.dump(dict(json.load(open(config_file)), **{field: value}), open(config_file, "w"))
    from deebert_jax.weights.convert import CheckpointError

    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert str(e.value).startswith(f"{config_file}: {message} (") and "not of one model" in str(e.value)
    assert "\n" not in str(e.value)


def test_params_with_a_leaf_the_config_does_not_imply(params):
    from deebert_jax.weights.checkpoint import check_params_match
    from deebert_jax.weights.convert import CheckpointError

    extra = dict(params, extra={"kernel": np.zeros((2, 2), np.float32)})
    with pytest.raises(CheckpointError, match=r"^m/deebert_config.json: the config and the weights are not of one "
                                              r"model \(extra/kernel is in params/ but not in what the config implies\)$"):
        check_params_match(CONFIG, extra, "m/deebert_config.json")
    check_params_match(CONFIG, params, "m/deebert_config.json")   # a match says nothing


@pytest.mark.parametrize("field, value", [("num_labels", 100_000_000), ("vocab_size", 10 ** 9),
                                          ("intermediate_size", 10 ** 9), ("max_position_embeddings", 10 ** 9)])
def test_configs_too_large_to_allocate_are_refused_naming_the_field(field, value):
    with pytest.raises(ConfigError, match=rf"^{field}={value} is too large: the model would have [\d,]+ parameters "
                                          r"\([\d.]+ GiB in float32\); at most 2,147,483,647$"):
        tiny_config(**{field: value})
    assert DeeBertConfig().num_parameters == 115_997_208   # bert-base with 12 ramps: far below the bound


def test_training_length_is_recorded_and_read_back(tmp_path, params):
    from deebert_jax.weights.checkpoint import TRAINING_FILE, training_length, write_training_info
    from deebert_jax.weights.convert import CheckpointError

    path = save_checkpoint(tmp_path / "model", CONFIG, params, write_extra=lambda tmp: write_training_info(tmp, 32))
    assert training_length(path) == 32
    assert training_length(save_checkpoint(tmp_path / "other", CONFIG, params)) is None
    with open(os.path.join(path, TRAINING_FILE), "w") as f:
        json.dump({"max_seq_length": "32"}, f)
    with pytest.raises(CheckpointError, match=r"training.json: max_seq_length='32' must be a positive integer"):
        training_length(path)


# ----------------------------------------------------------------------------------------------
# Tokenizers that cannot tokenise; texts cut before tokenising; lengths; a byte-order mark

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "was", "good", "bad", "a", "."]


def word_tokenizer(words=WORDS, **kwargs):
    from transformers import BertTokenizerFast
    return BertTokenizerFast(vocab={w: i for i, w in enumerate(words)}, **kwargs)


@pytest.mark.parametrize("case, message", [
    ("only_special", r"^src: the tokenizer has no vocabulary, only its 5 special tokens"),
    ("larger_than_vocab", r"^src: the tokenizer has 12 tokens, more than the model's vocab_size=10$"),
    ("other_pad", r"^src: the tokenizer pads with id 0 \('\[PAD\]'\), the model's config has pad_token_id=1; "),
])
def test_tokenizers_that_cannot_tokenise_for_the_model(case, message):
    from deebert_jax.data.glue import DataError, check_tokenizer

    tok = word_tokenizer(WORDS[:5] if case == "only_special" else WORDS)
    config = {"only_special": tiny_config(), "larger_than_vocab": tiny_config(vocab_size=10),
              "other_pad": tiny_config(model_type="roberta", pad_token_id=1)}[case]
    with pytest.raises(DataError, match=message):
        check_tokenizer(tok, "src", config)
    assert check_tokenizer(word_tokenizer(), "src", tiny_config()) is not None   # a usable one passes


def test_a_tokenizer_adding_no_leading_special_token_is_refused():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from deebert_jax.data.glue import DataError, check_tokenizer

    raw = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token="[PAD]", unk_token="[UNK]")
    with pytest.raises(DataError, match=r"^src: the tokenizer adds no special token \(such as \[CLS\] or <s>\)"):
        check_tokenizer(tok, "src")


def test_load_tokenizer_refuses_a_directory_with_only_tokenizer_config(tmp_path):
    from deebert_jax.data.glue import DataError, load_tokenizer

    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "RobertaTokenizer"}))
    with pytest.raises(DataError, match=f"^{tmp_path}: the tokenizer has no vocabulary"):
        load_tokenizer(tmp_path)


class CountingTokenizer:
    """Wraps a tokenizer, recording the longest text it is given."""

    def __init__(self, tok):
        self.tok, self.longest = tok, 0

    def __call__(self, firsts, seconds=None, **kwargs):
        self.longest = max([self.longest, *map(len, firsts), *map(len, seconds or [])])
        return self.tok(firsts, seconds, **kwargs)

    def __getattr__(self, name):
        return getattr(self.tok, name)

    def __len__(self):
        return len(self.tok)


@pytest.mark.parametrize("text, truncated", [
    ("the movie was good", False),
    ("the movie " * 7, False),                        # 14 words + 2 special tokens: fits 16 exactly
    ("the movie " * 7 + "a", True),                   # one token too many
    ("good " * 2_000_000, True),                      # 10 MB: cut before tokenising
    (" " * 600 + "good", True),                       # only the part the model can see is read
])
def test_texts_are_cut_before_tokenising_and_truncated_says_so(text, truncated):
    from deebert_jax.data.glue import CHARS_PER_TOKEN
    from deebert_jax.inference.predict import encode

    tok = CountingTokenizer(word_tokenizer())
    arrays, cut = encode(tok, [(text, None), (text, "a good movie")], 16)
    assert tok.longest <= CHARS_PER_TOKEN * 16
    assert arrays["input_ids"].shape[1] <= 16
    assert cut[0] == truncated and cut[1] == (truncated or len(text.split()) + 3 + 3 > 16)


def test_max_seq_length_defaults_and_bounds(tmp_path, params):
    from deebert_jax.core.errors import InputError
    from deebert_jax.inference.model_dir import resolve_max_seq_length
    from deebert_jax.weights.checkpoint import write_training_info

    tok = word_tokenizer(model_max_length=512)
    plain = save_checkpoint(tmp_path / "plain", CONFIG, params)
    trained = save_checkpoint(tmp_path / "trained", CONFIG, params, write_extra=lambda t: write_training_info(t, 32))
    assert resolve_max_seq_length(None, CONFIG, plain, tok) == (64, "the model's max_position_embeddings=64")
    assert resolve_max_seq_length(None, CONFIG, trained, tok)[0] == 32
    assert resolve_max_seq_length(None, CONFIG, plain, tok, fallback=48)[0] == 48
    assert resolve_max_seq_length(None, CONFIG, plain, word_tokenizer(model_max_length=16)) == (
        16, "the tokenizer's model_max_length=16")
    assert resolve_max_seq_length(40, CONFIG, trained, tok) == (40, "given")
    for requested, tokenizer, message in [
            (65, tok, "--max-seq-length 65 is longer than the model's max_position_embeddings=64"),
            (32, word_tokenizer(model_max_length=16), "--max-seq-length 32 is longer than the tokenizer's model_max_length=16"),
            (2, tok, "--max-seq-length 2 is too short: the tokenizer adds 2 special tokens to a text, so at least 3 are needed")]:
        with pytest.raises(InputError) as e:
            resolve_max_seq_length(requested, CONFIG, plain, tokenizer)
        assert str(e.value) == message


@pytest.mark.parametrize("name, body", [
    ("in.txt", "good movie\nbad\n"),
    ("in.tsv", "sentence\tlabel\ngood movie\t1\nbad\t0\n"),
    ("in.jsonl", '{"text": "good movie"}\n{"text": "bad"}\n'),
])
def test_a_byte_order_mark_is_not_part_of_the_first_text(tmp_path, name, body):
    from deebert_jax.data.text_inputs import read_inputs

    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + body.encode())
    assert read_inputs(tmp_path / name) == [("good movie", None), ("bad", None)]


def test_input_naming_a_directory_says_so(tmp_path):
    from deebert_jax.data.glue import DataError
    from deebert_jax.data.text_inputs import read_inputs

    with pytest.raises(DataError, match=f"^{tmp_path}: is a directory; expected a .txt, .tsv, .jsonl file of texts$"):
        read_inputs(tmp_path)
