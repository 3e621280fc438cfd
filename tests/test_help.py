"""Every `inspectd COMMAND --help` shows the default of each option that has one."""

from __future__ import annotations

import argparse
import re

import pytest
from conftest import run_cli

from inspectd.cli import build_parser

COMMANDS = (
    "run",
    "check-config",
    "watch",
    "bench",
    "archive",
    "part",
    "shadow",
    "keys",
    "proxy",
    "bridge",
    "train",
    "convert",
    "export",
    "infer",
    "evaluate",
    "synth",
)


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    (sub,) = (a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _help_of(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The lines --help prints for one action, whitespace-normalised."""
    formatter = parser._get_formatter()
    formatter.add_argument(action)
    return " ".join(formatter.format_help().split())


def _shown(default) -> list[str]:
    return [str(v) for v in default] if isinstance(default, list | tuple) else [str(default)]


def test_every_command_is_covered():
    assert set(_subparsers()) == set(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_every_default(command, capsys):
    """Options that take a value and have a non-None default; flags (store_true) are off unless given."""
    parser = _subparsers()[command]
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([command, "--help"])
    assert exit_.value.code == 0
    printed = " ".join(capsys.readouterr().out.split())
    for action in parser._actions:
        if action.default in (None, argparse.SUPPRESS) or action.nargs == 0:
            continue
        block = _help_of(parser, action)
        assert block in printed
        assert "(default" in block, f"{command} {action.dest}: no default shown: {block!r}"
        for value in _shown(action.default):
            assert value in block.split("(default", 1)[1], f"{command} {action.dest}: {value!r} not in {block!r}"


def test_help_from_the_command_line():
    r = run_cli("infer", "--help")
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())
    assert re.search(r"--batch-size BATCH_SIZE images per forward pass \(default: 8\)", text), text
    assert "builtin:demo" in text
