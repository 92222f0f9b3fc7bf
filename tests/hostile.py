"""Hostile messages: what a foreign or broken publisher can put on the bus.

Each case is published with py-amqp (it can send floats and deep tables in headers,
and ``content_encoding``), under a message id naming the case, next to valid ones.
``reason`` is a piece of the text the operator tools must show for an unreadable body
(None: the body is readable, only something else about the message is odd).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import amqp
from kombu import Connection

from schemas.event import dumps, new_event

__all__ = ["Case", "dead_letter_headers", "event_body", "hostile_cases", "publish",
           "valid_cases"]

#: Levels of the deeply nested header table (more than the AMQP clients' 1,000 frames).
DEEP_HEADER_LEVELS = 2_000
#: A 5 MB body.
BIG = 5 * 1024 * 1024


@dataclass(frozen=True)
class Case:
    """One message to publish."""

    message_id: str | None
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    properties: dict[str, Any] = field(default_factory=dict)
    #: Expected piece of the unreadable reason; None when the body is readable.
    reason: str | None = None


def event_body(key: int | str, *, record: dict[str, Any] | None = None) -> bytes:
    """A valid change event of ``src.items`` for ``{"id": key}``."""
    return dumps(new_event(
        connection="src", entity="items", op="upsert", key={"id": key}, version=1,
        record=record or {"id": key, "name": f"n-{key}", "qty": 1, "price": "1.00",
                          "updated": None},
        modified_at=None, cursor=None))


def dead_letter_headers(**extra: Any) -> dict[str, Any]:
    """The headers the link consumer puts on a dead letter of link ``items``."""
    return {"x-syncbus-link": "items", "x-syncbus-queue": "syncbus.link.items.a2b",
            "x-syncbus-routing-key": "src.items.upsert", "x-syncbus-error": "boom",
            "x-syncbus-error-class": "RecordRejected", "x-syncbus-attempts": 1,
            "x-syncbus-last-failure": "2026-01-01T00:00:00+00:00", **extra}


def valid_cases() -> list[Case]:
    """Two well-formed dead letters (keys 1 and 2)."""
    return [Case(f"valid-{k}", event_body(k), dead_letter_headers()) for k in (1, 2)]


def hostile_cases() -> list[Case]:
    """Every kind of body and header the tools must survive."""
    deep: dict[str, Any] = {}
    for _ in range(DEEP_HEADER_LEVELS):
        deep = {"a": deep}
    hdrs = dead_letter_headers
    return [
        Case("deep-json", b"[" * 100_000, hdrs(), reason="nested deeper than 64 levels"),
        Case("not-json", b"not json {", hdrs(),
             reason="not JSON: Expecting value at line 1 column 1"),
        Case("empty", b"", hdrs(), reason="empty body"),
        Case("encoded-empty", b"", hdrs(), {"content_encoding": "utf-8"}, reason="empty body"),
        Case("bad-utf8", b'{"id": "\xff\xfe"}', hdrs(), reason="not UTF-8"),
        Case("not-object", b"[1, 2, 3]", hdrs(), reason="not a JSON object but an array"),
        Case("blob", bytes(range(256)) * (BIG // 256), hdrs(), reason="not UTF-8"),
        Case("nul", b'{"id": "a\x00b"}', hdrs(), reason="not JSON: Invalid control character"),
        Case("nan", b'{"id": NaN}', hdrs(), reason="not JSON: NaN is not a JSON number"),
        # An integer id (and no message id), an integer entity, a list as the key.
        Case(None, b'{"id": 5, "data": {"entity": 7, "op": 1, "key": [9], "version": [1]}}',
             hdrs()),
        Case("attempts-abc", event_body(10), hdrs(**{"x-syncbus-attempts": "abc"})),
        Case("history-not-list", event_body(11), hdrs(**{"x-syncbus-history": "nope"})),
        Case("round-float", event_body(12), hdrs(**{"x-syncbus-round": 1.5})),
        Case("round-bytes", event_body(13), hdrs(**{"x-syncbus-round": b"\xff\x00"})),
        Case("round-table", event_body(14), hdrs(**{"x-syncbus-round": {"a": [1, {"b": 2}]}})),
        Case("error-bytes", event_body(15), hdrs(**{"x-syncbus-error": b"\xff bad \x00"})),
        Case("death-garbage", event_body(16), {"x-death": "garbage", "x-syncbus-link": "items"}),
        Case("deep-header", event_body(17), hdrs(**{"x-syncbus-history": [deep]})),
        Case("foreign-encoded", event_body(18), hdrs(), {"content_encoding": "utf-8"}),
        Case("markup", event_body("[/bold]\x1b[2J"),
             hdrs(**{"x-syncbus-error": "[/red] \x1b[31mred\u202e"})),
        Case("big-event", event_body(19, record={"id": 19, "name": "x" * BIG}), hdrs()),
    ]


def publish(amqp_url: str, exchange: str, routing_key: str, cases: list[Case]) -> None:
    """Publish ``cases`` with publisher confirms (each is in its queues on return)."""
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(max(limit, 5 * DEEP_HEADER_LEVELS))  # py-amqp encodes recursively
    try:
        with Connection(amqp_url) as conn:
            channel: amqp.Channel = conn.default_channel
            for case in cases:
                props = {"delivery_mode": 2, **case.properties}
                if case.message_id is not None:
                    props["message_id"] = case.message_id
                message = amqp.Message(case.body, application_headers=case.headers, **props)
                channel.basic_publish_confirm(message, exchange=exchange,
                                              routing_key=routing_key)
    finally:
        sys.setrecursionlimit(limit)
