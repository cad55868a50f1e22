"""Where a training step's time goes on this machine: one encoder layer's pieces, timed alone.

    python -m train.profile_layer [--batch-size 32] [--seq-len 128] [--runs 10]

MiniLM-L6's shapes (width 384, 12 heads, FFN 1536), float32, jitted, medians of --runs after two
warm-up calls. Prints one line per piece (milliseconds).
"""

from __future__ import annotations

import argparse
import functools
import sys

from deebert_jax.commands.cli import positive_int, run


def _pieces(B: int, S: int, H: int = 384, I: int = 1536, heads: int = 12):
    import jax
    import jax.extend as jex
    import jax.numpy as jnp

    from deebert_jax.cpu.matmul import dense_matmul

    d = H // heads
    key = jax.random.PRNGKey(0)
    x = jax.random.normal(key, (B, S, H))
    w, w1, w2 = (jax.random.normal(key, s) * 0.05 for s in ((H, H), (H, I), (I, H)))
    bias = jnp.zeros((B, S))
    q4 = x.reshape(B, S, heads, d)

    def attention_einsum(q):
        s = jnp.einsum("bqhd,bkhd->bhqk", q, q) / jnp.sqrt(float(d)) + bias[:, None, None, :]
        return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), q)

    def attention_batched(q):   # the layout modeling.Layer uses
        qt, kt = jnp.transpose(q, (0, 2, 1, 3)), jnp.transpose(q, (0, 2, 3, 1))
        s = (qt @ kt) / jnp.sqrt(float(d)) + bias[:, None, None, :]
        return jnp.transpose(jax.nn.softmax(s, -1) @ qt, (0, 2, 1, 3))

    def backward(f):
        return lambda q: jax.vjp(f, q)[1](jnp.ones_like(q))[0]

    def layer_norm(x):
        m = x.mean(-1, keepdims=True)
        return (x - m) * jax.lax.rsqrt(((x - m) ** 2).mean(-1, keepdims=True) + 1e-12)

    h = jax.random.normal(key, (B, S, I))
    from jax._src.random import threefry2x32 as threefry
    count = jnp.arange(B * heads * S * S // 2, dtype=jnp.uint32)
    k1, k2 = jnp.uint32(1), jnp.uint32(2)
    g = jax.random.normal(key, (B, S, I))
    kernel_grad = lambda matmul: (lambda x, w, g: jax.vjp(lambda w: matmul(x, w), w)[1](g)[0])
    # (name, function, its arguments): arrays go in as arguments, so nothing is folded at compile time.
    return [
        ("the six matmuls of a layer, forward",
         lambda x, w, w1, w2: (x @ w) @ w + (x @ w) @ w + jax.nn.relu(x @ w1) @ w2, (x, w, w1, w2)),
        ("attention as einsums, forward", attention_einsum, (q4,)),
        ("attention as [B, h, S, d] batched matmuls, forward", attention_batched, (q4,)),
        ("attention backward, einsum form", backward(attention_einsum), (q4,)),
        ("attention backward, batched form", backward(attention_batched), (q4,)),
        (f"dropout bits for attention probabilities [{B}, {heads}, {S}, {S}]",
         lambda k: jax.random.bernoulli(k, 0.9, (B, heads, S, S)), (key,)),
        (f"threefry bits for [{B}, {heads}, {S}, {S}], JAX's rolled CPU lowering",
         lambda a, b, c: threefry._threefry2x32_lowering(a, b, c, c, use_rolled_loops=True), (k1, k2, count)),
        (f"threefry bits for [{B}, {heads}, {S}, {S}], unrolled (cpu_rng)",
         lambda a, b, c: jex.random.threefry2x32_p.bind(a, b, c, c), (k1, k2, count)),
        (f"FFN-in kernel gradient [{H}, {I}], autodiff (x^T @ g)", kernel_grad(lambda x, w: x @ w), (x, w1, g)),
        ("FFN-in kernel gradient, matmul.dense_matmul", kernel_grad(dense_matmul), (x, w1, g)),
        (f"dropout bits for a hidden state [{B}, {S}, {H}]", lambda k: jax.random.bernoulli(k, 0.9, (B, S, H)), (key,)),
        (f"exact GELU on [{B}, {S}, {I}]", lambda h: jax.nn.gelu(h, approximate=False), (h,)),
        ("layer norm", layer_norm, (x,)),
    ]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m train.profile_layer", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--seq-len", type=positive_int, default=128)
    p.add_argument("--runs", type=positive_int, default=10)
    args = p.parse_args(argv)
    from deebert_jax.cpu.process import setup_process
    setup_process()   # as every command: `bernoulli` below draws through the unrolled threefry lowering
    import jax
    from benchmarks.harness import load_average, time_calls

    print(f"batch {args.batch_size}, length {args.seq_len}, {jax.devices()[0].device_kind}, "
          f"load average {load_average()}")
    for name, piece, arrays in _pieces(args.batch_size, args.seq_len):
        f = jax.jit(piece)
        ms = time_calls(lambda: jax.block_until_ready(f(*arrays)), runs=args.runs, warmup=2).median_ms
        print(f"{ms:9.3f} ms  {name}")
    return 0


entry = functools.partial(run, main)   # the console script and `python -m`: errors as one line


if __name__ == "__main__":
    sys.exit(entry())
