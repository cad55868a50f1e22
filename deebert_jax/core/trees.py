"""Stacking and splitting parameter trees along a leading layer axis (numpy or jax leaves)."""

from __future__ import annotations

from typing import Any, Iterator, Mapping, Sequence

import numpy as np


def leaves(tree: Any) -> Iterator[Any]:
    """The arrays of a tree of dicts, tuples and lists, in order (no jax needed)."""
    if isinstance(tree, Mapping):
        for value in tree.values():
            yield from leaves(value)
    elif isinstance(tree, (tuple, list)):
        for value in tree:
            yield from leaves(value)
    else:
        yield tree


def stack_trees(trees: Sequence[Any]) -> Any:
    """L trees of one structure -> one tree whose leaves gain a leading L axis.

    Numpy leaves stack with numpy (host memory, no device), anything else with `jnp.stack`.
    """
    first = trees[0]
    if isinstance(first, Mapping):
        return {key: stack_trees([t[key] for t in trees]) for key in first}
    if isinstance(first, np.ndarray):
        return np.stack(trees)
    import jax.numpy as jnp
    return jnp.stack(trees)


def unstack_tree(tree: Any, length: int) -> tuple:
    """The inverse of `stack_trees`: a tuple of `length` trees, leaf i of each = leaf[i] (numpy: views)."""
    def take(t, i):
        if isinstance(t, Mapping):
            return {key: take(value, i) for key, value in t.items()}
        return t[i]
    return tuple(take(tree, i) for i in range(length))
