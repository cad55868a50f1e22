"""Keep freed memory in the process, so XLA's CPU buffers are reused rather than faulted in anew.

A MiniLM-L6 training step (batch 32, length 128) allocates about 1.3 GB of temporaries. glibc's
malloc hands blocks that large out as fresh `mmap`s and returns them on free, so every step paid
some 300,000 page faults (0.7 s of system time a step on the 2-core dev box) and first-touch costs
in the kernels themselves (`git log -p -- docs/performance-history.md`). With one arena, no `mmap`
for large blocks and no trimming, the heap keeps its peak and the next step reuses it: no page
faults after the first step.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_MAX, _M_ARENA_MAX = -1, -4, -8
_applied = False
# "0": never, not even when called (`cpu.process.setup_process` calls it for every command).
ENV = "DEEBERT_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """glibc on Linux: one malloc arena, large blocks from the heap, never trimmed -> True.
    Elsewhere, or with DEEBERT_KEEP_FREED_MEMORY=0 in the environment, nothing is done -> False.

    Process-wide, and only for threads that have not allocated yet: a thread that already has an
    arena of its own keeps it, and such an arena still maps large blocks afresh. Call it before JAX
    runs anything (XLA's CPU threads start with its client): the command-line entry points do, in
    `setup_process`. The price: the process keeps its peak heap until it exits.
    """
    global _applied
    if _applied:
        return True
    if not sys.platform.startswith("linux") or os.environ.get(ENV, "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):   # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    _applied = all(mallopt(param, value) == 1 for param, value in
                   ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
    return _applied


def applied() -> bool:
    """Whether `keep_freed_memory` has taken effect in this process."""
    return _applied
