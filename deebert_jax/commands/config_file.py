"""`--config FILE[:ARGS]` and its `--config.FIELD=VALUE` overrides on an argparse command line.

Every command parses its flags with argparse. A command that takes a config file adds `--config`
here; the file and the overrides go to ml_collections' `config_flags` (on a private absl
`FlagValues`, so nothing global is defined), which loads the file, calls `get_config(ARGS)` and
parses each override to its field's type. Its errors become one line `error: ...` (exit 1).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from absl import flags as absl_flags
from ml_collections import config_flags

from deebert_jax.commands.cli import debug_requested, one_line

PREFIX = "--config."


def add_config_argument(parser: argparse.ArgumentParser, default: str | None = None,
                        help: str = "config file (configs/*.py[:ARGS])") -> None:
    parser.add_argument("--config", default=default, metavar="FILE[:ARGS]",
                        help=help + "; then --config.FIELD=VALUE overrides a field")


def parse_args_with_config(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None, *,
                           lock_config: bool = True) -> argparse.Namespace:
    """`parser.parse_args`, and the config: `args.config` the loaded ConfigDict (None without
    `--config`), `args.config_file` what `--config` named (FILE[:ARGS]) and `args.config_overrides`
    the `--config.FIELD[=VALUE]` arguments in order. Other unknown arguments are argparse's error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args, extra = parser.parse_known_args(argv)
    overrides, unknown = split_overrides(extra)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    args.config_file, args.config_overrides = args.config, overrides
    if args.config is None:
        if overrides:
            parser.error(f"{overrides[0].split('=')[0]} needs --config FILE")
        return args
    debug = debug_requested(argv) or debug_requested()   # cli.run passes argv without --debug
    args.config = load_config(args.config, overrides, lock_config=lock_config, debug=debug)
    return args


def split_overrides(extra: Sequence[str]) -> tuple[list[str], list[str]]:
    """Unknown arguments -> (the `--config.FIELD=VALUE` / `--config.FIELD VALUE` ones, the rest)."""
    overrides, rest, i = [], [], 0
    while i < len(extra):
        arg = extra[i]
        if arg.startswith(PREFIX) and len(arg) > len(PREFIX):
            if "=" not in arg and i + 1 < len(extra) and not extra[i + 1].startswith("--"):
                overrides.append(f"{arg}={extra[i + 1]}")
                i += 1
            else:
                overrides.append(arg)
        else:
            rest.append(arg)
        i += 1
    return overrides, rest


def load_config(spec: str, overrides: Sequence[str] = (), *, lock_config: bool = True, debug: bool = False):
    """FILE[:ARGS] and its overrides -> the ConfigDict; a bad file, ARGS or override -> one line
    `error: ...` on stderr and exit 1 (`debug`: the exception)."""
    argv = ["prog", f"--config={spec}", *overrides]
    values = absl_flags.FlagValues()
    holder = config_flags.DEFINE_config_file("config", None, "", flag_values=values, sys_argv=argv,
                                             lock_config=lock_config)
    try:
        values(argv)
    except (absl_flags.Error, OSError, AttributeError, KeyError, TypeError, ValueError) as e:
        if debug:
            raise
        print(f"error: {_config_error(e)}", file=sys.stderr)
        sys.exit(1)
    return holder.value


def _config_error(e: BaseException) -> str:
    text = str(e).strip()
    if isinstance(e, (AttributeError, KeyError)):   # config_flags: an override of a field the config lacks
        return f"the config has no field {text.strip(chr(34) + chr(39))!r} (--config.FIELD=VALUE)"
    if "Traceback" in text or isinstance(e, OSError):
        # config_flags folds a config file's traceback (or the paths it tried) into the message;
        # its last line says what is wrong.
        text = text.splitlines()[-1].strip()
        text = text.split(": ", 1)[1] if text.split(":")[0].endswith(("Error", "Exception")) else text
    return one_line(ValueError(text))
