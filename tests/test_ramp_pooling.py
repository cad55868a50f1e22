"""`ramp_pooling="mean"`: off-ramps read the mean of the real tokens, every path agrees with a
reference computed by hand from the hidden states, and with the PyTorch reference."""

import math

import jax
import numpy as np
import pytest
from conftest import ragged_batch

from deebert_jax.model import modeling
from tests import layer_access
from deebert_jax.model import layouts
from deebert_jax.model import inference_step
from deebert_jax.core.config import ConfigError, DeeBertConfig, tiny_config
from deebert_jax.inference.early_exit import early_exit_predict
from deebert_jax.inference.exit_aware import exit_aware_predict

L, K, SEQ = 4, 3, 12
CONFIG = tiny_config(num_hidden_layers=L, num_labels=K, initializer_range=0.5, ramp_pooling="mean")


@pytest.fixture(scope="module")
def params():
    return jax.device_put(modeling.init_params(CONFIG, jax.random.PRNGKey(3)))


def make_batch(n, seed, padding_rows=()):
    return ragged_batch(n, SEQ, CONFIG.vocab_size, seed, padding_rows=padding_rows, min_length=2,
                        zero_padding_ids=True)


def np_ramp(ramp_params, features):
    p = jax.tree_util.tree_map(np.asarray, ramp_params)
    pooled = np.tanh(features @ p["pooler"]["kernel"] + p["pooler"]["bias"])
    return pooled @ p["classifier"]["kernel"] + p["classifier"]["bias"]


def np_entropy(z):
    z = z - z.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -(np.exp(logp) * logp).sum(-1)


def test_off_ramps_read_the_mean_of_real_tokens_and_ramp_l_the_first(params):
    ids, mask, types = make_batch(6, seed=0)
    logits, states = modeling.DeeBert(CONFIG).apply({"params": params}, ids, mask, types, output_hidden_states=True)
    states, real = np.asarray(states, np.float64), mask[..., None].astype(np.float64)
    for i in range(L):
        features = (states[i] * real).sum(1) / real.sum(1) if i < L - 1 else states[i][:, 0]
        want = np_ramp(layer_access.ramp_params_at(params, i), features)
        np.testing.assert_allclose(np.asarray(logits[i]), want, rtol=1e-4, atol=1e-4)
    # Without hidden states (the training graph) the same logits.
    np.testing.assert_allclose(modeling.DeeBert(CONFIG).apply({"params": params}, ids, mask, types), logits,
                               atol=1e-5)


def test_padding_tokens_do_not_reach_the_mean(params):
    ids, mask, types = make_batch(6, seed=1)
    noisy = np.where(mask == 1, ids, 7).astype(np.int32)  # other ids under the padding
    a = inference_step.forward(CONFIG, params, ids, mask, types)
    b = inference_step.forward(CONFIG, params, noisy, mask, types)
    np.testing.assert_allclose(a, b, atol=1e-5)
    # ... while the first-token model's off-ramps differ from the mean model's on the same weights.
    first = inference_step.forward(CONFIG.replace(ramp_pooling="first"), params, ids, mask, types)
    assert np.abs(np.asarray(first[0]) - np.asarray(a[0])).max() > 1e-2
    np.testing.assert_allclose(first[-1], a[-1], atol=1e-5)


def test_inference_layout_and_exit_loops_agree(params):
    ids, mask, types = make_batch(29, seed=2, padding_rows=(3, 17))
    full = np.asarray(modeling.DeeBert(CONFIG).apply({"params": params}, ids, mask, types))
    unstacked = layouts.unstack_params(params)
    np.testing.assert_allclose(inference_step.forward(CONFIG, unstacked, ids, mask, types), full, rtol=2e-5, atol=1e-5)
    scores = np_entropy(full.astype(np.float64))
    real = mask.sum(-1) > 0
    values = np.unique(scores[:, real])
    gaps = [(a + b) / 2 for a, b in zip(values[:-1], values[1:]) if b - a > 1e-3]
    exits_seen = set()
    for threshold in [0.0] + gaps[len(gaps) // 6::len(gaps) // 4][:4] + [math.log(K) + 1e-3]:
        # The DeeBERT rule by hand: first ramp under the threshold, else ramp L.
        below = scores < threshold
        want = np.where(below[:-1].any(0), below[:-1].argmax(0) + 1, L) * real
        for p in (params, unstacked):
            out = early_exit_predict(CONFIG, p, ids, mask, types, threshold)
            np.testing.assert_array_equal(np.asarray(out.exit_layer), want, err_msg=str(threshold))
            picked = full[np.maximum(want, 1) - 1, np.arange(len(ids))]
            np.testing.assert_allclose(np.asarray(out.logits)[real], picked[real], rtol=2e-5, atol=1e-5)
        pooled = exit_aware_predict(CONFIG, params, ids, mask, types, threshold, bucket_sizes=(8, 2))
        np.testing.assert_array_equal(np.asarray(pooled.exit_layer), want)
        exits_seen |= set(want[real].tolist())
    assert len(exits_seen) >= 3, exits_seen


def test_torch_reference_reads_the_same_mean(params, tmp_path):
    torch = pytest.importorskip("torch")
    from deebert_jax.weights.convert import export_pytorch_checkpoint, load_pytorch_checkpoint
    from deebert_jax.weights.torch_reference import TorchDeeBert
    directory = export_pytorch_checkpoint(CONFIG, params, tmp_path / "pt")
    config, _ = load_pytorch_checkpoint(directory)
    assert config.ramp_pooling == "mean"   # config.json carries it back
    ids, mask, types = make_batch(5, seed=4)
    ours = np.asarray(inference_step.forward(CONFIG, params, ids, mask, types))
    model = TorchDeeBert.from_pretrained(directory)
    with torch.inference_mode():
        ref = model(*(torch.from_numpy(a).long() for a in (ids, mask, types))).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_unknown_pooling_is_a_clear_error():
    with pytest.raises(ConfigError, match="ramp_pooling='max'"):
        tiny_config(ramp_pooling="max")
    assert DeeBertConfig.from_hf_config({"hidden_size": 32, "num_attention_heads": 4}).ramp_pooling == "first"


def test_config_override_applies_to_a_loaded_checkpoint_and_empty_keeps_it():
    from configs.common import base_config
    from deebert_jax.training.loop import model_overrides
    cfg = base_config()
    assert model_overrides(cfg) == {}
    cfg.model.ramp_pooling = "mean"
    assert model_overrides(cfg) == {"ramp_pooling": "mean"}
