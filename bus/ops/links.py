"""Pausing and resuming a link direction by hand (``syncbus link pause|resume NAME``).

The pause flag lives in the state store (``syncbus_links``); every worker reads it
once per second and cancels or restarts that link's consumer. While a link is
paused its detector keeps publishing and its changes wait in its queue, so nothing
is lost; prefetched messages go back to the queue when the consumer is cancelled.
An alert rule (``links.<name>.alert``) sets the same flag.
"""

from __future__ import annotations

import getpass
import socket
from pathlib import Path

from rich.console import Console

from bus.config.load import load_or_report
from bus.state.store import StateStore
from connectors.base import BusError

__all__ = ["operator_name", "set_link_paused"]


def operator_name() -> str:
    """``user@host`` of whoever runs the command (recorded with a pause)."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def set_link_paused(path: Path, name: str, paused: bool, *, reason: str | None = None,
                    console: Console | None = None) -> int:
    """Pause or resume link ``name`` of the config at ``path``.

    Args:
        path: The config file.
        name: A link of that config.
        paused: True to pause, False to resume.
        reason: Why (shown by ``syncbus status``).
        console: Where to print (default: stdout).

    Returns:
        0 done (or already so), 1 state store unreachable, 2 unknown link or invalid config.
    """
    console = console or Console()
    loaded = load_or_report(path, lambda line: console.print(line, markup=False))
    if loaded is None:
        return 2
    config = loaded.config
    if name not in config.links:
        known = ", ".join(sorted(config.links)) or "none"
        console.print(f"unknown link {name!r} (links of {path}: {known})", markup=False)
        return 2
    try:
        state = StateStore(config.state.url)
        try:
            changed = state.set_link_paused(
                name, paused, reason=(reason or "paused by an operator") if paused else None,
                by=operator_name())
        finally:
            state.close()
    except BusError as exc:
        console.print(f"syncbus: {exc.message}", markup=False)
        return 1
    if not changed:
        console.print(f"link {name} is already {'paused' if paused else 'running'}")
    elif paused:
        console.print(f"link {name} paused: workers stop consuming it within a few seconds; "
                      "its changes wait in its queue (nothing is lost)")
    else:
        console.print(f"link {name} resumed: workers consume its queue again within a few "
                      "seconds; replay its errors with `syncbus tx replay --link "
                      f"{name}` if their cause is fixed")
    return 0
