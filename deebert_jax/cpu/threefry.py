"""Dropout bits on the CPU: the same threefry values, lowered without a rolled loop.

JAX lowers `threefry2x32` on the CPU as a `fori_loop` over its five key injections, to keep
compile times short. XLA then cannot fuse across the loop: every iteration writes both uint32
words of the whole counter array to memory and reads them back. A MiniLM-L6 training step at
batch 32, length 128 draws 6 x 32 x 12 x 128 x 128 attention-dropout bits, and the rolled loop made
those draws about a seventh of the step's CPU time (`python -m train.profile_layer`; `git log -p --
docs/performance-history.md`). JAX's other platforms use the unrolled form, which XLA fuses into
one kernel; registering that form for the CPU gives bit-for-bit the same numbers (checked against
the rolled form in tests/test_cpu_rng.py), so masks, losses and resumed runs do not change.

`cpu.process.setup_process(kernels="cpu_tuned")` registers it, once per process (every command
does; a library user opts in); it does nothing (returns False) if this JAX version no longer
exposes the pieces it needs. `register_threefry_lowering(unrolled=False)` puts JAX's own lowering
back (`train.benchmark_train --jax-defaults` times both).
"""

from __future__ import annotations

import functools
import logging

log = logging.getLogger("deebert_jax.cpu.threefry")
_unrolled = False


def _lowerings():
    """-> (primitive, {"unrolled": rule, "rolled": JAX's CPU rule}) or None when JAX's internals moved."""
    try:
        import jax.extend as jex
        from jax._src.random import threefry2x32 as impl
        from jax.interpreters import mlir
    except ImportError:
        return None
    lowering = getattr(impl, "_threefry2x32_lowering", None)
    rolled = getattr(impl, "_threefry2x32_cpu_lowering_rule", None)
    primitive = getattr(getattr(jex, "random", None), "threefry2x32_p", None)
    if lowering is None or rolled is None or primitive is None:
        return None
    unrolled = mlir.lower_fun(functools.partial(lowering, use_rolled_loops=False), multiple_results=True)
    return primitive, {"unrolled": unrolled, "rolled": rolled}


def register_threefry_lowering(unrolled: bool = True) -> bool:
    """Lower `threefry2x32` on the CPU unrolled (ours) or with JAX's rolled loop; True if done.
    Affects functions compiled afterwards, not executables already compiled."""
    found = _lowerings()
    if found is None:
        log.info("threefry lowering left as JAX ships it (this JAX has no unrolled form to register)")
        return False
    from jax.interpreters import mlir

    global _unrolled
    primitive, rules = found
    mlir.register_lowering(primitive, rules["unrolled" if unrolled else "rolled"], platform="cpu")
    _unrolled = unrolled
    return True


def registered_unrolled() -> bool:
    """Whether the unrolled lowering is the one registered now (this module's doing)."""
    return _unrolled
