"""What every command-line entry point shares: list-valued flags and one way to fail.

Each `train.*` command parses its flags, calls the library and prints. A project error (a
`deebert_jax.DeeBertError`: bad data, config, checkpoint or input, a failed run; or an `OSError`
naming a file) becomes one line, `error: ...`, on stderr and exit status 1; `--debug` on the command line or `DEEBERT_DEBUG=1` in
the environment shows the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from deebert_jax.core.errors import DeeBertError

DEBUG_FLAG = "--debug"


def floats(text: str) -> list[float]:
    """'0,0.1 0.5' -> [0.0, 0.1, 0.5] (an argparse type)."""
    try:
        return [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def ints(text: str) -> list[int]:
    """'1,32' -> [1, 32] (an argparse type)."""
    try:
        return [int(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} must be positive")
    return value


def number(ok: Callable[[float], bool], requirement: str) -> Callable[[str], float]:
    """An argparse type: a float for which `ok(value)` holds, else "'TEXT' `requirement`"."""
    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not ok(value):
            raise argparse.ArgumentTypeError(f"{text!r} {requirement}")
        return value
    return parse


confidence_level = number(lambda v: 0 < v < 1, "must be in (0, 1)")


def debug_requested(argv: Sequence[str] | None = None) -> bool:
    argv = sys.argv[1:] if argv is None else argv
    return DEBUG_FLAG in argv or os.environ.get("DEEBERT_DEBUG", "") not in ("", "0")


def without_debug_flag(argv: Sequence[str]) -> list[str]:
    return [a for a in argv if a != DEBUG_FLAG]


def _is_project_error(e: BaseException) -> bool:
    return isinstance(e, (DeeBertError, OSError))


def one_line(e: BaseException) -> str:
    """The message of `e` on one line (multi-line messages folded with ' | ')."""
    text = str(e).strip() or type(e).__name__
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return " | ".join(line.strip() for line in text.splitlines() if line.strip())


def run(main: Callable[[list[str]], int | None], argv: Sequence[str] | None = None) -> int:
    """Calls `main(argv)` (argv without `--debug`) -> its exit status; a project error -> 1 and one line."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = debug_requested(argv)
    try:
        return int(main(without_debug_flag(argv)) or 0)
    except Exception as e:  # noqa: BLE001 - filtered just below
        if debug or not _is_project_error(e):
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1


# --max-seq-length of the commands that pad every dev row to it, when the model records no training length.
DEV_MAX_SEQ_LENGTH = 128


def add_dev_data_flags(parser: argparse.ArgumentParser, limit_help: str = "only the first N dev examples",
                       default_length: int | None = DEV_MAX_SEQ_LENGTH) -> None:
    """--glue-dir, --max-seq-length and --limit, as every command that reads a GLUE dev set takes them.
    `default_length=None`: the command resolves the length from the model
    (`ModelDir.max_seq_length(..., fallback=DEV_MAX_SEQ_LENGTH)`)."""
    parser.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR"),
                        help="local GLUE folder (default $GLUE_DIR; without it the datasets hub)")
    help_length = (None if default_length is not None else
                   f"default: the length the model was trained at, else {DEV_MAX_SEQ_LENGTH} "
                   "or the model's longest input if shorter; a longer one is refused")
    parser.add_argument("--max-seq-length", type=positive_int, default=default_length, help=help_length)
    parser.add_argument("--limit", type=positive_int, default=None, help=limit_help)
