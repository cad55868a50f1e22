"""Early-exit predictions on raw text: read inputs, tokenise, run `exit_aware_predict`, format.

Input files, by extension (every line one example; an empty or malformed line is a `DataError`
naming the file and line, so nothing half-read is used):
- `.txt`: one text per line.
- `.tsv`: tab-separated. If the first line names a text column (`text`, `sentence`, `sentence1`
  or `text_a`, case-insensitive) it is a header: that column is the text, a column named
  `text_pair`, `sentence2` or `text_b` the optional second text, and other columns (labels, ids)
  are ignored. Otherwise there is no header and every line holds one text, or two (a pair), the
  same number on every line.
- `.jsonl`: one object per line, `{"text": "...", "text_pair": "..."}` (`text_pair` optional or
  null; other keys ignored).
"""

from __future__ import annotations

import json
import os
import time
from typing import Mapping, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from deebert_jax.core.errors import InputError
from deebert_jax.evaluation import calibration
from deebert_jax.evaluation import sweep as evaluation
from deebert_jax.model import layouts
from deebert_jax.core.config import DeeBertConfig
from deebert_jax.data.glue import DataError, check_room_for_text, cut_text
from deebert_jax.inference.exit_aware import exit_aware_predict
from deebert_jax.core.fileutil import atomic_write_text
from deebert_jax.weights.checkpoint import LABELS_FILE, TRAINING_FILE, training_length

Example = tuple[str, "str | None"]   # (text, text_pair or None)
INPUT_FORMATS = (".txt", ".tsv", ".jsonl")
FIRST_COLUMNS = ("text", "sentence", "sentence1", "text_a")
SECOND_COLUMNS = ("text_pair", "sentence2", "text_b")


# ----------------------------------------------------------------------------------------------
# Reading

def _lines(path: str):
    # utf-8-sig: a byte-order mark (an editor may write one) is not part of the first text.
    with open(path, encoding="utf-8-sig", newline="") as f:
        for number, line in enumerate(f, 1):
            yield number, line.rstrip("\r\n")


def check_text(value, where: str) -> str:
    """`value` if it is a non-blank string, else a DataError '<where> is empty' (or not a string)."""
    if isinstance(value, str) and value.strip():
        return value
    if value is None or isinstance(value, str):
        raise DataError(f"{where} is empty")
    raise DataError(f"{where} must be a string, got {type(value).__name__}")


def _text(path: str, number: int, value, what: str) -> str:
    return check_text(value, f"{path}: line {number}: {what}")


def _read_txt(path: str) -> list[Example]:
    return [(_text(path, n, line, "the line"), None) for n, line in _lines(path)]


def _tsv_header(fields: Sequence[str]) -> tuple[int, int | None] | None:
    names = [f.strip().lower() for f in fields]
    first = [i for i, name in enumerate(names) if name in FIRST_COLUMNS]
    second = [i for i, name in enumerate(names) if name in SECOND_COLUMNS]
    if not first:
        return None
    if len(first) > 1 or len(second) > 1:
        raise InputError(f"header names several text columns {fields}")
    return first[0], (second[0] if second else None)


def _read_tsv(path: str) -> list[Example]:
    examples, columns, width = [], None, None
    for n, line in _lines(path):
        fields = line.split("\t")
        if n == 1:
            try:
                columns = _tsv_header(fields)
            except ValueError as e:
                raise DataError(f"{path}: line 1: {e}") from None
            if columns is not None:
                continue
        if columns is None:
            width = width or len(fields)
            if len(fields) not in (1, 2) or len(fields) != width:
                raise DataError(f"{path}: line {n}: {len(fields)} tab-separated columns; expected "
                                f"{width if width in (1, 2) else '1 or 2'} (or a header naming {FIRST_COLUMNS[:2]})")
            first, second = 0, (1 if width == 2 else None)
        else:
            first, second = columns
            needed = max(first, second or 0) + 1
            if len(fields) < needed:
                raise DataError(f"{path}: line {n}: {len(fields)} columns, the header needs {needed}")
        pair = None if second is None else _text(path, n, fields[second], "the second text")
        examples.append((_text(path, n, fields[first], "the text"), pair))
    return examples


def _read_jsonl(path: str) -> list[Example]:
    examples = []
    for n, line in _lines(path):
        if not line.strip():
            raise DataError(f"{path}: line {n}: empty line")
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
        if not isinstance(record, dict) or "text" not in record:
            raise DataError(f"{path}: line {n}: expected an object with a \"text\" key")
        pair = record.get("text_pair")
        examples.append((_text(path, n, record["text"], '"text"'),
                         None if pair is None else _text(path, n, pair, '"text_pair"')))
    return examples


def read_inputs(path: str | os.PathLike) -> list[Example]:
    """A `.txt`, `.tsv` or `.jsonl` file (see the module docstring) -> [(text, text_pair or None)]."""
    path = os.fspath(path)
    ext = os.path.splitext(path)[1].lower()
    readers = {".txt": _read_txt, ".tsv": _read_tsv, ".jsonl": _read_jsonl}
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory; expected a {', '.join(INPUT_FORMATS)} file of texts")
    if ext not in readers:
        raise DataError(f"{path}: unknown input format {ext or '(no extension)'!r}; expected one of {INPUT_FORMATS}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no such input file")
    try:
        examples = readers[ext](path)
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if not examples:
        raise DataError(f"{path}: no examples (empty file)")
    return examples


# ----------------------------------------------------------------------------------------------
# Tokenising and running

def encode(tokenizer, examples: Sequence[Example], max_seq_length: int,
           vocab_size: int | None = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """-> (input_ids, attention_mask, token_type_ids [N, S] int32, S the longest example rounded up
    to a power of two, at most `max_seq_length`; truncated [N] bool: the model does not see all of
    the text). Single texts and pairs may be mixed. Each text is cut to a bounded length first
    (`glue.cut_text`), so memory does not grow with the longest line; a text cut there is truncated."""
    if vocab_size is not None and len(tokenizer) > vocab_size:  # larger ids would read past the embeddings
        raise DataError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size={vocab_size}")
    rows: list = [None] * len(examples)
    truncated = np.zeros(len(examples), bool)
    for pairs in (False, True):
        index = [i for i, (_, pair) in enumerate(examples) if (pair is not None) == pairs]
        if not index:
            continue
        check_room_for_text(tokenizer, max_seq_length, pairs)
        firsts = [cut_text(examples[i][0], max_seq_length) for i in index]
        seconds = [cut_text(examples[i][1], max_seq_length) for i in index] if pairs else None
        cut = [len(firsts[j]) < len(examples[i][0]) or (pairs and len(seconds[j]) < len(examples[i][1]))
               for j, i in enumerate(index)]
        # The lengths in full (of the cut texts) against `max_seq_length` itself: a tokenizer that
        # cut on its own (a truncation saved in tokenizer.json) cannot hide a truncation here.
        full = tokenizer(firsts, seconds, truncation=False, verbose=False)["input_ids"]
        enc = tokenizer(firsts, seconds, truncation=True, max_length=max_seq_length, return_token_type_ids=True)
        for j, i in enumerate(index):
            ids = enc["input_ids"][j]
            if len(ids) > max_seq_length:
                raise DataError(f"the tokenizer returned {len(ids)} tokens for max_length={max_seq_length}")
            rows[i] = (ids, enc["token_type_ids"][j])
            truncated[i] = cut[j] or len(full[j]) > len(ids) or len(full[j]) > max_seq_length
    # Padded to the longest row rounded up to a power of two (at most max_seq_length), not to
    # max_seq_length: short inputs run short, and few shapes compile.
    longest = max(len(ids) for ids, _ in rows)
    seq = max(longest, min(max_seq_length, 1 << max(3, (longest - 1).bit_length())))
    arrays = {k: np.zeros((len(rows), seq), np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}
    arrays["input_ids"][:] = tokenizer.pad_token_id or 0
    for i, (ids, types) in enumerate(rows):
        arrays["input_ids"][i, :len(ids)] = ids
        arrays["attention_mask"][i, :len(ids)] = 1
        arrays["token_type_ids"][i, :len(ids)] = types
    return arrays, truncated


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
    tokenizer_limit = getattr(tokenizer, "model_max_length", None)
    if not isinstance(tokenizer_limit, int) or tokenizer_limit > 1_000_000:   # transformers' "no limit" sentinel
        tokenizer_limit = None
    if requested is None:
        trained, source = training_length(model_dir), TRAINING_FILE
        if not trained:   # a model saved before training.json: the length its exit policy was chosen at
            trained, source = _policy_length(model_dir), calibration.POLICY_FILE
        said = ("the length the model was trained at" if source == TRAINING_FILE
                else "the length its exit policy was calibrated at")
        length, why = ((trained, f"{said} ({source})") if trained else (limit, f"the model's {config.sequence_limit}"))
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
            raise InputError(f"{flag} {length} is too short: {str(e).split(': ', 1)[-1]}") from None
    return length, why


def _policy_length(model_dir: str | os.PathLike) -> int | None:
    """`exit_policy.json`'s max_seq_length when it is a positive integer (the policy itself is
    checked where its threshold is read), else None."""
    try:
        with open(os.path.join(os.fspath(model_dir), calibration.POLICY_FILE), encoding="utf-8") as f:
            value = json.load(f).get("max_seq_length")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 1 else None


def predict_arrays(config: DeeBertConfig, params, arrays: Mapping[str, np.ndarray], threshold: float,
                   rule: str = "entropy", batch_size: int = 256,
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """Exit-aware early exit in chunks of `batch_size` rows -> (probabilities [N, K], exit_layer [N],
    seconds, compilation included)."""
    params = jax.device_put(layouts.unstack_params(params))   # once, not per chunk
    n = len(arrays["input_ids"])
    probs, exits = [], []
    start = time.perf_counter()
    with tqdm(total=n, desc="predict", unit="ex", disable=not progress) as bar:
        for lo in range(0, n, batch_size):
            chunk = [arrays[k][lo:lo + batch_size] for k in ("input_ids", "attention_mask", "token_type_ids")]
            out = exit_aware_predict(config, params, *chunk, threshold, rule, pool_size=batch_size)
            probs.append(np.asarray(jax.nn.softmax(out.logits, axis=-1)))
            exits.append(np.asarray(out.exit_layer))
            bar.update(len(chunk[0]))
    return np.concatenate(probs), np.concatenate(exits), time.perf_counter() - start


# ----------------------------------------------------------------------------------------------
# Labels, thresholds and output

def label_names(model_dir: str | os.PathLike, num_labels: int) -> list[str]:
    """`id2label` from the model directory's `labels.json` (training writes the task's names
    there), `config.json` or `deebert_config.json`, the first that has it for every label, else
    LABEL_0 .. LABEL_{K-1}."""
    for name in (LABELS_FILE, "config.json", "deebert_config.json"):
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


def resolve_threshold(model_dir: str | os.PathLike, threshold: float | None, rule: str | None,
                      num_layers: int, *, model: tuple | None = None,
                      max_seq_length: int | None = None) -> tuple[float, str, str]:
    """-> (threshold, rule, a note saying where they came from). A missing threshold comes from
    the model directory's exit_policy.json (when its rule is `rule` or `rule` is None), else the
    rule's full-depth threshold (entropy 0). A missing rule: the policy's, else entropy. The
    policy is checked against `model` ((config, params)) and `max_seq_length` when given
    (`calibration.load_exit_policy`); it is not read when `threshold` is given."""
    if threshold is not None:
        rule = rule or "entropy"
        return float(threshold), rule, f"rule {rule}, threshold {threshold:g} (given)"
    policy = calibration.load_exit_policy(model_dir, model=model, max_seq_length=max_seq_length)
    rule = rule or (policy["rule"] if policy else "entropy")
    path = os.path.join(os.fspath(model_dir), calibration.POLICY_FILE)
    if policy is not None and policy["rule"] == rule:
        return (float(policy["threshold"]), rule,
                f"rule {rule}, threshold {policy['threshold']:g} from {path} ({calibration.describe_policy(policy)})")
    full = evaluation.default_thresholds(rule, num_layers)[0]
    why = (f"no {calibration.POLICY_FILE} in {os.fspath(model_dir)}" if policy is None
           else f"{path} is for rule {policy['rule']}")
    return full, rule, (f"rule {rule}, threshold {full:g}: the full depth ({why}; "
                        "python -m train.calibrate chooses a threshold)")


def format_predictions(examples: Sequence[Example], probs: np.ndarray, exit_layer: np.ndarray,
                       names: Sequence[str], truncated: np.ndarray) -> list[dict]:
    """One JSON-ready dict per example: text (, text_pair), label, label_id, probabilities,
    exit_layer (1-based), truncated."""
    records = []
    for (text, pair), p, layer, cut in zip(examples, probs, exit_layer, truncated):
        record = {"text": text} if pair is None else {"text": text, "text_pair": pair}
        best = int(np.argmax(p))
        record.update(label=names[best], label_id=best, probabilities=[round(float(x), 6) for x in p],
                      exit_layer=int(layer), truncated=bool(cut))
        records.append(record)
    return records


def write_jsonl(records: Sequence[Mapping], path: str | os.PathLike) -> str:
    """All records at once, atomically (nothing appears until every line is ready)."""
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def summary(exit_layer: np.ndarray, num_layers: int, seconds: float, truncated: np.ndarray,
            max_seq_length: int) -> str:
    n, mean_exit = len(exit_layer), float(np.mean(exit_layer))
    return (f"{n} examples in {seconds:.2f} s ({n / max(seconds, 1e-9):.1f} examples/s, compilation included); "
            f"mean exit layer {mean_exit:.2f} of {num_layers}, layer saving {1 - mean_exit / num_layers:.1%}; "
            f"{int(truncated.sum())} truncated to {max_seq_length} tokens")
