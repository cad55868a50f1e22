"""FLOPs and bytes of a traced program with every loop body counted by its trip count.

XLA's `cost_analysis()` counts a loop body once, whatever its trip count: a 12-layer step whose
layers are a `scan` reads as about one layer. This walks the program's jaxpr instead, where each
loop says how often it runs: a `scan` its length; a `while_loop` whose end depends on the data
(the early-exit loops) as often as the caller says (`dynamic_trips`, e.g. full depth). A `cond`
/ `switch` counts its costliest branch. Matmul FLOPs (`dot_general`, 2 per multiply-add) are
counted exactly; every other arithmetic op as one FLOP per output element.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
from jax.extend import core as jex_core

# Primitives that move or relabel data, or only describe it: no arithmetic.
_NO_FLOPS = frozenset({
    "broadcast_in_dim", "reshape", "squeeze", "expand_dims", "transpose", "slice", "dynamic_slice",
    "dynamic_update_slice", "gather", "scatter", "concatenate", "pad", "convert_element_type", "iota",
    "select_n", "copy", "copy_p", "device_put", "bitcast_convert_type", "rev", "sharding_constraint",
    "pvary", "stop_gradient", "random_wrap", "random_unwrap", "random_seed", "split", "pjit",
    "optimization_barrier", "axis_index",
})
# Parameters under which call-like primitives keep the program they run once.
_CALLED = ("jaxpr", "call_jaxpr", "fun_jaxpr")


@dataclasses.dataclass(frozen=True)
class Costs:
    matmul_flops: float = 0.0
    other_flops: float = 0.0

    @property
    def flops(self) -> float:
        return self.matmul_flops + self.other_flops

    def __add__(self, other: "Costs") -> "Costs":
        return Costs(self.matmul_flops + other.matmul_flops, self.other_flops + other.other_flops)

    def times(self, n: float) -> "Costs":
        return Costs(self.matmul_flops * n, self.other_flops * n)


def _size(aval) -> int:
    return int(math.prod(getattr(aval, "shape", ())))


def _open(jaxpr):
    return jaxpr.jaxpr if isinstance(jaxpr, jex_core.ClosedJaxpr) else jaxpr


def _dot_flops(eqn) -> float:
    (lhs_contract, _), _ = eqn.params["dimension_numbers"]
    lhs = eqn.invars[0].aval
    contracted = math.prod(lhs.shape[d] for d in lhs_contract)
    return 2.0 * _size(eqn.outvars[0].aval) * contracted


DynamicTrips = Callable[[tuple[int, ...]], int]


def jaxpr_costs(jaxpr, dynamic_trips: DynamicTrips = lambda path: 1, *, loops_once: bool = False,
                _path: tuple[int, ...] = ()) -> Costs:
    """Costs of `jaxpr` (open or closed). `dynamic_trips(path)`: how often a `while_loop` runs,
    `path` its place among the data-dependent loops (the i-th such loop in its body, nested
    through the loops around it, e.g. (0,) the first top-level one, (0, 1) the second inside
    it). `loops_once`: every loop body counted once, as XLA's own analysis does."""
    total = Costs()
    dynamic_index = 0
    for eqn in _open(jaxpr).eqns:
        name = eqn.primitive.name
        params = eqn.params
        if name == "scan":
            body = jaxpr_costs(params["jaxpr"], dynamic_trips, loops_once=loops_once, _path=_path)
            total += body if loops_once else body.times(int(params["length"]))
        elif name == "while":
            path = _path + (dynamic_index,)
            dynamic_index += 1
            body = (jaxpr_costs(params["body_jaxpr"], dynamic_trips, loops_once=loops_once, _path=path)
                    + jaxpr_costs(params["cond_jaxpr"], dynamic_trips, loops_once=loops_once, _path=path))
            total += body if loops_once else body.times(int(dynamic_trips(path)))
        elif name == "cond":
            branches = [jaxpr_costs(b, dynamic_trips, loops_once=loops_once, _path=_path) for b in params["branches"]]
            total += max(branches, key=lambda c: c.flops)
        elif any(k in params for k in _CALLED):
            inner = next(params[k] for k in _CALLED if k in params)
            total += jaxpr_costs(inner, dynamic_trips, loops_once=loops_once, _path=_path)
        elif name == "dot_general":
            total += Costs(matmul_flops=_dot_flops(eqn))
        elif name not in _NO_FLOPS:
            work = max([_size(v.aval) for v in eqn.outvars] + [_size(v.aval) for v in eqn.invars
                                                               if hasattr(v, "aval") and name.startswith("reduce")])
            total += Costs(other_flops=float(work))
    return total


def scale(xla_figure: float, counted: float, once: float) -> float:
    """XLA's figure (loop bodies once) scaled by what counting the trips adds on the jaxpr: exact
    when XLA's program splits its work between loops and the rest as the jaxpr does."""
    return xla_figure * (counted / once) if once else xla_figure
