import json

import pytest

from deebert_jax.config import ConfigError, DeeBertConfig, tiny_config


def test_from_minilm_config(minilm_dir):
    c = DeeBertConfig.from_hf_config(minilm_dir, num_labels=3)
    assert (c.num_hidden_layers, c.hidden_size, c.num_attention_heads, c.intermediate_size) == (6, 384, 12, 1536)
    assert c.num_labels == 3 and c.vocab_size == 30522 and c.hidden_act == "gelu"


def test_hf_round_trip_and_hashable():
    c = tiny_config(num_labels=3)
    assert DeeBertConfig.from_hf_config(c.to_hf_config()) == c
    assert DeeBertConfig.from_dict(c.to_dict()) == c
    assert hash(c) == hash(tiny_config(num_labels=3))


def test_num_labels_from_id2label():
    d = tiny_config().to_hf_config()
    d.pop("num_labels")
    d["id2label"] = {"0": "a", "1": "b", "2": "c"}
    assert DeeBertConfig.from_hf_config(d).num_labels == 3


@pytest.mark.parametrize("change, message", [
    ({"model_type": "roberta"}, "model_type='roberta'"),
    ({"position_embedding_type": "relative_key"}, "position_embedding_type='relative_key'"),
    ({"hidden_act": "quick_gelu"}, "hidden_act='quick_gelu'"),
    ({"is_decoder": True}, "decoder"),
])
def test_unsupported_configs_are_errors(tmp_path, change, message):
    d = tiny_config().to_hf_config()
    d.update(change)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match=message) as e:
        DeeBertConfig.from_hf_config(tmp_path)
    assert str(path) in str(e.value)


def test_invalid_values():
    with pytest.raises(ConfigError, match="num_attention_heads"):
        tiny_config(hidden_size=30, num_attention_heads=4)
    with pytest.raises(ConfigError, match="num_labels"):
        tiny_config(num_labels=0)
    with pytest.raises(ConfigError, match="unknown DeeBertConfig fields"):
        DeeBertConfig.from_dict({"hidden_size": 8, "bogus": 1})
