"""The two layouts of the parameters, and the one place that reaches a layer's weights.

Training keeps every layer's arrays stacked on a leading L axis (`nn.scan`); serving splits them
once (`unstack_params` -> `PerLayerParams`) so a traced layer index is a `lax.switch` whose
branch reads its own weights in place (`per_layer`).
"""

from __future__ import annotations

import functools
import operator
from typing import Any, Callable

import jax

from deebert_jax.core.trees import stack_trees, unstack_tree

Params = Any


class PerLayerParams(dict):
    """The serving layout: the stacked tree's keys, with `layers` and `ramps` as tuples of L
    per-layer trees (the same arrays, the L axis split). A pytree like the dict it is."""


def _flatten(params: PerLayerParams):
    keys = tuple(sorted(params))
    return [(jax.tree_util.DictKey(k), params[k]) for k in keys], keys


jax.tree_util.register_pytree_with_keys(PerLayerParams, _flatten, lambda keys, values: PerLayerParams(zip(keys, values)))


def is_unstacked(params: Params) -> bool:
    """True for params in the serving layout (`unstack_params`)."""
    return isinstance(params, PerLayerParams)


def unstack_params(params: Params) -> Params:
    """Stacked params -> the inference layout: `layers` and `ramps` as tuples of L per-layer trees.

    Do it once after loading: `forward` and `layer_step` then read each layer's weights in place.
    Numpy leaves stay numpy (views); device arrays are sliced once.
    """
    if is_unstacked(params):
        return params
    L = jax.tree_util.tree_leaves(params["layers"])[0].shape[0]
    return PerLayerParams(params, layers=unstack_tree(params["layers"], L), ramps=unstack_tree(params["ramps"], L))


def stack_params(params: Params) -> Params:
    """The inverse of `unstack_params` (for saving, exporting and training)."""
    if not is_unstacked(params):
        return params
    return {**params, "layers": stack_trees(params["layers"]), "ramps": stack_trees(params["ramps"])}


def static_index(index) -> int | None:
    try:
        return operator.index(index)
    except TypeError:  # a tracer
        return None


def per_layer(params: Params, fn: Callable[..., Any]) -> Callable[..., Any]:
    """Binds the whole model's params once -> `run(layer, *args) = fn(layer_params, ramp_params, layer, *args)`.

    The one place that decides how a layer's weights are reached. `layer` is 0-based: a Python
    int indexes directly; a traced index on params from `unstack_params` is a `lax.switch` whose
    branch i calls `fn` with layer i's own weights (read in place) and a static `layer`; on stacked
    params it slices the L axis (a copy of the layer's weights per call) and `fn` gets the
    traced index.
    """
    unstacked = is_unstacked(params)

    def weights(i):
        if unstacked:
            return params["layers"][i], params["ramps"][i]
        take = lambda x: x[i] if isinstance(i, int) else jax.lax.dynamic_index_in_dim(x, i, keepdims=False)
        return jax.tree_util.tree_map(take, params["layers"]), jax.tree_util.tree_map(take, params["ramps"])

    def run(layer, *args):
        static = static_index(layer)
        if static is not None:
            return fn(*weights(static), static, *args)
        if unstacked:
            branches = [functools.partial(fn, *weights(i), i) for i in range(len(params["layers"]))]
            return jax.lax.switch(layer, branches, *args)
        return fn(*weights(layer), layer, *args)

    return run
