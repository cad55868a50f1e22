"""A model directory, read once and checked once, for every command that runs one.

`open_model_dir(path)` reads the config and weights (`weights.checkpoint`), the tokenizer, the
label names and the length the model was trained at, and returns one `ModelDir`: predict, serve,
evaluate and calibrate take their model, tokenizer, labels, input length and threshold from it.
The exit policy (`exit_policy.json`) is read and checked against these weights by
`inference.exit_policy`, here when a threshold is asked for (`ModelDir.threshold`).

It sits in `inference` (not `weights`) because the threshold it resolves belongs to the exit
rules (`inference.early_exit`).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from deebert_jax.core.config import DeeBertConfig
from deebert_jax.core.errors import InputError
from deebert_jax.data.glue import DataError, check_room_for_text, load_tokenizer
from deebert_jax.inference.early_exit import full_depth_threshold
from deebert_jax.inference.exit_policy import POLICY_FILE, describe_policy, load_exit_policy, policy_length
from deebert_jax.weights.checkpoint import LABELS_FILE, TRAINING_FILE, load_checkpoint, training_length
from deebert_jax.weights.torch_files import CheckpointError
from deebert_jax.weights.model_loading import load_model_for_task


@dataclasses.dataclass(frozen=True)
class ModelDir:
    """What a model directory holds, read once: `path`, `config`, `params` (stacked layout), the
    `tokenizer` (None when opened without one, or for the synthetic task), `label_names` (one per
    label) and `task` (canonical; None when opened for no task)."""

    path: str
    config: DeeBertConfig
    params: Any
    tokenizer: Any
    label_names: tuple[str, ...]
    task: str | None = None

    @property
    def num_layers(self) -> int:
        return self.config.num_hidden_layers

    def max_seq_length(self, requested: int | None = None, *, flag: str = "--max-seq-length",
                       fallback: int | None = None) -> tuple[int, str]:
        """`resolve_max_seq_length` for this model and its tokenizer."""
        return resolve_max_seq_length(requested, self.config, self.path, self.tokenizer, flag, fallback)

    def policy(self, *, max_seq_length: int | None = None) -> dict | None:
        """`exit_policy.json`, checked against these weights (None when there is none)."""
        return load_exit_policy(self.path, model=(self.config, self.params), max_seq_length=max_seq_length)

    def threshold(self, threshold: float | None, rule: str | None, *,
                  max_seq_length: int | None = None) -> tuple[float, str, str]:
        """`resolve_threshold` with the exit policy checked against these weights."""
        return resolve_threshold(self.path, threshold, rule, self.num_layers, model=(self.config, self.params),
                                 max_seq_length=max_seq_length)


def open_model_dir(path: str | os.PathLike, *, task: str | None = None) -> ModelDir:
    """Reads the model directory `path` (a missing or damaged one fails here, naming it). With
    `task`: the model must have that task's label count (`model_loading.load_model_for_task`),
    and the synthetic task needs no tokenizer."""
    if task is None:
        config, params = load_checkpoint(path)
        tokenizer = load_tokenizer(path, config)
    else:
        config, params, task, tokenizer = load_model_for_task(os.fspath(path), task)
    return ModelDir(os.fspath(path), config, params, tokenizer, tuple(label_names(path, config.num_labels)), task)


def resolve_max_seq_length(requested: int | None, config: DeeBertConfig, model_dir: str | os.PathLike,
                           tokenizer=None, flag: str = "--max-seq-length",
                           fallback: int | None = None) -> tuple[int, str]:
    """-> (the length inputs are cut to, where it came from: "given" when `requested`), before any
    text is read.

    Default (`requested` None): the length the model was trained at (`training.json`, else the
    length its `exit_policy.json` was calibrated at), else the
    longest the model's positions cover (`config.max_sequence_length`; at most `fallback` when
    given: commands that pad every row to the length keep a shorter default), and never more than
    the tokenizer's own `model_max_length`. A requested length longer than the model's positions or the
    tokenizer's `model_max_length` is an `InputError` naming `flag`; so is one too short for the
    special tokens.
    """
    limit = config.max_sequence_length
    named = flag   # what a length too short is blamed on: the flag, or the file the default came from
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if not isinstance(tokenizer_limit, int) or tokenizer_limit > 1_000_000:   # transformers' "no limit" sentinel
        tokenizer_limit = None
    if requested is None:
        trained, source = training_length(model_dir), TRAINING_FILE
        if not trained:   # a model saved before training.json: the length its exit policy was chosen at
            trained, source = policy_length(model_dir), POLICY_FILE
        said = ("the length the model was trained at" if source == TRAINING_FILE
                else "the length its exit policy was calibrated at")
        length, why = ((trained, f"{said} ({source})") if trained else (limit, f"the model's {config.sequence_limit}"))
        if trained:
            named = f"{os.path.join(os.fspath(model_dir), source)}: max_seq_length="
        if not trained and fallback is not None and fallback < limit:
            length, why = int(fallback), f"the default, within the model's {config.sequence_limit}"
        if length > limit:
            raise InputError(f"{os.path.join(os.fspath(model_dir), source)}: max_seq_length={length} is "
                             f"longer than the model's {config.sequence_limit}")
        if tokenizer_limit is not None and tokenizer_limit < length:
            length, why = tokenizer_limit, f"the tokenizer's model_max_length={tokenizer_limit}"
    else:
        length, why = int(requested), "given"
        if length > limit:
            raise InputError(f"{flag} {length} is longer than the model's {config.sequence_limit}")
        if tokenizer_limit is not None and length > tokenizer_limit:
            raise InputError(f"{flag} {length} is longer than the tokenizer's model_max_length={tokenizer_limit}")
    if tokenizer is not None:
        try:
            check_room_for_text(tokenizer, length)
        except DataError as e:
            sep = "" if named.endswith("=") else " "
            raise InputError(f"{named}{sep}{length} is too short: {str(e).split(': ', 1)[-1]}") from None
    return length, why


def label_names(model_dir: str | os.PathLike, num_labels: int) -> list[str]:
    """`id2label` from the model directory's `labels.json` (training writes the task's names
    there), `config.json` or `deebert_config.json`, the first that has it for every label, else
    LABEL_0 .. LABEL_{K-1}. A `labels.json` that is there but damaged, or that does not name
    every label of the model (or names more), is a CheckpointError naming it: its names are
    never silently replaced by LABEL_i."""
    own = os.path.join(os.fspath(model_dir), LABELS_FILE)
    if os.path.lexists(own):
        return _own_label_names(own, num_labels)
    for name in ("config.json", "deebert_config.json"):
        path = os.path.join(os.fspath(model_dir), name)
        try:
            with open(path, encoding="utf-8") as f:
                id2label = json.load(f).get("id2label") or {}
        except (OSError, ValueError, AttributeError):
            continue
        names = [id2label.get(str(i), id2label.get(i)) for i in range(num_labels)]
        if all(isinstance(x, str) for x in names):
            return names
    return [f"LABEL_{i}" for i in range(num_labels)]


def _own_label_names(path: str, num_labels: int) -> list[str]:
    """labels.json (`{"id2label": {"0": name, ...}}`, what training writes) -> the K names."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable labels file ({one_line_reason(e)}); expected "
                              '{"id2label": {"0": "negative", ...}}') from None
    id2label = record.get("id2label") if isinstance(record, dict) else None
    if not isinstance(id2label, dict):
        raise CheckpointError(f'{path}: expected an object {{"id2label": {{"0": NAME, ...}}}}')
    expected = {str(i) for i in range(num_labels)}
    if set(id2label) != expected or not all(isinstance(v, str) and v for v in id2label.values()):
        raise CheckpointError(f"{path}: id2label has keys {sorted(id2label, key=str)[:8]}; the model has "
                              f"{num_labels} labels, so it must name each of {sorted(expected, key=int)} with a "
                              "non-empty string")
    return [id2label[str(i)] for i in range(num_labels)]


def one_line_reason(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def resolve_threshold(model_dir: str | os.PathLike, threshold: float | None, rule: str | None,
                      num_layers: int, *, model: tuple | None = None,
                      max_seq_length: int | None = None) -> tuple[float, str, str]:
    """-> (threshold, rule, a note saying where they came from). A missing threshold comes from
    the model directory's exit_policy.json (when its rule is `rule` or `rule` is None), else the
    rule's full-depth threshold (entropy 0). A missing rule: the policy's, else entropy. The
    policy is checked against `model` ((config, params)) and `max_seq_length` when given
    (`load_exit_policy`); it is not read when `threshold` is given."""
    if threshold is not None:
        rule = rule or "entropy"
        return float(threshold), rule, f"rule {rule}, threshold {threshold:g} (given)"
    policy = load_exit_policy(model_dir, model=model, max_seq_length=max_seq_length)
    rule = rule or (policy["rule"] if policy else "entropy")
    path = os.path.join(os.fspath(model_dir), POLICY_FILE)
    if policy is not None and policy["rule"] == rule:
        return (float(policy["threshold"]), rule,
                f"rule {rule}, threshold {policy['threshold']:g} from {path} ({describe_policy(policy)})")
    full = full_depth_threshold(rule, num_layers)
    why = (f"no {POLICY_FILE} in {os.fspath(model_dir)}" if policy is None
           else f"{path} is for rule {policy['rule']}")
    return full, rule, (f"rule {rule}, threshold {full:g}: the full depth ({why}; "
                        "python -m train.calibrate chooses a threshold)")
