"""bus.amqp.peek: reading any message for display never raises and stays bounded."""

from __future__ import annotations

import json
import struct
import time
from datetime import UTC, datetime
from decimal import Decimal

import amqp.serialization
import pika.data
import pytest

from bus.amqp.peek import (
    MAX_HEADER_DEPTH,
    body_bytes,
    cap_headers,
    harden_amqp_decoders,
    header_history,
    header_int,
    header_text,
    printable,
    read_body,
    read_failure,
)
from schemas.event import dumps, new_event

EVENT = dumps(new_event(connection="crm", entity="customers", op="upsert", key={"id": 7},
                        version=42, record={"id": 7}, modified_at=None, cursor=None))


@pytest.mark.parametrize(("raw", "reason"), [
    (b"[" * 100_000, "nested deeper than 64 levels"),
    (b"[" * 65 + b"]" * 65, "nested deeper than 64 levels"),
    (b'{"a":' * 65 + b"1" + b"}" * 65, "nested deeper than 64 levels"),
    (b"not json {", "not JSON: Expecting value at line 1 column 1"),
    (b'{"a": 1,}', "not JSON: Expecting property name enclosed in double quotes at line 1"),
    (b'{"id": "a\x00b"}', "not JSON: Invalid control character at line 1 column 10"),
    (b"", "empty body"),
    ("", "empty body"),
    (None, "empty body"),
    (b"  \n", "blank body"),
    (b'{"id": "\xff"}', "not UTF-8: invalid start byte at byte 8"),
    (b"\xef\xbb\xbf{}", "not JSON: Unexpected UTF-8 BOM"),
    (b"[1, 2]", "not a JSON object but an array"),
    (b'"text"', "not a JSON object but a string"),
    (b"12", "not a JSON object but a number"),
    (b"null", "not a JSON object but null"),
    (b'{"a": NaN}', "not JSON: NaN is not a JSON number"),
    (b'{"a": 1e999}', "a number too large for JSON"),
    (b'{"a": ' + b"9" * 5000 + b"}", "not JSON: Exceeds the limit (4300 digits)"),
    (12, "a body of type int, not bytes"),
])
def test_an_unreadable_body_says_why_with_its_size_and_escaped_first_bytes(raw, reason):
    body = read_body(raw)
    assert body.unreadable is not None and body.unreadable.reason.startswith(reason)
    assert body.value is None and body.fields.key is None
    assert body.unreadable.size == len(body_bytes(raw) or b"")
    assert body.unreadable.preview.isascii() and body.unreadable.preview.isprintable()
    assert body.unreadable.describe().startswith(f"unreadable ({body.unreadable.size} byte")


def test_the_preview_is_the_first_bytes_escaped():
    body = read_body(b"\x00\x1b[2J\\\n\xff" + b"x" * 1000)
    assert body.unreadable is not None
    assert body.unreadable.preview == r"\x00\x1b[2J\\\n\xff" + "x" * 56


def test_large_and_deep_bodies_take_bounded_time():
    started = time.monotonic()
    for raw in (b"[" * 5_000_000, b"{" * 5_000_000, bytes(range(256)) * 20_000,
                b'{"a": "' + b"x" * 5_000_000 + b'"}', b"[" * 64 + b"0," * 2_000_000 + b"0" +
                b"]" * 64):
        read_body(raw)
    assert time.monotonic() - started < 5
    huge = read_body(b'"' + b"x" * 9_000_000 + b'"')
    assert huge.unreadable and huge.unreadable.reason.startswith("too large to read (9000002")
    assert read_body(b'{"a": 1}', max_bytes=4).unreadable is not None


def test_a_valid_event_gives_its_fields_and_its_json():
    body = read_body(EVENT)
    assert body.unreadable is None and body.value == json.loads(EVENT)
    assert (body.fields.entity, body.fields.op, body.fields.key, body.fields.version) == (
        "customers", "upsert", '{"id":7}', 42)
    assert body.fields.source == "/syncbus/crm/customers" and body.fields.id


def test_odd_types_become_text_and_a_large_body_keeps_no_json():
    body = read_body(b'{"id": 5, "source": ["x"], "data": {"entity": 7, "op": true, '
                     b'"key": "k", "version": {"v": 1.5}}}')
    fields = body.fields
    assert (fields.id, fields.source, fields.entity, fields.op, fields.key, fields.version) == (
        "5", '["x"]', "7", "true", '"k"', '{"v":1.5}')
    assert read_body(b'{"data": 3}').fields.entity is None
    big = read_body(b'{"data": {"key": {"id": 1}}, "pad": "' + b"x" * 100_000 + b'"}')
    assert big.unreadable is None and big.value is None and big.fields.key == '{"id":1}'
    assert big.preview.startswith('{"data"')


def test_str_bodies_from_py_amqp_are_read_as_the_bytes_that_were_sent():
    assert read_body(EVENT.decode()).fields.key == '{"id":7}'
    assert body_bytes("é", "latin-1") == b"\xe9"
    assert body_bytes("é", "no-such-codec") == "é".encode()
    assert body_bytes("\ud800") == b"\xed\xa0\x80"  # a lone surrogate does not raise
    assert body_bytes(bytearray(b"ab")) == b"ab" and body_bytes(memoryview(b"ab")) == b"ab"
    assert body_bytes(object()) is None


def test_header_accessors_never_raise_and_show_what_was_given():
    hdrs = cap_headers({"a": "abc", "b": b"\xff\x00", "c": 1.5, "d": 2.0, "e": " 7 ",
                        "f": True, "g": Decimal("3"), "h": datetime(2026, 1, 1),
                        "i": {"x": [1]}, "j": None, b"\xffk": 1})
    assert [header_int(hdrs, k) for k in "abcdefghij"] == [
        None, None, None, 2, 7, None, 3, None, None, None]
    assert header_text(hdrs, "a") == "abc" and header_text(hdrs, "b") == "\\xff\x00"
    assert header_text(hdrs, "c") == "1.5" and header_text(hdrs, "f") == "true"
    assert header_text(hdrs, "h") == "2026-01-01T00:00:00+00:00"
    assert header_text(hdrs, "i") == '{"x":[1]}' and header_text(hdrs, "j") is None
    assert "\\xffk" in hdrs  # a key that is not UTF-8 becomes text
    assert header_int({"n": "9" * 30}, "n") is None  # no huge numbers from text
    assert header_history({"h": "nope"}, "h") == []
    assert header_history({"h": [{"at": 1, "class": b"X"}, "junk"]}, "h") == [
        {"at": "1", "class": "X"}, {"unreadable": "junk"}]
    assert cap_headers("not a table") == {} and cap_headers(None) == {}


def test_cap_headers_cuts_deep_nesting_without_recursion():
    deep: object = "leaf"
    for _ in range(100_000):
        deep = [deep]
    capped = cap_headers({"x": deep, "t": ({"a": 1},)})
    depth, value = 1, capped["x"]
    while isinstance(value, list):
        depth, value = depth + 1, value[0]
    assert depth == MAX_HEADER_DEPTH and value == f"<nested deeper than {MAX_HEADER_DEPTH} levels>"
    assert capped["t"] == [{"a": 1}]
    json.dumps(capped)  # safe for anything that walks it


def test_read_failure_of_syncbus_and_broker_dead_letters():
    ok = read_failure({"x-syncbus-link": "items", "x-syncbus-error": "boom",
                       "x-syncbus-attempts": 2, "x-syncbus-routing-key": "src.items.upsert"})
    assert (ok.link, ok.error, ok.attempts, ok.routing_key, ok.deliveries) == (
        "items", "boom", 2, "src.items.upsert", None)
    assert read_failure({"x-syncbus-attempts": "abc"}).attempts is None
    assert read_failure({}).attempts == 0

    death = {"x-death": [{"reason": "delivery_limit", "count": 1,
                          "queue": "syncbus.link.items.a2b", "routing-keys": ["src.items.upsert"],
                          "time": datetime(2026, 1, 1, tzinfo=UTC)}],
             "x-delivery-count": 0}  # the dead-letter queue's own count: not the deliveries
    limit = read_failure(death, delivery_limit=20)
    assert (limit.link, limit.routing_key, limit.error_class, limit.deliveries) == (
        "items", "src.items.upsert", "Broker.delivery_limit", 21)
    assert "delivered 21 times without being settled (delivery_limit 20)" in (limit.error or "")
    assert limit.last_failure == "2026-01-01T00:00:00+00:00"
    twice = read_failure({"x-death": [{**death["x-death"][0], "count": 2}]}, delivery_limit=3)
    assert twice.deliveries == 8 and "dead-lettered 2 times, each after 4" in (twice.error or "")
    assert "delivered more often than" in (read_failure(death).error or "")
    expired = read_failure({"x-death": [{"reason": "expired", "queue": "q"}]})
    assert expired.error == "dead-lettered by RabbitMQ from q: its time to live ran out"
    for garbage in ("garbage", [], [1], [{"count": "x", "routing-keys": "no"}]):
        read_failure({"x-death": garbage}, delivery_limit=20)  # never raises


def test_printable_escapes_what_a_terminal_would_obey_and_truncates():
    assert printable("a\x1b[31mb\u202ec\ud800d\te\x00") == (
        "a\\x1b[31mb\\u202ec\\ud800d\\te\\x00")
    assert printable("é ü 中文 [bold]") == "é ü 中文 [bold]"
    assert printable("x" * 100, 10) == "x" * 9 + "…"
    assert printable(b"\xff") == r"\xff" and printable(5) == "5"


def test_hardened_decoders_read_deep_tables_and_impossible_timestamps():
    harden_amqp_decoders()
    harden_amqp_decoders()  # idempotent

    def table(value: bytes) -> bytes:  # {"k": value}
        body = b"\x01k" + value
        return struct.pack(">I", len(body)) + body

    deep = b"V"
    for _ in range(30_000):  # deeper than any recursion limit
        deep = b"A" + struct.pack(">I", len(deep)) + deep
    stamp = b"T" + struct.pack(">Q", 2**63)
    for encoded in (table(deep), table(b"F" + table(stamp))):
        decoded, _ = pika.data.decode_table(encoded, 0)
        item, end = amqp.serialization._read_item(b"F" + encoded, 0)
        assert end == len(encoded) + 1
        for text in (json.dumps(decoded, default=str), json.dumps(item, default=str)):
            assert (f"<nested deeper than {MAX_HEADER_DEPTH} levels>" in text
                    or "<timestamp 9223372036854775808 out of range>" in text), text
    good, _ = pika.data.decode_table(table(b"T" + struct.pack(">Q", 1_767_225_600)), 0)
    assert good == {"k": datetime(2026, 1, 1, tzinfo=UTC)}
