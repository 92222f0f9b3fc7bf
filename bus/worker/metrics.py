"""Prometheus metrics of a worker (prometheus-client), one registry per worker.

Every worker owns a :class:`Metrics` with its own ``CollectorRegistry``, so several
workers in one process (tests) never mix their numbers; the worker's HTTP port
(``metrics.port`` in the config, see :mod:`bus.worker.health`) serves it at ``/metrics``.
Counters are updated per page and per batch, histograms of change-to-target latency
once per applied change (a bisect and an add, no I/O).

Names, types and labels (``docs/operations.md`` explains each)::

    syncbus_events_detected_total{connection,entity,op}          counter
    syncbus_events_published_total{connection,entity,op}         counter
    syncbus_publish_confirm_seconds{connection,entity}           histogram (per page)
    syncbus_detector_poll_seconds{connection,entity}             histogram
    syncbus_detector_poll_errors_total{connection,entity}        counter
    syncbus_detector_last_success_timestamp_seconds{connection,entity}  gauge
    syncbus_events_applied_total{link,entity,op}                 counter
    syncbus_events_skipped_total{link,entity}                    counter
    syncbus_events_retried_total{link,entity}                    counter
    syncbus_events_dead_lettered_total{link,entity}              counter
    syncbus_apply_batch_seconds{link,entity}                     histogram (per batch)
    syncbus_change_to_target_seconds{link,entity}                histogram (per change)
    syncbus_link_last_applied_timestamp_seconds{link,entity}     gauge
    syncbus_link_paused{link}                                    gauge (0/1)
    syncbus_alerts_fired_total{link}                             counter
    syncbus_queue_messages{link,queue}                           gauge (queue: work|retry)
    syncbus_dead_letter_queue_messages                           gauge
    syncbus_throttled_total{connection}                          counter
    syncbus_throttle_wait_seconds{connection}                    histogram
    syncbus_webhook_rejected_total{connection,reason}            counter

Connectors report throttling through :func:`record_throttle`, which needs no
reference to a worker: every live :class:`Metrics` that serves that connection
name counts it.
"""

from __future__ import annotations

import threading
import time
import weakref
from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

__all__ = ["Metrics", "record_throttle"]

#: Buckets (seconds) of publish-confirm and apply-batch latencies.
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
#: Buckets (seconds) of change-to-target latency: sub-second to a day offline.
END_TO_END_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
                      21600.0, 86400.0)
#: Buckets (seconds) of detector polls.
POLL_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)
#: Buckets (seconds) of Retry-After waits.
WAIT_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 3600.0)

_live: weakref.WeakSet[Metrics] = weakref.WeakSet()
_live_lock = threading.Lock()


class Metrics:
    """The metric families of one worker, registered in a registry of their own.

    Args:
        connections: Connection names this worker serves (for :func:`record_throttle`).
    """

    def __init__(self, connections: Iterable[str] = ()) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.connections = set(connections)
        reg = self.registry
        src, link = ("connection", "entity"), ("link", "entity")
        self.detected = Counter("syncbus_events_detected", "Changes read from a source.",
                                [*src, "op"], registry=reg)
        self.published = Counter("syncbus_events_published",
                                 "Change events confirmed by RabbitMQ.", [*src, "op"], registry=reg)
        self.publish_confirm = Histogram(
            "syncbus_publish_confirm_seconds", "Publish and confirm of one page of events.",
            src, buckets=LATENCY_BUCKETS, registry=reg)
        self.poll_seconds = Histogram("syncbus_detector_poll_seconds",
                                      "Duration of successful detector polls.", src,
                                      buckets=POLL_BUCKETS, registry=reg)
        self.poll_errors = Counter("syncbus_detector_poll_errors", "Failed detector polls.",
                                   src, registry=reg)
        self.poll_success = Gauge("syncbus_detector_last_success_timestamp_seconds",
                                  "Unix time the last successful poll ended.", src, registry=reg)
        self.applied = Counter("syncbus_events_applied", "Changes written to a target.",
                               [*link, "op"], registry=reg)
        self.skipped = Counter("syncbus_events_skipped",
                               "Changes acknowledged without a write (stale, superseded, "
                               "ignored deletes).", link, registry=reg)
        self.retried = Counter("syncbus_events_retried",
                               "Changes sent to a retry queue.", link, registry=reg)
        self.dead = Counter("syncbus_events_dead_lettered",
                            "Changes sent to the dead-letter queue.", link, registry=reg)
        self.apply_seconds = Histogram("syncbus_apply_batch_seconds",
                                       "Map, write and record one batch.", link,
                                       buckets=LATENCY_BUCKETS, registry=reg)
        self.end_to_end = Histogram("syncbus_change_to_target_seconds",
                                    "From detection of a change to its write in the target.",
                                    link, buckets=END_TO_END_BUCKETS, registry=reg)
        self.last_applied = Gauge("syncbus_link_last_applied_timestamp_seconds",
                                  "Unix time of the last write to the target.", link,
                                  registry=reg)
        self.paused = Gauge("syncbus_link_paused", "1 while the link is paused.", ["link"],
                            registry=reg)
        self.alerts = Counter("syncbus_alerts_fired", "Alert rules that fired.", ["link"],
                              registry=reg)
        self.queue_messages = Gauge("syncbus_queue_messages",
                                    "Ready messages of a link's work or retry queues (sampled).",
                                    ["link", "queue"], registry=reg)
        self.dead_letters = Gauge("syncbus_dead_letter_queue_messages",
                                  "Error transactions of this config in the offline-transaction index (sampled).",
                                  registry=reg)
        self.throttled = Counter("syncbus_throttled", "Responses 429 (Too Many Requests).",
                                 ["connection"], registry=reg)
        self.throttle_wait = Histogram("syncbus_throttle_wait_seconds",
                                       "Waits asked for by Retry-After.", ["connection"],
                                       buckets=WAIT_BUCKETS, registry=reg)
        self.webhooks_rejected = Counter(
            "syncbus_webhook_rejected",
            "Webhook notification POSTs refused (reason: missing_client_state, "
            "wrong_client_state, unknown_resource, malformed, too_large).",
            ["connection", "reason"], registry=reg)
        with _live_lock:
            _live.add(self)

    # -- detectors ------------------------------------------------------------------------

    def page_read(self, connection: str, entity: str, upserts: int, deletes: int) -> None:
        """Count a page of changes read from a source."""
        if upserts:
            self.detected.labels(connection, entity, "upsert").inc(upserts)
        if deletes:
            self.detected.labels(connection, entity, "delete").inc(deletes)

    def page_published(self, connection: str, entity: str, upserts: int, deletes: int,
                       seconds: float) -> None:
        """Count a page of events confirmed by the broker and its confirm latency."""
        if upserts:
            self.published.labels(connection, entity, "upsert").inc(upserts)
        if deletes:
            self.published.labels(connection, entity, "delete").inc(deletes)
        self.publish_confirm.labels(connection, entity).observe(seconds)

    def polled(self, connection: str, entity: str, seconds: float, *, ok: bool) -> None:
        """Record one detector poll."""
        if ok:
            self.poll_seconds.labels(connection, entity).observe(seconds)
            self.poll_success.labels(connection, entity).set(time.time())
        else:
            self.poll_errors.labels(connection, entity).inc()

    # -- links ----------------------------------------------------------------------------

    def batch_applied(self, link: str, entity: str, *, upserted: int, deleted: int,
                      skipped: int, latencies: Iterable[float]) -> None:
        """Record what the target confirmed for one batch (latencies: one per change)."""
        if upserted:
            self.applied.labels(link, entity, "upsert").inc(upserted)
        if deleted:
            self.applied.labels(link, entity, "delete").inc(deleted)
        if skipped:
            self.skipped.labels(link, entity).inc(skipped)
        if upserted or deleted:
            self.last_applied.labels(link, entity).set(time.time())
        histogram = self.end_to_end.labels(link, entity)
        for latency in latencies:
            histogram.observe(max(latency, 0.0))

    def batch_settled(self, link: str, entity: str, *, retried: int, dead: int,
                      seconds: float) -> None:
        """Record one settled batch: its handling time, retry and dead-letter copies."""
        self.apply_seconds.labels(link, entity).observe(seconds)
        if retried:
            self.retried.labels(link, entity).inc(retried)
        if dead:
            self.dead.labels(link, entity).inc(dead)

    def link_paused(self, link: str, paused: bool) -> None:
        self.paused.labels(link).set(1 if paused else 0)

    def alert_fired(self, link: str) -> None:
        self.alerts.labels(link).inc()

    def queue_depths(self, link: str, *, work: int, retry: int) -> None:
        self.queue_messages.labels(link, "work").set(work)
        self.queue_messages.labels(link, "retry").set(retry)

    # -- connections ----------------------------------------------------------------------

    def throttle(self, connection: str, retry_after: float | None) -> None:
        """Count one 429 of ``connection`` and the wait it asked for."""
        self.throttled.labels(connection).inc()
        if retry_after is not None:
            self.throttle_wait.labels(connection).observe(max(retry_after, 0.0))

    def webhook_rejected(self, connection: str, reason: str) -> None:
        """Count one notification POST the webhook receiver of ``connection`` refused."""
        self.webhooks_rejected.labels(connection, reason).inc()

    # -- exposition -----------------------------------------------------------------------

    def render(self) -> bytes:
        """The registry in the Prometheus text format."""
        return generate_latest(self.registry)

    def close(self) -> None:
        """Stop receiving :func:`record_throttle` calls."""
        with _live_lock:
            _live.discard(self)


def record_throttle(connection: str, retry_after: float | None = None) -> None:
    """Count a 429 answer of ``connection`` (and its Retry-After seconds, if given).

    The hook HTTP connectors call; cheap and safe from any thread, and a no-op when
    no worker serving ``connection`` runs in this process.

    Args:
        connection: The connection name of the config.
        retry_after: Seconds the server asked to wait, if it did.
    """
    with _live_lock:
        targets = [m for m in _live if connection in m.connections]
    for metrics in targets:
        metrics.throttle(connection, retry_after)
