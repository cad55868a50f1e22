"""GLUE classification data as fixed-shape numpy arrays (the batches that feed `pmap`: `data.batching`).

Local GLUE folders (the standard TSV layout of `download_glue_data.py`) are read with the
`csv` module, `QUOTE_NONE`, so that every error can name the file and line at fault; without a
folder the same tasks come from the `datasets` hub (`nyu-mll/glue`). Both paths end in the same
tokenisation, so local and hub data give identical arrays.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import sys
from typing import Mapping, Sequence

import numpy as np

from deebert_jax.core.errors import DeeBertError
from deebert_jax.core.optional import require

ARRAY_KEYS = ("input_ids", "attention_mask", "token_type_ids", "labels")
HUB_DATASET = "nyu-mll/glue"


class DataError(DeeBertError, ValueError):
    """Input data we cannot use; the message names the file (and line) at fault."""


@dataclasses.dataclass(frozen=True)
class TaskSpec:
    """Where a GLUE task's text and label live, locally and on the hub.

    `tsv_text`/`tsv_label` are header names, or column indices for header-less files (CoLA).
    `labels` are the TSV label strings in the hub's integer order; `label_names` what each means,
    in the same order (the hub's names), as a trained model's `id2label`.
    """

    folder: str
    hub_name: str
    tsv_text: tuple
    tsv_label: str | int
    labels: tuple[str, ...]
    hub_text: tuple[str, ...]
    header: bool = True
    dev_file: str = "dev.tsv"
    hub_dev_split: str = "validation"
    # utf-8-sig: a byte-order mark before the header (MRPC ships one; an edited file may) is dropped.
    encoding: str = "utf-8-sig"
    label_names: tuple[str, ...] = ()


TASKS: dict[str, TaskSpec | None] = {
    "sst2": TaskSpec("SST-2", "sst2", ("sentence",), "label", ("0", "1"), ("sentence",),
                     label_names=("negative", "positive")),
    "mrpc": TaskSpec("MRPC", "mrpc", ("#1 String", "#2 String"), "Quality", ("0", "1"),
                     ("sentence1", "sentence2"), label_names=("not_equivalent", "equivalent")),
    "rte": TaskSpec("RTE", "rte", ("sentence1", "sentence2"), "label", ("entailment", "not_entailment"),
                    ("sentence1", "sentence2"), label_names=("entailment", "not_entailment")),
    "qnli": TaskSpec("QNLI", "qnli", ("question", "sentence"), "label", ("entailment", "not_entailment"),
                     ("question", "sentence"), label_names=("entailment", "not_entailment")),
    "qqp": TaskSpec("QQP", "qqp", ("question1", "question2"), "is_duplicate", ("0", "1"),
                    ("question1", "question2"), label_names=("not_duplicate", "duplicate")),
    "mnli": TaskSpec("MNLI", "mnli", ("sentence1", "sentence2"), "gold_label",
                     ("entailment", "neutral", "contradiction"), ("premise", "hypothesis"),
                     dev_file="dev_matched.tsv", hub_dev_split="validation_matched",
                     label_names=("entailment", "neutral", "contradiction")),
    # CoLA has no header: source, label, original mark, sentence.
    "cola": TaskSpec("CoLA", "cola", (3,), 1, ("0", "1"), ("sentence",), header=False,
                     label_names=("unacceptable", "acceptable")),
    # Random token ids with a learnable rule; no files, no tokenizer (tests, configs/tiny.py).
    "synthetic": None,
}

SYNTHETIC_SIZES = {"train": 512, "dev": 100}
SYNTHETIC_CLS, SYNTHETIC_SEP, SYNTHETIC_FIRST_WORD = 1, 2, 3


def canonical_task(task: str) -> str:
    """'SST-2', 'sst_2', 'sst2' -> 'sst2'; unknown names are an error listing the known ones."""
    name = str(task).lower().replace("-", "").replace("_", "")
    if name not in TASKS:
        raise DataError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    return name


def label_names(task: str) -> tuple[str, ...]:
    """The task's label names in label-id order (SST-2: negative, positive); () for synthetic."""
    spec = TASKS[canonical_task(task)]
    return () if spec is None else spec.label_names


def num_labels(task: str) -> int:
    spec = TASKS[canonical_task(task)]
    return 2 if spec is None else len(spec.labels)


# Any of these in a directory means a tokenizer is saved there: a fast tokenizer's own file,
# BERT's WordPiece vocabulary, RoBERTa's BPE vocabulary (with merges.txt) or the tokenizer config.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "tokenizer_config.json")
# Every file a saved tokenizer may be read from.
TOKENIZER_READ_FILES = (*TOKENIZER_FILES, "merges.txt", "special_tokens_map.json", "added_tokens.json")
# A text is cut to this many characters per token of the maximum length before it is tokenised,
# so one huge line costs no more than a long text (`cut_text`); a token of real text rarely spans
# more than a few dozen characters (a word longer than 100 is one unknown token).
CHARS_PER_TOKEN = 32


def has_tokenizer(directory: str | os.PathLike) -> bool:
    """Whether `directory` holds tokenizer files (`TOKENIZER_FILES`)."""
    return any(os.path.isfile(os.path.join(os.fspath(directory), f)) for f in TOKENIZER_FILES)


def load_tokenizer(path: str | os.PathLike, config=None):
    """The fast tokenizer saved with a model: `path/tokenizer/` if present, else `path` (offline).

    Whatever kind the directory holds (BERT's WordPiece, RoBERTa's BPE `vocab.json` + `merges.txt`,
    a `tokenizer.json`), through `AutoTokenizer`; one that cannot load, or cannot tokenise
    (`check_tokenizer`, against the model's `config` when given), is a `DataError` naming it.
    """
    from transformers import AutoTokenizer

    path = os.fspath(path)
    candidates = [os.path.join(path, "tokenizer"), path]
    for candidate in candidates:
        if os.path.isdir(candidate) and has_tokenizer(candidate):
            present = lambda f: os.path.isfile(os.path.join(candidate, f))
            if present("vocab.json") and not present("merges.txt") and not present("tokenizer.json"):
                raise DataError(f"{candidate}: vocab.json without merges.txt: a BPE tokenizer (RoBERTa's) needs both")
            try:
                tok = AutoTokenizer.from_pretrained(candidate, use_fast=True, local_files_only=True)
            except Exception as e:  # transformers and tokenizers raise many types (a bare Exception too)
                raise DataError(f"{candidate}: cannot load its tokenizer ({type(e).__name__}: {e})") from e
            if not tok.is_fast:
                raise DataError(f"{candidate}: tokenizer is not a fast tokenizer")
            return check_tokenizer(tok, candidate, config)
    if not os.path.exists(path) and "/" in path.strip("/") and not os.path.isabs(path):
        return check_tokenizer(AutoTokenizer.from_pretrained(path, use_fast=True), path, config)  # a hub id (online)
    raise DataError(f"{path}: no tokenizer found (looked in {candidates})")


def check_tokenizer(tokenizer, source: str, config=None):
    """-> `tokenizer`, if it can tokenise for a model of `config` (a `DeeBertConfig`, or None for
    the checks that need none); else a `DataError` naming `source`. Refused: no vocabulary beyond
    its special tokens (every text would become the same row), no special tokens around a text
    (the off-ramps read the first token), and with `config` more tokens than the model's
    `vocab_size` or a padding id other than the config's `pad_token_id` (RoBERTa's positions
    count the tokens that are not padding)."""
    special = set(tokenizer.all_special_ids)
    if len(tokenizer) <= len(special):
        raise DataError(f"{source}: the tokenizer has no vocabulary, only its {len(tokenizer)} special tokens "
                        f"{tokenizer.all_special_tokens}; every text would become the same input (are its "
                        "vocab.txt / vocab.json + merges.txt / tokenizer.json missing?)")
    if tokenizer.num_special_tokens_to_add(pair=False) < 1:
        raise DataError(f"{source}: the tokenizer adds no special token (such as [CLS] or <s>) before a text; "
                        "the off-ramps read the first token")
    if config is not None:
        if len(tokenizer) > config.vocab_size:
            raise DataError(f"{source}: the tokenizer has {len(tokenizer)} tokens, more than the model's "
                            f"vocab_size={config.vocab_size}")
        pad = tokenizer.pad_token_id
        if pad is not None and pad != config.pad_token_id:
            raise DataError(f"{source}: the tokenizer pads with id {pad} ({tokenizer.pad_token!r}), the model's "
                            f"config has pad_token_id={config.pad_token_id}; they are not of one model")
    return tokenizer


def cut_text(text: str, max_seq_length: int, side: str = "right") -> str:
    """`text` cut to `CHARS_PER_TOKEN * max_seq_length` characters, before tokenising: a longer
    text cannot be read whole by the model anyway, and tokenising all of it would cost memory in
    proportion to its length. `side`: where it is cut ("left" keeps the end)."""
    limit = CHARS_PER_TOKEN * int(max_seq_length)
    if len(text) <= limit:
        return text
    return text[-limit:] if side == "left" else text[:limit]


def check_room_for_text(tokenizer, max_seq_length: int, pairs: bool = False) -> None:
    """A `DataError` unless `max_seq_length` leaves room for a token of text (of each text of a
    pair) besides the special tokens the tokenizer adds."""
    need = tokenizer.num_special_tokens_to_add(pair=pairs) + (2 if pairs else 1)
    if max_seq_length < need:
        raise DataError(f"max_seq_length={max_seq_length} is too short: the tokenizer adds "
                        f"{need - (2 if pairs else 1)} special tokens to a {'pair' if pairs else 'text'}, "
                        f"so at least {need} are needed")


# ----------------------------------------------------------------------------------------------
# Reading

def _undecodable_line(path: str, encoding: str) -> str:
    """'line N: ...' for the first line of `path` that `encoding` cannot decode."""
    name = "UTF-8" if encoding.startswith("utf-8") else encoding
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            try:
                raw.decode(encoding)
            except UnicodeDecodeError as e:
                return f"line {number}: byte 0x{raw[e.start]:02x} at column {e.start + 1} is not valid {name}"
    return "not valid text"


def _read_tsv(path: str, spec: TaskSpec) -> tuple[list[tuple[str, ...]], np.ndarray]:
    """-> (one tuple of texts per example, int labels); every bad row is an error with its line."""
    if not os.path.isfile(path):
        raise DataError(f"{path}: GLUE file not found (task folder {spec.folder})")
    try:
        return _parse_tsv(path, spec)
    except UnicodeDecodeError:
        raise DataError(f"{path}: {_undecodable_line(path, spec.encoding)}; save the file as UTF-8") from None


def _parse_tsv(path: str, spec: TaskSpec) -> tuple[list[tuple[str, ...]], np.ndarray]:
    label_index = {s: i for i, s in enumerate(spec.labels)}
    texts, labels = [], []
    with open(path, encoding=spec.encoding, newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        if spec.header:
            header = next(reader, None)
            if header is None:
                raise DataError(f"{path}: empty file (expected a header line)")
            missing = [c for c in (*spec.tsv_text, spec.tsv_label) if c not in header]
            if missing:
                raise DataError(f"{path}: line 1: missing column(s) {missing}; header has {header}")
            text_cols = [header.index(c) for c in spec.tsv_text]
            label_col = header.index(spec.tsv_label)
        else:
            text_cols, label_col = list(spec.tsv_text), spec.tsv_label
        needed = max(*text_cols, label_col) + 1
        for row in reader:
            line = reader.line_num
            if not row:
                continue
            if len(row) < needed:
                raise DataError(f"{path}: line {line}: {len(row)} columns, expected at least {needed}")
            label = row[label_col].strip()
            if label not in label_index:
                raise DataError(f"{path}: line {line}: unknown label {label!r}; expected one of {list(spec.labels)}")
            texts.append(tuple(row[c] for c in text_cols))
            labels.append(label_index[label])
    if not labels:
        raise DataError(f"{path}: no examples (empty split)")
    return texts, np.asarray(labels, np.int32)


def _read_hub(task: str, spec: TaskSpec, split: str) -> tuple[list[tuple[str, ...]], np.ndarray]:
    datasets = require("datasets", "hub", f"reading {task} from the datasets hub (no --glue-dir / GLUE_DIR)")
    hub_split = "train" if split == "train" else spec.hub_dev_split
    source = f"{HUB_DATASET}/{spec.hub_name}[{hub_split}]"
    ds = datasets.load_dataset(HUB_DATASET, spec.hub_name, split=hub_split)
    missing = [c for c in (*spec.hub_text, "label") if c not in ds.column_names]
    if missing:
        raise DataError(f"{source}: missing column(s) {missing}; has {ds.column_names}")
    labels = np.asarray(ds["label"], np.int32)
    bad = np.flatnonzero((labels < 0) | (labels >= len(spec.labels)))
    if bad.size:
        raise DataError(f"{source}: row {int(bad[0])}: unknown label {int(labels[bad[0]])}")
    if not labels.size:
        raise DataError(f"{source}: no examples (empty split)")
    columns = [ds[c] for c in spec.hub_text]
    return list(zip(*columns)), labels


def _tokenize(tokenizer, texts: Sequence[tuple[str, ...]], max_seq_length: int) -> dict[str, np.ndarray]:
    check_room_for_text(tokenizer, max_seq_length, pairs=len(texts[0]) > 1)
    firsts = [cut_text(t[0], max_seq_length) for t in texts]
    seconds = [cut_text(t[1], max_seq_length) for t in texts] if len(texts[0]) > 1 else None
    enc = tokenizer(firsts, seconds, max_length=max_seq_length, truncation=True, padding="max_length",
                    return_token_type_ids=True, return_attention_mask=True, return_tensors="np")
    return {k: np.asarray(enc[k], np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")}


def synthetic_split(split: str, *, max_seq_length: int, vocab_size: int, size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random sentences `[CLS] w1 .. wn [SEP] pad..`; label = w1 is in the upper half of the vocabulary.

    A one-token rule that a 2-layer model learns in a few dozen steps, so tests see loss fall.
    """
    if vocab_size <= SYNTHETIC_FIRST_WORD + 2:
        raise DataError(f"synthetic task: vocab_size={vocab_size} is too small (need > {SYNTHETIC_FIRST_WORD + 2})")
    if max_seq_length < 3:
        raise DataError(f"synthetic task: max_seq_length={max_seq_length} must be at least 3")
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    lengths = rng.integers(1, max_seq_length - 1, size=size)
    words = rng.integers(SYNTHETIC_FIRST_WORD, vocab_size, size=(size, max_seq_length))
    positions = np.arange(max_seq_length)[None, :]
    real = (positions >= 1) & (positions <= lengths[:, None])
    input_ids = np.where(real, words, 0)
    input_ids[:, 0] = SYNTHETIC_CLS
    input_ids[np.arange(size), lengths + 1] = SYNTHETIC_SEP
    middle = (SYNTHETIC_FIRST_WORD + vocab_size) // 2
    return {
        "input_ids": input_ids.astype(np.int32),
        "attention_mask": (positions <= lengths[:, None] + 1).astype(np.int32),
        "token_type_ids": np.zeros((size, max_seq_length), np.int32),
        "labels": (input_ids[:, 1] >= middle).astype(np.int32),
    }


def glue_file(task: str, split: str, glue_dir: str | os.PathLike) -> str:
    spec = TASKS[canonical_task(task)]
    return os.path.join(os.fspath(glue_dir), spec.folder, "train.tsv" if split == "train" else spec.dev_file)


def read_texts(task: str, split: str, glue_dir: str | os.PathLike) -> tuple[list[tuple[str, ...]], np.ndarray]:
    """A GLUE split's raw texts (one tuple per example: a text or a pair) and int labels [N], untokenised."""
    name = canonical_task(task)
    if TASKS[name] is None:
        raise DataError("the synthetic task has no texts")
    return _read_tsv(glue_file(name, split, glue_dir), TASKS[name])


def load_split(task: str, split: str, *, glue_dir: str | os.PathLike | None = None, tokenizer=None,
               max_seq_length: int = 128, limit: int | None = None, vocab_size: int | None = None,
               seed: int = 0) -> dict[str, np.ndarray]:
    """One split as arrays: input_ids, attention_mask, token_type_ids [N, S] int32, labels [N] int32.

    `split` is "train" or "dev" (MNLI: dev_matched). `glue_dir=None` reads the hub. `limit` keeps
    the first `limit` examples. The synthetic task needs `vocab_size` and no tokenizer.
    """
    name = canonical_task(task)
    if split not in ("train", "dev"):
        raise DataError(f"split {split!r}: expected 'train' or 'dev'")
    if limit is not None and limit <= 0:
        limit = None
    spec = TASKS[name]
    if spec is None:
        if vocab_size is None:
            raise DataError("synthetic task: vocab_size is required")
        size = limit or SYNTHETIC_SIZES[split]
        return synthetic_split(split, max_seq_length=max_seq_length, vocab_size=vocab_size, size=size, seed=seed)
    if tokenizer is None:
        raise DataError(f"task {name}: a tokenizer is required")
    if glue_dir:
        texts, labels = _read_tsv(glue_file(name, split, glue_dir), spec)
    else:
        texts, labels = _read_hub(name, spec, split)
    if limit is not None:
        texts, labels = texts[:limit], labels[:limit]
    arrays = _tokenize(tokenizer, texts, max_seq_length)
    arrays["labels"] = labels
    return arrays


def load_train_and_holdout(task: str, holdout: int, *, limit: int | None = None, **common
                           ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """-> (training rows, held-out rows or None), disjoint by construction.

    The held-out rows are the last `holdout` rows of the train split (what `train.calibrate
    --calibration-split train-holdout --calibration-size N` reads); training keeps the first
    `limit` of the rows before them (all when `limit` is None or 0). `common`: `load_split`'s keywords.
    """
    if not holdout:
        return load_split(task, "train", limit=limit, **common), None
    full = load_split(task, "train", limit=None, **common)
    n = num_examples(full)
    if holdout >= n:
        raise DataError(f"config.calibration_holdout={holdout}: the {canonical_task(task)} training split has "
                        f"{n} rows, none would be left to train on")
    keep = n - holdout if not limit or limit <= 0 else min(int(limit), n - holdout)
    return ({k: v[:keep] for k, v in full.items()}, {k: v[n - holdout:] for k, v in full.items()})


def num_examples(arrays: Mapping[str, np.ndarray]) -> int:
    return int(arrays["labels"].shape[0])


def describe(arrays: Mapping[str, np.ndarray]) -> str:
    labels = arrays["labels"]
    counts = np.bincount(labels, minlength=2)
    return f"{len(labels)} examples, length {arrays['input_ids'].shape[1]}, label counts {counts.tolist()}"


if __name__ == "__main__":  # quick look: python -m deebert_jax.data.glue TASK GLUE_DIR TOKENIZER_DIR
    task, glue, tok_dir = sys.argv[1:4]
    for s in ("train", "dev"):
        print(s, describe(load_split(task, s, glue_dir=glue, tokenizer=load_tokenizer(tok_dir))))
