"""One flag system: every command parses with argparse; a config file and its `--config.FIELD`
overrides go through `commands.config_file` (ml_collections underneath)."""

import argparse
import ast
import pathlib

import pytest

from deebert_jax.commands.config_file import add_config_argument, parse_args_with_config, split_overrides
from tests.conftest import REPO

COMMAND_TREES = ["deebert_jax/commands", "benchmarks/commands", "research/commands"]


def _parser():
    parser = argparse.ArgumentParser(prog="t")
    add_config_argument(parser)
    parser.add_argument("--out")
    return parser


def test_overrides_are_split_from_the_rest():
    assert split_overrides(["--config.a=1", "--config.b", "2", "--config.c=x", "--x", "3", "--config.d"]) == (
        ["--config.a=1", "--config.b=2", "--config.c=x", "--config.d"], ["--x", "3"])


def test_a_config_file_with_its_overrides():
    args = parse_args_with_config(_parser(), ["--config", str(REPO / "configs" / "glue.py") + ":model=bert_base",
                                              "--config.train_limit", "7", "--out", "o", "--config.task=RTE"])
    assert (args.config.train_limit, args.config.task, args.out) == (7, "RTE", "o")
    assert args.config.init_checkpoint == "google-bert/bert-base-uncased"
    assert args.config_file.endswith("glue.py:model=bert_base")
    assert args.config_overrides == ["--config.train_limit=7", "--config.task=RTE"]


def test_no_config_and_unknown_flags(capsys):
    assert parse_args_with_config(_parser(), ["--out", "o"]).config is None
    for argv, message in [(["--nope"], "unrecognized arguments: --nope"),
                          (["--config.task=RTE"], "--config.task needs --config FILE")]:
        with pytest.raises(SystemExit) as e:
            parse_args_with_config(_parser(), argv)
        assert e.value.code == 2 and message in capsys.readouterr().err


def test_a_bad_override_is_one_line(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args_with_config(_parser(), ["--config", str(REPO / "configs" / "tiny.py"), "--config.nothing=1"])
    assert e.value.code == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: the config has no field 'nothing' (--config.FIELD=VALUE)"]


def _imports(path: pathlib.Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("tree", COMMAND_TREES)
def test_every_command_parses_with_argparse(tree):
    modules = sorted((REPO / tree).glob("*.py"))
    assert modules, tree
    for path in modules:
        imports = _imports(path)
        if path.relative_to(REPO).as_posix() == "deebert_jax/commands/config_file.py":
            continue   # the one place ml_collections' config_flags (absl) is used
        assert "absl" not in imports, f"{path.relative_to(REPO)} imports absl: parse flags with argparse"
        text = path.read_text()
        if "def main(" in text and ("entry = " in text or "def entry(" in text):
            assert "argparse" in imports or "parse_args_with_config" in text, path.relative_to(REPO)
