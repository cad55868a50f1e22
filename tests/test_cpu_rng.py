"""The CPU threefry lowering registered by `cpu_rng` draws exactly JAX's numbers."""

import subprocess
import sys

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from deebert_jax.cpu.threefry import register_threefry_lowering


def test_unrolled_threefry_matches_the_rolled_loop_and_the_known_answer():
    from jax._src.random import threefry2x32 as impl

    assert register_threefry_lowering()
    # Random123's known-answer vector for threefry2x32 with 20 rounds.
    key = jnp.array([0x13198A2E, 0x03707344], jnp.uint32)
    count = jnp.array([0x243F6A88, 0x85A308D3], jnp.uint32)
    assert [int(x) for x in jex.random.threefry_2x32(key, count)] == [0xC4923A9C, 0x483DF7A0]

    rng = np.random.default_rng(0)
    k1, k2 = (jnp.uint32(v) for v in rng.integers(0, 2**32, 2, dtype=np.uint64))
    x1, x2 = (jnp.asarray(rng.integers(0, 2**32, (3, 1000), dtype=np.uint64).astype(np.uint32)) for _ in range(2))
    rolled = jax.jit(lambda *a: impl._threefry2x32_lowering(*a, use_rolled_loops=True))(k1, k2, x1, x2)
    fused = jax.jit(lambda a, b, c, d: jex.random.threefry2x32_p.bind(a, b, c, d))(k1, k2, x1, x2)
    for r, f in zip(rolled, fused):
        np.testing.assert_array_equal(np.asarray(r), np.asarray(f))
    # ... and the primitive really lowers without the rolled loop now (the values alone would match
    # with JAX's own lowering too).
    lowered = jax.jit(lambda a, b, c, d: jex.random.threefry2x32_p.bind(a, b, c, d)).lower(k1, k2, x1, x2).as_text()
    rolled_text = jax.jit(lambda *a: impl._threefry2x32_lowering(*a, use_rolled_loops=True)).lower(k1, k2, x1, x2).as_text()
    assert "stablehlo.while" in rolled_text and "stablehlo.while" not in lowered


def test_dropout_masks_are_the_ones_jax_draws_without_the_patch():
    code = ("import jax, numpy as np, sys\n"
            "f = lambda: np.asarray(jax.jit(lambda k: jax.random.bernoulli(k, 0.9, (4, 12, 33)))(jax.random.PRNGKey(7)))\n"
            "before = f()\n"
            "from deebert_jax.cpu.threefry import register_threefry_lowering\n"
            "assert register_threefry_lowering()\n"
            "after = f()\n"
            "print(int((before != after).sum()), int(before.sum()))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"JAX_PLATFORMS": "cpu", **__import__("os").environ})
    differing, kept = (int(v) for v in out.stdout.split())
    assert differing == 0
    assert 0 < kept < 4 * 12 * 33  # a real mask, not all ones or all zeros
