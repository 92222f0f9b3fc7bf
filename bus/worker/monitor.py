"""The worker's bookkeeping: counters, pause flags, alert rules, readiness, history.

A :class:`Monitor` sits beside the consumers and detectors of one worker:

- the consumers' and appliers' per-batch hooks feed it: metrics at once, and link
  activity (applied / skipped / retried / dead-lettered, last applied, last failure)
  accumulated in memory and written to the state store once per second;
- once per second it reads every link's pause flag from the state store and pauses
  or resumes the local consumer (``syncbus link pause|resume`` from any machine is
  obeyed within about a second), and evaluates the alert rules;
- after a batch that dead-lettered something on a link with an alert rule, it writes
  that link's activity and evaluates the rule at once, so a burst of permanent
  failures is stopped after one batch instead of one second of batches;
- it samples queue depths for the metrics and keeps what ``/readyz`` reports;
- it records detector polls (state store, metrics, sync history).

An alert rule counts the link's dead-lettered changes of every worker within its
window (``syncbus_activity``), never before the link's last resume, so a resumed link
is not paused again for the errors that paused it.
"""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import structlog

from bus.amqp.consumer import BatchConsumer, Settled
from bus.amqp.queues import BrokerSession
from bus.amqp.topology import LinkQueues
from bus.state.rows import LinkDelta, RunRecord
from bus.state.store import StateStore
from bus.worker.metrics import Metrics
from connectors.base import BrokerConnectionError, BusError
from consumers.apply import ApplyReport
from producers.detector import Detector, PollResult
from schemas.config import AlertRule, SyncConfig

__all__ = ["CONTROL_INTERVAL", "Monitor"]

log = structlog.get_logger(__name__)

#: Seconds between two rounds of flushing, pause-flag reading and alert evaluation.
CONTROL_INTERVAL = 1.0
#: Seconds without a successful state-store round after which readiness fails.
STATE_STALE = 10.0


@dataclass(slots=True)
class _Link:
    name: str
    entity: str
    consumer: BatchConsumer
    queues: LinkQueues
    rule: AlertRule | None
    delta: LinkDelta
    #: The pause flag as last read from the state store (None: not read yet).
    seen_paused: bool | None = None
    resumed_at: datetime | None = None
    #: A "log" rule already reported the current burst.
    alerting: bool = False
    #: The link the direction belongs to (pause flags, alerts); set by add_link.
    link: str = ""


@dataclass(slots=True)
class _Health:
    state_ok_at: float | None = None
    state_error: str | None = None
    broker_ok_at: float | None = None
    broker_error: str | None = None
    poll_errors: dict[str, str] = field(default_factory=dict)


class Monitor:
    """Bookkeeping of one worker (see the module docstring).

    Args:
        config: The worker's configuration.
        state: The state store.
        metrics: The worker's metrics.
        worker: The worker's identity (host:pid:nonce).
    """

    def __init__(self, config: SyncConfig, state: StateStore, metrics: Metrics,
                 worker: str) -> None:
        self.config = config
        self.state = state
        self.metrics = metrics
        self.worker = worker
        self.links: dict[str, _Link] = {}
        self._lock = threading.Lock()
        self._flush_lock = threading.Lock()
        self._health = _Health()

    def add_link(self, name: str, consumer: BatchConsumer, *, link_name: str | None = None,
                 entity: str | None = None) -> None:
        """Watch link direction ``name`` served by ``consumer``.

        Args:
            name: The direction's name: the link's name for a → b, ``<link>.b2a`` for
                b → a (metrics and activity are kept per direction).
            link_name: The link it belongs to (pause flags and alerts), default ``name``.
            entity: The entity it writes, default the link's target.
        """
        link_name = link_name or name
        link = self.config.links[link_name]
        self.links[name] = _Link(name, entity or link.target.entity, consumer, consumer.queues,
                                 link.alert, LinkDelta(name), link=link_name)
        self.metrics.link_paused(name, False)

    # -- hooks (consumer threads) -----------------------------------------------------------

    def on_applied(self, name: str, report: ApplyReport) -> None:
        """The applier's hook: metrics and activity of what the target confirmed."""
        ln = self.links[name]
        latencies = [report.applied_at - t for t in _timestamps(report.detected)]
        self.metrics.batch_applied(name, ln.entity, upserted=report.upserted,
                                   deleted=report.deleted, skipped=report.skipped,
                                   latencies=latencies)
        applied = report.upserted + report.deleted
        with self._lock:
            ln.delta.applied += applied
            ln.delta.skipped += report.skipped
            if applied:
                ln.delta.last_applied_at = datetime.fromtimestamp(report.applied_at, UTC)

    def on_settled(self, name: str, settled: Settled) -> None:
        """The consumer's hook: metrics and activity of retries and dead letters."""
        ln = self.links[name]
        self.metrics.batch_settled(name, ln.entity, retried=settled.retried, dead=settled.dead,
                                   seconds=settled.seconds)
        if not (settled.retried or settled.dead):
            return
        with self._lock:
            ln.delta.retried += settled.retried
            ln.delta.dead += settled.dead
            ln.delta.failure = settled.error or "failed"
            ln.delta.failure_at = datetime.now(UTC)
        if settled.dead and ln.rule is not None:
            try:
                self.flush()
                self._check_alert(ln)
            except BusError as exc:
                log.warning("alert_check_failed", link=name, error=exc.message)

    # -- detector observer (detector threads) ------------------------------------------------

    def page_read(self, detector: Detector, upserts: int, deletes: int) -> None:
        """Count a page read from the source."""
        self.metrics.page_read(detector.connection, detector.entity, upserts, deletes)

    def page_published(self, detector: Detector, upserts: int, deletes: int,
                       seconds: float) -> None:
        """Count a page confirmed by the broker."""
        self.metrics.page_published(detector.connection, detector.entity, upserts, deletes,
                                    seconds)

    def polled(self, detector: Detector, *, started: datetime, seconds: float,
               result: PollResult | None, error: str | None,
               run_id: str | None = None) -> RunRecord:
        """Record a poll: state store, metrics, and (outside a run) the sync history.

        A continuous worker records a history entry for a cycle that found changes, and
        for a failure unless the previous failure of that detector had the same text.

        Args:
            detector: The detector that polled.
            started: Wall-clock start of the poll.
            seconds: Its duration.
            result: What it published (None when it failed).
            error: Why it failed.
            run_id: The ``run --until-idle`` it belongs to (its record is then returned
                for the run to store, not stored here).

        Returns:
            The history record of this poll.
        """
        self.metrics.polled(detector.connection, detector.entity, seconds, ok=error is None)
        result = result or PollResult()
        record = RunRecord(
            run_id=run_id or _new_id(), kind="poll", name=detector.name, started_at=started,
            ended_at=datetime.now(UTC), status="ok" if error is None else "failed",
            upserts=result.upserts, deletes=result.deletes, errors=int(error is not None),
            error=error, worker=self.worker)
        repeated = error is not None and self._health.poll_errors.get(detector.name) == error
        if error is None:
            self._health.poll_errors.pop(detector.name, None)
        else:
            self._health.poll_errors[detector.name] = error
        try:
            self.state.record_poll(detector.name, started=started, seconds=seconds,
                                   changes=result.changes, error=error, worker=self.worker)
            if run_id is None and (result.changes or (error and not repeated)):
                self.state.add_runs([record])
        except BusError as exc:
            log.warning("poll_not_recorded", detector=detector.name, error=exc.message)
        return record

    # -- the control loop ---------------------------------------------------------------------

    def run(self, stop: threading.Event, sample_interval: float | None = None) -> None:
        """Flush, follow pause flags and evaluate alerts every second until ``stop``.

        Args:
            stop: Ends the loop (after a last flush).
            sample_interval: Seconds between queue-depth samples; None: no sampling.
        """
        next_sample = time.monotonic()
        while not stop.is_set():
            self.tick()
            if sample_interval is not None and time.monotonic() >= next_sample:
                self.sample_queues()
                next_sample = time.monotonic() + sample_interval
            stop.wait(CONTROL_INTERVAL)
        self.tick()

    def tick(self) -> None:
        """One round: flush activity, follow pause flags, evaluate alert rules."""
        try:
            self.flush()
            self.sync_controls()
            for ln in self.links.values():
                if ln.rule is not None:
                    self._check_alert(ln)
        except BusError as exc:
            self._health.state_error = exc.message
            log.warning("monitor_state_unavailable", error=exc.message)
            return
        except Exception:  # noqa: BLE001 - keep the loop (and the pause control) alive
            log.exception("monitor_tick_failed")
            return
        self._health.state_ok_at, self._health.state_error = time.monotonic(), None

    def flush(self) -> None:
        """Write the activity accumulated since the last flush (once, in one transaction).

        Raises:
            BusError: the state store cannot be reached (the activity is kept for the
                next flush).
        """
        with self._flush_lock:
            with self._lock:
                deltas = [ln.delta for ln in self.links.values() if not ln.delta.empty]
                for ln in self.links.values():
                    if not ln.delta.empty:
                        ln.delta = LinkDelta(ln.name)
            if not deltas:
                return
            try:
                self.state.add_link_activity(deltas)
            except BusError:
                with self._lock:
                    for d in deltas:
                        _merge(self.links[d.link].delta, d)
                raise

    def sync_controls(self) -> None:
        """Pause or resume local consumers as the state store's pause flags say.

        Raises:
            BusError: the state store cannot be reached.
        """
        rows = self.state.link_rows()
        for ln in self.links.values():
            row = rows.get(ln.link) or {}
            paused = bool(row.get("paused"))
            ln.resumed_at = row.get("resumed_at")
            if paused != ln.seen_paused:
                ln.seen_paused = paused
                self._apply_pause(ln, paused, row.get("paused_reason"))

    def sample_queues(self) -> None:
        """Sample ready messages of every link's queues and of the dead-letter queue."""
        try:
            with BrokerSession(self.config.broker.url, timeout=5, retries=0) as broker:
                for ln in self.links.values():
                    work = _depth(broker, ln.queues.work)
                    retry = sum(_depth(broker, q) for _, q in ln.queues.retries)
                    self.metrics.queue_depths(ln.name, work=work, retry=retry)
            counts = self.state.tx_counts(list(self.config.links))
            self.metrics.dead_letters.set(sum(row.get("error", 0) for row in counts.values()))
        except Exception as exc:  # noqa: BLE001 - any broker failure: not ready
            self._health.broker_error = f"{type(exc).__name__}: {exc}"
            return
        self._health.broker_ok_at, self._health.broker_error = time.monotonic(), None

    # -- readiness --------------------------------------------------------------------------

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        """What ``/readyz`` answers: broker connected, state store reachable, links consuming."""
        now = time.monotonic()
        h = self._health
        state_ok = h.state_ok_at is not None and now - h.state_ok_at < STATE_STALE
        links = {}
        for ln in self.links.values():
            st = ln.consumer.stats
            links[ln.name] = {"ok": st.paused or st.connected, "consuming": st.connected,
                              "paused": st.paused or ln.consumer.paused.is_set()}
        active = [v for v in links.values() if not v["paused"]]
        broker_ok = any(v["consuming"] for v in active) or (
            h.broker_ok_at is not None and h.broker_error is None)
        links_ok = all(v["ok"] for v in links.values())
        checks = {
            "broker": {"ok": broker_ok, **({"error": h.broker_error} if h.broker_error else {})},
            "state_store": {"ok": state_ok,
                            **({"error": h.state_error} if h.state_error else {})},
            "links": links,
        }
        return broker_ok and state_ok and links_ok, {"checks": checks}

    # -- internals --------------------------------------------------------------------------

    def _apply_pause(self, ln: _Link, paused: bool, reason: str | None = None) -> None:
        if paused == ln.consumer.paused.is_set():
            return
        if paused:
            ln.consumer.paused.set()
            log.warning("link_paused", link=ln.name, reason=reason or "paused by an operator")
        else:
            ln.consumer.paused.clear()
            ln.alerting = False
            log.info("link_resumed", link=ln.name)
        self.metrics.link_paused(ln.name, paused)

    def _check_alert(self, ln: _Link) -> None:
        rule = ln.rule
        if rule is None or ln.consumer.paused.is_set():
            return
        since = datetime.now(UTC) - timedelta(minutes=rule.minutes)
        if ln.resumed_at is not None and ln.resumed_at > since:
            since = ln.resumed_at
        errors = self.state.link_errors_since(ln.name, since)
        if errors <= rule.errors:
            ln.alerting = False
            return
        if rule.action == "log":
            if not ln.alerting:
                ln.alerting = True
                self.metrics.alert_fired(ln.name)
                log.error("link_alert", link=ln.name, errors=errors, minutes=rule.minutes,
                          threshold=rule.errors, action="log")
            return
        reason = (f"alert: {errors} errors in {rule.minutes:g} min "
                  f"(more than {rule.errors} allowed)")
        self.metrics.alert_fired(ln.name)
        log.error("link_alert", link=ln.name, errors=errors, minutes=rule.minutes,
                  threshold=rule.errors, action="pause",
                  hint=f"fix the cause, then `syncbus link resume {ln.link}` and "
                       "`syncbus tx replay --link " + ln.link + "`")
        self.state.set_link_paused(ln.link, True, reason=reason, by=f"alert@{self.worker}")
        ln.seen_paused = True
        self._apply_pause(ln, True, reason)


def _timestamps(values: list[str]) -> list[float]:
    out = []
    for value in values:
        try:
            out.append(datetime.fromisoformat(value).timestamp())
        except (TypeError, ValueError):
            continue
    return out


def _merge(into: LinkDelta, other: LinkDelta) -> None:
    into.applied += other.applied
    into.skipped += other.skipped
    into.retried += other.retried
    into.dead += other.dead
    if other.last_applied_at and (into.last_applied_at is None
                                  or other.last_applied_at > into.last_applied_at):
        into.last_applied_at = other.last_applied_at
    if other.failure and into.failure is None:
        into.failure, into.failure_at = other.failure, other.failure_at


def _depth(broker: BrokerSession, queue: str) -> int:
    depth = broker.depth(queue)
    if depth is None:  # deleted under a running worker: not ready
        raise BrokerConnectionError(f"queue {queue} does not exist")
    return depth


def _new_id() -> str:
    return uuid.uuid4().hex
