"""The lengths rows are padded to: a few classes, so that few shapes compile and short rows run short.

Two spacings (`SPACINGS`): "power-of-two" (16, 32, 64, ...: the fewest shapes) and "multiple-of-8"
(16, 24, 32, 40, ...: less padding, more shapes: 7 against 3 up to 64). SST-2's 872 dev sentences
average 25.2 tokens (the MiniLM tokenizer); padded to powers of two 36.0, to multiples of 8 29.0.
"""

from __future__ import annotations

from typing import Sequence

from deebert_jax.core.errors import InputError

SPACINGS = ("power-of-two", "multiple-of-8")
SHORTEST_LENGTH = 16


def length_classes(max_seq_length: int, spacing: str = "power-of-two",
                   shortest: int = SHORTEST_LENGTH) -> tuple[int, ...]:
    """The padded lengths below `max_seq_length` (from `shortest`, in `spacing`), then it."""
    if spacing not in SPACINGS:
        raise InputError(f"length spacing {spacing!r}; expected one of {SPACINGS}")
    lengths, n = [], shortest
    while n < max_seq_length:
        lengths.append(n)
        n = n * 2 if spacing == "power-of-two" else n + 8
    return tuple(lengths) + (int(max_seq_length),)


def padded_length(longest: int, classes: Sequence[int]) -> int:
    """The shortest class that holds `longest` tokens (classes ascending, the last the maximum)."""
    for size in classes:
        if size >= longest:
            return int(size)
    raise InputError(f"{longest} tokens: longer than the longest length class {classes[-1]}")
