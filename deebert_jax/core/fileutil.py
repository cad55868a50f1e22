"""Directory writes that never lose data: a half-written output never replaces a good one, and a
directory we did not write is never replaced unless the caller says so."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import stat
import tempfile
from typing import Callable, Iterable, Mapping

from deebert_jax.core.errors import DeeBertError


class OutputPathError(DeeBertError, ValueError):
    """An output path we refuse to write: it would replace or contain something we did not write."""


def _real(path: str | os.PathLike) -> str:
    return os.path.realpath(os.path.abspath(os.fspath(path)))


def _inside(path: str, root: str) -> bool:
    """`path` is `root` or below it (both real paths)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


_OS_ERROR_CODE = re.compile(r"os_error_code='?(\d+)")


@contextlib.contextmanager
def storage_errors(path: str | os.PathLike, what: str = "writing"):
    """Inside: an OS error met while writing `path` (a full disk, a quota, a read-only file
    system) becomes an OSError naming `path`, so a command says it in one line: one raised with
    no file name, or a storage library's error that is one underneath (orbax / tensorstore raise
    ValueError("RESOURCE_EXHAUSTED: ... [os_error_code='28']")). The library's own log records
    of such an error (orbax logs each failed background write, with its traceback) are dropped
    meanwhile: the one line says it."""
    quiet = _OsErrorLogFilter()
    loggers = [logging.getLogger(name) for name in ("absl", "orbax")]
    for logger in loggers:
        logger.addFilter(quiet)
    try:
        yield
    except OSError as e:
        if e.filename is not None or e.errno is None:
            raise
        raise OSError(e.errno, f"{e.strerror or e} ({what})", os.fspath(path)) from None
    except (ValueError, RuntimeError) as e:
        match = _OS_ERROR_CODE.search(str(e))
        if match is None:
            raise
        code = int(match.group(1))
        raise OSError(code, f"{os.strerror(code)} ({what})", os.fspath(path)) from None
    finally:
        for logger in loggers:
            logger.removeFilter(quiet)


class _OsErrorLogFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage() + (str(record.exc_info[1]) if record.exc_info and record.exc_info[1] else "")
        return _OS_ERROR_CODE.search(text) is None


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """Writes `text` to `path` through a temporary file in the same folder and one rename, so a
    reader sees the old file or the whole new one; nothing else in the folder changes. The file's
    mode follows the umask, as a plain `open` would give."""
    return _atomic_write(path, lambda f: f.write(text), "w", "utf-8")


def atomic_write_lines(path: str | os.PathLike, lines: Iterable[str]) -> str:
    """`atomic_write_text` of `lines` as they come (a generator: memory does not grow with the
    file); if the iterable raises, nothing replaces `path` and no temporary file is left. (A
    hidden named temporary file, not an unnamed one: the lines cannot be written twice, should
    the unnamed file fail to get a name after them.)"""
    return _atomic_write(path, lambda f: f.writelines(lines), "w", "utf-8", replayable=False)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> str:
    """`atomic_write_text` for bytes (e.g. a PNG rendered in memory)."""
    return _atomic_write(path, lambda f: f.write(data), "wb", None)


def _atomic_write(path, write: Callable, mode: str, encoding: str | None, replayable: bool = True) -> str:
    path = os.path.abspath(os.fspath(path))
    if os.path.isdir(path):   # before anything is created: no temporary file to clean up
        raise OutputPathError(f"{path}: is a directory; name a file to write")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    with storage_errors(path):
        try:
            _write_and_rename(path, write, mode, encoding, unnamed=replayable and _can_write_unnamed())
        except _NoLink:   # a file system without O_TMPFILE links: a named temporary file instead
            _write_and_rename(path, write, mode, encoding, unnamed=False)
    return path


class _NoLink(Exception):
    """An unnamed (O_TMPFILE) file could not be given a name."""


def _can_write_unnamed() -> bool:
    return hasattr(os, "O_TMPFILE") and os.path.isdir("/proc/self/fd")   # the link goes through /proc


def _write_and_rename(path: str, write: Callable, mode: str, encoding: str | None, unnamed: bool) -> None:
    """`write(file)` into a temporary file beside `path`, then one rename. `unnamed`: the file has no
    name until it is complete (Linux O_TMPFILE), so a process killed while writing leaves nothing
    behind (only one killed between the link and the rename could); else a hidden `mkstemp` file."""
    parent, name = os.path.split(path)
    tmp = None
    fd = -1
    if unnamed:
        try:
            fd = os.open(parent, os.O_TMPFILE | os.O_WRONLY, 0o600)
        except OSError:
            raise _NoLink() from None
    else:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=parent)
    try:
        with os.fdopen(fd, mode, encoding=encoding) as f:
            write(f)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            if tmp is None:
                tmp = _link_unnamed(f.fileno(), parent, name)
        os.replace(tmp, path)
    except BaseException:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)
        raise


def _link_unnamed(fd: int, parent: str, name: str) -> str:
    """Gives an O_TMPFILE file a hidden name beside its target -> that path; `_NoLink` if it cannot."""
    # linkat(AT_SYMLINK_FOLLOW) through /proc: os.link calls linkat (not link, which would link the
    # /proc entry itself) when given a directory fd.
    parent_fd = os.open(parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        for _ in range(100):
            tmp = f".{name}.{os.urandom(4).hex()}"
            try:
                os.link(f"/proc/self/fd/{fd}", tmp, dst_dir_fd=parent_fd, follow_symlinks=True)
                return os.path.join(parent, tmp)
            except FileExistsError:
                continue
            except OSError:
                raise _NoLink() from None
    finally:
        os.close(parent_fd)
    raise FileExistsError(f"{parent}: no free temporary name for {name}")


def open_own_file(path: str | os.PathLike, flags: int, mode: int = 0o644) -> int:
    """`os.open(path, flags | O_NOFOLLOW)` for a file we write in place (a lock, an appended log)
    -> its descriptor. Refused in one line: a symlink (a write would land on the file it points at),
    a hard link to another name, or anything but a regular file."""
    path = os.fspath(path)
    try:
        fd = os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as e:
        if os.path.islink(path):
            raise OutputPathError(f"{path}: is a symbolic link (to {os.readlink(path)}); refusing to write "
                                  "through it: remove it, or choose another directory") from None
        raise e
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink > 1:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"a hard link ({st.st_nlink} names)"
        raise OutputPathError(f"{path}: is {what}; refusing to write into it: remove it, or choose another directory")
    return fd


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


def same_path(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether `a` and `b` name one file or directory: the same path after symlinks, or the same
    inode (a hard link)."""
    if _real(a) == _real(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:   # one of them does not exist (yet): not the same file
        return False


def check_outputs_apart(outputs: Mapping[str, str | os.PathLike | None],
                        inputs: Mapping[str, str | os.PathLike | None],
                        reads: Mapping[str, Iterable[str]] | None = None) -> None:
    """Refuses, before any work, an output that is one of the command's inputs.

    `outputs` and `inputs` map a flag (`--out`) to a path (None: not given). An output may not be
    the same file as an input (`same_path`: symlinks and hard links included), nor an input
    directory, nor one of the files `reads[flag]` lists inside input directory `flag` (relative
    names; a listed folder covers what is below it): what the command reads is never overwritten.
    """
    reads = reads or {}
    for out_flag, out in outputs.items():
        if out is None:
            continue
        for in_flag, source in inputs.items():
            if source is None or not os.path.lexists(source):
                continue
            if same_path(out, source):
                raise OutputPathError(f"{os.fspath(out)}: {out_flag} names the same file as {in_flag} "
                                      f"{os.fspath(source)}; write the output somewhere else")
            if _inside(_real(source), _real(out)):
                raise OutputPathError(f"{os.fspath(out)}: {out_flag} would replace {in_flag} {os.fspath(source)}, "
                                      "which is inside it; write the output somewhere else")
            if not os.path.isdir(source):
                continue
            for name in reads.get(in_flag, ()):
                inner = os.path.join(os.fspath(source), name)
                if same_path(out, inner) or _inside(_real(out), _real(inner)):
                    raise OutputPathError(f"{os.fspath(out)}: {out_flag} would overwrite {name} of {in_flag} "
                                          f"{os.fspath(source)}; write the output somewhere else")


def with_siblings(flag: str, path: str | os.PathLike | None, **suffixes: str) -> dict[str, str | None]:
    """`--out` and the files a command derives from it: `with_siblings("--out", "b.json",
    table=".md", plot=".png")` -> {"--out": "b.json", "--out's table": "b.md", "--out's plot": "b.png"}."""
    if path is None:
        return {flag: None}
    stem = os.path.splitext(os.fspath(path))[0]
    return {flag: os.fspath(path), **{f"{flag}'s {kind}": stem + suffix for kind, suffix in suffixes.items()}}


def check_outputs(outputs: Mapping[str, str | os.PathLike | None],
                  inputs: Mapping[str, str | os.PathLike | None] | None = None,
                  reads: Mapping[str, Iterable[str]] | None = None, *,
                  directories: Mapping[str, str | os.PathLike | None] | None = None) -> dict[str, str]:
    """The one output check every command makes, before any work (before a model is loaded):
    each output file (`with_siblings` for the .md / .png written beside one) may be written
    (`check_output_file`), no two outputs are one file, and none is an input or a file an input
    directory holds (`check_outputs_apart`); `directories`, output directories a step replaces,
    are checked apart from the inputs too (neither one of them, inside one's read files, nor
    containing one). -> {flag: absolute path} of the output files given."""
    given = {flag: check_output_file(path) for flag, path in outputs.items() if path is not None and os.fspath(path) != ""}
    flags = list(given)
    for i, a in enumerate(flags):
        for b in flags[i + 1:]:
            if same_path(given[a], given[b]) or given[a] == given[b]:
                raise OutputPathError(f"{os.fspath(outputs[a])}: {a} and {b} name the same file; give each its own path")
    check_outputs_apart({**{flag: outputs[flag] for flag in given}, **(directories or {})}, inputs or {}, reads)
    return given


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
