"""Model configuration: the subset of a Hugging Face BERT or RoBERTa config that we can run."""

from __future__ import annotations

import dataclasses
import json
import numbers
import os
from typing import Any, Mapping

from deebert_jax.core.errors import DeeBertError, InputError

# Hugging Face activation names -> how our Flax layer computes them.
SUPPORTED_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "gelu_fast", "relu", "silu", "swish", "tanh")


RAMP_POOLINGS = ("first", "mean")

# "bert": positions 0..S-1. "roberta": positions count from pad_token_id + 1 over the non-padding
# tokens and padding sits at pad_token_id (`modeling.position_ids`); the weights are laid out alike.
MODEL_TYPES = ("bert", "roberta")

# The most parameters a config may imply (8 GiB in float32; BERT-large has 0.34e9): a field set far
# too large (`--num-labels 100000000`) is refused in one line, not by an allocation failing later.
MAX_PARAMETERS = 2 ** 31 - 1


_SIZE_FIELDS = ("vocab_size", "max_position_embeddings", "type_vocab_size", "hidden_size", "intermediate_size",
                "num_hidden_layers", "num_labels")
# Sizes of large real models (BERT-large's width and depth, XLM-R's vocabulary, ...), against
# which a field is judged when a config implies too many parameters.
_LARGE_MODEL = {"vocab_size": 250_002, "max_position_embeddings": 4096, "type_vocab_size": 16, "hidden_size": 1024,
                "intermediate_size": 4096, "num_hidden_layers": 24, "num_labels": 1000}


def _num_parameters(vocab_size, max_position_embeddings, type_vocab_size, hidden_size, intermediate_size,
                    num_hidden_layers, num_labels) -> int:
    H, I, L, K = hidden_size, intermediate_size, num_hidden_layers, num_labels
    embeddings = (vocab_size + max_position_embeddings + type_vocab_size + 2) * H
    layer = 4 * (H * H + H) + 4 * H + (H * I + I) + (I * H + H)
    ramp = H * H + H + H * K + K
    return embeddings + L * (layer + ramp)


class ConfigError(DeeBertError, ValueError):
    """A configuration we cannot run faithfully."""


# The kernel choices (`model.kernels`, the backend seam). The names live here, below the model and
# `cpu.process`, because setting up a process checks them before any model code loads.
KERNELS = ("reference", "cpu_tuned")


def check_kernels(kernels: str) -> str:
    if kernels not in KERNELS:
        raise InputError(f"kernels={kernels!r}: expected one of {', '.join(KERNELS)}")
    return kernels


@dataclasses.dataclass(frozen=True)
class DeeBertConfig:
    """Shapes and constants of a BERT (or RoBERTa) with one off-ramp per layer.

    Frozen (hashable) so it can be a static argument of `jax.jit`.
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    initializer_range: float = 0.02
    pad_token_id: int = 0
    num_labels: int = 2
    # What off-ramps 1..L-1 read: "first" (DeeBERT: the first token) or "mean" (the average of the
    # non-padding tokens, for encoders pretrained with mean pooling such as MiniLM sentence
    # models, whose early first-token vectors hardly vary between inputs). Ramp L, the usual
    # pooler + classifier, always reads the first token.
    ramp_pooling: str = "first"
    # Which encoder's embeddings: "bert" or "roberta" (`MODEL_TYPES`). Saved configs without the
    # field are BERT.
    model_type: str = "bert"

    def __post_init__(self):
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            checked = _check_type(f.name, value, _FIELD_KINDS[f.name])
            if checked is not value:
                object.__setattr__(self, f.name, checked)  # 384.0 -> 384, 1 -> 1.0: same hash as the literal
        if self.hidden_act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(
                f"hidden_act={self.hidden_act!r} is not supported; expected one of {SUPPORTED_ACTIVATIONS}"
            )
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(
                f"hidden_size={self.hidden_size} is not a multiple of num_attention_heads={self.num_attention_heads}"
            )
        if self.ramp_pooling not in RAMP_POOLINGS:
            raise ConfigError(f"ramp_pooling={self.ramp_pooling!r}; expected one of {RAMP_POOLINGS}")
        if self.model_type not in MODEL_TYPES:
            raise ConfigError(f"model_type={self.model_type!r} is not supported; expected one of {MODEL_TYPES}")
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size", "num_labels"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name}={getattr(self, name)!r} must be a positive integer")
        self._check_size()
        if self.model_type == "roberta" and not 0 <= self.pad_token_id < self.max_position_embeddings - 1:
            raise ConfigError(f"max_position_embeddings={self.max_position_embeddings} leaves no position for a "
                              f"token: RoBERTa positions start at pad_token_id + 1 = {self.pad_token_id + 1}")

    @property
    def num_parameters(self) -> int:
        """How many numbers the parameters hold (embeddings, layers, one ramp per layer)."""
        return _num_parameters(**{f: getattr(self, f) for f in _SIZE_FIELDS})

    def _check_size(self) -> None:
        n = self.num_parameters
        if n <= MAX_PARAMETERS:
            return
        # The field to blame: the one whose value brought down to a large real model's shrinks
        # the count the most (10,000 layers of width 384 are the layers' fault, not the width's).
        sizes = {f: getattr(self, f) for f in _SIZE_FIELDS}
        field = max(_SIZE_FIELDS, key=lambda f: n - _num_parameters(**{**sizes, f: min(sizes[f], _LARGE_MODEL[f])}))
        raise ConfigError(f"{field}={getattr(self, field)} is too large: the model would have {n:,} parameters "
                          f"({4 * n / 2 ** 30:.1f} GiB in float32); at most {MAX_PARAMETERS:,}")

    @property
    def num_layers(self) -> int:
        return self.num_hidden_layers

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def max_sequence_length(self) -> int:
        """The longest input the position table covers: `max_position_embeddings`, less RoBERTa's
        `pad_token_id + 1` offset (roberta-base: 514 - 2 = 512)."""
        if self.model_type == "roberta":
            return self.max_position_embeddings - self.pad_token_id - 1
        return self.max_position_embeddings

    @property
    def sequence_limit(self) -> str:
        """`max_sequence_length` for messages, with the field it comes from."""
        if self.model_type == "roberta":
            return (f"{self.max_sequence_length} tokens (max_position_embeddings={self.max_position_embeddings} "
                    f"less RoBERTa's pad_token_id + 1 = {self.pad_token_id + 1})")
        return f"max_position_embeddings={self.max_position_embeddings}"

    def replace(self, **changes) -> "DeeBertConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any], source: str | None = None) -> "DeeBertConfig":
        """From `to_dict` output; `source` (a file) prefixes every error message."""
        prefix = f"{source}: " if source else ""
        if not isinstance(d, Mapping):
            raise ConfigError(f"{prefix}expected a JSON object of DeeBertConfig fields, found {type(d).__name__}")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError(f"{prefix}unknown DeeBertConfig fields: {unknown}")
        return _build(cls, dict(d), source)

    @classmethod
    def from_hf_config(cls, hf: Mapping[str, Any] | str | os.PathLike,
                       num_labels: int | None = None) -> "DeeBertConfig":
        """From a Hugging Face BERT or RoBERTa `config.json` (a path, a directory or its dict)."""
        source = "config"
        if not isinstance(hf, Mapping):
            path = os.fspath(hf)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            source = path
            if not os.path.isfile(path):
                raise ConfigError(f"{path}: no such config file")
            hf = read_json_object(path)
        elif not isinstance(hf, Mapping):
            raise ConfigError(f"{source}: expected a JSON object, found {type(hf).__name__}")
        model_type = hf.get("model_type", "bert")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"{source}: model_type={model_type!r} is not supported; expected one of {MODEL_TYPES}")
        pos = hf.get("position_embedding_type", "absolute")
        if pos != "absolute":
            raise ConfigError(f"{source}: position_embedding_type={pos!r} is not supported (only 'absolute')")
        if hf.get("is_decoder") or hf.get("add_cross_attention"):
            raise ConfigError(f"{source}: decoder / cross-attention BERT is not supported")
        act = hf.get("hidden_act", "gelu")
        if act not in SUPPORTED_ACTIVATIONS:
            raise ConfigError(f"{source}: hidden_act={act!r} is not supported; expected one of {SUPPORTED_ACTIVATIONS}")
        if num_labels is None:
            id2label = hf.get("id2label")
            num_labels = hf.get("num_labels") or (len(id2label) if isinstance(id2label, (Mapping, list)) and id2label
                                                  else 2)
        fields = {f.name for f in dataclasses.fields(cls)} - {"num_labels"}
        kwargs = {k: hf[k] for k in fields if k in hf and hf[k] is not None}
        if model_type == "roberta":
            kwargs.setdefault("pad_token_id", 1)  # `RobertaConfig`'s default, which its positions depend on
        return _build(cls, dict(kwargs, num_labels=num_labels), None if source == "config" else source)

    def to_hf_config(self, architectures=None) -> dict[str, Any]:
        """A Hugging Face style `config.json` dict (BERT or RoBERTa, absolute positions).

        `architectures` defaults to the DeeBERT / DeeRoBERTa sequence classifier.
        """
        if architectures is None:
            architectures = ("DeeRobertaForSequenceClassification",) if self.model_type == "roberta" else (
                "DeeBertForSequenceClassification",)
        d = self.to_dict()
        d.pop("num_labels")
        d.update(
            architectures=list(architectures),
            position_embedding_type="absolute",
            id2label={str(i): f"LABEL_{i}" for i in range(self.num_labels)},
            label2id={f"LABEL_{i}": i for i in range(self.num_labels)},
            num_labels=self.num_labels,
        )
        return d


def read_json_object(path: str) -> dict[str, Any]:
    """The JSON object in `path`; invalid JSON or another JSON value is a ConfigError naming the file."""
    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise ConfigError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


_FIELD_KINDS = {f.name: {"int": int, "float": float, "str": str}[f.type] for f in dataclasses.fields(DeeBertConfig)}


def _check_type(name: str, value: Any, kind: type) -> Any:
    """`value` as `kind` (an integral float is an int, an int is a float); a wrong type is a ConfigError."""
    if kind is str:
        ok = isinstance(value, str)
    elif kind is int:
        ok = isinstance(value, numbers.Integral) or (isinstance(value, float) and value.is_integer())
    else:
        ok = isinstance(value, numbers.Real)
    if isinstance(value, bool) or not ok:  # True is an Integral, never a layer count
        expected = {int: "an integer", float: "a number", str: "a string"}[kind]
        raise ConfigError(f"field {name}={value!r} ({type(value).__name__}) must be {expected}")
    if kind is int and not isinstance(value, int):
        return int(value)
    if kind is float and not isinstance(value, float):
        return float(value)
    return value


def _build(cls, kwargs: dict, source: str | None) -> DeeBertConfig:
    """`cls(**kwargs)` with the file name (if any) in front of any ConfigError."""
    try:
        return cls(**kwargs)
    except ConfigError as e:
        if source and not str(e).startswith(source):
            raise ConfigError(f"{source}: {e}") from e
        raise


def tiny_config(**overrides) -> DeeBertConfig:
    """A 2-layer, 32-wide config for unit tests."""
    base = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64, num_labels=2)
    base.update(overrides)
    return DeeBertConfig(**base)
