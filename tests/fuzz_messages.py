"""Hostile messages for the poison tests: what a foreign or broken AMQP client can send.

:func:`hostile_messages` yields a deterministic (seeded) mix over every category a
link consumer must survive, each with what should become of it:

- ``dead``: dead-lettered with a syncbus reason of the given error class;
- ``applied``: a valid change that must reach the target despite its odd wrapping
  (a ``content_encoding`` the client set, damaged ``x-syncbus-*`` headers, text that
  looks like SQL or HTML); ``values`` is the row it leaves in the ``items`` table.

Messages are for the ``items`` link of :func:`tests.syncenv.make_env` (source ``src``,
entity ``items``, target column types: id integer, name text NOT NULL, qty integer,
price numeric, updated timestamp).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from bus.amqp.integrity import SIGNATURE_HEADER, Signer
from schemas.event import dumps, new_event

__all__ = ["Hostile", "event_body", "hostile_messages"]

#: The header naming each message, so its dead letter can be found again.
FUZZ_ID = "x-fuzz-id"


@dataclass
class Hostile:
    """One message to publish and what must become of it."""

    ident: str
    category: str
    body: bytes
    headers: dict[str, Any] = field(default_factory=dict)
    content_encoding: str | None = None
    content_type: str | None = None
    message_id: str | bytes | None = None
    #: Error class of its dead letter; None for a message that must be applied.
    dead: str | None = None
    #: For an applied message: the row it leaves in the target (id → name, qty).
    values: tuple[int, str, int] | None = None


def event_dict(key: Any, version: Any = 1, *, name: str = "n", qty: int = 1,
               **over: Any) -> dict[str, Any]:
    """A change event of the ``items`` link, overridable field by field."""
    event = new_event(connection="src", entity="items", op="upsert",
                      key={"id": key if isinstance(key, int) else 1}, version=1,
                      record={"id": key, "name": name, "qty": qty, "price": "1.50",
                              "updated": None},
                      modified_at=None, cursor=None)
    event["data"]["key"] = {"id": key}
    event["data"]["version"] = version
    # An id of its own, as the bus would give it (same record key and version, same id):
    # one event per message, even for a key or version new_event could not take.
    event["id"] = str(uuid.uuid5(uuid.NAMESPACE_URL, f"fuzz/{key!r}/{version!r}"))
    for path, value in over.items():
        node = event
        *parents, last = path.split("__")
        if parents[:1] == ["record"]:  # record__name is short for data__record__name
            parents.insert(0, "data")
        for part in parents:
            node = node[part]
        if value is _DROP:
            node.pop(last, None)
        else:
            node[last] = value
    return event


def event_body(key: Any, version: Any = 1, **over: Any) -> bytes:
    return dumps(event_dict(key, version, **over))


_DROP = object()


def hostile_messages(signer: Signer, count: int, *, seed: int = 14,
                     first_key: int = 100_000) -> Iterator[Hostile]:
    """``count`` hostile messages, cycling through every category (see module doc).

    Applied ones use keys from ``first_key`` up, so they never touch real source rows.
    """
    rng = random.Random(seed)
    makers = [getattr(_Maker, name) for name in sorted(vars(_Maker)) if name.startswith("m_")]
    maker = _Maker(signer, rng, first_key)
    for n in range(count):
        msg = makers[n % len(makers)](maker)
        msg.ident = f"fuzz-{n}"
        if msg.category != "undecodable":
            msg.headers[FUZZ_ID] = msg.ident
        yield msg


class _Maker:
    """One method per category; each returns one message (varied by the seed)."""

    def __init__(self, signer: Signer, rng: random.Random, first_key: int) -> None:
        self.signer, self.rng, self.next_key = signer, rng, first_key

    def key(self) -> int:
        self.next_key += 1
        return self.next_key

    def signed(self, category: str, body: bytes, dead: str | None = "SchemaError",
               **kw: Any) -> Hostile:
        headers = {**kw.pop("headers", {}), SIGNATURE_HEADER: self.signer.sign(body)}
        return Hostile("", category, body, headers, dead=dead, **kw)

    # -- bodies py-amqp hands over as str, or that are not text at all ---------------------

    def m_empty(self) -> Hostile:
        encoding = self.rng.choice([None, "utf-8"])
        return Hostile("", "empty", b"", content_encoding=encoding, dead="Unverified")

    def m_encoded_valid(self) -> Hostile:
        """A valid, signed event whose publisher set content_encoding: must be applied."""
        key = self.key()
        body = event_body(key, 1, record__name=f"enc-{key}", record__qty=key % 50)
        msg = self.signed("encoded", body, dead=None,
                          content_encoding=self.rng.choice(["utf-8", "UTF-8", "ascii", "latin-1"]))
        msg.values = (key, f"enc-{key}", key % 50)
        return msg

    def m_encoded_odd(self) -> Hostile:
        """A content_encoding that is no text codec, or a misleading one: still the bytes."""
        key = self.key()
        body = event_body(key, 1, record__name=f"odd-{key}", record__qty=1)
        encoding = self.rng.choice(["gzip", "bogus-codec", "utf-16", "base64"])
        msg = self.signed("encoded", body, dead=None, content_encoding=encoding)
        msg.values = (key, f"odd-{key}", 1)
        return msg

    def m_not_json(self) -> Hostile:
        body = self.rng.choice([b"not json {", b"{\"id\": ", b"<xml/>", b"\x00\x01\x02",
                                bytes(self.rng.randrange(256) for _ in range(64)),
                                b"NaN", b'{"a": Infinity}'])
        return self.signed("not-json", body)

    def m_invalid_utf8(self) -> Hostile:
        body = event_body(self.key()).replace(b'"n"', b'"\xff\xfe"')
        return self.signed("utf8", body)

    def m_nul(self) -> Hostile:
        choice = self.rng.randrange(3)
        if choice == 0:  # an event id with a NUL
            return self.signed("nul", event_body(self.key(), id="abc\u0000def"))
        if choice == 1:  # a NUL in a text value: the target refuses the record
            return self.signed("nul", event_body(self.key(), record__name="a\u0000b"),
                               dead="RecordRejected")
        return self.signed("nul", b"\x00" * 100)

    def m_deep(self) -> Hostile:
        depth = self.rng.choice([40, 600, 1000, 100_000])
        if self.rng.random() < 0.5:
            return self.signed("deep", b"[" * depth + b"]" * depth)
        nested: Any = "x"
        for _ in range(min(depth, 600)):
            nested = [nested]
        return self.signed("deep", event_body(self.key(), record__name=nested))

    def m_huge(self) -> Hostile:
        key = self.key()
        if self.rng.random() < 0.9:  # keep the run short: few 5 MB messages
            msg = self.signed("huge", event_body(key, record__name="x" * 5000, record__qty=2),
                              dead=None)
            msg.values = (key, "x" * 5000, 2)
            return msg
        return self.signed("huge", event_body(key, record__name="x" * (5 * 1024 * 1024)))

    # -- wrong shape, wrong types, wrong meaning -------------------------------------------

    def m_shape(self) -> Hostile:
        key = self.key()
        body = self.rng.choice([
            b"[]", b"42", b'"text"', b"null", b"{}", b'{"data": 1}',
            event_body(key, data__op="merge"),
            event_body(key, type="io.syncbus.change.delete"),
            event_body(key, specversion="0.3"),
            event_body(key, id=12345), event_body(key, id=["x"]), event_body(key, id=""),
            event_body(key, id="has space"), event_body(key, id="x" * 200),
            event_body(key, data__record=_DROP), event_body(key, data__record=[1, 2]),
            event_body(key, data__key=[1]), event_body(key, data__key={}),
            event_body(key, data__key={"id": {"$gt": 1}}),
            event_body(key, data__key={f"k{i}": i for i in range(40)}),
            event_body(key, data=[]),
        ])
        return self.signed("shape", body)

    def m_version(self) -> Hostile:
        version = self.rng.choice(["abc", 1.5, None, [1], {"v": 1}, True, -1, 2**64, ""])
        return self.signed("version", event_body(self.key(), version))

    def m_foreign(self) -> Hostile:
        key = self.key()
        body = self.rng.choice([
            event_body(key, source="/syncbus/other/items"),
            event_body(key, source="/syncbus/src/customers"),
            event_body(key, data__entity="customers"),
            event_body(key, data__origin__connection="elsewhere"),
            event_body(key, data__origin=None),
        ])
        return self.signed("foreign", body)

    def m_values(self) -> Hostile:
        """Values that do not fit their columns: refused by the target, naming the field."""
        key = self.key()
        body = self.rng.choice([
            event_body(key, data__record__qty="twelve"),
            event_body(key, data__record__qty={"n": 1}),
            event_body(key, data__record__price="12,50"),
            event_body(key, data__record__updated="yesterday"),
            event_body(key, data__record__name=None),  # NOT NULL
            event_body(key, data__record__name={"first": "a"}),
        ])
        return self.signed("values", body, dead="RecordRejected")

    # -- integrity ----------------------------------------------------------------------

    def m_unsigned(self) -> Hostile:
        key = self.key()
        body = event_body(key, self.rng.choice([1, 2**63 - 1]))
        headers = self.rng.choice([
            {}, {SIGNATURE_HEADER: "v1=" + "0" * 64}, {SIGNATURE_HEADER: "v2=abc"},
            {SIGNATURE_HEADER: self.signer.sign(event_body(key + 1))},
            {SIGNATURE_HEADER: 12}, {SIGNATURE_HEADER: b"\xff"},
        ])
        return Hostile("", "unsigned", body, dict(headers), dead="Unverified")

    def m_forged_winner(self) -> Hostile:
        """A signed event with a conflict-deciding header added later: not vouched for."""
        body = event_body(self.key())
        msg = self.signed("forged-winner", body, dead="Unverified")
        msg.headers[self.rng.choice(["x-syncbus-winner", "x-syncbus-master"])] = "a"
        return msg

    # -- headers ------------------------------------------------------------------------

    def m_headers(self) -> Hostile:
        """Damaged x-syncbus-* and odd AMQP header values on a valid event: applied.

        (No decimal values: RabbitMQ 3.10 closes the publisher's connection with
        541 INTERNAL_ERROR when one is routed into the history stream.)"""
        key = self.key()
        body = event_body(key, record__name=f"hdr-{key}", record__qty=key % 7)
        forged = self.rng.choice([
            {"x-syncbus-round": "abc"}, {"x-syncbus-attempts": "abc"},
            {"x-syncbus-attempts": -5}, {"x-syncbus-attempts": 10**12},
            {"x-syncbus-retry-since": "garbage"}, {"x-syncbus-retry-since": 1234},
            {"x-syncbus-first-failure": ["x"]}, {"x-syncbus-history": "x"},
            {"x-syncbus-history": [1, "two", None]},
            {"x-syncbus-routing-key": "#" * 300}, {"x-syncbus-queue": "elsewhere"},
            {"x-odd-list": [[[[[[["deep"]]]]]]]}, {"x-odd-float-text": "1e400"},
            {"x-odd-bytes": b"\xff\x00"}, {"x-odd-bool": True}, {"x-odd-none": None},
        ])
        msg = self.signed("headers", body, dead=None, headers=forged)
        msg.values = (key, f"hdr-{key}", key % 7)
        return msg

    def m_headers_on_bad(self) -> Hostile:
        """Odd header values on a message that is dead-lettered: its copy must still go."""
        forged = self.rng.choice([
            {"x-syncbus-round": 10**9, "x-syncbus-retry-since": "2000-01-01T00:00:00+00:00"},
            {"x-syncbus-history": [{"at": 1, "class": [], "error": {}}] * 30},
            {"x-syncbus-routing-key": "not a key with spaces"},
            {"x-odd-table": {"a": {"b": {"c": [1, "2", None, True]}}}},
        ])
        return Hostile("", "headers", b"{}", forged, dead="Unverified")

    def m_injection(self) -> Hostile:
        """Keys and values that look like SQL or markup: stored verbatim or refused."""
        key = self.key()
        if self.rng.random() < 0.5:
            # Unique per message: events of one record key supersede each other.
            text = self.rng.choice(["{}; DROP TABLE items;--", "{}' OR '1'='1", "{} UNION SELECT 1"])
            return self.signed("injection", event_body(text.format(key)), dead="RecordRejected")
        name = self.rng.choice(["Robert'); DROP TABLE items;--", "<script>alert(1)</script>",
                                "${jndi:ldap://x}", "%s%s%n", "\\x00 not a nul"])
        msg = self.signed("injection", event_body(key, record__name=name, record__qty=3),
                          dead=None)
        msg.values = (key, name, 3)
        return msg

    def m_undecodable(self) -> Hostile:
        """A message_id that is not UTF-8: py-amqp cannot decode the properties."""
        return Hostile("", "undecodable", event_body(self.key()), message_id=b"\xff\xfe\xfd",
                       dead="Unreadable")
