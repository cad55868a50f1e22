"""Directory writes that never lose data: a half-written output never replaces a good one, and a
directory we did not write is never replaced unless the caller says so."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from typing import Callable, Iterable

from deebert_jax.core.errors import DeeBertError


class OutputPathError(DeeBertError, ValueError):
    """An output path we refuse to write: it would replace or contain something we did not write."""


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _inside(path: str, root: str) -> bool:
    """`path` is `root` or below it (both real paths)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """Writes `text` to `path` through a temporary file in the same folder and one rename, so a
    reader sees the old file or the whole new one; nothing else in the folder changes. The file's
    mode follows the umask, as a plain `open` would give."""
    return _atomic_write(path, text, "w", "utf-8")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """`atomic_write_text` for bytes (e.g. a PNG rendered in memory)."""
    return _atomic_write(path, data, "wb", None)


def _atomic_write(path, content, mode: str, encoding: str | None) -> str:
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            f.write(content)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def check_output_file(path: str | os.PathLike) -> str:
    """-> the absolute `path`, if a result file can be written there; checked before long work.

    Refused: an existing directory, and a path whose parent is an existing file. A file we wrote
    before (or any file) is replaced, in one rename, when the new one is complete.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):
        raise OutputPathError(f"{path}: is a directory; name a file to write (e.g. {os.path.join(path, 'results.json')})")
    parent = os.path.dirname(path)
    while parent and not os.path.exists(parent):
        parent = os.path.dirname(parent) if os.path.dirname(parent) != parent else ""
    if parent and not os.path.isdir(parent):
        raise OutputPathError(f"{path}: {parent} is a file, not a directory")
    return path


def check_output_path(path: str | os.PathLike, *, sources: Iterable[str | os.PathLike] = (),
                      is_ours: Callable[[str], bool] | None = None, overwrite: bool = False) -> str:
    """-> the absolute `path`, if writing a directory there (replacing what is there) is safe.

    Refused always: `path` equal to, inside or containing an existing source directory, or
    containing the current directory. Refused unless `overwrite`: an existing file, or a non-empty
    directory for which `is_ours(path)` is false (not a previous output of ours).
    """
    path = os.path.abspath(os.fspath(path))
    real = _real(path)
    for source in sources:
        if source is None or not os.path.exists(source):
            continue
        src = _real(source)
        if _inside(real, src) or _inside(src, real):
            where = "is" if real == src else "is inside" if _inside(real, src) else "contains"
            raise OutputPathError(f"{path}: output directory {where} the source {os.fspath(source)}; "
                                  "choose an output path outside it")
    if _inside(_real(os.getcwd()), real):
        raise OutputPathError(f"{path}: output directory is (or contains) the current directory; "
                              "choose a new path for the output")
    if overwrite or not os.path.lexists(path):
        return path
    if not os.path.isdir(path):
        raise OutputPathError(f"{path}: exists and is not a directory; choose a new path, or pass "
                              "overwrite=True (--overwrite) to replace it")
    entries = sorted(os.listdir(path))
    if entries and not (is_ours is not None and is_ours(path)):
        raise OutputPathError(f"{path}: refusing to replace a directory that is not an output of deebert-jax "
                              f"({len(entries)} entries, e.g. {entries[0]!r}); choose a new path, or pass "
                              "overwrite=True (--overwrite) to replace it")
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, is_ours: Callable[[str], bool] | None = None,
                     overwrite: bool = False, sources: Iterable[str | os.PathLike] = ()):
    """Yields a temporary sibling directory; on success it replaces `path` in one rename.

    `path` must pass `check_output_path(path, sources=..., is_ours=..., overwrite=...)`, checked
    before the caller writes and again just before the rename. On any exception the temporary
    directory is removed and `path` is left as it was.
    """
    sources = list(sources)
    path = check_output_path(path, sources=sources, is_ours=is_ours, overwrite=overwrite)
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=parent)
    try:
        # mkdtemp makes 0700; the output gets the mode any directory the user makes would get.
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        check_output_path(path, sources=sources, is_ours=is_ours, overwrite=overwrite)
        old = None
        if os.path.lexists(path):
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.old-", dir=parent)
            os.rmdir(old)
            os.replace(path, old)
        os.replace(tmp, path)
        if old is not None:
            if os.path.isdir(old) and not os.path.islink(old):
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.remove(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
