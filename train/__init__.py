"""`python -m train.NAME` in a checkout: each module here stands in for the command that does the work.

The product's commands live in the installed package (`deebert_jax.commands`, also the `deebert-*`
console scripts); the benchmark, profiling and research commands live in `benchmarks/commands` and
`research/commands`, beside the package and not installed. Importing `train.NAME` gives the
command's own module, so `from train import predict` and `train.predict.main` keep working.
Importing this package changes nothing.
"""

from __future__ import annotations

import importlib
import sys


def stand_in(name: str, target: str, **entry_kwargs) -> None:
    """Run as `python -m train.NAME` (`name` "__main__"): the command `target`'s `entry`, then exit
    with its status. Imported: `sys.modules[name]` becomes `target`'s module, so attributes and
    monkeypatching reach the code that runs."""
    module = importlib.import_module(target)
    if name == "__main__":
        sys.exit(module.entry(**entry_kwargs))
    sys.modules[name] = module
