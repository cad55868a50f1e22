"""The optional packages (pyproject's extras): imported where they are used, and a missing one is
one line naming the extra that installs it rather than a traceback."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from deebert_jax.core.errors import DeeBertError


class MissingDependencyError(DeeBertError, ImportError):
    """An optional package a feature needs is not installed; the message names its extra."""


def _missing(module: str, extra: str, what: str) -> MissingDependencyError:
    return MissingDependencyError(f"{what} needs the {module.split('.')[0]} package: "
                                  f"pip install 'deebert-jax[{extra}]'")


def check_installed(modules: tuple[str, ...], extra: str, what: str) -> None:
    """Before a command's work: each of `modules` can be imported (found, not loaded), else
    MissingDependencyError naming `extra`."""
    for module in modules:
        if importlib.util.find_spec(module) is None:
            raise _missing(module, extra, what)


def require(module: str, extra: str, what: str) -> ModuleType:
    """`import module`, or MissingDependencyError "WHAT needs MODULE: pip install 'deebert-jax[EXTRA]'".
    A missing package *inside* `module` (a broken install) keeps its own error."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] != module.split(".")[0]:
            raise
        raise _missing(module, extra, what) from None
