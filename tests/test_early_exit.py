"""Dynamic early exit: the jitted while_loop against references built from the full ramp logits."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deebert_jax.inference import early_exit as ee
from deebert_jax.model import modeling
from deebert_jax.model import layouts
from deebert_jax.model import inference_step
from deebert_jax.core.config import tiny_config

L, K = 4, 3
# Wide initialisation so that random ramps disagree in confidence and exits spread over layers.
CONFIG = tiny_config(num_hidden_layers=L, num_labels=K, initializer_range=0.5)
ATOL = 1e-5


def assert_logits_close(actual, desired):
    # Two compiled programs (different batch shapes, loop vs scan) round differently; with the wide
    # initialisation logits reach ~5, so allow float32 relative error as well as 1e-5 absolute.
    np.testing.assert_allclose(np.asarray(actual), np.asarray(desired), rtol=2e-5, atol=ATOL)


@pytest.fixture(scope="module")
def params():
    return jax.device_put(modeling.init_params(CONFIG, jax.random.PRNGKey(0)))


@pytest.fixture(scope="module", params=["stacked", "unstacked"])
def any_params(request, params):
    """Both parameter layouts the loop reads: stacked L axis, and `unstack_params` (lax.switch)."""
    return params if request.param == "stacked" else layouts.unstack_params(params)


def make_batch(batch, seq=12, seed=0, padding_rows=()):
    """Random ids with ragged lengths; rows in `padding_rows` are all padding."""
    rng = np.random.RandomState(seed)
    ids = rng.randint(1, CONFIG.vocab_size, (batch, seq)).astype(np.int32)
    lengths = rng.randint(3, seq + 1, batch)
    mask = (np.arange(seq)[None, :] < lengths[:, None]).astype(np.int32)
    mask[list(padding_rows)] = 0
    ids = ids * mask
    types = ((np.arange(seq)[None, :] >= lengths[:, None] // 2) & mask.astype(bool)).astype(np.int32)
    return ids, mask, types


def np_entropy(logits):
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -(np.exp(logp) * logp).sum(-1)


def reference_exits(ramp_logits, threshold, mask, rule="entropy"):
    """[L, B, K] ramp logits -> (logits [B, K], exit_layer [B]) by the rule, row by row."""
    ramp_logits = np.asarray(ramp_logits, np.float64)
    n_layers, B, _ = ramp_logits.shape
    logits, exit_layer = np.zeros(ramp_logits.shape[1:]), np.zeros(B, np.int64)
    for b in range(B):
        if mask[b].sum() == 0:
            continue
        prev, count = None, 0
        for layer in range(n_layers):
            z = ramp_logits[layer, b]
            if rule == "entropy":
                fires = np_entropy(z) < threshold
            elif rule == "max_prob":
                fires = np.max(np.exp(z - z.max()) / np.exp(z - z.max()).sum()) > threshold
            else:
                pred = int(np.argmax(z))
                count = count + 1 if pred == prev else 0
                prev = pred
                fires = count >= threshold
            if fires or layer == n_layers - 1:
                logits[b], exit_layer[b] = z, layer + 1
                break
    return logits, exit_layer


def safe_thresholds(values, n, rng, low, high, margin=1e-3):
    """n random thresholds in [low, high] at least `margin` from every value (no float ties)."""
    values = np.asarray(values).ravel()
    out = []
    while len(out) < n:
        t = rng.uniform(low, high)
        if np.min(np.abs(values - t)) > margin:
            out.append(float(t))
    return out


def test_entropy_is_stable_and_in_nats():
    assert float(ee.entropy(jnp.zeros(K))) == pytest.approx(math.log(K), abs=1e-6)
    big = ee.entropy(jnp.array([1e4, -1e4, 0.0]))
    assert np.isfinite(float(big)) and float(big) == pytest.approx(0.0, abs=1e-6)
    z = np.array([[0.3, -1.2, 2.0], [5.0, 5.0, -3.0]])
    np.testing.assert_allclose(ee.entropy(jnp.asarray(z)), np_entropy(z), atol=1e-6)


def test_threshold_zero_runs_every_layer_and_matches_full_forward(params, any_params):
    ids, mask, types = make_batch(24, seed=0, padding_rows=[4])   # 24 rows: one compile shared with other tests
    out = ee.early_exit_predict(CONFIG, any_params, ids, mask, types, 0.0)
    full = np.asarray(inference_step.forward(CONFIG, params, ids, mask, types))
    real = mask.sum(-1) > 0
    np.testing.assert_array_equal(np.asarray(out.exit_layer), np.where(real, L, 0))
    np.testing.assert_allclose(np.asarray(out.logits)[real], full[-1][real], atol=ATOL)
    assert int(out.layers_run) == L


def test_threshold_above_ln_k_exits_everyone_at_layer_one(params, any_params):
    ids, mask, types = make_batch(24, seed=1, padding_rows=[0])
    out = ee.early_exit_predict(CONFIG, any_params, ids, mask, types, math.log(K) + 1e-3)
    full = np.asarray(inference_step.forward(CONFIG, params, ids, mask, types))
    real = mask.sum(-1) > 0
    np.testing.assert_array_equal(np.asarray(out.exit_layer), np.where(real, 1, 0))
    np.testing.assert_allclose(np.asarray(out.logits)[real], full[0][real], atol=ATOL)
    assert int(out.layers_run) == 1


@pytest.mark.parametrize("rule", ["entropy", "max_prob", "patience"])
def test_random_thresholds_match_reference_from_full_logits(params, rule):
    check_random_thresholds(params, rule)


def test_random_thresholds_match_reference_unstacked_params(params):
    check_random_thresholds(layouts.unstack_params(params), "entropy")


def check_random_thresholds(params, rule):
    rng = np.random.RandomState(3)
    ids, mask, types = make_batch(24, seed=2, padding_rows=[3, 17, 23])
    full = np.asarray(inference_step.forward(CONFIG, params, ids, mask, types))
    if rule == "entropy":
        thresholds = safe_thresholds(np_entropy(full), 5, rng, 0.0, math.log(K))
    elif rule == "max_prob":
        probs = np.exp(full - full.max(-1, keepdims=True))
        thresholds = safe_thresholds((probs / probs.sum(-1, keepdims=True)).max(-1), 5, rng, 1 / K, 1.0)
    else:
        thresholds = [0, 1, 2, 3, L]
    exits_seen = set()
    for threshold in thresholds:
        out = ee.early_exit_predict(CONFIG, params, ids, mask, types, threshold, rule=rule)
        want_logits, want_exit = reference_exits(full, threshold, mask, rule)
        np.testing.assert_array_equal(np.asarray(out.exit_layer), want_exit, err_msg=f"{rule} {threshold}")
        assert_logits_close(out.logits, want_logits)
        assert int(out.layers_run) == want_exit.max()
        exits_seen |= set(want_exit[want_exit > 0].tolist())
    assert len(exits_seen) >= 3, f"thresholds too easy: exits only at {exits_seen}"


def test_layers_run_counts_loop_iterations(any_params, monkeypatch):
    """A callback in the layer counts real iterations: the loop stops at the largest exit layer."""
    params = any_params
    calls = []
    layer_forward = inference_step.layer_forward

    def counting_layer_forward(*args, **kwargs):
        jax.debug.callback(lambda: calls.append(1))
        return layer_forward(*args, **kwargs)

    monkeypatch.setattr(inference_step, "layer_forward", counting_layer_forward)
    config = CONFIG.replace(layer_norm_eps=1.01e-12)   # a config of its own: traced afresh, with the callback
    ids, mask, types = make_batch(8, seed=4, padding_rows=[2])
    full = np.asarray(inference_step.forward(config, params, ids, mask, types))
    # One threshold for each number of layers the reference says the batch needs.
    grid = [t for t in np.linspace(0.0, math.log(K) + 0.01, 120) if np.min(np.abs(np_entropy(full) - t)) > 1e-3]
    by_depth = {reference_exits(full, t, mask)[1].max(): t for t in grid}
    thresholds = list(by_depth.values())
    runs = set()
    for threshold in thresholds:
        calls.clear()
        out = ee.early_exit_predict(config, params, ids, mask, types, threshold)
        jax.block_until_ready(out)
        jax.effects_barrier()
        assert len(calls) == int(out.layers_run) == int(np.max(out.exit_layer))
        runs.add(len(calls))
    assert 1 in runs and L in runs and len(runs) >= 3, runs

    calls.clear()
    out = ee.early_exit_predict(config, params, np.zeros_like(ids), np.zeros_like(mask), types, 0.0)
    jax.effects_barrier()
    assert len(calls) == int(out.layers_run) == 0, "all-padding batch must not run a layer"


def test_batch_of_one_and_batch_of_32_agree(params):
    ids, mask, types = make_batch(32, seed=5)
    full = np.asarray(inference_step.forward(CONFIG, params, ids, mask, types))
    threshold = safe_thresholds(np_entropy(full), 1, np.random.RandomState(0), 0.3, 0.8)[0]
    batched = jax.device_get(ee.early_exit_predict(CONFIG, params, ids, mask, types, threshold))
    for b in range(32):
        one = jax.device_get(ee.early_exit_predict(CONFIG, params, ids[b:b + 1], mask[b:b + 1], types[b:b + 1],
                                                   threshold))
        assert int(one.exit_layer[0]) == int(batched.exit_layer[b]), b
        assert_logits_close(one.logits[0], batched.logits[b])
    assert len(set(np.asarray(batched.exit_layer).tolist())) >= 2


def test_same_exits_as_torch_reference_at_batch_size_one(params, tmp_path):
    torch = pytest.importorskip("torch")
    from deebert_jax.weights.convert import export_pytorch_checkpoint
    from deebert_jax.weights.torch_reference import TorchDeeBert
    model = TorchDeeBert.from_pretrained(export_pytorch_checkpoint(CONFIG, params, tmp_path / "pt"))
    ids, mask, types = make_batch(6, seed=6)
    full = np.asarray(inference_step.forward(CONFIG, params, ids, mask, types))
    thresholds = [0.0] + safe_thresholds(np_entropy(full), 3, np.random.RandomState(1), 0.1, math.log(K))
    layers_seen = set()
    for threshold in thresholds:
        for b in range(len(ids)):
            ours = jax.device_get(ee.early_exit_predict(CONFIG, params, ids[b:b + 1], mask[b:b + 1], types[b:b + 1],
                                                        threshold))
            with torch.no_grad():
                logits, exit_layer = model.early_exit(*(torch.from_numpy(a[b:b + 1]).long() for a in (ids, mask, types)),
                                                      threshold=threshold)
            assert int(ours.exit_layer[0]) == int(exit_layer[0]), (threshold, b)
            np.testing.assert_allclose(np.asarray(ours.logits[0]), logits[0].numpy(), atol=1e-4)
            layers_seen.add(int(exit_layer[0]))
    assert len(layers_seen) >= 2


def test_sweep_of_13_thresholds_compiles_once(params):
    ids, mask, types = make_batch(5, seed=7)   # a batch shape no other test uses
    before = ee._exit_loop._cache_size()
    # Mixed Python / numpy / jax scalar types must still share one compiled loop.
    thresholds = [0, 0.001, np.float64(0.005), 0.01, np.float32(0.05), jnp.float32(0.1), 0.15, 0.2, 0.3,
                  0.4, 0.5, 0.6, jnp.asarray(0.7)]
    layers = [ee.early_exit_predict(CONFIG, params, ids, mask, types, t).exit_layer for t in thresholds]
    assert ee._exit_loop._cache_size() - before == 1
    means = [float(np.mean(l)) for l in layers]
    assert means == sorted(means, reverse=True) and means[0] == L
    # Inside a caller's jit the threshold is a tracer: no concrete check, same answer.
    traced = jax.jit(lambda t: ee.early_exit_predict(CONFIG, params, ids, mask, types, t).exit_layer)
    np.testing.assert_array_equal(traced(0.1), layers[5])


@pytest.mark.parametrize("rule, threshold, message", [
    ("entropy", float("nan"), "NaN"), ("entropy", -0.1, ">= 0"), ("max_prob", 1.5, "[0, 1]"),
    ("patience", 1.5, "whole number"), ("patience", -1, "whole number"), ("nope", 0.1, "unknown exit rule"),
])
def test_bad_thresholds_are_clear_errors(params, rule, threshold, message):
    ids, mask, types = make_batch(2)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        ee.early_exit_predict(CONFIG, params, ids, mask, types, threshold, rule=rule)
    with pytest.raises(ValueError, match="threshold"):
        ee.early_exit_predict(CONFIG, params, ids, mask, types, np.array([0.1, 0.2]))


def test_bad_inputs_are_clear_errors(params):
    ids, mask, types = make_batch(2)
    with pytest.raises(ValueError, match="one \\[B, S\\] shape"):
        ee.early_exit_predict(CONFIG, params, ids, mask[:, :5], types, 0.1)
    with pytest.raises(ValueError, match="attention_mask must hold integers"):
        ee.early_exit_predict(CONFIG, params, ids, mask.astype(np.float32), types, 0.1)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        long = np.ones((1, CONFIG.max_position_embeddings + 1), np.int32)
        ee.early_exit_predict_pmap(CONFIG, params, long, long, long, 0.1)


def test_pmap_matches_single_device_and_each_device_stops_on_its_own(params):
    devices = jax.local_devices()
    assert len(devices) >= 2, "conftest should give 8 CPU devices"
    ids, mask, types = make_batch(13, seed=8, padding_rows=[5])   # 13: not a multiple of the devices
    full = np.asarray(inference_step.forward(CONFIG, params, ids, mask, types))
    threshold = safe_thresholds(np_entropy(full), 1, np.random.RandomState(2), 0.3, 0.8)[0]
    single = ee.early_exit_predict(CONFIG, params, ids, mask, types, threshold)
    multi = ee.early_exit_predict_pmap(CONFIG, ee.replicate_params(params), ids, mask, types, threshold)
    np.testing.assert_array_equal(np.asarray(multi.exit_layer), np.asarray(single.exit_layer))
    assert_logits_close(multi.logits, single.logits)
    assert np.asarray(multi.layers_run).shape == (len(devices),)

    # Two devices: the first shard is all padding, the second must run every layer.
    two = devices[:2]
    ids, mask, types = make_batch(4, seed=9, padding_rows=[0, 1])
    out = ee.early_exit_predict_pmap(CONFIG, params, ids, mask, types, 0.0, devices=two)
    np.testing.assert_array_equal(np.asarray(out.layers_run), [0, L])
    np.testing.assert_array_equal(np.asarray(out.exit_layer), [0, 0, L, L])


def test_the_full_depth_threshold_is_the_first_of_every_sweep():
    from deebert_jax.evaluation.sweep import default_thresholds
    from deebert_jax.inference.early_exit import EXIT_RULES, full_depth_threshold

    for rule in EXIT_RULES:
        for layers in (2, 6, 12):
            assert full_depth_threshold(rule, layers) == default_thresholds(rule, layers)[0]
