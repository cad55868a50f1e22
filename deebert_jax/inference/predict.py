"""Early-exit predictions on raw text: tokenise (`encode`), run `exit_aware_predict` in chunks
(`predict_arrays`), and the record each example answers with (`format_predictions`), as
`deebert-predict` writes it and the server returns it. Reading the user's files:
`data.text_inputs`; the model directory: `inference.model_dir`.
"""
from __future__ import annotations

import time
from typing import Mapping, Sequence

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
