"""Every ``syncbus`` command and group teaches by example in its ``--help``.

The command tree is walked from the typer app itself, so a command added later is
checked without touching this file: its help needs a line that starts with
``syncbus <its command path>`` (optionally after ``Example:`` / ``Examples:``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from bus.cli.main import cli

#: Box-drawing and padding characters rich puts around help text.
_FRAME = " │┃║\t"
_PREFIXES = ("Examples:", "Example:")


def _commands(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every visible command path below ``command``, groups included, depth first."""
    yield path
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        if not getattr(sub, "hidden", False):
            yield from _commands(sub, (*path, name))


COMMANDS = list(_commands(typer.main.get_command(cli)))


def _help(path: tuple[str, ...]) -> str:
    result = CliRunner().invoke(cli, [*path, "--help"], env={"COLUMNS": "200", "NO_COLOR": "1"})
    assert result.exit_code == 0, f"syncbus {' '.join(path)} --help failed:\n{result.output}"
    return result.output


def _example_lines(text: str, path: tuple[str, ...]) -> list[str]:
    """Lines of ``text`` that show ``syncbus <path> …`` being run."""
    stem = " ".join(("syncbus", *path))
    found = []
    for raw in text.splitlines():
        line = raw.strip(_FRAME)
        for prefix in _PREFIXES:
            if line.startswith(prefix):
                line = line[len(prefix):].strip()
        if line == stem or line.startswith(stem + " "):
            found.append(line)
    return found


def test_the_walk_finds_nested_commands():
    # Given the CLI as shipped, When walked, Then groups and their sub-commands are found.
    assert () in COMMANDS
    assert ("tx",) in COMMANDS and ("tx", "list") in COMMANDS
    assert ("emulate", "dataverse") in COMMANDS and ("link", "pause") in COMMANDS


def test_a_help_without_an_example_is_caught():
    # The check itself must be able to fail: a summary alone, or an example of
    # another command, is not an example of this one.
    assert _example_lines("Show one transaction.\n", ("tx", "show")) == []
    assert _example_lines("Example: syncbus tx list -c s.yaml", ("tx", "show")) == []
    assert _example_lines("Example: syncbus tx listing -c s.yaml", ("tx", "list")) == []
    assert _example_lines("│ Examples: syncbus tx show -c s.yaml 3f2a │", ("tx", "show")) == [
        "syncbus tx show -c s.yaml 3f2a"]


@pytest.mark.parametrize("path", COMMANDS, ids=lambda p: " ".join(("syncbus", *p)))
def test_help_has_a_summary_and_an_example(path: tuple[str, ...]):
    text = _help(path)
    name = " ".join(("syncbus", *path))
    summary = [line.strip(_FRAME) for line in text.splitlines()
               if line.strip(_FRAME) and not line.strip(_FRAME).startswith("Usage:")]
    assert summary and not summary[0].startswith(("╭", "Usage")), f"{name}: no summary line"
    assert _example_lines(text, path), (
        f"{name} --help shows no example: add a line starting with "
        f"'Example: {name} …' to its docstring or help text\n{text}")
