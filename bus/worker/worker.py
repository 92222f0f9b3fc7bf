"""The worker process: detectors and mapping consumers of every enabled link.

``Worker.run(stop)`` keeps the targets in sync until ``stop`` is set; shutdown lets
each detector finish its page (publish, confirm, commit) and each consumer its batch
(write, ack). ``Worker.run_until_idle()`` is "Sync All": poll every source once,
deliver everything pending, report.

Every worker keeps its own Prometheus registry (:attr:`Worker.metrics`) and a
:class:`~bus.worker.monitor.Monitor` (activity counters, pause flags, alert rules, poll
records); with ``metrics.port`` configured it serves ``/metrics``, ``/healthz`` and
``/readyz`` (:mod:`bus.worker.health`). A ``run --until-idle`` and every detector cycle that
found changes leave a record in the sync history (``syncbus history``).
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import cast

import structlog

from bus.amqp.consumer import BatchConsumer
from bus.amqp.integrity import Signer, signer_for
from bus.amqp.publisher import Publisher
from bus.amqp.queues import BrokerSession
from bus.amqp.topology import LinkQueues
from bus.amqp.txrecord import TxRecorder
from bus.amqp.txsweep import SWEEP_INTERVAL, catch_up, migrate_legacy
from bus.config.drift import refuse_drifted_links
from bus.state.rows import RunRecord
from bus.state.store import StateStore
from bus.worker.health import HealthServer
from bus.worker.metrics import Metrics
from bus.worker.monitor import Monitor
from connectors._http import add_throttle_listener, remove_throttle_listener
from connectors.base import (
    BusError,
    ConfigError,
    Connector,
    EntityInfo,
    PermanentError,
    TransientError,
)
from connectors.features import ChangeNotifier, TrackingSetup, WebhookSource
from connectors.registry import open_connector
from consumers.apply import LinkApplier
from consumers.flow import Flow, flows
from consumers.intake import Intake
from consumers.twoway import EchoFilter, LinkSides
from producers.detector import Detector, PollResult
from schemas.config import SyncConfig

__all__ = ["LinkSummary", "RunSummary", "Worker"]

log = structlog.get_logger(__name__)

#: Seconds the idle check waits to be sure no message is still on its way to a consumer.
IDLE_SETTLE = 0.3
#: Longest pause between two polls of a failing source.
MAX_POLL_BACKOFF = 60.0
#: Seconds between two trims of the Processed history.
HOUSEKEEPING_INTERVAL = 3600.0
#: Seconds a detector lease lasts without renewal (renewed every page and every poll).
LEASE_TTL = 60.0
#: Seconds of link activity kept at least (rates, alert windows extend it).
ACTIVITY_RETENTION = 3600.0


@dataclass(slots=True)
class LinkSummary:
    """What one link direction did during a run."""

    link: str
    upserted: int = 0
    deleted: int = 0
    skipped: int = 0
    retried: int = 0
    dead: int = 0
    pending: int = 0


@dataclass(slots=True)
class RunSummary:
    """What a ``run --until-idle`` did."""

    detected: dict[str, PollResult] = field(default_factory=dict)
    links: list[LinkSummary] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    dead_total: int = 0
    timed_out: bool = False
    seconds: float = 0.0
    #: Links that were paused (their changes stay queued), with the reason.
    paused: dict[str, str] = field(default_factory=dict)

    @property
    def dead(self) -> int:
        return sum(s.dead for s in self.links)

    @property
    def ok(self) -> bool:
        return not (self.dead or self.errors or self.timed_out)


class Worker:
    """Owns the connectors, state store, publisher, detectors and consumers.

    Args:
        config: A validated configuration.
    """

    def __init__(self, config: SyncConfig) -> None:
        self.config = config
        self.connectors: dict[str, Connector] = {}
        self.state: StateStore | None = None
        self.publisher: Publisher | None = None
        self.signer: Signer | None = None
        self.detectors: list[tuple[Detector, float]] = []
        self.consumers: list[tuple[BatchConsumer, LinkApplier]] = []
        self.queues: list[LinkQueues] = []
        #: Per detector: set by a webhook notification (poll now) or at shutdown.
        self._wake: dict[str, threading.Event] = {}
        self._described: dict[str, dict[str, EntityInfo]] = {}
        #: This worker's identity in detector leases.
        self.owner = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        #: This worker's metrics (a registry of its own).
        self.metrics = Metrics(config.connections)
        self.monitor: Monitor | None = None
        #: The metrics / health HTTP server, when ``metrics.port`` is configured.
        self.health: HealthServer | None = None
        self._threads: list[threading.Thread] = []
        self._stopping = False
        #: Whether the pre-index quorum queues were checked (bus.amqp.txsweep.migrate_legacy).
        self._migrated = False
        #: Connections whose refused webhook notifications this worker counts.
        self._webhooks_wired: set[str] = set()
        #: Links refused because their schema drifted (bus/config/drift.py): name → report.
        self.refused: dict[str, list[str]] = {}
        self._sides: dict[str, LinkSides] | None = None

    # -- lifecycle ------------------------------------------------------------------------

    def open_connectors(self) -> None:
        """Create the connectors (connections open lazily, on first use)."""
        for name, conn_cfg in self.config.connections.items():
            if name not in self.connectors:
                self.connectors[name] = open_connector(name, conn_cfg)

    def prepare_sources(self) -> list[str]:
        """Prepare every enabled link's source entity for change tracking.

        Returns:
            What was done, one line per step.
        """
        self.open_connectors()
        self._wire_webhooks()  # a subscription made here carries the kept clientState
        self._described.clear()
        wanted: dict[str, list[str]] = {}
        for flow in self.flows():
            entities = wanted.setdefault(flow.source.connection, [])
            if flow.source.entity not in entities:
                entities.append(flow.source.entity)
        lines = []
        for conn_name, entities in wanted.items():
            connector = self.connectors[conn_name]
            if not connector.capabilities.tracking_setup:
                lines.append(f"{conn_name}: tracks changes natively, nothing to prepare")
                continue
            prepared = cast(TrackingSetup, connector).prepare_tracking(entities)
            lines += [f"{conn_name}.{line}" for line in prepared]
        return lines

    def open(self) -> None:
        """Connect everything and declare the topology.

        Raises:
            BrokerConnectionError: RabbitMQ cannot be reached.
            ConfigError: the metrics port cannot be opened.
            BusError: a connector or the state store cannot be opened.
        """
        cfg = self.config
        self.open_connectors()
        if self.state is None:  # prepare_sources may have opened it
            self.state = StateStore(cfg.state.url)
        self._wire_webhooks()
        self.signer = signer_for(cfg, self.state)
        self.queues = self._declare()
        self.publisher = Publisher(cfg.broker.url, name="syncbus-worker")
        self.monitor = Monitor(cfg, self.state, self.metrics, self.owner)
        # Schema drift (bus/config/drift.py): a drifted link is refused, the others run.
        self.refused = refuse_drifted_links(cfg, self.describe, self.state.engine)
        self._build_detectors()
        self._build_consumers()
        add_throttle_listener(self._on_throttled)
        try:
            self.monitor.sync_controls()  # a paused link does not even start consuming
        except BusError as exc:
            log.warning("link_controls_unavailable", error=exc.message)
        if cfg.metrics.port is not None:
            try:
                self.health = HealthServer(self.metrics, liveness=self.liveness,
                                           readiness=self.monitor.readiness,
                                           host=cfg.metrics.host, port=cfg.metrics.port)
            except OSError as exc:
                raise ConfigError(f"metrics: cannot listen on {cfg.metrics.host}:"
                                  f"{cfg.metrics.port}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        """Release every connection (after the threads stopped)."""
        remove_throttle_listener(self._on_throttled)
        if self.health is not None:
            self.health.close()
            self.health = None
        self.metrics.close()
        if self.publisher is not None:
            self.publisher.close()
        for conn in self.connectors.values():
            conn.close()
        if self.state is not None:
            self.state.close()

    def describe(self, connection: str) -> dict[str, EntityInfo]:
        """Entities of ``connection`` by name (for validation); cached per worker."""
        if connection not in self._described:
            self._described[connection] = {
                e.name: e for e in self.connectors[connection].describe()}
        return self._described[connection]

    # -- running ----------------------------------------------------------------------------

    def run(self, stop: threading.Event) -> None:
        """Detect and deliver until ``stop`` is set, then shut down gracefully."""
        self._start_webhooks()
        threads = [self._thread(f"consumer-{c.queues.work}", c.run, stop) for c, _ in self.consumers]
        threads += [
            self._thread(f"detector-{d.name}", self._detect_loop, d, interval, stop)
            for d, interval in self.detectors
        ]
        threads.append(self._thread("housekeeping", self._housekeeping, stop))
        threads.append(self._thread("txsweep", self._sweep_loop, stop))
        threads.append(self._thread("monitor", self._monitor().run, stop,
                                    self._sample_interval()))
        self._threads, self._stopping = threads, False
        log.info("worker_started", detectors=len(self.detectors), links=len(self.consumers))
        stop.wait()
        self._stopping = True
        log.info("worker_stopping")
        for wake in self._wake.values():
            wake.set()
        for t in threads:
            t.join()
        log.info("worker_stopped")

    def liveness(self) -> tuple[bool, dict[str, object]]:
        """What ``/healthz`` answers: every thread of :meth:`run` is alive."""
        dead = [t.name for t in self._threads if not t.is_alive()]
        ok = self._stopping or not dead
        return ok, {"worker": self.owner, "threads": len(self._threads), "dead_threads": dead}

    def run_until_idle(self, *, max_wait: float = 600.0,
                       on_progress: Callable[[str], None] | None = None,
                       poll: bool = True) -> RunSummary:
        """Poll every source once, deliver everything pending, and report.

        Args:
            max_wait: Seconds to wait for pending deliveries (retries included).
            on_progress: Called with one line per step, for the CLI.
            poll: False to only deliver what is queued (Sync All publishes itself).
        """
        started = time.monotonic()
        started_at = datetime.now(UTC)
        run_id = uuid.uuid4().hex
        say = on_progress or (lambda _line: None)
        summary = RunSummary()
        summary.errors += [f"link {name} refused, its schema drifted: {'; '.join(lines)}"
                           for name, lines in self.refused.items()]
        polls: list[RunRecord] = []
        self.sweep()
        stop = threading.Event()
        threads = [self._thread(f"consumer-{c.queues.work}", c.run, stop) for c, _ in self.consumers]
        threads.append(self._thread("monitor", self._monitor().run, stop, None))
        try:
            for detector, _ in self.detectors if poll else ():
                try:
                    if not self._wait_lease(detector, started + max_wait):
                        say(f"{detector.name}: not polled here, worker "
                            f"{self._state().lease_owner(detector.name)} polls it")
                        continue
                    result = self._poll(detector, None, functools.partial(self._lease, detector),
                                        run_id=run_id, records=polls)
                    self._state().release_lease(detector.name, self.owner)
                except BusError as exc:
                    summary.errors.append(f"detector {detector.name}: {exc.message}")
                    continue
                summary.detected[detector.name] = result
                say(f"{detector.name}: published {result.upserts} upserts, "
                    f"{result.deletes} deletes"
                    + (f" ({result.echoes} echoes of our own writes left out)"
                       if result.echoes else ""))
            summary.timed_out = not self._wait_idle(started + max_wait)
        finally:
            stop.set()
            for t in threads:
                t.join()
        self._purge_history()
        summary.links = self._link_summaries()
        self.sweep()  # letters RabbitMQ dead-lettered itself count too
        summary.dead_total = self._dead_total()
        self._report_paused(summary)
        summary.seconds = time.monotonic() - started
        self._record_run(summary, run_id, started_at, polls)
        return summary

    # -- internals ----------------------------------------------------------------------------

    def _declare(self) -> list[LinkQueues]:
        with BrokerSession(self.config.broker.url, retries=3) as broker:
            return broker.declare(self.config)

    def flows(self) -> list[Flow]:
        """Every direction of every enabled link.

        Raises:
            ConfigError: a two-way link cannot identify records in the b → a direction.
        """
        return [f for name, link in self.config.links.items()
                if link.enabled and name not in self.refused  # refused: bus/config/drift.py
                for f in flows(name, link)]

    def link_sides(self) -> dict[str, LinkSides]:
        """The shared pair state of links that keep one: two-way links and lookup parents."""
        if self._sides is None:
            parents = {f.lookup for link in self.config.links.values()
                       for f in (link.field_specs() or {}).values() if f.lookup}
            parents |= {s.lookup for link in self.config.links.values() if link.b2a
                        for s in (link.b2a.fields or {}).values()
                        if not isinstance(s, str) and s.lookup}
            self._sides = {}
            for name, link in self.config.links.items():
                if link.enabled and (link.direction == "both" or name in parents):
                    self._sides[name] = LinkSides(flows(name, link), self.connectors)
        return self._sides

    def _build_detectors(self) -> None:
        sources: dict[tuple[str, str], tuple[int, float]] = {}
        readers: dict[tuple[str, str], list[tuple[Flow, LinkSides | None]]] = {}
        sides = self.link_sides()
        for flow in self.flows():
            link = flow.config
            src = (flow.source.connection, flow.source.entity)
            page, interval = sources.get(src, (link.page_size, link.poll_interval))
            sources[src] = (min(page, link.page_size), min(interval, link.poll_interval))
            readers.setdefault(src, []).append((flow, sides.get(flow.link)))
        assert self.state is not None and self.publisher is not None and self.signer is not None
        for (conn, entity), (page, interval) in sources.items():
            flows_here = readers[(conn, entity)]
            echo = None
            if all(s is not None and s.two_way for _, s in flows_here):
                echo = EchoFilter([(f, s) for f, s in flows_here if s is not None], self.state)
            detector = Detector(connection=conn, entity=entity, connector=self.connectors[conn],
                                state=self.state, publisher=self.publisher, page_size=page,
                                observer=self.monitor, echo_filter=echo, signer=self.signer)
            self.detectors.append((detector, interval))
            self._wake[detector.name] = threading.Event()
        for conn in {c for c, _ in sources}:
            connector = self.connectors[conn]
            if connector.capabilities.change_listener:  # a notification polls at once
                cast(ChangeNotifier, connector).add_change_listener(
                    functools.partial(self._wake_detector, conn))

    def _on_throttled(self, host: str, retry_after: float | None) -> None:
        """A 429 from ``host``: count it for every connection of this worker on that host."""
        for name, conn_cfg in self.config.connections.items():
            url = str(getattr(conn_cfg, "url", ""))
            if url.startswith("http") and urllib.parse.urlsplit(url).netloc.lower() == host:
                self.metrics.throttle(name, retry_after)

    def _wake_detector(self, connection: str, entity: str) -> None:
        wake = self._wake.get(f"{connection}.{entity}")
        if wake is not None:
            log.info("detector_woken", detector=f"{connection}.{entity}")
            wake.set()

    def _wire_webhooks(self) -> None:
        """Give connectors with webhooks the state store, which keeps the ``clientState``
        secrets they generate, and count the notifications they refuse."""
        for name, hooks in self._webhook_sources():
            if self.state is None:
                self.state = StateStore(self.config.state.url)
            hooks.use_secret_store(self.state)
            if name not in self._webhooks_wired:
                hooks.add_rejection_listener(functools.partial(self.metrics.webhook_rejected, name))
                self._webhooks_wired.add(name)

    def _start_webhooks(self) -> None:
        """Start the webhook receivers of connectors configured for them (accelerators only:
        polling stays the source of truth, so a failure here is logged, not fatal)."""
        for name, hooks in self._webhook_sources():
            try:
                hooks.start_webhooks()
            except (BusError, OSError) as exc:
                log.warning("webhooks_not_started", connection=name, error=str(exc))

    def _webhook_sources(self) -> list[tuple[str, WebhookSource]]:
        """The connectors that declare webhooks (configured for them), by name."""
        return [(name, cast(WebhookSource, connector))
                for name, connector in self.connectors.items() if connector.capabilities.webhooks]

    def _build_consumers(self) -> None:
        assert self.state is not None and self.publisher is not None
        by_name = {(q.link, q.direction): q for q in self.queues}
        sides = self.link_sides()
        for flow in self.flows():
            name, link = flow.link, flow.config
            target = self.connectors[flow.target.connection]
            try:
                described = self.describe(flow.target.connection)[flow.target.entity]
                fields: list[str] | None = [f.name for f in described.fields]
            except TransientError:
                fields = None  # the target is down: the applier asks again when it is back
            monitor = self._monitor()
            label = name if flow.direction == "a2b" else flow.name
            intake = Intake(
                flow, signer=self.signer, max_bytes=self.config.broker.max_event_bytes,
                version_types=self.connectors[flow.source.connection].capabilities.version_types)
            applier = LinkApplier(name, flow, target, self.state, sides=sides.get(name),
                                  links=self.config.links, target_fields=fields,
                                  on_batch=functools.partial(monitor.on_applied, label),
                                  intake=intake)
            consumer = BatchConsumer(
                url=self.config.broker.url, queues=by_name[(name, flow.direction)],
                handler=applier, publisher=self.publisher, retry=link.retry,
                prefetch=self.config.broker.prefetch, batch_size=link.batch_size,
                on_settled=functools.partial(monitor.on_settled, label),
                tx_index=TxRecorder(self.state, name, flow.direction,
                                    self.config.broker.delivery_limit),
            )
            monitor.add_link(label, consumer, link_name=name, entity=flow.target.entity)
            self.consumers.append((consumer, applier))

    def _detect_loop(self, detector: Detector, interval: float, stop: threading.Event) -> None:
        backoff = interval
        while not stop.is_set():
            try:
                if self._lease(detector):
                    self._poll(detector, stop, lambda: self._lease(detector))
                backoff = interval
            except PermanentError as exc:
                log.error("detector_failed", detector=detector.name, error=exc.message)
                backoff = MAX_POLL_BACKOFF
            except BusError as exc:
                backoff = min(max(backoff * 2, 1.0), MAX_POLL_BACKOFF)
                log.warning("detector_retrying", detector=detector.name, error=exc.message,
                            wait=backoff)
            except Exception:  # noqa: BLE001 - keep the worker alive; the cursor did not move
                log.exception("detector_crashed", detector=detector.name)
                backoff = MAX_POLL_BACKOFF
            wake = self._wake.get(detector.name) or stop
            wake.wait(backoff)  # the poll interval, cut short by a webhook or by stop
            if wake is not stop:
                wake.clear()
        with contextlib.suppress(BusError):
            self._state().release_lease(detector.name, self.owner)

    def _poll(self, detector: Detector, stop: threading.Event | None,
              keep_going: Callable[[], bool], *, run_id: str | None = None,
              records: list[RunRecord] | None = None) -> PollResult:
        """Poll ``detector`` once and record the poll (state store, metrics, history)."""
        started_at, started = datetime.now(UTC), time.perf_counter()
        monitor = self._monitor()
        try:
            result = detector.poll(stop, keep_going=keep_going)
        except Exception as exc:
            message = exc.message if isinstance(exc, BusError) else f"{type(exc).__name__}: {exc}"
            record = monitor.polled(detector, started=started_at,
                                    seconds=time.perf_counter() - started, result=None,
                                    error=message, run_id=run_id)
            if records is not None:
                records.append(record)
            raise
        record = monitor.polled(detector, started=started_at, seconds=time.perf_counter() - started,
                                result=result, error=None, run_id=run_id)
        if records is not None:
            records.append(record)
        return result

    def sweep(self) -> None:
        """Reconcile the offline-transaction index with the dead-letter log (and move
        what pre-index quorum queues hold into it); failures are logged, never raised."""
        state = self._state()
        try:
            if not self._migrated:
                moved = migrate_legacy(self.config.broker.url)
                self._migrated = True
                if any(moved.values()):
                    log.warning("txlog_migrated", moved=moved)
            report = catch_up(state, self.config.broker.url,
                              delivery_limit=self.config.broker.delivery_limit)
            if report.indexed or report.located:
                log.info("txlog_swept", indexed=report.indexed, located=report.located,
                         stale=report.stale)
        except Exception as exc:  # noqa: BLE001 - the next sweep tries again
            log.warning("txlog_sweep_failed", error=str(exc) or type(exc).__name__)

    def _sweep_loop(self, stop: threading.Event) -> None:
        """Sweep when the worker starts and every :data:`SWEEP_INTERVAL` seconds."""
        while not stop.is_set():
            self.sweep()
            stop.wait(SWEEP_INTERVAL)

    def _dead_total(self) -> int:
        """Error transactions of this config's links in the index."""
        counts = self._state().tx_counts(list(self.config.links))
        return sum(row.get("error", 0) for row in counts.values())

    def _housekeeping(self, stop: threading.Event) -> None:
        """Trim the histories to their retention, now and every hour."""
        while not stop.is_set():
            self._purge_history()
            stop.wait(HOUSEKEEPING_INTERVAL)

    def _purge_history(self) -> None:
        """Trim the Processed history, the sync history and the link activity."""
        cfg, state = self.config, self._state()
        windows = [ln.alert.minutes * 60 for ln in cfg.links.values() if ln.alert is not None]
        try:
            removed = state.purge_processed(cfg.state.history_retention)
            runs = state.purge_runs(cfg.state.run_retention)
            state.purge_activity(max([ACTIVITY_RETENTION, *windows]))
        except BusError as exc:
            log.warning("history_purge_failed", error=exc.message)
            return
        if removed or runs:
            log.info("history_purged", removed=removed, runs=runs)

    def _report_paused(self, summary: RunSummary) -> None:
        """Name the paused links of a run (their changes wait in their queues)."""
        for consumer, applier in self.consumers:
            if not consumer.paused.is_set():
                continue
            try:
                reason = (self._state().link_rows().get(applier.name) or {}).get(
                    "paused_reason") or "paused by an operator"
            except BusError:
                reason = "paused"
            summary.paused[applier.name] = reason
            pending = next((s.pending for s in summary.links if s.link == applier.name), 0)
            summary.errors.append(
                f"link {applier.name} is paused ({reason}); {pending} change(s) wait in its "
                f"queues: `syncbus link resume {applier.name}` when its cause is fixed")

    def _record_run(self, summary: RunSummary, run_id: str, started_at: datetime,
                    polls: list[RunRecord]) -> None:
        """Store the run in the sync history: the run, each link, each detector polled."""
        records = run_records(summary, run_id=run_id, started_at=started_at, worker=self.owner)
        try:
            self._state().add_runs([*records, *polls])
        except BusError as exc:
            log.warning("run_not_recorded", error=exc.message)

    def _monitor(self) -> Monitor:
        assert self.monitor is not None, "Worker.open() first"
        return self.monitor

    def _sample_interval(self) -> float | None:
        """Queue depths are sampled only for the metrics endpoint."""
        return self.config.metrics.sample_interval if self.health is not None else None

    def _lease(self, detector: Detector) -> bool:
        """Take or renew this worker's lease on ``detector``'s source entity.

        A lease left by a worker of this host whose process is gone (killed, crashed)
        is taken over at once; one of another host waits for its expiry.
        """
        state = self._state()
        if state.acquire_lease(detector.name, self.owner, LEASE_TTL):
            return True
        holder = state.lease_owner(detector.name)
        if holder is not None and _dead_local_owner(holder):
            log.info("lease_taken_over", detector=detector.name, dead_owner=holder)
            return state.acquire_lease(detector.name, self.owner, LEASE_TTL, dead_owner=holder)
        return False

    def _wait_lease(self, detector: Detector, deadline: float) -> bool:
        """Wait (at most one lease lifetime) for another worker's lease to end."""
        until = min(deadline, time.monotonic() + LEASE_TTL + 1)
        while not self._lease(detector):
            if time.monotonic() >= until:
                return False
            time.sleep(1.0)
        return True

    def _state(self) -> StateStore:
        assert self.state is not None, "Worker.open() first"
        return self.state

    def _wait_idle(self, deadline: float) -> bool:
        """Wait until every link's queues are empty and every consumer is idle.

        A paused link is left out: its changes wait in its queues until it is resumed.
        """
        while time.monotonic() < deadline:
            checked_at = time.monotonic()
            if self._pending() == 0:
                time.sleep(IDLE_SETTLE)
                if all(c.stats.connected and c.stats.idle_since is not None
                       and c.stats.idle_since <= checked_at
                       for c, _ in self.consumers if not c.paused.is_set()):
                    return True
            else:
                time.sleep(IDLE_SETTLE)
        return False

    def _pending(self) -> int:
        active = [c.queues for c, _ in self.consumers if not c.paused.is_set()]
        return self._count(*(n for q in active for n in _names(q)))

    def _count(self, *queues: str) -> int:
        """Ready messages in ``queues`` (one connection for all)."""
        with BrokerSession(self.config.broker.url) as broker:
            return broker.total(queues)

    def _link_summaries(self) -> list[LinkSummary]:
        out = []
        for consumer, applier in self.consumers:
            st, ap = consumer.stats, applier.stats
            name = applier.name if applier.flow.direction == "a2b" else applier.flow.name
            out.append(LinkSummary(
                link=name, upserted=ap.upserted, deleted=ap.deleted,
                skipped=ap.skipped, retried=st.retried, dead=st.dead,
                pending=self._count(*_names(consumer.queues)),
            ))
        return out

    @staticmethod
    def _thread(name: str, target: Callable[..., None], *args: object) -> threading.Thread:
        thread = threading.Thread(target=target, args=args, name=name, daemon=True)
        thread.start()
        return thread


def _names(queues: LinkQueues) -> list[str]:
    return [queues.work, *(name for _, name in queues.retries)]


def _dead_local_owner(owner: str) -> bool:
    """True when ``owner`` (host:pid:nonce) names a process of this host that is gone."""
    host, _, rest = owner.partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def run_records(summary: RunSummary, *, run_id: str, started_at: datetime,
                worker: str) -> list[RunRecord]:
    """The history records of a finished ``run --until-idle``: the run and each link.

    Args:
        summary: What the run did.
        run_id: Shared by every record of the run (its polls included).
        started_at: When the run started.
        worker: The worker's identity.
    """
    ended = datetime.now(UTC)
    status = ("failed" if summary.dead or summary.errors
              else "timed_out" if summary.timed_out else "ok")
    links = summary.links
    records = [RunRecord(
        run_id=run_id, kind="run", name="until-idle", started_at=started_at, ended_at=ended,
        status=status, upserts=sum(s.upserted for s in links),
        deletes=sum(s.deleted for s in links), skipped=sum(s.skipped for s in links),
        retried=sum(s.retried for s in links), dead=summary.dead,
        errors=len(summary.errors) + summary.dead, error="\n".join(summary.errors) or None,
        worker=worker)]
    for s in links:
        records.append(RunRecord(
            run_id=run_id, kind="link", name=s.link, started_at=started_at, ended_at=ended,
            status=("paused" if s.link in summary.paused else "failed" if s.dead else "ok"),
            upserts=s.upserted, deletes=s.deleted, skipped=s.skipped, retried=s.retried,
            dead=s.dead, errors=s.dead, error=summary.paused.get(s.link), worker=worker))
    return records
