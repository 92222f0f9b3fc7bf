"""Logging setup: structlog events, JSON when not on a terminal, readable on one.

Every line is an event with fields (``log.info("batch_applied", link=…, count=…)``);
lines about a change carry the event id, link, entity and key. Secrets never go in:
URLs are redacted before they are logged, and a last processor masks any password
left inside a URL in a string field.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

from bus.core.redact import redact_text

__all__ = ["configure_logging"]


def _redact(_logger: Any, _method: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key, value in event.items():
        if isinstance(value, str) and "://" in value:
            event[key] = redact_text(value)
    return event


class _Stderr:
    """Whatever ``sys.stderr`` is when a line is written (not when logging was set up).

    A command run inside another program (a test runner's captured CLI, an embedding
    application) may swap stderr and close it afterwards; lines then follow the swap.
    """

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


def configure_logging(level: str = "info", fmt: str = "auto") -> None:
    """Configure structlog (and stdlib logging of libraries) once per process.

    Args:
        level: debug, info, warning or error.
        fmt: ``json``, ``console`` or ``auto`` (console on a terminal, else JSON).
    """
    use_json = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    numeric = logging.getLevelNamesMapping().get(level.upper(), logging.INFO)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info if use_json else structlog.processors.StackInfoRenderer(),
            _redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=_Stderr()),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=_Stderr(),
                        format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("pika", "amqp", "kombu"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
