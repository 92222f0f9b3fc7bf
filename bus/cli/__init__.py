"""The ``syncbus`` command line: one module per command group (see :mod:`bus.cli.main`).

``bus.cli:main`` is the console script; ``python -m bus.cli`` runs the same.
"""

from __future__ import annotations

__all__ = ["main"]


def main() -> None:
    """Console-script entry point (imports the commands only when called)."""
    from bus.cli.main import main as run  # noqa: PLC0415 - importing bus.cli stays cheap

    run()
