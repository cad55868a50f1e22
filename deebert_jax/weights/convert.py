"""PyTorch (Hugging Face BERT / RoBERTa, original DeeBERT / DeeRoBERTa) checkpoints <-> our Flax tree.

Keys are those of Hugging Face BERT and the original DeeBERT code (`LAYER_MODULES`, `EMBEDDINGS`,
`bert.encoder.highway.{i}.*`), and for a `config.json` with `model_type: roberta` the same under
`roberta.` (`BASE_PREFIXES`): `RobertaModel`, `RobertaForSequenceClassification` (its head,
`classifier.dense` + `classifier.out_proj`, is ramp L) and DeeRoBERTa from the Hugging Face
research project. Every key is accounted for: an unused key, a missing key or a shape mismatch is
a `CheckpointError` that names the key; only pretraining heads and buffers (`SKIPPED_PREFIXES`)
are skipped, and the report lists them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any, Mapping

import numpy as np

from deebert_jax.core.config import ConfigError, DeeBertConfig
from deebert_jax.core.fileutil import atomic_directory
from deebert_jax.core.trees import leaves, stack_trees
# The files are read in `torch_files`; these names stay importable here, as before.
from deebert_jax.weights.torch_files import WEIGHT_FILES, CheckpointError, find_weights_file, read_state_dict, \
    resolve_model_dir  # noqa: F401

# Pretraining heads (BERT's `cls.*`, RoBERTa's `lm_head.*`) and non-persistent buffers: not part
# of a classifier, safe to leave out.
SKIPPED_PREFIXES = ("cls.", "lm_head.", "embeddings.position_ids", "embeddings.token_type_ids")
# The encoder's prefix in a sequence classifier's state dict, per `DeeBertConfig.model_type`.
BASE_PREFIXES = {"bert": "bert.", "roberta": "roberta."}
# `export_pytorch_checkpoint`'s layout per model type, recorded under `EXPORT_MARKER`.
EXPORT_FORMATS = {"bert": "deebert", "roberta": "deeroberta"}

# Our per-layer module name -> (torch sub-key, kind).
LAYER_MODULES = {
    "query": ("attention.self.query", "dense"),
    "key": ("attention.self.key", "dense"),
    "value": ("attention.self.value", "dense"),
    "attention_output": ("attention.output.dense", "dense"),
    "attention_LayerNorm": ("attention.output.LayerNorm", "norm"),
    "intermediate": ("intermediate.dense", "dense"),
    "output": ("output.dense", "dense"),
    "output_LayerNorm": ("output.LayerNorm", "norm"),
}
EMBEDDINGS = ("word_embeddings", "position_embeddings", "token_type_embeddings")


@dataclasses.dataclass
class ConversionReport:
    source: str
    config: DeeBertConfig
    num_params: int = 0
    imported: list[str] = dataclasses.field(default_factory=list)     # what came from the file
    initialized: list[str] = dataclasses.field(default_factory=list)  # what we made up, and how
    skipped: list[str] = dataclasses.field(default_factory=list)      # keys deliberately ignored
    dropped: list[str] = dataclasses.field(default_factory=list)      # keys read but not used, and why

    def summary(self) -> str:
        c = self.config
        lines = [
            f"source:      {self.source}",
            f"model:       {c.num_hidden_layers} layers, width {c.hidden_size}, {c.num_attention_heads} heads, "
            f"intermediate {c.intermediate_size}, {c.num_labels} labels",
            f"parameters:  {self.num_params:,}",
            "imported:    " + (", ".join(self.imported) or "nothing"),
            "initialised: " + (", ".join(self.initialized) or "nothing"),
        ]
        if self.dropped:
            lines.append("dropped:     " + "; ".join(self.dropped))
        if self.skipped:
            lines.append(f"skipped:     {len(self.skipped)} keys ({', '.join(sorted(self.skipped)[:6])}"
                         + (", ..." if len(self.skipped) > 6 else "") + ")")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# torch state dict -> Flax tree

def _normalize(key: str, prefix: str = "bert.") -> str:
    key = key[len(prefix):] if key.startswith(prefix) else key
    if ".LayerNorm." in key or key.startswith("LayerNorm."):
        key = re.sub(r"\.gamma$", ".weight", key)
        key = re.sub(r"\.beta$", ".bias", key)
    return key


class _Reader:
    """Hands out state-dict entries by key, checking shapes and remembering what was used."""

    def __init__(self, state: dict[str, np.ndarray], source: str):
        self.state, self.source, self.used = state, source, set()

    def has(self, key: str) -> bool:
        return key in self.state

    def get(self, key: str, shape: tuple[int, ...]) -> np.ndarray:
        if key not in self.state:
            raise CheckpointError(f"{self.source}: missing key {key!r}")
        value = self.state[key]
        if tuple(value.shape) != tuple(shape):
            raise CheckpointError(f"{self.source}: key {key!r} has shape {tuple(value.shape)}, expected {tuple(shape)}")
        self.used.add(key)
        return np.asarray(value, np.float32)

    def dense(self, prefix: str, n_in: int, n_out: int) -> dict[str, np.ndarray]:
        return {"kernel": self.get(f"{prefix}.weight", (n_out, n_in)).T.copy(), "bias": self.get(f"{prefix}.bias", (n_out,))}

    def norm(self, prefix: str, n: int) -> dict[str, np.ndarray]:
        return {"scale": self.get(f"{prefix}.weight", (n,)), "bias": self.get(f"{prefix}.bias", (n,))}


def _classifier_init(config: DeeBertConfig, rng: np.random.Generator) -> dict[str, np.ndarray]:
    return {"kernel": (rng.standard_normal((config.hidden_size, config.num_labels)) * config.initializer_range).astype(np.float32),
            "bias": np.zeros((config.num_labels,), np.float32)}


def state_dict_to_params(state: Mapping[str, np.ndarray], config: DeeBertConfig, source: str = "checkpoint",
                         seed: int = 0) -> tuple[dict, ConversionReport]:
    """Torch-named arrays -> (Flax params, report). See the module docstring for the rules.

    `config.model_type` says which prefix the encoder's keys may carry (`BASE_PREFIXES`).
    """
    c, H, L = config, config.hidden_size, config.num_hidden_layers
    prefix = BASE_PREFIXES[c.model_type]
    report = ConversionReport(source=source, config=config)
    normalized: dict[str, np.ndarray] = {}
    for key, value in state.items():
        nk = _normalize(key, prefix)
        if nk.startswith(SKIPPED_PREFIXES):
            report.skipped.append(key)
            continue
        if nk in normalized:
            raise CheckpointError(f"{source}: key {key!r} appears twice (with and without the {prefix!r} prefix)")
        normalized[nk] = np.asarray(value)
    r = _Reader(normalized, source)
    rng = np.random.default_rng(seed)

    emb = {name: {"embedding": r.get(f"embeddings.{name}.weight", (n, H))}
           for name, n in zip(EMBEDDINGS, (c.vocab_size, c.max_position_embeddings, c.type_vocab_size))}
    emb["LayerNorm"] = r.norm("embeddings.LayerNorm", H)
    report.imported.append("embeddings")

    per_layer = []
    for i in range(L):
        layer = {}
        for name, (sub, kind) in LAYER_MODULES.items():
            prefix = f"encoder.layer.{i}.{sub}"
            if kind == "norm":
                layer[name] = r.norm(prefix, H)
            else:
                n_in = c.intermediate_size if name == "output" else H
                n_out = c.intermediate_size if name == "intermediate" else H
                layer[name] = r.dense(prefix, n_in, n_out)
        per_layer.append(layer)
    report.imported.append(f"{L} encoder layers")

    # The final ramp: the pretrained pooler and, for sequence classifiers, the classifier;
    # `RobertaForSequenceClassification` has no pooler, its head's dense layer takes that place.
    roberta_head = c.model_type == "roberta" and r.has("classifier.dense.weight")
    if roberta_head:
        final_pooler = r.dense("classifier.dense", H, H)
        report.imported.append("classifier.dense (as the final pooler)")
        pooler_keys = [k for k in normalized if k.startswith("pooler.")]
        if pooler_keys:  # older transformers saved RobertaModel's pooler in the classifier too
            r.used.update(pooler_keys)
            report.dropped.append("pooler.* (RobertaForSequenceClassification's head does not read it)")
    elif r.has("pooler.dense.weight"):
        final_pooler = r.dense("pooler.dense", H, H)
        report.imported.append("pooler")
    else:
        final_pooler = {"kernel": (rng.standard_normal((H, H)) * c.initializer_range).astype(np.float32),
                        "bias": np.zeros((H,), np.float32)}
        report.initialized.append("pooler (random: the checkpoint has none)")
    head = "classifier.out_proj" if roberta_head else "classifier"
    # Half a RoBERTa head is a damaged file: `r.dense` then names the missing key.
    if r.has(f"{head}.weight") or roberta_head:
        labels = np.shape(normalized[f"{head}.weight"])[0] if r.has(f"{head}.weight") else c.num_labels
        if labels != c.num_labels:
            raise CheckpointError(f"{source}: key '{head}.weight' has {labels} labels, but num_labels={c.num_labels}")
        final_classifier = r.dense(head, H, c.num_labels)
        report.imported.append(head)
    else:
        final_classifier = _classifier_init(c, rng)
        report.initialized.append(f"final classifier (normal std {c.initializer_range}, seed {seed})")

    ramps = []
    has_highway = any(k.startswith("encoder.highway.") for k in normalized)
    for i in range(L - 1):
        prefix = f"encoder.highway.{i}"
        if has_highway:
            ramps.append({"pooler": r.dense(f"{prefix}.pooler.dense", H, H),
                          "classifier": r.dense(f"{prefix}.classifier", H, c.num_labels)})
        else:
            ramps.append({"pooler": {k: v.copy() for k, v in final_pooler.items()},
                          "classifier": _classifier_init(c, rng)})
    if has_highway:
        report.imported.append(f"off-ramps 1..{L - 1} (highway 0..{L - 2})")
        last = f"encoder.highway.{L - 1}"
        last_keys = [k for k in normalized if k.startswith(last + ".")]
        if last_keys:
            r.used.update(last_keys)
            report.dropped.append(f"{last}.* (the last highway is never trained in DeeBERT / DeeRoBERTa; "
                                  "ramp L is the final pooler + classifier)")
    elif L > 1:
        report.initialized.append(f"off-ramps 1..{L - 1} (pooler copied from the final pooler, "
                                  f"classifier normal std {c.initializer_range}, seed {seed})")
    ramps.append({"pooler": final_pooler, "classifier": final_classifier})

    unused = sorted(set(normalized) - r.used)
    if unused:
        raise CheckpointError(f"{source}: unexpected key {unused[0]!r}"
                              + (f" (and {len(unused) - 1} more)" if len(unused) > 1 else ""))

    params = {"embeddings": emb, "layers": stack_trees(per_layer), "ramps": stack_trees(ramps)}
    report.num_params = int(sum(x.size for x in leaves(params)))
    return params, report


def _read_config(directory: str, num_labels: int | None) -> DeeBertConfig:
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise CheckpointError(f"{directory}: no config.json in this directory")
    try:
        return DeeBertConfig.from_hf_config(path, num_labels=num_labels)
    except ConfigError as e:
        raise CheckpointError(str(e)) from e


def convert_pytorch_checkpoint(path: str | os.PathLike, num_labels: int | None = None,
                               seed: int = 0) -> tuple[DeeBertConfig, dict, ConversionReport]:
    """Like `load_pytorch_checkpoint`, also returning the report of what was imported."""
    directory = resolve_model_dir(path)
    weights = find_weights_file(directory)
    state = read_state_dict(weights)
    if num_labels is None:
        # Checked against the config's model type by `state_dict_to_params`.
        head = next((k for k in ("classifier.weight", "classifier.out_proj.weight") if k in state), None)
        if head is not None and np.ndim(state[head]) == 2:
            num_labels = int(state[head].shape[0])
    config = _read_config(directory, num_labels)
    params, report = state_dict_to_params(state, config, source=weights, seed=seed)
    return config, params, report


def load_pytorch_checkpoint(path: str | os.PathLike, num_labels: int | None = None) -> tuple[DeeBertConfig, dict]:
    """A model directory (`config.json` + `model.safetensors` or `pytorch_model.bin`) -> (config, params).

    Accepts Hugging Face `BertModel` and `BertForSequenceClassification` checkpoints, original
    DeeBERT checkpoints (`bert.encoder.highway.{i}.*`), and with `model_type: roberta` in
    `config.json` `RobertaModel`, `RobertaForSequenceClassification` and DeeRoBERTa checkpoints
    (`roberta.encoder.highway.{i}.*`). Params are numpy arrays in our layout.
    """
    config, params, _ = convert_pytorch_checkpoint(path, num_labels)
    return config, params


# ----------------------------------------------------------------------------------------------
# Flax tree -> DeeBERT / DeeRoBERTa-format torch checkpoint

def params_to_state_dict(config: DeeBertConfig, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Our params -> torch-named arrays in the original DeeBERT layout (`bert.` prefix), or for
    RoBERTa the DeeRoBERTa one (the same under `roberta.`).

    Highway L-1 is written as a copy of the final head so the original code, which expects L
    highways, loads the file strictly and gives the same answer at the last layer.
    """
    L = config.num_hidden_layers
    base = BASE_PREFIXES[config.model_type]
    a = lambda x: np.ascontiguousarray(np.asarray(x, np.float32))
    sd: dict[str, np.ndarray] = {}

    def dense(prefix, p, index=None):
        k, b = p["kernel"], p["bias"]
        if index is not None:
            k, b = k[index], b[index]
        sd[f"{prefix}.weight"], sd[f"{prefix}.bias"] = a(np.asarray(k).T), a(b)

    def norm(prefix, p, index=None):
        s, b = p["scale"], p["bias"]
        if index is not None:
            s, b = s[index], b[index]
        sd[f"{prefix}.weight"], sd[f"{prefix}.bias"] = a(s), a(b)

    e = params["embeddings"]
    for name in EMBEDDINGS:
        sd[f"{base}embeddings.{name}.weight"] = a(e[name]["embedding"])
    norm(f"{base}embeddings.LayerNorm", e["LayerNorm"])
    for i in range(L):
        for name, (sub, kind) in LAYER_MODULES.items():
            (norm if kind == "norm" else dense)(f"{base}encoder.layer.{i}.{sub}", params["layers"][name], i)
    ramps = params["ramps"]
    for i in range(L):
        dense(f"{base}encoder.highway.{i}.pooler.dense", ramps["pooler"], i)
        dense(f"{base}encoder.highway.{i}.classifier", ramps["classifier"], i)
    dense(f"{base}pooler.dense", ramps["pooler"], L - 1)
    dense("classifier", ramps["classifier"], L - 1)
    return sd


# A key in the `config.json` we write: marks the directory as ours, so exporting again may replace it.
EXPORT_MARKER = "deebert_jax"


def is_export_dir(path: str | os.PathLike) -> bool:
    """Whether `path` holds a directory written by `export_pytorch_checkpoint` (it may be replaced)."""
    try:
        with open(os.path.join(os.fspath(path), "config.json"), encoding="utf-8") as f:
            return EXPORT_MARKER in json.load(f)
    except (OSError, ValueError, TypeError):
        return False


def export_pytorch_checkpoint(config: DeeBertConfig, params: Mapping[str, Any], directory: str | os.PathLike,
                              *, overwrite: bool = False) -> str:
    """Writes `model.safetensors` + `config.json` atomically; returns the directory.

    The layout is the family the model was read from (`EXPORT_FORMATS`): DeeBERT for BERT,
    DeeRoBERTa (`roberta.` keys, `model_type: roberta`) for RoBERTa; both read back exactly, and
    `transformers`' `BertModel` / `RobertaModel` load their encoder and pooler from it. An existing
    `directory` is replaced only if empty or a previous export, or with `overwrite=True`.
    """
    from safetensors.numpy import save_file
    directory = os.fspath(directory)
    sd = params_to_state_dict(config, params)
    with atomic_directory(directory, is_ours=is_export_dir, overwrite=overwrite) as tmp:
        save_file(sd, os.path.join(tmp, "model.safetensors"), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            marker = {EXPORT_MARKER: {"format": EXPORT_FORMATS[config.model_type]}}
            json.dump(dict(config.to_hf_config(), **marker), f, indent=2, sort_keys=True)
    return directory
