"""Importing the library changes nothing outside it; `setup_process` is the one explicit opt-in."""

import subprocess
import sys

from tests.conftest import REPO


PROBE = """
import logging, os, sys
import jax                     # JAX's own import sets TF_CPP_MIN_LOG_LEVEL and TPU_SKIP_MDS_QUERY
env, hook = dict(os.environ), sys.unraisablehook
asyncio_filters = list(logging.getLogger("asyncio").filters)
import deebert_jax, train.train, train.predict, train.benchmark, train.benchmark_train, train.calibrate
from deebert_jax import *      # every public name, and with them every layer of the library
from benchmarks import benchmarking, train_step
from deebert_jax.cpu import memory, threefry
from deebert_jax.model import kernels
from deebert_jax.training import steps
from deebert_jax.core.config import tiny_config
import jax
steps.make_train_step(tiny_config(), None, None, 1, kernels="cpu_tuned")   # building a step registers nothing
assert dict(os.environ) == env, set(os.environ.items()) ^ set(env.items())
assert sys.unraisablehook is hook
assert logging.getLogger("asyncio").filters == asyncio_filters
assert not memory.applied() and not threefry.registered_unrolled()
settings = deebert_jax.setup_process()
assert settings.keep_freed_memory == sys.platform.startswith("linux") and memory.applied()
assert settings.threefry_unrolled and threefry.registered_unrolled()
assert sys.unraisablehook is not hook
print("ok")
"""


def _run(code):
    env = {"PATH": "", "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, env=env)


def test_import_changes_nothing_and_setup_process_is_the_opt_in():
    out = _run(PROBE)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]


def test_importing_the_commands_leaves_the_environment_alone():
    """Not even JAX is imported: the library loads a name on first use, the commands import late."""
    out = _run("import os; e = dict(os.environ); import deebert_jax, train.train, train.predict; "
               "assert dict(os.environ) == e")
    assert out.returncode == 0, out.stderr[-2000:]


def test_a_server_process_leaves_malloc_alone_and_runs_programs_inline():
    out = _run("import jax\n"
               "from deebert_jax.cpu import memory\n"
               "from deebert_jax.cpu.process import setup_serving_process\n"
               "settings = setup_serving_process(threads=1)\n"
               "assert not settings.keep_freed_memory and not memory.applied(), settings\n"
               "assert settings.cpu_inline_dispatch and settings.threads == 1\n"
               "assert not jax.config.read(\"jax_cpu_enable_async_dispatch\")\n"
               "print('ok')")
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-3000:]
