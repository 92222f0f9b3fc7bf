"""``syncbus --help`` starts at once: the command tree imports no implementation.

Each command imports what it runs when it is called (``bus.cli.main``). A module-level
import of the worker, the broker or a connector in a command module makes every
``syncbus`` call, ``--help`` included, wait for SQLAlchemy, kombu and the HTTP stack
(over a second, where the tree alone takes a tenth). Checked in a fresh interpreter,
since this test process has imported them all already.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.syncenv import ROOT

#: Top-level packages the CLI must not import to build its help. pydantic: the config
#: schema needs it, and typer too, to convert option values (bus.cli.common.Group).
HEAVY = ("sqlalchemy", "kombu", "pika", "amqp", "httpx", "msal", "structlog", "connectors",
         "pydantic")
#: Floors of bus/ the CLI must not import to build its help.
HEAVY_FLOORS = ("bus.worker", "bus.amqp")

#: Imports bus.cli.main, renders the help of ``argv`` and prints sys.modules as JSON;
#: {preload} is run first.
_PROBE = """
import json, sys
{preload}
from typer.testing import CliRunner
from bus.cli.main import cli
result = CliRunner().invoke(cli, sys.argv[1:], env={"COLUMNS": "100", "NO_COLOR": "1"})
assert result.exit_code == 0 and "Usage:" in result.output, result.output
print(json.dumps(sorted(sys.modules)))
"""


def _heavy_modules(*argv: str, preload: str = "") -> list[str]:
    """The heavy modules loaded by building ``syncbus <argv>``'s help, in a new process."""
    probe = _PROBE.replace("{preload}", preload)
    done = subprocess.run([sys.executable, "-c", probe, *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    loaded = json.loads(done.stdout)
    return [name for name in loaded
            if name.split(".")[0] in HEAVY
            or any(name == floor or name.startswith(floor + ".") for floor in HEAVY_FLOORS)]


@pytest.mark.parametrize("argv", [("--help",), ("status", "--help"), ("tx", "stats", "--help")],
                         ids=" ".join)
def test_help_imports_no_implementation(argv: tuple[str, ...]):
    # Given a fresh interpreter, When the help is built, Then nothing heavy was imported.
    assert _heavy_modules(*argv) == []


def test_the_probe_sees_a_heavy_import():
    # The check itself must be able to fail: the implementation of `syncbus run`, imported
    # at module level, would be caught.
    found = _heavy_modules("--help", preload="import bus.cli.app")
    assert {"sqlalchemy", "kombu", "structlog", "bus.worker.worker", "bus.amqp.errors",
            "connectors.base"} <= set(found)


def test_the_cli_copies_of_implementation_constants_agree():
    # The options name these without importing their floors; they must not drift apart.
    from bus.amqp.events import AMQP_URL_ENV, DEFAULT_AMQP_URL
    from bus.cli import common, preview
    from bus.ops.preview import DEFAULT_LIMIT

    assert (common.AMQP_URL_ENV, common.DEFAULT_AMQP_URL) == (AMQP_URL_ENV, DEFAULT_AMQP_URL)
    assert preview.DEFAULT_LIMIT == DEFAULT_LIMIT
