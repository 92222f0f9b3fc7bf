"""Writes: upserts with ``UpsertMultiple``, else through ``$batch``; deletes; per-row outcomes.

Upserts go out as the bulk operation message ``UpsertMultiple`` (``POST
<set>/Microsoft.Dynamics.CRM.UpsertMultiple`` with ``{"Targets": [...]}``), at most
``bulk_size`` records per request, each record named by its primary id in the body or
by ``@odata.id`` with its alternate key. A bulk message is all-or-nothing on a
standard table, so a refused request is split in halves and each half sent again
(bisection) until the failing record is alone: only that record gets Dataverse's
error, the others are written. A table that does not offer the message (see
:func:`bulk_unsupported`) is remembered and written through ``$batch`` from then on.

``$batch`` requests (deletes; upserts when ``bulk_size`` is 0 or the table has no bulk
message) carry at most ``batch_size`` operations, each a ``PATCH <set>(<key>)`` (an
upsert) or a ``DELETE``, with ``Prefer: odata.continue-on-error`` so that one bad row
does not stop the others. Each record's answer becomes its outcome:

========================================  =================================================
answer                                    outcome
========================================  =================================================
2xx; 404 to a DELETE                      APPLIED (a missing row counts as deleted)
412, 400, 403, 405, 413, other 4xx        PERMANENT with Dataverse's message and code
404 to an upsert (an ``@odata.bind``      TRANSIENT: the referenced row may not be synced
target does not exist)                    yet; the bus retries later
429, 5xx, time-out                        retried here (shared throttle, Retry-After),
                                          then TRANSIENT with ``retry_after``
========================================  =================================================

A row whose values cannot be converted to its columns, or whose key is neither the
primary id nor an alternate key, is PERMANENT without being sent.

Features
    * Retries inside the connector resend only the operations that failed
      transiently; a whole request refused with 429/503 is resent as a whole.
    * Bisection costs about 2·log2(n) extra requests per bad record in a bulk request.

Configuration
    ``bulk_size`` (records per ``UpsertMultiple``, at most 1,000; 0: ``$batch`` only),
    ``batch_size`` (operations per ``$batch``, at most 1,000), ``retry_attempts``.

Limits
    * No change sets: rows are independent (a change set would roll back a whole
      batch for one bad row).
    * How a real organisation answers a bulk message on a table without it is not
      documented: :func:`bulk_unsupported` is the one place that decides.
    * Deletes use ``$batch``: ``DeleteMultiple`` is documented for elastic tables only.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog

from connectors._http import (
    TRANSIENT_STATUSES,
    parse_retry_after,
    retry_budget,
    retry_time_left,
    service_error,
)
from connectors.base import ConnectorUnavailable, Outcome, OutcomeStatus, TransientError, WriteRow
from connectors.dataverse.client import API_PATH, DataverseClient
from connectors.dataverse.convert import ConversionError, key_segment, to_body
from connectors.dataverse.metadata import TableMeta
from connectors.dataverse.multipart import BatchItem, Operation, OperationResult

__all__ = ["BULK_ACTION", "Writer", "bulk_unsupported"]

log = structlog.get_logger(__name__)

_JSON = {"Content-Type": "application/json"}
#: The bound action upserts are sent with.
BULK_ACTION = "Microsoft.Dynamics.CRM.UpsertMultiple"


def bulk_unsupported(status: int, code: str | None, message: str) -> bool:
    """Whether an error answer to ``UpsertMultiple`` means the table does not offer it.

    Unconfirmed (Microsoft does not document this answer): taken to be a 400, 404,
    405 or 501 whose message names the action, as the Web API answers an operation
    segment it does not know ("Resource not found for the segment …").
    """
    return status in (400, 404, 405, 501) and "UpsertMultiple" in message


class _Unsupported(Exception):
    """The table has no UpsertMultiple."""


class Writer:
    """Batched writes to one organisation.

    Args:
        name: The connection name (log field).
        client: The organisation's client.
        batch_size: Operations per ``$batch``.
        sets: Returns logical name → entity set of every table (for binds).
        bulk_size: Records per ``UpsertMultiple`` (0: upserts through ``$batch``).
    """

    def __init__(self, name: str, client: DataverseClient, batch_size: int,
                 sets: Callable[[], Mapping[str, str]], bulk_size: int = 0) -> None:
        self.name, self.client, self.batch_size, self.sets = name, client, batch_size, sets
        self.bulk_size = bulk_size
        #: Tables found not to offer UpsertMultiple (written through $batch).
        self.no_bulk: set[str] = set()

    def upsert(self, table: TableMeta, rows: Sequence[WriteRow]) -> list[Outcome]:
        """Upsert ``rows``; one outcome per row, in order (see the module docstring).

        Raises:
            ConnectorUnavailable: not one request could be sent (nothing was attempted).
        """
        if self.bulk_size > 0 and table.logical_name not in self.no_bulk:
            with retry_budget(clock=self.client.throttle.clock):  # bisection shares one budget
                return self._upsert_bulk(table, rows)
        return self._upsert_batch(table, rows)

    def _upsert_batch(self, table: TableMeta, rows: Sequence[WriteRow]) -> list[Outcome]:
        sets = self.sets()
        ops: list[Operation | Outcome] = []
        for row in rows:
            try:
                url = key_segment(table, row.key)
                body = to_body(table, sets, row.values, skip=set(row.key))
            except ConversionError as exc:
                ops.append(Outcome(OutcomeStatus.PERMANENT, error=str(exc), code="conversion"))
                continue
            ops.append(Operation("PATCH", API_PATH + url, dict(_JSON),
                                 json.dumps(body, separators=(",", ":")).encode()))
        return self._run(table, ops, deleting=False)

    # -- bulk messages -------------------------------------------------------------------------

    def _upsert_bulk(self, table: TableMeta, rows: Sequence[WriteRow]) -> list[Outcome]:
        sets = self.sets()
        outcomes: list[Outcome | None] = [None] * len(rows)
        targets: list[tuple[int, dict[str, Any]]] = []
        for index, row in enumerate(rows):
            try:
                targets.append((index, _target(table, sets, row)))
            except ConversionError as exc:
                outcomes[index] = Outcome(OutcomeStatus.PERMANENT, error=str(exc),
                                          code="conversion")
        attempted = False
        for start in range(0, len(targets), self.bulk_size):
            chunk = targets[start:start + self.bulk_size]
            try:
                results = self._bulk(table, chunk, first=True)
                attempted = True
            except _Unsupported:
                log.warning("dataverse_bulk_unsupported", connector=self.name,
                            entity=table.logical_name,
                            detail="UpsertMultiple refused; writing this table through $batch")
                self.no_bulk.add(table.logical_name)
                rest = [index for index, _ in targets[start:]]
                fallback = self._upsert_batch(table, [rows[i] for i in rest])
                results = dict(zip(rest, fallback, strict=True))
                for index, outcome in results.items():
                    outcomes[index] = outcome
                break
            except TransientError as exc:
                if isinstance(exc, ConnectorUnavailable) and not attempted:
                    raise
                results = {i: _transient(exc.message, exc.status, exc.retry_after)
                           for i, _ in chunk}
            for index, outcome in results.items():
                outcomes[index] = outcome
        return [o if o is not None else Outcome(OutcomeStatus.TRANSIENT, error="not attempted")
                for o in outcomes]

    def _bulk(self, table: TableMeta, chunk: list[tuple[int, dict[str, Any]]], *,
              first: bool = False) -> dict[int, Outcome]:
        """One ``UpsertMultiple``; a refused one is split in halves (see the module docstring).

        Raises:
            _Unsupported: the table has no UpsertMultiple (only for ``first``).
            TransientError: the first request failed transiently (halves answer TRANSIENT).
        """
        try:
            response = self.client.send(
                "POST", f"{table.entity_set}/{BULK_ACTION}", entity=table.logical_name,
                json_body={"Targets": [target for _, target in chunk]}, answer_errors=True)
        except TransientError as exc:
            if first:
                raise
            return {i: _transient(exc.message, exc.status, exc.retry_after) for i, _ in chunk}
        status = response.status_code
        if status < 300:
            return {i: Outcome.applied() for i, _ in chunk}
        code, message = service_error(response)
        if first and bulk_unsupported(status, code, message):
            raise _Unsupported
        if len(chunk) == 1:
            if status == 404:  # an @odata.bind target that does not exist (yet)
                return {chunk[0][0]: Outcome(OutcomeStatus.TRANSIENT, error=message,
                                             code=code or "404")}
            return {chunk[0][0]: Outcome(OutcomeStatus.PERMANENT, error=message,
                                         code=code or str(status))}
        log.info("dataverse_bulk_split", connector=self.name, entity=table.logical_name,
                 records=len(chunk), status=status, error=message)
        half = len(chunk) // 2
        return {**self._bulk(table, chunk[:half]), **self._bulk(table, chunk[half:])}

    # -- $batch ------------------------------------------------------------------------------------

    def delete(self, table: TableMeta, keys: Sequence[dict[str, Any]]) -> list[Outcome]:
        """Delete rows by key; a missing row counts as applied.

        Raises:
            ConnectorUnavailable: not one ``$batch`` could be sent (nothing was attempted).
        """
        ops: list[Operation | Outcome] = []
        for key in keys:
            try:
                ops.append(Operation("DELETE", API_PATH + key_segment(table, key)))
            except ConversionError as exc:
                ops.append(Outcome(OutcomeStatus.PERMANENT, error=str(exc), code="conversion"))
        return self._run(table, ops, deleting=True)

    def _run(self, table: TableMeta, ops: list[Operation | Outcome], *,
             deleting: bool) -> list[Outcome]:
        with retry_budget(clock=self.client.throttle.clock):
            return self._run_chunks(table, ops, deleting=deleting)

    def _run_chunks(self, table: TableMeta, ops: list[Operation | Outcome], *,
                    deleting: bool) -> list[Outcome]:
        outcomes: list[Outcome | None] = [o if isinstance(o, Outcome) else None for o in ops]
        pending = [(i, o) for i, o in enumerate(ops) if isinstance(o, Operation)]
        attempted = False
        for start in range(0, len(pending), self.batch_size):
            chunk = pending[start:start + self.batch_size]
            try:
                results = self._send(table, chunk, deleting)
                attempted = True
            except TransientError as exc:
                if isinstance(exc, ConnectorUnavailable) and not attempted:
                    raise
                results = {i: _transient(exc.message, exc.status, exc.retry_after) for i, _ in chunk}
            for index, outcome in results.items():
                outcomes[index] = outcome
        return [o if o is not None else Outcome(OutcomeStatus.TRANSIENT, error="not attempted")
                for o in outcomes]

    def _send(self, table: TableMeta, chunk: list[tuple[int, Operation]],
              deleting: bool) -> dict[int, Outcome]:
        """One chunk, resending transiently failed operations up to ``attempts``."""
        done: dict[int, Outcome] = {}
        todo = chunk
        for attempt in range(1, self.client.attempts + 1):
            items: list[BatchItem] = [op for _, op in todo]
            results = self.client.batch(items, entity=table.logical_name)
            retry: list[tuple[int, Operation]] = []
            wait: float | None = None
            for position, (index, op) in enumerate(todo):
                result = results[position] if position < len(results) else None
                outcome = _outcome(result, deleting)
                if outcome.status is OutcomeStatus.TRANSIENT and _retryable(result):
                    retry.append((index, op))
                    wait = max(wait or 0.0, outcome.retry_after or 0.0)
                done[index] = outcome
            if not retry or attempt == self.client.attempts:
                break
            log.info("dataverse_batch_retry", connector=self.name, entity=table.logical_name,
                     operations=len(retry), attempt=attempt, retry_after=wait)
            throttle = self.client.throttle
            if wait:
                throttle.pause(wait, reason=done[retry[0][0]].error)
            else:
                throttle.backoff(reason=done[retry[0][0]].error)
            if throttle.paused_for > retry_time_left():
                # Too long to wait here: the bus's retry queues wait instead.
                for index, _ in retry:
                    done[index] = dataclasses.replace(
                        done[index], retry_after=max(done[index].retry_after or 0.0,
                                                     throttle.paused_for))
                break
            todo = retry
        return done


def _target(table: TableMeta, sets: Mapping[str, str], row: WriteRow) -> dict[str, Any]:
    """One ``Targets`` item: ``@odata.type``, the key, the values.

    Raises:
        ConversionError: a value does not fit, or the key is no key.
    """
    segment = key_segment(table, row.key)
    target: dict[str, Any] = {"@odata.type": f"Microsoft.Dynamics.CRM.{table.logical_name}"}
    if set(row.key) == {table.primary_id}:
        target[table.primary_id] = segment[len(table.entity_set) + 1:-1]
    else:
        target["@odata.id"] = segment
    target.update(to_body(table, sets, row.values, skip=set(row.key)))
    return target


def _retryable(result: OperationResult | None) -> bool:
    return result is None or result.status in TRANSIENT_STATUSES or result.status >= 500


def _outcome(result: OperationResult | None, deleting: bool) -> Outcome:
    if result is None:
        return _transient("the $batch answer has no part for this operation", None, None)
    status = result.status
    if status < 300 or (deleting and status == 404):
        return Outcome.applied()
    code, message = _error(result)
    if status in TRANSIENT_STATUSES or status >= 500:
        retry_after = parse_retry_after(_header(result.headers, "retry-after"))
        return _transient(message, code or str(status), retry_after)
    if status == 404:  # an @odata.bind target that does not exist (yet)
        return Outcome(OutcomeStatus.TRANSIENT, error=message, code=code or "404")
    return Outcome(OutcomeStatus.PERMANENT, error=message, code=code or str(status))


def _transient(message: str, code: Any, retry_after: float | None) -> Outcome:
    return Outcome(OutcomeStatus.TRANSIENT, error=message,
                   code=None if code is None else str(code), retry_after=retry_after)


def _error(result: OperationResult) -> tuple[str | None, str]:
    try:
        error = json.loads(result.body or b"null").get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    code = error.get("code") or None
    message = str(error.get("message") or f"HTTP {result.status}")
    return code, message


def _header(headers: Mapping[str, str], name: str) -> str | None:
    return next((v for k, v in headers.items() if k.lower() == name), None)
