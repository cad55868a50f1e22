"""Converter: parity with PyTorch on the real MiniLM-L6, round trips, and every error case."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from deebert_jax.model import modeling
from deebert_jax.model import inference_step
from deebert_jax.core.config import tiny_config
from deebert_jax.weights.convert import (CheckpointError, convert_pytorch_checkpoint, export_pytorch_checkpoint,
                                 load_pytorch_checkpoint)
from deebert_jax.weights.torch_reference import TorchDeeBert
from tests.conftest import deebert_heads

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tree_equal(a, b):
    return jax.tree_util.tree_all(jax.tree_util.tree_map(
        lambda x, y: np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(x, y), a, b))


@pytest.fixture(scope="module")
def pair_batch(minilm_dir):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(minilm_dir)
    enc = tok(["a gripping, funny and moving film .", "the plot is thin ."],
              ["it never lets go of you", "and the acting is flat"],
              padding="max_length", max_length=24, return_tensors="np")
    return {k: enc[k].astype(np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}


def test_minilm_hidden_states_match_transformers(minilm_dir, pair_batch):
    from transformers import BertModel
    config, params = load_pytorch_checkpoint(minilm_dir, num_labels=2)
    mask = pair_batch["attention_mask"]
    assert mask.sum(1).min() < mask.shape[1], "the batch must contain padding"
    assert pair_batch["token_type_ids"].max() == 1, "the batch must contain a sentence pair"
    _, states = modeling.DeeBert(config).apply({"params": params}, *map(jnp.asarray, pair_batch.values()),
                                                 output_hidden_states=True)
    model = BertModel.from_pretrained(minilm_dir, attn_implementation="eager").eval()
    with torch.inference_mode():
        ref = model(**{k: torch.from_numpy(v).long() for k, v in pair_batch.items()},
                    output_hidden_states=True).hidden_states[1:]
    real = mask.astype(bool)
    for layer, (ours, theirs) in enumerate(zip(np.asarray(states), ref)):
        diff = np.abs(ours - theirs.numpy())[real].max()
        assert diff < 1e-4, f"layer {layer + 1}: max abs difference {diff}"


def _deebert_state_dict(minilm_dir, num_labels, seed=0):
    """MiniLM plus random heads under the original DeeBERT key names, built without our exporter."""
    rng = np.random.default_rng(seed)
    base = load_file(os.path.join(minilm_dir, "model.safetensors"))
    sd = {f"bert.{k}": v for k, v in base.items() if k != "embeddings.position_ids"}
    H = base["pooler.dense.weight"].shape[0]
    return {**sd, **deebert_heads("bert", 6, H, num_labels, rng)}


def _write_checkpoint(directory, config_dict, state, fmt="safetensors"):
    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config_dict, f)
    if fmt == "safetensors":
        save_file(state, os.path.join(directory, "model.safetensors"))
    else:
        torch.save({k: torch.from_numpy(v) for k, v in state.items()}, os.path.join(directory, "pytorch_model.bin"))
    return str(directory)


@pytest.fixture(scope="module")
def deebert_dir(minilm_dir, tmp_path_factory):
    with open(os.path.join(minilm_dir, "config.json")) as f:
        cfg = json.load(f)
    cfg["num_labels"] = 3
    return _write_checkpoint(tmp_path_factory.mktemp("deebert"), cfg, _deebert_state_dict(minilm_dir, 3))


def test_deebert_checkpoint_ramps_match_torch_reference(deebert_dir, pair_batch):
    config, params, report = convert_pytorch_checkpoint(deebert_dir)
    assert config.num_labels == 3
    assert any("highway" in d for d in report.dropped), report.summary()
    ours = np.asarray(inference_step.forward(config, params, *map(jnp.asarray, pair_batch.values())))
    ref_model = TorchDeeBert.from_pretrained(deebert_dir)
    with torch.inference_mode():
        ref = ref_model(*(torch.from_numpy(v).long() for v in pair_batch.values())).numpy()
    assert ours.shape == ref.shape == (6, 2, 3)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)
    # The final ramp is the checkpoint's pooler + classifier, not the untrained highway 5.
    sd = load_file(os.path.join(deebert_dir, "model.safetensors"))
    np.testing.assert_array_equal(params["ramps"]["classifier"]["kernel"][-1], sd["classifier.weight"].T)
    np.testing.assert_array_equal(params["ramps"]["classifier"]["kernel"][0],
                                  sd["bert.encoder.highway.0.classifier.weight"].T)


def test_bert_model_checkpoint_initialises_ramps(minilm_dir):
    config, params, report = convert_pytorch_checkpoint(minilm_dir, num_labels=2, seed=3)
    pooler = load_file(os.path.join(minilm_dir, "model.safetensors"))["pooler.dense.weight"].T
    for i in range(config.num_hidden_layers):
        np.testing.assert_array_equal(params["ramps"]["pooler"]["kernel"][i], pooler)
    assert "embeddings.position_ids" in report.skipped
    assert any("off-ramps" in s for s in report.initialized) and any("final classifier" in s for s in report.initialized)
    _, again, _ = convert_pytorch_checkpoint(minilm_dir, num_labels=2, seed=3)
    assert tree_equal(params, again), "initialisation must be reproducible from the seed"


def test_sequence_classification_checkpoint_matches_transformers(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification
    torch.manual_seed(0)
    hf = BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=64, max_position_embeddings=64, num_labels=3)
    model = BertForSequenceClassification(hf).eval()
    model.save_pretrained(tmp_path)
    config, params = load_pytorch_checkpoint(tmp_path)
    assert config.num_labels == 3
    ids = torch.randint(1, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0
    with torch.inference_mode():
        ref = model(input_ids=ids, attention_mask=mask).logits.numpy()
    ours = inference_step.forward(config, params, jnp.asarray(ids.numpy()), jnp.asarray(mask.numpy()),
                            jnp.zeros((2, 9), jnp.int32))[-1]
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_model():
    config = tiny_config(num_labels=3)
    return config, jax.tree_util.tree_map(np.asarray, modeling.init_params(config, jax.random.PRNGKey(4)))


@pytest.fixture
def tiny_export(tiny_model, tmp_path):
    config, params = tiny_model
    directory = export_pytorch_checkpoint(config, params, tmp_path / "export")
    return config, params, directory


def test_export_then_import_is_exact(tiny_export):
    config, params, directory = tiny_export
    config2, params2 = load_pytorch_checkpoint(directory)
    assert config2 == config
    assert tree_equal(params, params2)


def test_export_loads_in_torch_reference(tiny_export):
    config, params, directory = tiny_export
    ids = np.random.default_rng(0).integers(1, 100, (2, 7)).astype(np.int32)
    mask, types = np.ones_like(ids), np.zeros_like(ids)
    ours = np.asarray(inference_step.forward(config, params, ids, mask, types))
    with torch.inference_mode():
        ref = TorchDeeBert.from_pretrained(directory)(torch.from_numpy(ids).long()).numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_bin_and_old_layernorm_names(tiny_export, tmp_path):
    config, params, directory = tiny_export
    sd = load_file(os.path.join(directory, "model.safetensors"))
    renamed = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
               for k, v in sd.items()}
    renamed["cls.predictions.bias"] = np.zeros(100, np.float32)
    cfg = json.load(open(os.path.join(directory, "config.json")))
    bin_dir = _write_checkpoint(tmp_path / "bin", cfg, renamed, fmt="bin")
    config2, params2, report = convert_pytorch_checkpoint(bin_dir)
    assert tree_equal(params, params2)
    assert "cls.predictions.bias" in report.skipped


def _corrupt(tiny_export, tmp_path, edit):
    config, params, directory = tiny_export
    sd = dict(load_file(os.path.join(directory, "model.safetensors")))
    edit(sd)
    cfg = json.load(open(os.path.join(directory, "config.json")))
    return _write_checkpoint(tmp_path / "bad", cfg, sd)


@pytest.mark.parametrize("edit, message", [
    (lambda sd: sd.pop("bert.encoder.layer.1.attention.self.key.bias"),
     "missing key 'encoder.layer.1.attention.self.key.bias'"),
    (lambda sd: sd.update({"bert.encoder.layer.0.extra.weight": np.zeros(3, np.float32)}),
     "unexpected key 'encoder.layer.0.extra.weight'"),
    (lambda sd: sd.update({"bert.encoder.layer.0.output.dense.weight": np.zeros((32, 63), np.float32)}),
     r"key 'encoder.layer.0.output.dense.weight' has shape \(32, 63\), expected \(32, 64\)"),
    (lambda sd: sd.pop("bert.encoder.highway.0.classifier.bias"),
     "missing key 'encoder.highway.0.classifier.bias'"),
])
def test_bad_keys_are_named(tiny_export, tmp_path, edit, message):
    bad = _corrupt(tiny_export, tmp_path, edit)
    with pytest.raises(CheckpointError, match=message) as e:
        load_pytorch_checkpoint(bad)
    assert "model.safetensors" in str(e.value)


def test_num_labels_conflict_names_the_key(tiny_export):
    _, _, directory = tiny_export
    with pytest.raises(CheckpointError, match="'classifier.weight' has 3 labels, but num_labels=5"):
        load_pytorch_checkpoint(directory, num_labels=5)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_truncated_file(tiny_export, tmp_path, fmt):
    config, params, directory = tiny_export
    sd = load_file(os.path.join(directory, "model.safetensors"))
    cfg = json.load(open(os.path.join(directory, "config.json")))
    d = _write_checkpoint(tmp_path / fmt, cfg, sd, fmt=fmt)
    path = os.path.join(d, "model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="cannot read weights") as e:
        load_pytorch_checkpoint(d)
    assert path in str(e.value)


def test_directory_without_config_or_weights(tiny_export, tmp_path):
    _, _, directory = tiny_export
    os.remove(os.path.join(directory, "config.json"))
    with pytest.raises(CheckpointError, match="no config.json"):
        load_pytorch_checkpoint(directory)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors or pytorch_model.bin"):
        load_pytorch_checkpoint(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no such directory"):
        load_pytorch_checkpoint(tmp_path / "absent")


def test_export_is_atomic(tiny_export, monkeypatch):
    config, params, directory = tiny_export
    before = open(os.path.join(directory, "model.safetensors"), "rb").read()
    import safetensors.numpy

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.numpy, "save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        export_pytorch_checkpoint(config, params, directory)
    assert open(os.path.join(directory, "model.safetensors"), "rb").read() == before
    assert not [n for n in os.listdir(os.path.dirname(directory)) if ".tmp-" in n]


def test_orbax_checkpoint_round_trip(tiny_export, tmp_path):
    from deebert_jax.weights.checkpoint import load_checkpoint, save_checkpoint
    config, params, _ = tiny_export
    save_checkpoint(tmp_path / "ckpt", config, params)
    config2, params2 = load_checkpoint(tmp_path / "ckpt")
    assert config2 == config and tree_equal(params, params2)


def run_cli(*args):
    env = dict(os.environ, HF_HUB_OFFLINE="1", JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "train.convert", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def test_cli_converts_and_reports(tiny_export, tmp_path):
    _, params, directory = tiny_export
    proc = run_cli("--pytorch", str(directory), "--out", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert "2 layers, width 32" in proc.stdout and "off-ramps 1..1" in proc.stdout
    from deebert_jax.weights.checkpoint import load_checkpoint
    assert tree_equal(params, load_checkpoint(tmp_path / "out")[1])


def test_cli_bad_input_names_the_fault(tiny_export, tmp_path):
    bad = _corrupt(tiny_export, tmp_path, lambda sd: sd.pop("bert.embeddings.LayerNorm.bias"))
    proc = run_cli("--pytorch", bad, "--out", str(tmp_path / "out"))
    assert proc.returncode != 0
    assert "embeddings.LayerNorm.bias" in proc.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()
