"""Writes to Business Central: upserts by key and deletes, in JSON ``$batch`` requests.

Features
    * Upsert by ``number`` (or any key the link maps, e.g. ``email``; or the page key):
      one ``$batch`` of GETs finds each record and its ETag, one ``$batch`` of
      ``PATCH`` (``If-Match: <ETag>``) / ``POST`` writes them — two requests per
      ``batch_size`` (≤ 100) rows. Values are converted to the page's EDM types
      (Business Central has no NULL: None becomes the type's empty value); read-only
      properties are left out.
    * A stale ETag (``Request_EntityChanged``, 409 or 412), a record deleted or created
      between lookup and write: the record is read again and the conflict hook decides
      (default: retry once); when it gives up, the outcome is permanent with Business
      Central's message.
    * 429 and 5xx inside a batch: the host's throttle backs off (jittered, shared) and
      the operations are tried again, up to ``max_retries``; then they are ``TRANSIENT``.
      All rounds of one call fit in ``MAX_RETRY_SECONDS`` (:mod:`connectors._http`): a
      backoff that would not fit ends the call, the outcomes ``TRANSIENT`` with
      ``retry_after``, and the bus's retry queues wait instead.
    * Every outcome is classified: applied, transient (408, 429, 5xx) or permanent
      (any other 4xx, with Business Central's code and message).

Configuration
    ``batch_size`` (≤ 100), ``max_retries``, ``conflict`` of the connection; a custom
    :data:`ConflictHook` can be passed to the connector.

Limits
    * Rows are written independently (no ``Isolation: snapshot``): one bad row does not
      fail its batch.
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import date, datetime
from decimal import Decimal, InvalidOperation
from typing import Any

from connectors._http import retry_budget, retry_time_left
from connectors.base import ConnectorUnavailable, Outcome, OutcomeStatus, TransientError, WriteRow
from connectors.business_central.client import BCClient, quote_key
from connectors.business_central.metadata import FieldMeta, PageInfo

__all__ = ["ConflictHook", "Writer", "fail_on_conflict", "key_literal", "key_value", "retry_once"]

#: ``(entity, row, current)`` → the row to write again, or None to give up. ``current``
#: is the record as Business Central holds it now (None when it is gone). Conflict
#: policies of later versions plug in here.
ConflictHook = Callable[[str, WriteRow, dict[str, Any] | None], WriteRow | None]
_TRANSIENT = {408, 429}
_GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_EMPTY: dict[str, Any] = {"Edm.String": "", "Edm.Guid": "00000000-0000-0000-0000-000000000000",
                          "Edm.Decimal": 0, "Edm.Double": 0, "Edm.Int32": 0, "Edm.Int64": 0,
                          "Edm.Boolean": False, "Edm.Date": "0001-01-01",
                          "Edm.DateTimeOffset": "0001-01-01T00:00:00Z"}


def retry_once(entity: str, row: WriteRow, current: dict[str, Any] | None) -> WriteRow | None:
    """The default policy: write our values again over the fresh ETag (last writer wins)."""
    return row


def fail_on_conflict(entity: str, row: WriteRow, current: dict[str, Any] | None) -> None:
    """Give up at once: the outcome is permanent with Business Central's message."""
    return None


class _Unconvertible(ValueError):
    pass


@dataclass(slots=True)
class _Task:
    index: int
    row: WriteRow
    op: str
    conflicts: int = 0
    failures: int = 0
    last: Outcome | None = None


class Writer:
    """Upserts and deletes for one connection.

    Args:
        client: The environment.
        batch_size: Operations per ``$batch`` (≤ 100).
        on_conflict: The conflict hook (default :func:`retry_once`).
    """

    def __init__(self, client: BCClient, batch_size: int,
                 on_conflict: ConflictHook = retry_once) -> None:
        self.client, self.batch_size, self.on_conflict = client, batch_size, on_conflict
        self.attempts = client.config.max_retries

    def upsert(self, page: PageInfo, rows: Sequence[WriteRow]) -> list[Outcome]:
        """Insert or update ``rows`` by their key; one outcome per row, in order.

        Raises:
            ConnectorUnavailable: Business Central cannot be reached.
            PermanentError: the credentials are refused.
        """
        return self._run(page, [_Task(i, r, "upsert") for i, r in enumerate(rows)])

    def delete(self, page: PageInfo, keys: Sequence[dict[str, Any]]) -> list[Outcome]:
        """Delete records by key (missing ones count as applied); one outcome per key.

        Raises:
            ConnectorUnavailable: Business Central cannot be reached.
            PermanentError: the credentials are refused.
        """
        return self._run(page, [_Task(i, WriteRow(k, {}), "delete") for i, k in enumerate(keys)])

    # -- rounds -----------------------------------------------------------------------

    def _run(self, page: PageInfo, tasks: list[_Task]) -> list[Outcome]:
        outcomes: list[Outcome | None] = [None] * len(tasks)
        throttle = self.client.throttle
        with retry_budget(clock=throttle.clock):
            for start in range(0, len(tasks), self.batch_size):
                todo = tasks[start:start + self.batch_size]
                while todo:
                    self._round(page, todo, outcomes)
                    todo = [t for t in todo if outcomes[t.index] is None]
                    failed = [t.last for t in todo
                              if t.last is not None and t.last.status is OutcomeStatus.TRANSIENT]
                    if failed:
                        throttle.backoff(reason=failed[0].error)
                        if throttle.paused_for > retry_time_left():
                            _defer(todo, outcomes, throttle.paused_for)  # the bus waits instead
                            todo = []
        return [o or Outcome(OutcomeStatus.TRANSIENT, "not attempted") for o in outcomes]

    def _round(self, page: PageInfo, todo: list[_Task], outcomes: list[Outcome | None]) -> None:
        """Look up, write and classify once; unsettled tasks go round again."""
        try:
            found = self._lookup(page, todo)
            ops: list[tuple[_Task, dict[str, Any]]] = []
            for task, hit in zip(todo, found, strict=True):
                if isinstance(hit, Outcome):
                    self._settle(task, hit, outcomes)
                    continue
                op = self._operation(page, task, hit, outcomes)
                if op is not None:
                    ops.append((task, op))
            replies = self.client.batch([op for _, op in ops], api=page.api,
                                        entity=page.entity_set) if ops else []
        except ConnectorUnavailable:
            raise
        except TransientError as exc:
            failed = Outcome(OutcomeStatus.TRANSIENT, exc.message, str(exc.status or ""),
                             retry_after=exc.retry_after)
            for task in todo:
                outcomes[task.index] = failed
            return
        for (task, op), reply in zip(ops, replies, strict=True):
            self._classify(task, op, reply, outcomes)

    def _operation(self, page: PageInfo, task: _Task, hit: dict[str, Any] | None,
                   outcomes: list[Outcome | None]) -> dict[str, Any] | None:
        path = self.client.collection(page.api, page.entity_set).split("/", 1)[1]
        if task.conflicts and task.op == "upsert":
            retried = self.on_conflict(page.entity_set, task.row, hit)
            if retried is None:
                outcomes[task.index] = task.last
                return None
            task.row = retried
        if task.op == "delete":
            if hit is None:
                outcomes[task.index] = Outcome.applied()
                return None
            return {"method": "DELETE", "url": f"{path}({_address(page, hit)})",
                    "headers": {"If-Match": hit.get("@odata.etag", "*")}}
        try:
            body = _payload(page, task.row, create=hit is None)
        except _Unconvertible as exc:
            outcomes[task.index] = Outcome(OutcomeStatus.PERMANENT, str(exc), "conversion")
            return None
        if hit is None:
            return {"method": "POST", "url": path, "body": body}
        return {"method": "PATCH", "url": f"{path}({_address(page, hit)})", "body": body,
                "headers": {"If-Match": hit.get("@odata.etag", "*")}}

    def _classify(self, task: _Task, op: dict[str, Any], reply: dict[str, Any],
                  outcomes: list[Outcome | None]) -> None:
        status = int(reply.get("status", 500))
        if 200 <= status < 300 or (status == 404 and op["method"] == "DELETE"):
            outcomes[task.index] = Outcome.applied()
            return
        code, message = _error(reply)
        outcome = Outcome(OutcomeStatus.PERMANENT, f"{status} {code}: {message}", code)
        conflict = status in (409, 412) or (status == 404 and op["method"] == "PATCH") or \
            code == "Internal_EntityWithSameKeyExists"
        if conflict:
            task.last = outcome
            task.conflicts += 1
            if task.conflicts > 1:
                outcomes[task.index] = outcome
        elif status in _TRANSIENT or status >= 500:
            self._settle(task, Outcome(OutcomeStatus.TRANSIENT, outcome.error, code), outcomes)
        else:
            outcomes[task.index] = outcome

    def _settle(self, task: _Task, outcome: Outcome, outcomes: list[Outcome | None]) -> None:
        if outcome.status is OutcomeStatus.TRANSIENT:
            task.failures += 1
            task.last = outcome
            if task.failures < self.attempts:
                return
        outcomes[task.index] = outcome

    # -- lookups ----------------------------------------------------------------------

    def _lookup(self, page: PageInfo, todo: list[_Task]
                ) -> list[dict[str, Any] | None | Outcome]:
        path = self.client.collection(page.api, page.entity_set).split("/", 1)[1]
        ops, out = [], []
        for task in todo:
            try:
                if set(task.row.key) == {page.key}:
                    value = _literal(page, page.key, task.row.key[page.key])
                    ops.append({"method": "GET", "url": f"{path}({_quote(value)})"})
                else:
                    where = " and ".join(f"{k} eq {_literal(page, k, v)}"
                                         for k, v in task.row.key.items())
                    ops.append({"method": "GET", "url": f"{path}?$filter={_quote(where)}"})
            except _Unconvertible as exc:
                ops.append({})
                out.append(Outcome(OutcomeStatus.PERMANENT, str(exc), "key"))
        real = [op for op in ops if op]
        replies = iter(self.client.batch(real, api=page.api, entity=page.entity_set)
                       if real else [])
        results: list[dict[str, Any] | None | Outcome] = []
        failures = iter(out)
        for op in ops:
            if not op:
                results.append(next(failures))
                continue
            results.append(_found(next(replies), op))
        return results


def _found(reply: dict[str, Any], op: dict[str, Any]) -> dict[str, Any] | None | Outcome:
    status = int(reply.get("status", 500))
    body = reply.get("body") or {}
    if status == 404:
        return None
    if not 200 <= status < 300:
        code, message = _error(reply)
        kind = OutcomeStatus.TRANSIENT if status in _TRANSIENT or status >= 500 \
            else OutcomeStatus.PERMANENT
        return Outcome(kind, f"{status} {code}: {message}", code)
    if "value" not in body:
        return dict(body)
    rows = list(body["value"])
    if len(rows) > 1:
        where = urllib.parse.unquote(op["url"].split("$filter=", 1)[-1])
        return Outcome(OutcomeStatus.PERMANENT, f"the key matches {len(rows)} records "
                       f"({where}); upserts need a unique key",
                       "ambiguous_key")
    return dict(rows[0]) if rows else None


def _error(reply: dict[str, Any]) -> tuple[str, str]:
    body = reply.get("body")
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("code") or reply.get("status")), str(error.get("message") or "")
    return str(reply.get("status")), "no error text"


def _address(page: PageInfo, record: dict[str, Any]) -> str:
    return _quote(quote_key(record[page.key], guid=page.key_is_guid))


def _quote(text: str) -> str:
    """Percent-encode a key or filter for a URL (``+``, ``&``, ``#``, spaces…)."""
    return urllib.parse.quote(text, safe="'(),=")


def _payload(page: PageInfo, row: WriteRow, *, create: bool) -> dict[str, Any]:
    body: dict[str, Any] = {}
    for name, value in {**row.values, **row.key}.items():
        meta = page.fields.get(name)
        if meta is None:
            body[name] = value  # Business Central names the unknown property itself
            continue
        if meta.read_only or (name == page.key and not (create and name in row.key)):
            continue  # the page key is sent only to create a record upserted by that key
        body[name] = _convert(meta, value)
    return body


def key_literal(page: PageInfo, name: str, value: Any) -> str:
    """A key value as a ``$filter`` literal (not URL-encoded), converted as upserts do.

    Raises:
        ValueError: the page has no such field, or the value does not fit it.
    """
    literal = _literal(page, name, value)
    if page.fields[name].type == "Edm.Guid" and not _GUID.fullmatch(literal):
        raise _Unconvertible(f"field {name!r}: {value!r} is not a GUID")
    return literal


def key_value(page: PageInfo, name: str, value: Any) -> Any:
    """A key value as Business Central compares it: converted, text case-folded.

    Raises:
        ValueError: the page has no such field, or the value does not fit it.
    """
    meta = page.fields.get(name)
    if meta is None:
        raise _Unconvertible(f"{page.entity_set} has no field {name!r}")
    converted = _convert(meta, value)
    return converted.casefold() if isinstance(converted, str) else converted


def _literal(page: PageInfo, name: str, value: Any) -> str:
    meta = page.fields.get(name)
    if meta is None:
        raise _Unconvertible(f"{page.entity_set} has no field {name!r} to look records up by")
    converted = _convert(meta, value)
    if meta.type == "Edm.String":
        return quote_key(converted, guid=False)
    if meta.type == "Edm.Boolean":
        return "true" if converted else "false"
    return str(converted)


def _convert(meta: FieldMeta, value: Any) -> Any:
    """A JSON-shaped value in the form Business Central wants for ``meta``'s type."""
    t = meta.type
    if value is None:
        return _EMPTY.get(t)
    try:
        if t in ("Edm.String", "Edm.Guid"):
            text = value if isinstance(value, str) else str(value)
            return text.lower() if t == "Edm.Guid" else text
        if t in ("Edm.Decimal", "Edm.Double"):
            number = Decimal(str(value))
            return int(number) if number == number.to_integral_value() else float(number)
        if t in ("Edm.Int32", "Edm.Int64", "Edm.Int16", "Edm.Byte"):
            return int(str(value))
        if t == "Edm.Boolean":
            if isinstance(value, str):
                return value.strip().lower() in ("true", "1", "yes")
            return bool(value)
        if t == "Edm.Date":
            text = value.isoformat() if isinstance(value, date) else str(value)
            return date.fromisoformat(text[:10]).isoformat()
        if t == "Edm.DateTimeOffset":
            text = value.isoformat() if isinstance(value, datetime) else str(value)
            parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
            return parsed.isoformat().replace("+00:00", "Z") if parsed.tzinfo else text + "Z"
    except (ValueError, InvalidOperation, TypeError) as exc:
        raise _Unconvertible(f"field {meta.name!r}: cannot convert {value!r} to {t}") from exc
    return value


def _defer(todo: Sequence[_Task], outcomes: list[Outcome | None], wait: float) -> None:
    """Settle ``todo`` as transient now, asking the bus to retry after ``wait`` seconds."""
    for task in todo:
        last = task.last if task.last is not None and task.last.status is OutcomeStatus.TRANSIENT \
            else Outcome(OutcomeStatus.TRANSIENT, "not attempted")
        outcomes[task.index] = replace(last, retry_after=max(last.retry_after or 0.0, wait))
