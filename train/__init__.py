"""Command-line entry points (`python -m train.NAME`).

They keep freed memory in the process (`deebert_jax.cpu.memory`), so XLA's CPU buffers are reused
from step to step instead of being faulted in anew: `import deebert_jax` applies it before JAX is
imported when DEEBERT_KEEP_FREED_MEMORY=1, set here unless the user set it (=0 turns it off).
"""

import os

os.environ.setdefault("DEEBERT_KEEP_FREED_MEMORY", "1")
