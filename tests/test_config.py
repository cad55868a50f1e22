import json

import pytest

from deebert_jax.core.config import ConfigError, DeeBertConfig, tiny_config


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
    ({"model_type": "gpt2"}, r"model_type='gpt2' is not supported; expected one of \('bert', 'roberta'\)"),
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


# The training configs (configs/*.py): variants of configs/glue.py behind the old names.

def _config_json(name: str, arg: str | None = None) -> str:
    import importlib

    module = importlib.import_module(f"configs.{name}")
    cfg = module.get_config(arg) if arg is not None else module.get_config()
    return json.dumps(cfg.to_dict(), sort_keys=True)  # JSON keeps 3 apart from 3.0


@pytest.mark.parametrize("name", ["glue_minilm", "glue_bert_base", "demo", "sst2_full", "tiny"])
def test_config_files_keep_their_values(name):
    """Every field (value and int/float type) as the file gave it before it became a variant alias."""
    import pathlib

    snapshot = json.loads((pathlib.Path(__file__).parent / "data" / "config_values.json").read_text())
    # Fields added after the snapshot, at the value runs had before (DeeBERT's loss, no holdout).
    added_since = {"dtype": "float32", "offramp_loss": "labels", "distill_temperature": 2.0, "distill_weight": 0.5,
                   "calibration_holdout": 0, "calibration_max_drop": 1.0, "calibration_confidence": 0.95,
                   "calibration_rule": "entropy", "ramp_temperature": "none", "temperature_rows": 1000}
    # Deliberate changes since: MiniLM's off-ramps are distilled from ramp L, every GLUE budget
    # holds out training rows to choose the exit threshold, and the 4000-row holdouts also fit
    # off-ramp temperatures.
    minilm = {"offramp_loss": "distill", "distill_temperature": 1.0, "distill_weight": 0.5}
    temperatures = {"calibration_holdout": 4000, "ramp_temperature": "agreement"}
    changed_since = {"glue_minilm": {**minilm, "calibration_holdout": 500},
                     "demo": {**minilm, **temperatures},
                     "sst2_full": {**minilm, **temperatures},
                     "glue_bert_base": {"calibration_holdout": 500}}
    expected = {**added_since, **snapshot[name], **changed_since.get(name, {})}
    assert _config_json(name) == json.dumps(expected, sort_keys=True)


@pytest.mark.parametrize("alias, arg", [
    ("glue_minilm", "model=minilm,budget=paper"), ("glue_bert_base", "model=bert_base,budget=paper"),
    ("glue_roberta_base", "model=roberta_base,budget=paper"),
    ("demo", "model=minilm,budget=demo"), ("sst2_full", "model=minilm,budget=cpu_full"),
    ("glue_minilm", None), ("glue_minilm", ""), ("demo", " budget = demo "),
])
def test_aliases_are_glue_variants(alias, arg):
    assert _config_json("glue", arg) == _config_json(alias)


def test_glue_variants_and_bad_args():
    from configs import glue

    bert_demo = glue.get_config("model=bert_base,budget=demo")
    assert (bert_demo.init_checkpoint, bert_demo.learning_rate, bert_demo.train_limit) == (
        "google-bert/bert-base-uncased", 2e-5, 4000)
    assert bert_demo.workdir == "workdirs/demo_bert_base" and bert_demo.model.ramp_pooling == ""
    roberta, bert = glue.get_config("model=roberta_base"), glue.get_config("model=bert_base")
    assert (roberta.init_checkpoint, roberta.stage1_epochs, roberta.stage2_epochs, roberta.workdir) == (
        "FacebookAI/roberta-base", 10.0, 10.0, "workdirs/glue_roberta_base")
    differ = {k for k in roberta if roberta[k] != bert[k]}
    assert differ == {"init_checkpoint", "stage1_epochs", "stage2_epochs", "workdir"}, differ
    for bad, message in [("model=roberta", "model='roberta'"), ("budget=huge", "budget='huge'"),
                         ("size=big", "expected KEY=VALUE"), ("minilm", "expected KEY=VALUE")]:
        with pytest.raises(ValueError, match=message):
            glue.get_config(bad)


def test_config_flag_passes_the_variant():
    """`--config configs/glue.py:model=...,budget=...` through absl's config_flags, as the CLIs read it."""
    from absl import flags
    from ml_collections import config_flags

    from tests.conftest import REPO

    argv = ["prog", f"--config={REPO / 'configs' / 'glue.py'}:model=bert_base,budget=cpu_full",
            "--config.train_limit=7"]
    values = flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv)
    values(argv)
    cfg = holder.value
    assert (cfg.init_checkpoint, cfg.max_seq_length, cfg.train_limit) == ("google-bert/bert-base-uncased", 64, 7)
    assert config_flags.get_config_filename(values["config"]).endswith("glue.py:model=bert_base,budget=cpu_full")
