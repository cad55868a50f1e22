"""The training configs, installed with the package: `deebert-train --config FILE` reads one by
its path (ml_collections `config_flags`), so an installed user needs the files themselves.
`python -m deebert_jax.configs NAME` prints the path of `NAME.py` (`tiny`, `glue`, ...); in a
checkout `configs/NAME.py` names the same config. Importing this package loads nothing.
"""

from __future__ import annotations

import os

HERE = os.path.dirname(os.path.abspath(__file__))


def path(name: str) -> str:
    """The file of the training config `name` (e.g. "tiny" or "glue.py"); FileNotFoundError naming the choices."""
    file = os.path.join(HERE, name if name.endswith(".py") else f"{name}.py")
    if os.path.basename(file) in ("__init__.py", "__main__.py", "common.py") or not os.path.isfile(file):
        raise FileNotFoundError(f"no training config {name!r}; installed: {', '.join(names())}")
    return file


def names() -> list[str]:
    return sorted(f[:-3] for f in os.listdir(HERE) if f.endswith(".py") and not f.startswith("_") and f != "common.py")
