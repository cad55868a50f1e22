"""RoBERTa and DeeRoBERTa: parity with `transformers`' own classes (random small configs), a
DeeRoBERTa checkpoint built from raw keys, export round trip, early exit, training, tokenizer."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import RobertaConfig, RobertaForSequenceClassification, RobertaModel

from deebert_jax.model import modeling
from deebert_jax.model import layouts
from deebert_jax.model import inference_step
from deebert_jax.core.config import ConfigError, DeeBertConfig
from deebert_jax.weights.convert import convert_pytorch_checkpoint, export_pytorch_checkpoint, load_pytorch_checkpoint
from deebert_jax.inference.early_exit import early_exit_predict
from deebert_jax.inference.exit_aware import exit_aware_predict
from deebert_jax.weights.torch_reference import TorchDeeBert
from deebert_jax.data.validation import check_model_inputs
from tests.conftest import deebert_heads
from tests.test_convert import _write_checkpoint, tree_equal
from tests.test_early_exit import np_entropy, reference_exits
from tests.test_exit_aware import safe_thresholds

PAD, L, K, SEQ = 1, 2, 3, 12
HF = dict(vocab_size=100, hidden_size=32, num_hidden_layers=L, num_attention_heads=4, intermediate_size=64,
          max_position_embeddings=40, type_vocab_size=1, layer_norm_eps=1e-5, pad_token_id=PAD, num_labels=K)


@functools.partial(jax.jit, static_argnums=0)
def ramps_and_states(config, params, ids, mask, types):
    """Stacked params -> (ramp logits [L, B, K], every layer's output [L, B, S, H]); compiled once per shape."""
    return modeling.DeeBert(config).apply({"params": params}, ids, mask, types, output_hidden_states=True)


# The inference layout's full forward (`layer_step`, the step of every exit loop), compiled once.
serving_forward = jax.jit(inference_step.forward, static_argnums=0)


def hf_config(**changes) -> RobertaConfig:
    return RobertaConfig(**{**HF, **changes}, attn_implementation="eager")


def right_padded(n=8, seed=0):
    """input_ids, attention_mask, token_type_ids [n, SEQ] int32: ragged rows (one full length), padding
    ids = PAD, real ids never PAD (as a RoBERTa tokenizer makes them)."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, SEQ + 1, n)
    lengths[0] = SEQ
    mask = (np.arange(SEQ)[None, :] < lengths[:, None]).astype(np.int32)
    ids = np.where(mask == 1, rng.integers(PAD + 2, HF["vocab_size"], (n, SEQ)), PAD).astype(np.int32)
    return ids, mask, np.zeros_like(ids)


def torch_inputs(ids, mask):
    return dict(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())


def max_real_diff(ours, theirs, mask):
    return float(np.abs(np.asarray(ours) - np.asarray(theirs))[mask.astype(bool)].max())


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Random `RobertaModel` (with pooler) and `RobertaForSequenceClassification`, saved by transformers."""
    out = {}
    for seed, cls in enumerate((RobertaModel, RobertaForSequenceClassification)):
        torch.manual_seed(seed)
        model = cls(hf_config()).eval()
        if cls is RobertaForSequenceClassification:  # logits of order 1, so that 1e-4 is a tight bound
            with torch.no_grad():
                for p in model.classifier.parameters():
                    p.normal_(0.0, 1.0)
        directory = tmp_path_factory.mktemp(cls.__name__)
        model.save_pretrained(directory)
        out[cls.__name__] = (model, str(directory))
    return out


def test_position_ids_follow_transformers():
    from transformers.models.roberta.modeling_roberta import RobertaEmbeddings
    ids, _, _ = right_padded(4, seed=1)
    ids[3] = np.concatenate([[PAD, PAD], ids[3, :-2]])  # a left-padded row too
    config = DeeBertConfig.from_hf_config(hf_config().to_dict())
    expected = RobertaEmbeddings.create_position_ids_from_input_ids(torch.from_numpy(ids).long(), PAD).numpy()
    got = np.asarray(modeling.position_ids(config, jnp.asarray(ids)))
    np.testing.assert_array_equal(got, expected)
    assert got[0].tolist() == list(range(PAD + 1, PAD + 1 + SEQ)) and (got[ids == PAD] == PAD).all()
    np.testing.assert_array_equal(modeling.position_ids(config.replace(model_type="bert"), ids), [np.arange(SEQ)])


def test_roberta_model_hidden_states_match_transformers(saved):
    model, directory = saved["RobertaModel"]
    config, params, report = convert_pytorch_checkpoint(directory, num_labels=K)
    assert (config.model_type, config.pad_token_id, config.type_vocab_size, config.layer_norm_eps) == ("roberta", 1, 1, 1e-5)
    assert "pooler" in report.imported
    ids, mask, types = right_padded()
    assert mask.sum(1).min() < SEQ, "the batch must contain padding"
    with torch.inference_mode():
        ref = model(**torch_inputs(ids, mask), output_hidden_states=True)
    embedded = inference_step.embed(config, params, ids, types)
    assert max_real_diff(embedded, ref.hidden_states[0].numpy(), mask) < 1e-4
    # The check can fail: BERT's positions 0..S-1 embed the same ids differently.
    bert_embedded = inference_step.embed(config.replace(model_type="bert"), params, ids, types)
    assert max_real_diff(bert_embedded, ref.hidden_states[0].numpy(), mask) > 1e-2
    _, states = ramps_and_states(config, params, ids, mask, types)
    for layer in range(L):
        diff = max_real_diff(states[layer], ref.hidden_states[layer + 1].numpy(), mask)
        assert diff < 1e-4, f"layer {layer + 1}: max abs difference {diff}"
    # Ramp L's pooler is RobertaModel's pooler.
    ramp = jax.tree_util.tree_map(lambda x: x[-1], params["ramps"])
    pooled = np.tanh(np.asarray(states[-1][:, 0]) @ ramp["pooler"]["kernel"] + ramp["pooler"]["bias"])
    np.testing.assert_allclose(pooled, ref.pooler_output.numpy(), atol=1e-4)


def test_sequence_classifier_logits_match_transformers(saved):
    model, directory = saved["RobertaForSequenceClassification"]
    config, params, report = convert_pytorch_checkpoint(directory)
    assert config.num_labels == K and "classifier.out_proj" in report.imported
    assert [s.split(" (")[0] for s in report.initialized] == [f"off-ramps 1..{L - 1}"], report.summary()
    ids, mask, types = right_padded(seed=2)
    with torch.inference_mode():
        ref = model(**torch_inputs(ids, mask), output_hidden_states=True)
    logits, states = ramps_and_states(config, params, ids, mask, types)
    for layer in range(L):
        assert max_real_diff(states[layer], ref.hidden_states[layer + 1].numpy(), mask) < 1e-4, layer
    np.testing.assert_allclose(logits[-1], ref.logits.numpy(), atol=1e-4)
    # The inference layout (the step of every exit loop) gives the same final head.
    serving = layouts.unstack_params(params)
    np.testing.assert_allclose(serving_forward(config, serving, ids, mask, types)[-1], ref.logits.numpy(), atol=1e-4)


def test_roberta_checkpoint_keys_accounted_for(saved, tmp_path):
    from deebert_jax.weights.convert import CheckpointError
    _, directory = saved["RobertaForSequenceClassification"]
    sd = dict(load_file(os.path.join(directory, "model.safetensors")))
    cfg = json.loads(open(os.path.join(directory, "config.json")).read())
    _, params = load_pytorch_checkpoint(directory)
    # An older transformers' pooler (never read by this head) and the MLM head are left out, and said so.
    extra = dict(sd, **{"roberta.pooler.dense.weight": np.ones((32, 32), np.float32),
                        "roberta.pooler.dense.bias": np.ones(32, np.float32), "lm_head.bias": np.ones(100, np.float32)})
    config, params2, report = convert_pytorch_checkpoint(_write_checkpoint(tmp_path / "extra", cfg, extra))
    assert tree_equal(params, params2)
    assert "lm_head.bias" in report.skipped and any(d.startswith("pooler.*") for d in report.dropped)
    half = {k: v for k, v in sd.items() if k != "classifier.out_proj.bias"}
    with pytest.raises(CheckpointError, match="missing key 'classifier.out_proj.bias'"):
        load_pytorch_checkpoint(_write_checkpoint(tmp_path / "half", cfg, half))
    with pytest.raises(CheckpointError, match="'classifier.out_proj.weight' has 3 labels, but num_labels=5"):
        load_pytorch_checkpoint(directory, num_labels=5)
    # BERT keys in a RoBERTa directory are named, not guessed at.
    bert_keys = {k.replace("roberta.", "bert.", 1): v for k, v in sd.items()}
    with pytest.raises(CheckpointError, match="missing key 'embeddings.word_embeddings.weight'"):
        load_pytorch_checkpoint(_write_checkpoint(tmp_path / "bert_keys", cfg, bert_keys))


# ----------------------------------------------------------------------------------------------
# DeeRoBERTa (the Hugging Face research project's layout), written key by key without our exporter

@pytest.fixture(scope="module")
def deeroberta(saved, tmp_path_factory):
    """-> (directory, raw state dict): RobertaModel's weights under `roberta.`, L highways (the last
    never trained in DeeRoBERTa) and a plain classifier after the pooler."""
    model, _ = saved["RobertaModel"]
    rng = np.random.default_rng(7)
    H = HF["hidden_size"]
    sd = {f"roberta.{k}": v.numpy().copy() for k, v in model.state_dict().items()}
    # Wide classifiers: ramp entropies spread, so thresholds send rows out at several layers.
    sd.update(deebert_heads("roberta", L, H, K, rng, pooler_std=(0.3, 0.1), classifier_std=(1.5, 0.3)))
    cfg = dict(hf_config().to_dict(), architectures=["DeeRobertaForSequenceClassification"])
    return _write_checkpoint(tmp_path_factory.mktemp("deeroberta"), cfg, sd), sd


def test_deeroberta_ramps_match_a_numpy_computation(saved, deeroberta):
    directory, sd = deeroberta
    config, params, report = convert_pytorch_checkpoint(directory)
    assert config.model_type == "roberta" and config.num_labels == K
    assert any(f"encoder.highway.{L - 1}" in d for d in report.dropped), report.summary()
    ids, mask, types = right_padded(seed=3)
    with torch.inference_mode():
        hidden = saved["RobertaModel"][0](**torch_inputs(ids, mask), output_hidden_states=True).hidden_states[1:]
    dense = lambda x, name: x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]
    expected = []
    for i in range(L):
        first = hidden[i][:, 0].numpy().astype(np.float64)
        if i < L - 1:
            pooled = np.tanh(dense(first, f"roberta.encoder.highway.{i}.pooler.dense"))
            expected.append(dense(pooled, f"roberta.encoder.highway.{i}.classifier"))
        else:  # ramp L: the pooler and the classifier, not highway L-1
            expected.append(dense(np.tanh(dense(first, "roberta.pooler.dense")), "classifier"))
    ours = np.asarray(ramps_and_states(config, params, ids, mask, types)[0])
    np.testing.assert_allclose(ours, np.stack(expected), atol=1e-4, rtol=1e-4)


def test_torch_reference_and_early_exit_on_deeroberta(deeroberta):
    directory, _ = deeroberta
    config, params = load_pytorch_checkpoint(directory)
    reference = TorchDeeBert.from_pretrained(directory)  # strict: every DeeRoBERTa key has its module
    assert reference.base_model_prefix == "roberta"
    ids, mask, types = right_padded(seed=4)
    full = np.asarray(ramps_and_states(config, params, ids, mask, types)[0])
    with torch.inference_mode():
        torch_full = reference(*(torch.from_numpy(a).long() for a in (ids, mask, types))).numpy()
    np.testing.assert_allclose(full, torch_full, atol=1e-4, rtol=1e-4)
    serving = jax.device_put(layouts.unstack_params(params))
    seen = set()
    for threshold in safe_thresholds(np_entropy(full), np.random.default_rng(0), 2, (0.2, 0.8)):
        expected_logits, expected_layers = reference_exits(full, threshold, mask)
        with torch.inference_mode():
            torch_logits, torch_layers = reference.early_exit(*(torch.from_numpy(a).long() for a in (ids, mask, types)),
                                                              threshold=threshold)
        np.testing.assert_array_equal(torch_layers.numpy(), expected_layers)
        for out in (early_exit_predict(config, serving, ids, mask, types, threshold),
                    # One pool, one bucket: the smallest exit-aware program (its batching is tested elsewhere).
                    exit_aware_predict(config, serving, ids, mask, types, threshold, pool_size=8, bucket_sizes=(8,))):
            np.testing.assert_array_equal(np.asarray(out.exit_layer), expected_layers)
            np.testing.assert_allclose(np.asarray(out.logits), torch_logits.numpy(), atol=1e-4, rtol=1e-4)
        seen.update(expected_layers.tolist())
    assert len(seen) >= 2, f"thresholds sent every row out at the same layer: {seen}"


def test_export_writes_back_deeroberta(saved, deeroberta, tmp_path):
    directory, sd = deeroberta
    config, params = load_pytorch_checkpoint(directory)
    out = export_pytorch_checkpoint(config, params, tmp_path / "export")
    exported = load_file(os.path.join(out, "model.safetensors"))
    assert set(exported) == set(sd), set(exported) ^ set(sd)
    for key, value in sd.items():
        if not key.startswith(f"roberta.encoder.highway.{L - 1}."):  # written as a copy of the final head
            np.testing.assert_array_equal(exported[key], value, err_msg=key)
    cfg = json.loads(open(os.path.join(out, "config.json")).read())
    assert (cfg["model_type"], cfg["architectures"], cfg["deebert_jax"]) == (
        "roberta", ["DeeRobertaForSequenceClassification"], {"format": "deeroberta"})
    config2, params2 = load_pytorch_checkpoint(out)
    assert config2 == config and tree_equal(params, params2)
    # transformers reads the export: RobertaModel takes its encoder and pooler, the same as ours.
    ids, mask, types = right_padded(seed=5)
    with torch.inference_mode():
        ref = RobertaModel.from_pretrained(out, attn_implementation="eager").eval()(
            **torch_inputs(ids, mask), output_hidden_states=True)
        original = saved["RobertaModel"][0](**torch_inputs(ids, mask), output_hidden_states=True)
    for theirs, before in zip(ref.hidden_states, original.hidden_states):
        np.testing.assert_array_equal(theirs.numpy(), before.numpy())
    np.testing.assert_array_equal(ref.pooler_output.numpy(), original.pooler_output.numpy())
    export_pytorch_checkpoint(config, params, out)  # its own earlier export may be replaced


def test_roberta_configs():
    hf = hf_config().to_dict()
    config = DeeBertConfig.from_hf_config(hf)
    assert DeeBertConfig.from_hf_config(config.to_hf_config()) == config
    assert DeeBertConfig.from_dict(config.to_dict()) == config
    hf.pop("pad_token_id")
    assert DeeBertConfig.from_hf_config(hf).pad_token_id == 1  # RobertaConfig's default
    # A model directory saved before `model_type` existed holds BERT.
    old = config.replace(model_type="bert", pad_token_id=0).to_dict()
    old.pop("model_type")
    assert DeeBertConfig.from_dict(old).model_type == "bert"
    # Positions start at pad_token_id + 1: 40 table rows hold 38 tokens.
    assert config.max_sequence_length == 38
    ids = np.full((1, 38), 5, np.int32)
    check_model_inputs(config, ids, np.ones_like(ids), np.zeros_like(ids))
    ids = np.full((1, 39), 5, np.int32)
    with pytest.raises(ValueError, match=r"sequence length 39: longer than the model's 38 tokens"):
        check_model_inputs(config, ids, np.ones_like(ids), np.zeros_like(ids))
    with pytest.raises(ValueError, match=r"token_type_ids\[0, 0\] = 1: expected a value in \[0, type_vocab_size=1\)"):
        check_model_inputs(config, ids[:, :5], np.ones((1, 5), np.int32), np.ones((1, 5), np.int32))
    with pytest.raises(ConfigError, match="model_type='xlm-roberta'"):
        DeeBertConfig.from_hf_config(dict(hf, model_type="xlm-roberta"))
    with pytest.raises(ConfigError, match="leaves no position"):
        config.replace(max_position_embeddings=2)


# ----------------------------------------------------------------------------------------------
# The BPE tokenizer from the checkpoint directory, train.convert, training and the benchmark

def _write_bpe_tokenizer(directory):
    """A tiny byte-level BPE vocabulary (`vocab.json` + `merges.txt`) with RoBERTa's special tokens."""
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "<mask>": 4}
    for piece in list("abcdefghijklmnopqrstuvwxyz.,!\u0120") + ["\u0120" + c for c in "abcdefghijklmnopqrstuvwxyz"]:
        vocab[piece] = len(vocab)
    for piece in ("th", "\u0120th", "the", "\u0120the"):
        vocab[piece] = len(vocab)
    assert len(vocab) <= HF["vocab_size"]
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\nt h\n\u0120 th\nth e\n\u0120th e\n")


def test_bpe_tokenizer_comes_with_the_checkpoint(saved, tmp_path):
    import shutil

    from deebert_jax.data import glue as data
    from deebert_jax.weights.checkpoint import load_checkpoint
    from train import convert as convert_cli
    model, source = saved["RobertaForSequenceClassification"]
    src = tmp_path / "src"
    shutil.copytree(source, src)
    with pytest.raises(data.DataError, match="no tokenizer found"):
        data.load_tokenizer(src)
    _write_bpe_tokenizer(src)
    assert convert_cli.main(["--pytorch", str(src), "--out", str(tmp_path / "out")]) == 0
    tokenizer = data.load_tokenizer(tmp_path / "out")  # the copy in out/tokenizer/
    assert os.path.isdir(tmp_path / "out" / "tokenizer") and tokenizer.pad_token_id == PAD
    # A long pair (truncated) and a short one (padded), as GLUE rows are tokenised.
    enc = data._tokenize(tokenizer, [("the cat sat on the mat.", "a dog ran!"), ("the", "a")] * 4, SEQ)
    assert (enc["token_type_ids"] == 0).all() and enc["attention_mask"].min() == 0
    np.testing.assert_array_equal(enc["input_ids"][enc["attention_mask"] == 0], PAD)
    assert PAD not in enc["input_ids"][enc["attention_mask"] == 1]
    config, params = load_checkpoint(tmp_path / "out")
    ours = np.asarray(ramps_and_states(config, params, enc["input_ids"], enc["attention_mask"],
                                       enc["token_type_ids"])[0])
    with torch.inference_mode():
        ref = model(**torch_inputs(enc["input_ids"], enc["attention_mask"])).logits.numpy()
    np.testing.assert_allclose(ours[-1], ref, atol=1e-4)
    os.remove(src / "merges.txt")
    with pytest.raises(data.DataError, match="vocab.json without merges.txt"):
        data.load_tokenizer(src)


def test_training_on_a_roberta_checkpoint(saved, tmp_path):
    """`init_checkpoint` = a RobertaModel directory: the run's model is RoBERTa, and the training
    graph's stage-1 loss is the cross-entropy of the forward checked against transformers above."""
    from configs import tiny
    from deebert_jax.training import loop as training
    from deebert_jax.training import steps as train_steps
    from deebert_jax.weights.model_loading import load_initial_model
    _, directory = saved["RobertaModel"]
    cfg = tiny.get_config()
    cfg.init_checkpoint = directory
    cfg.model.hidden_dropout_prob = cfg.model.attention_probs_dropout_prob = 0.0
    config, params, tokenizer_dir = load_initial_model(cfg, K)
    assert (config.model_type, config.pad_token_id, config.hidden_dropout_prob) == ("roberta", PAD, 0.0)
    assert tokenizer_dir == os.path.abspath(directory)
    ids, mask, types = right_padded(seed=6)
    labels = np.arange(len(ids), dtype=np.int32) % K
    logits = np.asarray(ramps_and_states(config, params, ids, mask, types)[0][-1], np.float64)
    z = logits - logits.max(-1, keepdims=True)
    expected_loss = np.mean(np.log(np.exp(z).sum(-1)) - z[np.arange(len(ids)), labels])

    @jax.jit
    def stage1_loss(params):  # what `make_train_step` differentiates in stage 1
        ramp_logits = modeling.DeeBert(config).apply({"params": params}, ids, mask, types, train=True,
                                                     rngs={"dropout": jax.random.PRNGKey(0)})
        return train_steps.stage_loss(ramp_logits, labels, 1)[0]

    loss, grads = jax.value_and_grad(stage1_loss)(params)
    assert float(loss) == pytest.approx(expected_loss, abs=1e-5)
    # Padding sits at position pad_token_id and nothing reads its output: that row of the table gets
    # no gradient, while the first token's row (pad_token_id + 1) does.
    position_grads = np.asarray(grads["embeddings"]["position_embeddings"]["embedding"])
    assert not position_grads[PAD].any() and np.abs(position_grads[PAD + 1]).max() > 1e-6
    # A run asking for more tokens than the position table holds stops before any work.
    cfg.max_seq_length, cfg.workdir = 39, str(tmp_path / "run")
    with pytest.raises(ValueError, match=r"config.max_seq_length=39: expected an integer in \[1, 38\] \(the model's 38"):
        training.train(cfg)
    assert not (tmp_path / "run").exists()


def test_benchmark_twin_of_a_roberta_model(deeroberta, tmp_path):
    """What `train.benchmark` times on the PyTorch side: the exported DeeRoBERTa, strictly loaded."""
    from benchmarks import benchmarking as bm
    directory, _ = deeroberta
    config, params = load_pytorch_checkpoint(directory)
    twin = bm.torch_twin(config, params, str(tmp_path / "torch"))
    assert twin.base_model_prefix == "roberta"
    ids, mask, types = right_padded(seed=7)
    with torch.inference_mode():
        theirs = twin.full_forward(*(torch.from_numpy(a).long() for a in (ids, mask, types))).numpy()
    np.testing.assert_allclose(ramps_and_states(config, params, ids, mask, types)[0][-1], theirs, atol=1e-4)
    assert "roberta-base" in bm.RANDOM_MODELS
    big = bm.random_model_config("roberta-base")
    assert (big.model_type, big.max_sequence_length, big.type_vocab_size) == ("roberta", 512, 1)
