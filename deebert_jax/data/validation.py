"""Checks of model inputs at the library's edges, once per call, before anything is compiled.

Out-of-range ids do not fail inside XLA: an embedding lookup past the table clamps or reads NaN,
so a bad batch gives silently wrong logits. These checks turn that into one ValueError that names
the array, the row, the position and the value.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np

from deebert_jax.core.errors import InputError
from deebert_jax.core.config import DeeBertConfig

try:
    from jax.core import Tracer as _Tracer
except ImportError:  # jax.core re-exports move between releases
    from jax._src.core import Tracer as _Tracer

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def is_tracer(x: Any) -> bool:
    """Whether `x` is an abstract value inside a trace (`jit`, `pmap`, `vmap`): no values to read."""
    return isinstance(x, _Tracer)


def _first_bad(name: str, values: np.ndarray, bad: np.ndarray, expected: str) -> ValueError:
    row, pos = (int(i) for i in np.argwhere(bad)[0])
    count = int(bad.sum())
    more = f" ({count - 1} more values like it)" if count > 1 else ""
    return ValueError(f"{name}[{row}, {pos}] = {values[row, pos].item()!r}: expected {expected}{more}")


def check_model_inputs(config: DeeBertConfig, input_ids, attention_mask, token_type_ids) -> None:
    """Raises ValueError (naming the array, and for values the first bad row, position and value)
    unless the three arrays are integer or bool, share one shape [B, S] with S <=
    `config.max_sequence_length` (`max_position_embeddings`, less RoBERTa's offset), ids lie in [0, vocab_size), token types in
    [0, type_vocab_size) and mask values in {0, 1}.

    Tracers (a call inside the caller's own `jit`) have no values: only dtypes and shapes are
    checked for them. Host (numpy) arrays are checked in place; jax arrays are fetched to the host
    with one `jax.device_get`.
    """
    arrays = dict(zip(INPUT_NAMES, (input_ids, attention_mask, token_type_ids)))
    shapes = {}
    for name, x in arrays.items():
        if x is None:
            raise InputError(f"{name} is missing: expected an integer array [batch, sequence]")
        if not hasattr(x, "dtype"):
            x = arrays[name] = np.asarray(x)
        dtype = np.dtype(x.dtype)
        if not (np.issubdtype(dtype, np.integer) or dtype == np.bool_):
            raise InputError(f"{name} has dtype {dtype}: expected integers ({name} must hold integers: token ids, "
                             "mask and segment values)")
        shapes[name] = tuple(x.shape)
    shape = shapes["input_ids"]
    # An empty batch (B = 0) is allowed: exit-aware batching answers it with empty results.
    if len(shape) != 2 or shape[1] == 0:
        raise InputError(f"input_ids has shape {shape}: expected [batch, sequence], sequence at least 1")
    for name in INPUT_NAMES[1:]:
        if shapes[name] != shape:
            raise InputError(f"{name} has shape {shapes[name]}, input_ids {shape}: input_ids, attention_mask, "
                             "token_type_ids must share one [B, S] shape")
    if shape[1] > config.max_sequence_length:
        raise InputError(f"input_ids has sequence length {shape[1]}: longer than the model's {config.sequence_limit}")

    concrete = {k: v for k, v in arrays.items() if not is_tracer(v)}
    fetch = {k: v for k, v in concrete.items() if isinstance(v, jax.Array)}
    values = dict(concrete, **jax.device_get(fetch)) if fetch else concrete
    limits = {"input_ids": ("vocab_size", config.vocab_size),
              "token_type_ids": ("type_vocab_size", config.type_vocab_size)}
    for name, x in values.items():
        x = np.asarray(x)
        if name == "attention_mask":
            bad = (x != 0) & (x != 1)
            expected = "0 or 1"
        else:
            field, n = limits[name]
            bad = (x < 0) | (x >= n)
            expected = f"a value in [0, {field}={n})"
        if bad.any():
            raise _first_bad(name, x, bad, expected)
