"""`fusion` (masks and the activation's derivative computed once), `cpu_memory`, and the training
graph's CPU layout as a whole: same values, gradients autodiff's to rounding, in float32 and bf16."""

import functools
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deebert_jax.model import kernels
from deebert_jax.cpu import threefry as cpu_rng
from deebert_jax.cpu import fusion
from deebert_jax.model import modeling
from deebert_jax.core.config import tiny_config
from tests.conftest import REPO

EDGES = [0.0, -0.0, 1.5, -3.25, 1e30, -1e-30, np.inf, -np.inf, np.nan, 7.0, 40.0, -40.0]


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.bool_])
def test_computed_once_keeps_every_bit(dtype):
    x = jnp.asarray(EDGES, jnp.float32)
    x = (x > 0) if dtype == jnp.bool_ else x.astype(dtype)
    for first in (x, x[::-1], x[8:]):          # the first element (NaN, inf, 0) feeds the runtime 1
        out = jax.jit(fusion.computed_once)(first)
        assert out.dtype == first.dtype
        np.testing.assert_array_equal(np.asarray(out).view(np.uint8), np.asarray(first).view(np.uint8))


@pytest.mark.perf
def test_a_mask_read_twice_is_drawn_once():
    """Without `computed_once` XLA copies threefry into both readers; with it, one fusion draws it
    (with the fusable threefry lowering training uses, `cpu_rng`)."""
    cpu_rng.register_threefry_lowering()
    def f(wrap, key, x):
        keep = wrap(jax.random.bernoulli(key, 0.9, x.shape))
        return jnp.where(keep, x * 2, 0), jnp.where(keep, jnp.sin(x), 1)

    def draws(wrap):
        hlo = jax.jit(functools.partial(f, wrap)).lower(jax.random.PRNGKey(0), jnp.ones((64, 64))).compile().as_text()
        entry = hlo[hlo.index("ENTRY"):]
        fusions = re.findall(r"calls=%([\w.\-]+)", entry)
        return sum(bool(re.search(r"xor\(", body)) for name, body in _bodies(hlo).items() if name in fusions)

    assert draws(lambda k: k) == 2
    assert draws(fusion.computed_once) == 1


def _bodies(hlo):
    return {m.group(1): m.group(2) for m in re.finditer(r"^%([\w.\-]+) \(.*?\) -> .*? \{\n(.*?)\n\}", hlo, re.S | re.M)}


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-6), (jnp.bfloat16, 1e-2)])
@pytest.mark.parametrize("name", ["gelu", "gelu_new", "relu"])
def test_stored_derivative_matches_autodiff(name, dtype, tol):
    fn = modeling.activation(name)
    x = jnp.concatenate([jnp.linspace(-9, 9, 301), jnp.asarray([0.0, 1e-4, -1e-4, 30.0])]).astype(dtype)
    ours = fusion.stored_derivative(fn)
    np.testing.assert_array_equal(np.asarray(ours(x), np.float32), np.asarray(fn(x), np.float32))
    g = jax.grad(lambda x: jnp.sum(jnp.sin(ours(x).astype(jnp.float32))))(x)
    # bf16: against float32 autodiff (autodiff in bf16 lost up to 60% of the tanh GELU's slope at
    # x = -2.7 to cancellation; ours computes the derivative in float32, then rounds it).
    ref = jax.grad(lambda x: jnp.sum(jnp.sin(fn(x).astype(jnp.float32))))(x.astype(jnp.float32))
    assert g.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(ref, np.float32), rtol=tol, atol=tol)


def test_gelu_with_derivative_is_jax_gelu_bit_for_bit():
    x = jnp.linspace(-12, 12, 4001, dtype=jnp.float32)
    y, dy = jax.jit(fusion.gelu_with_derivative)(x)
    np.testing.assert_array_equal(np.asarray(y), np.asarray(jax.jit(functools.partial(jax.nn.gelu, approximate=False))(x)))
    np.testing.assert_allclose(dy, jax.vmap(jax.grad(functools.partial(jax.nn.gelu, approximate=False)))(x),
                               rtol=1e-6, atol=1e-7)


def test_training_layer_keeps_values_and_gradients_in_bf16():
    """One encoder layer in training mode with bf16 compute: the CPU layout (`attention`, `fusion`)
    against the layer as Flax ships it; same dropout draws, so the same output, and gradients to
    bf16 rounding. (The whole float32 step, bit for bit: tests/test_training.py, `jax_defaults`.)"""
    config = tiny_config(num_hidden_layers=1)
    hidden = jax.random.normal(jax.random.PRNGKey(3), (3, 8, config.hidden_size), jnp.bfloat16)
    mask_bias = modeling.attention_bias(jnp.ones((3, 8)).at[1, 6:].set(0), jnp.bfloat16)
    tuned = modeling.Layer(config, jnp.bfloat16, deterministic=False, kernels="cpu_tuned")
    params = tuned.init({"params": jax.random.PRNGKey(4), "dropout": jax.random.PRNGKey(5)}, hidden, mask_bias)
    probe = jax.random.normal(jax.random.PRNGKey(6), hidden.shape, jnp.float32)

    def value_and_grad(layer):
        def loss(p, h):
            out = layer.apply(p, h, mask_bias, rngs={"dropout": jax.random.PRNGKey(7)})
            return jnp.sum(out.astype(jnp.float32) * probe), out
        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(params, hidden)

    (_, ours), grads = value_and_grad(tuned)
    (_, theirs), their_grads = value_and_grad(tuned.clone(kernels="reference"))
    assert ours.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(theirs, np.float32))
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(their_grads)):
        assert a.dtype == b.dtype
        scale = max(1e-3, float(jnp.max(jnp.abs(b.astype(jnp.float32)))))
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=3e-2 * scale, rtol=3e-2)


PROBE = """
import resource
import jax, jax.numpy as jnp
from deebert_jax.cpu import memory as cpu_memory
from deebert_jax.cpu.process import setup_process
setup_process()                           # first thing, as every command's main() calls it
a, b = jnp.ones((8192, 64), jnp.float32), jnp.ones((64, 8192), jnp.float32)
f = jax.jit(lambda a, b: jnp.sum(jnp.sin(a @ b)))      # a 256 MB temporary, the product
faults = []
for _ in range(12):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    f(a, b).block_until_ready()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(cpu_memory.applied(), *faults[1:])                 # the first call compiles and grows the heap
"""


@pytest.mark.perf
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc settings")
def test_keep_freed_memory_stops_page_faults_from_step_to_step():
    def run(keep):
        env = {"PATH": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO), "DEEBERT_KEEP_FREED_MEMORY": keep}
        out = subprocess.run([sys.executable, "-c", PROBE], cwd=REPO, capture_output=True, text=True, check=True,
                             env=env)
        applied, *faults = out.stdout.split()
        return applied == "True", [int(n) for n in faults]

    # Kept, the heap grows to a few times the temporary in the first calls (strace: several 256 MB
    # `brk`s), and a call whose product lands in a part of it not yet touched faults that part in
    # once; after that, calls run fault-free. Without it, every call maps and faults in 256 MB anew.
    default_kept, default_faults = run("0")
    assert not default_kept
    assert min(default_faults) > 20_000, default_faults   # 256 MB faulted in again (4 KB pages), every call
    for _ in range(2):
        kept, faults = run("1")
        if min(faults) < min(default_faults) / 10 and sum(faults) < sum(default_faults) / 2:
            break
    assert kept
    assert min(faults) < min(default_faults) / 10, (faults, default_faults)
    assert sum(faults) < sum(default_faults) / 2, (faults, default_faults)


@pytest.mark.perf
def test_the_cpu_tuned_graph_is_built_for_the_cpu_only():
    """The entry points choose "cpu_tuned" for CPU devices only; "reference", the choice anywhere
    else, builds the training graph as JAX and Flax ship it: no custom VJPs (dense kernel
    gradients, attention, the activation) and a rolled layer loop."""
    config = tiny_config(num_hidden_layers=2)
    params = modeling.init_params(config, jax.random.PRNGKey(0))
    ids = jnp.ones((2, 8), jnp.int32)

    def loss_jaxpr(kernels):
        loss = lambda p: modeling.DeeBert(config, kernels=kernels).apply(
            {"params": p}, ids, train=True, rngs={"dropout": jax.random.PRNGKey(1)}).sum()
        return str(jax.make_jaxpr(loss)(params))

    class Device:
        def __init__(self, platform):
            self.platform = platform

    assert kernels.for_devices(jax.local_devices()) == "cpu_tuned"
    assert kernels.for_devices([Device("gpu")]) == "reference" == kernels.for_devices([Device("tpu")])
    assert kernels.for_devices([Device("cpu"), Device("gpu")]) == "reference"
    assert modeling.DeeBert(config).kernels == "reference"     # the library's default: Flax's graph
    on_cpu = loss_jaxpr(kernels.for_devices(jax.local_devices()))
    assert "custom_vjp_call" in on_cpu
    elsewhere = loss_jaxpr(kernels.for_devices([Device("gpu")]))
    assert "custom_vjp_call" not in elsewhere and "scan[" in elsewhere
    assert re.search(r"unroll=1\b", elsewhere) and not re.search(r"unroll=1\b", on_cpu)
