"""Early-exit predictions on raw text: tokenise (`encode`), run `exit_aware_predict` in chunks
(`predict_arrays`), and the record each example answers with (`format_predictions`), as
`deebert-predict` writes it and the server returns it; `predict_stream` does all three a chunk at
a time, so memory stays bounded whatever the number of examples. Reading the user's files:
`data.text_inputs`; the model directory: `inference.model_dir`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import time
from typing import Iterable, Iterator, Mapping, Sequence

import jax
import numpy as np
from tqdm.auto import tqdm

from deebert_jax.core.config import DeeBertConfig
from deebert_jax.data.glue import DataError, check_room_for_text, cut_text
from deebert_jax.data.text_inputs import Example
from deebert_jax.inference.exit_aware import exit_aware_predict
from deebert_jax.model import layouts



def encode(tokenizer, examples: Sequence[Example], max_seq_length: int,
           vocab_size: int | None = None, truncation_side: str = "right") -> tuple[dict[str, np.ndarray], np.ndarray]:
    """-> (input_ids, attention_mask, token_type_ids [N, S] int32, S the longest example rounded up
    to a power of two, at most `max_seq_length`; truncated [N] bool: the model does not see all of
    the text). Single texts and pairs may be mixed. Each text is cut to a bounded length first
    (`glue.cut_text`), so memory does not grow with the longest line; a text cut there is truncated.
    `truncation_side` "left" keeps the end of a long text instead of its start."""
    if truncation_side not in ("left", "right"):
        raise ValueError(f"truncation_side {truncation_side!r}; expected 'left' or 'right'")
    side, tokenizer.truncation_side = tokenizer.truncation_side, truncation_side
    try:
        return _encode(tokenizer, examples, max_seq_length, vocab_size, truncation_side)
    finally:
        tokenizer.truncation_side = side


def _encode(tokenizer, examples, max_seq_length, vocab_size, truncation_side):
    if vocab_size is not None and len(tokenizer) > vocab_size:  # larger ids would read past the embeddings
        raise DataError(f"the tokenizer has {len(tokenizer)} tokens, more than the model's vocab_size={vocab_size}")
    rows: list = [None] * len(examples)
    truncated = np.zeros(len(examples), bool)
    for pairs in (False, True):
        index = [i for i, (_, pair) in enumerate(examples) if (pair is not None) == pairs]
        if not index:
            continue
        check_room_for_text(tokenizer, max_seq_length, pairs)
        firsts = [cut_text(examples[i][0], max_seq_length, truncation_side) for i in index]
        seconds = [cut_text(examples[i][1], max_seq_length, truncation_side) for i in index] if pairs else None
        cut = [len(firsts[j]) < len(examples[i][0]) or (pairs and len(seconds[j]) < len(examples[i][1]))
               for j, i in enumerate(index)]
        # The lengths in full (of the cut texts) against `max_seq_length` itself: a tokenizer that
        # cut on its own (a truncation saved in tokenizer.json) cannot hide a truncation here.
        whole = tokenizer(firsts, seconds, truncation=False, verbose=False, return_token_type_ids=True)
        full = whole["input_ids"]
        # Only the rows that do not fit are tokenised again, cut: a row that fits is the same
        # with truncation on (one call a row instead of two, the server's main cost per request).
        enc = list(zip(full, whole["token_type_ids"]))
        long = [j for j, ids in enumerate(full) if len(ids) > max_seq_length]
        if long:
            again = tokenizer([firsts[j] for j in long], [seconds[j] for j in long] if pairs else None,
                              truncation=True, max_length=max_seq_length, return_token_type_ids=True)
            for j, cut_row in zip(long, zip(again["input_ids"], again["token_type_ids"])):
                enc[j] = cut_row
        for j, i in enumerate(index):
            ids = enc[j][0]
            if len(ids) > max_seq_length:
                raise DataError(f"the tokenizer returned {len(ids)} tokens for max_length={max_seq_length}")
            rows[i] = enc[j]
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


def predict_arrays(config: DeeBertConfig, params, arrays: Mapping[str, np.ndarray], threshold: float,
                   rule: str = "entropy", batch_size: int = 256,
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """Exit-aware early exit in chunks of `batch_size` rows -> (probabilities [N, K], exit_layer [N],
    seconds, compilation included)."""
    return _predict_placed(config, jax.device_put(layouts.unstack_params(params)), arrays, threshold, rule,
                           batch_size, progress)


def _predict_placed(config: DeeBertConfig, params, arrays: Mapping[str, np.ndarray], threshold: float,
                    rule: str, batch_size: int, progress: bool | tqdm) -> tuple[np.ndarray, np.ndarray, float]:
    """`predict_arrays` with the parameters already split and placed (`progress`: a bar to update)."""
    n = len(arrays["input_ids"])
    probs, exits = [], []
    start = time.perf_counter()
    bar_of = (contextlib.nullcontext(progress) if isinstance(progress, tqdm)   # the caller's bar, left open
              else tqdm(total=n, desc="predict", unit="ex", disable=not progress))
    with bar_of as bar:
        for lo in range(0, n, batch_size):
            chunk = [arrays[k][lo:lo + batch_size] for k in ("input_ids", "attention_mask", "token_type_ids")]
            out = exit_aware_predict(config, params, *chunk, threshold, rule, pool_size=batch_size)
            probs.append(np.asarray(jax.nn.softmax(out.logits, axis=-1)))
            exits.append(np.asarray(out.exit_layer))
            bar.update(len(chunk[0]))
    return np.concatenate(probs), np.concatenate(exits), time.perf_counter() - start


# Examples tokenised and run at once by `predict_stream`: pools of `batch_size` rows, this many
# pools per chunk. A file of at most that many examples is tokenised and padded as one, exactly as
# `encode` + `predict_arrays` on the whole of it.
CHUNK_POOLS = 16


@dataclasses.dataclass
class Tally:
    """What `predict_stream` has answered so far: examples, the sum of their exit layers, how
    many were truncated, and the seconds spent predicting (compilation included)."""
    examples: int = 0
    exit_layers: int = 0
    truncated: int = 0
    seconds: float = 0.0


def predict_stream(config: DeeBertConfig, params, tokenizer, examples: Iterable[Example], max_seq_length: int,
                   threshold: float, names: Sequence[str], rule: str = "entropy", batch_size: int = 256, *,
                   chunk_rows: int | None = None, tally: Tally | None = None, total: int | None = None,
                   progress: bool = False) -> Iterator[dict]:
    """The records of `format_predictions`, one at a time, for examples read one at a time:
    `chunk_rows` (default `CHUNK_POOLS` pools of `batch_size`) are tokenised (`encode`), run
    (`predict_arrays`'s pools) and formatted before the next are read, so memory is bounded by a
    chunk, not by the number of examples. `tally` is updated as records are yielded."""
    placed = jax.device_put(layouts.unstack_params(params))   # once, not per chunk
    chunk_rows = chunk_rows or batch_size * CHUNK_POOLS
    tally = tally if tally is not None else Tally()
    it = iter(examples)
    with tqdm(total=total, desc="predict", unit="ex", disable=not progress) as bar:
        while True:
            chunk = list(itertools.islice(it, chunk_rows))
            if not chunk:
                return
            arrays, truncated = encode(tokenizer, chunk, max_seq_length, config.vocab_size)
            probs, exits, seconds = _predict_placed(config, placed, arrays, threshold, rule, batch_size, bar)
            tally.examples += len(chunk)
            tally.exit_layers += int(exits.sum())
            tally.truncated += int(truncated.sum())
            tally.seconds += seconds
            yield from format_predictions(chunk, probs, exits, names, truncated)


def format_predictions(examples: Sequence[Example], probs: np.ndarray, exit_layer: np.ndarray,
                       names: Sequence[str], truncated: np.ndarray) -> list[dict]:
    """One JSON-ready dict per example: text (, text_pair), label, label_id, probabilities,
    exit_layer (1-based), truncated, score (the probability of `label`, added last so the keys
    before it are written as they always were)."""
    records = []
    for (text, pair), p, layer, cut in zip(examples, probs, exit_layer, truncated):
        record = {"text": text} if pair is None else {"text": text, "text_pair": pair}
        best = int(np.argmax(p))
        rounded = [round(float(x), 6) for x in p]
        record.update(label=names[best], label_id=best, probabilities=rounded, exit_layer=int(layer),
                      truncated=bool(cut), score=rounded[best])
        records.append(record)
    return records
