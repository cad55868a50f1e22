"""What a command sets up for its whole process, in one explicit call.

Importing `deebert_jax` changes nothing outside it: no environment variable, malloc setting,
JAX lowering or logging filter. The command-line entry points call `setup_process` first thing in
`main()`, before JAX runs anything; a library user who wants the same opts in by calling it.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import logging
import os
import re
import sys
import traceback

from deebert_jax.core.config import check_kernels
from deebert_jax.core.errors import InputError
from deebert_jax.cpu import memory, threefry   # both load nothing heavy (JAX comes inside their calls)

@dataclasses.dataclass(frozen=True)
class ProcessSettings:
    """What `setup_process` did."""

    keep_freed_memory: bool      # glibc malloc keeps freed memory (`cpu.memory`)
    threefry_unrolled: bool      # threefry's unrolled CPU lowering registered (`cpu.threefry`)
    threads: int | None          # XLA's CPU threads asked for (PJRT_NPROC), None: its default
    quiet_orbax: bool            # orbax's leftover noise after a failed read dropped
    tpu_backend_skipped: bool = False   # libtpu installed, no TPU here: JAX runs on the CPU at once
    cpu_inline_dispatch: bool = False   # CPU programs run on the calling thread (no async dispatch)


def setup_process(*, kernels: str = "cpu_tuned", keep_freed_memory: bool | None = None,
                  threads: int | None = None, share_accelerator_memory: bool = False,
                  quiet_orbax: bool = True, cpu_inline_dispatch: bool = False) -> ProcessSettings:
    """Process-wide settings for a command; call before JAX runs anything (they hold for what
    starts or compiles afterwards).

    kernels: "cpu_tuned" registers threefry's unrolled CPU lowering (same bits, fused by XLA);
      "reference" puts JAX's own back (`model.kernels`).
    keep_freed_memory: glibc's malloc keeps freed memory for reuse (no page faults from step to
      step, `cpu.memory`); None: yes unless DEEBERT_KEEP_FREED_MEMORY=0.
    threads: XLA's CPU intra-op threads (PJRT_NPROC), before its client starts.
    share_accelerator_memory: JAX does not claim most of an accelerator's memory up front, so
      PyTorch fits beside it (XLA_PYTHON_CLIENT_PREALLOCATE=false unless set).
    quiet_orbax: drop the tracebacks a failed orbax read leaves behind (`silence_closed_loop_noise`).
    cpu_inline_dispatch: a CPU program runs on the thread that calls it, not handed to a worker
      thread and waited for (jax_cpu_enable_async_dispatch off): the serving engine reads every
      step's results at once, and the hand-over cost it ~100 us a step (`train.benchmark_engine_step`).
    """
    check_kernels(kernels)
    # DEEBERT_KEEP_FREED_MEMORY=0 in the environment wins (`cpu.memory.keep_freed_memory`).
    kept = memory.keep_freed_memory() if keep_freed_memory is not False else memory.applied()
    unrolled = threefry.register_threefry_lowering(unrolled=kernels == "cpu_tuned") and kernels == "cpu_tuned"
    if threads is not None:
        if threads < 1:
            raise InputError(f"--threads={threads}: must be >= 1")
        os.environ["PJRT_NPROC"] = os.environ["NPROC"] = str(threads)
    if share_accelerator_memory:
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    if quiet_orbax:
        silence_closed_loop_noise()
    # The tokenizers need no PyTorch; without it, importing transformers advises installing it: a
    # stray line on every command of a plain `pip install deebert-jax` (set it empty to see the advice).
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    if cpu_inline_dispatch:
        import jax
        jax.config.update("jax_cpu_enable_async_dispatch", False)   # read when the CPU client starts
    return ProcessSettings(kept, unrolled, threads, quiet_orbax, skip_absent_tpu(), cpu_inline_dispatch)


def setup_serving_process(*, threads: int | None = None) -> ProcessSettings:
    """`setup_process` as a server runs: CPU programs on the calling thread, and glibc's malloc left
    as it is. A serving step's temporaries are small (the pools are donated, updated in place), so
    keeping freed memory saves no page faults there, while its one arena shared by every thread
    and its fragmented heap slow each step's many small allocations (docs/performance.md, "Host
    work per engine step")."""
    return setup_process(threads=threads, cpu_inline_dispatch=True, keep_freed_memory=False)


def tpu_chips_attached() -> int:
    """TPU chips on this machine's PCI bus (Google's vendor id), counted as JAX counts them."""
    count = 0
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor, encoding="ascii") as f:
                count += f.read().strip() == "0x1ae0"
        except OSError:
            continue
    return count


def libtpu_installed() -> bool:
    return importlib.util.find_spec("libtpu") is not None


def skip_absent_tpu() -> bool:
    """With libtpu installed (the `tpu` extra, for `train.plan`) JAX tries a TPU backend first and,
    on a machine with no TPU, libtpu prints what it could not find on stderr before JAX falls
    back. Where there is no TPU and no NVIDIA GPU, and nobody chose JAX's platforms, the CPU is
    named as the platform instead: the same devices as before, nothing new on stderr. Compiling
    for a TPU slice (`planning.chips`) loads libtpu on its own and is not affected."""
    if os.environ.get("JAX_PLATFORMS") or not libtpu_installed():
        return False
    if tpu_chips_attached() or glob.glob("/dev/nvidia[0-9]*"):
        return False
    import jax
    if jax.config.jax_platforms:
        return False
    jax.config.update("jax_platforms", "cpu")
    return True


def _is_closed_loop_noise(unraisable) -> bool:
    exc = unraisable.exc_value
    if not (isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"):
        return False
    frames = [f.f_code.co_name for f, _ in traceback.walk_tb(unraisable.exc_traceback)]
    return "call_soon_threadsafe" in frames


class _OrphanedReadFilter(logging.Filter):
    """Drops asyncio's "... exception was never retrieved" for orbax's abandoned tensorstore reads
    (their errors are absl statuses: 'NOT_FOUND: ...', 'OUT_OF_RANGE: ...')."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (str(record.msg).split("\n", 1)[0].endswith("exception was never retrieved")
                    and isinstance(exc, ValueError) and re.match(r"[A-Z_]+: ", str(exc)))


def silence_closed_loop_noise() -> None:
    """Drops the tracebacks a failed orbax read leaves behind after its error is raised.

    Orbax runs a read in a fresh event loop and closes it as soon as one tensorstore read fails.
    The reads still in flight then finish on tensorstore threads: waking the closed loop
    (`call_soon_threadsafe`) raises `RuntimeError: Event loop is closed`, which Python reports
    through `sys.unraisablehook`, and a second failed read is logged by asyncio as "Task exception
    was never retrieved" when its task is collected; both possibly after `restore` has returned.
    This drops exactly those two reports and passes every other one on. Idempotent.
    """
    asyncio_log = logging.getLogger("asyncio")
    if not any(isinstance(f, _OrphanedReadFilter) for f in asyncio_log.filters):
        asyncio_log.addFilter(_OrphanedReadFilter())
    previous = sys.unraisablehook
    if getattr(previous, "_deebert_filter", False):
        return

    def hook(unraisable):
        if not _is_closed_loop_noise(unraisable):
            previous(unraisable)

    hook._deebert_filter = True
    sys.unraisablehook = hook


