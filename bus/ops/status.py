"""``syncbus status``: is every link syncing, how far behind, what failed, and when?

One look at the whole bus, built from what the workers keep in the state store and
what RabbitMQ reports, without reading any log:

- **broker** and **state store**: reachable or not;
- **connections**: each system an enabled link reads or writes answers a metadata
  request for its entities (``--no-probe`` skips it);
- **detectors** (one per source entity, side b's of a two-way link too): last successful poll, last change seen,
  committed cursor, lag (seconds since the detector was last known to be caught up:
  the start of its last successful poll or its last page), which worker polls it,
  last error;
- **links** (one row per direction: a two-way link has an a → b and a b → a row):
  ready messages in the direction's work queue, messages waiting in its retry queues,
  its transactions in error (dead-letter queue), changes applied in the last minute,
  last applied, paused or not (and why), last failure.

The bus is **unhealthy** (exit code 1; 4 when RabbitMQ cannot be used) when the
broker or the state store cannot be reached, a connection does not answer, a link is
paused, a link has transactions in error, or a detector's lag exceeds
``max(3 × poll interval, 30 s)`` (``--max-lag`` sets the limit, e.g. for a cron-driven
``run --until-idle``) or it never polled.
So ``syncbus status`` doubles as a cron check or a container health probe.

Transactions in error per link come from counters the workers keep in the state
store; they are checked against the dead-letter queue's length (one cheap query),
and only when the two disagree (after a replay, an archive, or a message that
RabbitMQ dead-lettered itself) is the queue browsed once and the counters corrected.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from bus.amqp.errors import EXIT_BROKER
from bus.amqp.peek import printable
from bus.amqp.queues import queue_depths
from bus.amqp.topology import all_link_queues, link_queues
from bus.config.load import load_or_report
from bus.core.redact import redact_text, redact_url
from bus.state.store import StateStore
from connectors.base import BusError
from connectors.registry import open_connector
from schemas.config import SyncConfig

__all__ = [
    "Component",
    "DetectorStatus",
    "LinkStatus",
    "MIN_STALE",
    "STALE_FACTOR",
    "StatusReport",
    "collect_status",
    "counter_name",
    "dead_counts",
    "render",
    "show_status",
]

#: A detector is stale after this many poll intervals without a successful poll …
STALE_FACTOR = 3.0
#: … but never before this many seconds.
MIN_STALE = 30.0
#: Seconds each check (broker, state store, one connection) may take.
CHECK_TIMEOUT = 10.0


@dataclass(slots=True)
class Component:
    """The broker, the state store or a connection: reachable or not."""

    name: str
    ok: bool
    detail: str = ""


@dataclass(slots=True)
class DetectorStatus:
    """One source entity's change detector."""

    name: str
    connection: str
    entity: str
    interval: float
    cursor: str | None = None
    last_poll_at: datetime | None = None
    last_commit_at: datetime | None = None
    last_change_at: datetime | None = None
    lag: float | None = None
    polled_by: str | None = None
    last_error: str | None = None
    last_error_at: datetime | None = None
    problem: str | None = None


@dataclass(slots=True)
class LinkStatus:
    """One link direction."""

    name: str
    #: ``a2b`` or ``b2a``; a two-way link has one of each.
    direction: str
    source: str
    target: str
    #: Whether the link flows both ways (its rows then name their direction).
    two_way: bool = False
    ready: int | None = None
    retry: int | None = None
    error: int | None = None
    applied_last_minute: int | None = None
    dead_last_minute: int | None = None
    last_applied_at: datetime | None = None
    paused: bool = False
    paused_reason: str | None = None
    paused_by: str | None = None
    paused_at: datetime | None = None
    last_failure: str | None = None
    last_failure_at: datetime | None = None
    problems: list[str] = field(default_factory=list)


@dataclass(slots=True)
class StatusReport:
    """Everything ``syncbus status`` shows."""

    checked_at: datetime
    broker: Component
    state: Component
    connections: list[Component] = field(default_factory=list)
    detectors: list[DetectorStatus] = field(default_factory=list)
    links: list[LinkStatus] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready view (times as ISO 8601)."""
        return _jsonable({"healthy": self.healthy, **asdict(self)})  # type: ignore[no-any-return]


def collect_status(config: SyncConfig, *, probe: bool = True, max_lag: float | None = None,
                   timeout: float = CHECK_TIMEOUT) -> StatusReport:
    """Check the bus of ``config`` once.

    Args:
        config: The configuration (its enabled links and their sources are checked).
        probe: Ask every connection of an enabled link for its entities' metadata.
        max_lag: Seconds of detector lag tolerated (default: ``max(3 × interval, 30 s)``).
        timeout: Seconds each reachability check may take.

    Returns:
        The report; ``report.problems`` lists what makes the bus unhealthy.
    """
    now = datetime.now(UTC)
    enabled = {n: lk for n, lk in config.links.items() if lk.enabled}
    report = StatusReport(now, Component("broker", False), Component("state store", False))
    tables, report.state = _state_tables(config, timeout)
    depths, report.broker = _queue_depths(config, timeout)
    if probe:
        report.connections = _probe(config, timeout)
    errors: dict[str, int] | None = None
    if tables:
        try:
            if report.broker.ok:
                _sweep(config, tables["state"], report)
            errors = dead_counts(tables["state"])
        except BusError as exc:
            report.state = Component("state store", False, exc.message)
    report.detectors = _detectors(config, tables, now, max_lag)
    report.links = [_link(name, link, direction, tables, depths, errors)
                    for name, link in enabled.items() for direction in link.directions]
    report.problems = _problems(report)
    if tables:
        tables["state"].close()
    return report


def _sweep(config: SyncConfig, state: StateStore, report: StatusReport) -> None:
    """Index what RabbitMQ dead-lettered itself, unless a worker swept lately."""
    from bus.amqp.txsweep import catch_up_if_stale  # noqa: PLC0415 - kombu/pika only with a broker

    warning = catch_up_if_stale(state, config.broker.url,
                                delivery_limit=config.broker.delivery_limit)
    if warning:
        report.broker = Component("broker", True, warning)


def dead_counts(state: StateStore | None) -> dict[str, int]:
    """Error transactions per link direction, from the offline-transaction index.

    Keys are the workers' counter names: the link's name for a → b, ``<link>.b2a``
    for b → a. Letters RabbitMQ dead-lettered itself are counted once a sweep indexed
    them (a running worker sweeps every 30 s).

    Raises:
        ConnectorUnavailable: the state store cannot be reached.
    """
    if state is None:
        return {}
    counts: dict[str, int] = {}
    for (link, direction), n in state.tx_count_by_direction("error").items():
        name = counter_name(link, "b2a" if direction == "b2a" else "a2b")
        counts[name] = counts.get(name, 0) + n  # a letter whose queue is unknown: a → b
    return counts


def show_status(path: Path, *, as_json: bool = False, watch: bool = False,
                interval: float = 2.0, probe: bool = True, max_lag: float | None = None,
                timeout: float = CHECK_TIMEOUT, console: Console | None = None) -> int:
    """What ``syncbus status`` does: check, print, and return the exit code.

    Args:
        path: The config file.
        as_json: Print the report as JSON instead of tables.
        watch: Refresh every ``interval`` seconds until Ctrl-C.
        interval: Seconds between two refreshes with ``watch``.
        probe: Check that every connection answers.
        max_lag: Seconds of detector lag tolerated (see :func:`collect_status`).
        timeout: Seconds each reachability check may take.
        console: Where to print (default: stdout).

    Returns:
        0 healthy, 1 unhealthy, 2 invalid configuration, 4 RabbitMQ cannot be used.
    """
    console = console or Console()
    # Whole lines, not wrapped (grep, logs).
    loaded = load_or_report(path, lambda line: console.print(line, markup=False, soft_wrap=True))
    if loaded is None:
        return 2
    config = loaded.config

    def check() -> StatusReport:
        return collect_status(config, probe=probe, max_lag=max_lag, timeout=timeout)

    report = check()
    if not watch:
        if as_json:
            console.print_json(json.dumps(report.to_json()))
        else:
            console.print(render(report))
        return _exit_code(report)
    try:
        with Live(render(report), console=console, auto_refresh=False) as live:
            while True:
                time.sleep(interval)
                report = check()
                live.update(render(report), refresh=True)
    except KeyboardInterrupt:
        pass
    return _exit_code(report)


def _exit_code(report: StatusReport) -> int:
    """0 healthy, 4 RabbitMQ cannot be used (``bus.amqp.errors``), 1 otherwise unhealthy."""
    if report.healthy:
        return 0
    return EXIT_BROKER if not report.broker.ok else 1


def render(report: StatusReport) -> RenderableType:
    """The report as rich tables: systems, detectors, link directions, failures, problems.

    Laid out for an 80-column terminal: each link direction is one row (a two-way link
    has an ``a → b`` and a ``b → a`` row, with the entities it reads and writes under
    its name); the last failure of each direction and detector follows the tables.
    """
    now = report.checked_at
    verdict = Text("healthy", style="bold green") if report.healthy else Text(
        "UNHEALTHY", style="bold red")
    head = Text.assemble("syncbus status at ", now.astimezone().strftime("%Y-%m-%d %H:%M:%S"),
                         ": ", verdict)
    systems = Table("system", "", "detail", box=None, pad_edge=False)
    for c in (report.broker, report.state, *report.connections):
        systems.add_row(_cell(c.name), _mark(c.ok), _cell(c.detail))
    parts: list[RenderableType] = [head, "", systems, "", _detector_table(report),
                                   "", _link_table(report)]
    failures = _failures(report)
    if failures:
        parts += ["", Text("last failures:", style="bold yellow"), _bullets(failures)]
    if report.problems:
        parts += ["", Text("problems:", style="bold red"),
                  _bullets([printable(p, 500) for p in report.problems])]
    return Group(*parts)


def _detector_table(report: StatusReport) -> Table:
    now = report.checked_at
    table = Table(box=None, pad_edge=False)
    table.add_column("detector", overflow="fold", ratio=1, min_width=16)
    for header in ("last\npoll", "last\nchange", "lag"):
        table.add_column(header, no_wrap=True)
    table.add_column("cursor", no_wrap=True, overflow="ellipsis", max_width=12)
    table.add_column("polled by", no_wrap=True, overflow="ellipsis", max_width=14)
    table.add_column("state", no_wrap=True)
    for d in report.detectors:
        table.add_row(_cell(d.name), _ago(d.last_poll_at, now), _ago(d.last_change_at, now),
                      "-" if d.lag is None else f"{d.lag:.0f}s", _cell(d.cursor or "-"),
                      _cell(d.polled_by or "nobody"), _detector_state(d, _failing(d)))
    return table


def _link_table(report: StatusReport) -> Table:
    now = report.checked_at
    table = Table(box=None, pad_edge=False)
    table.add_column("link\n  from → to", overflow="fold", ratio=1)
    for header in ("pending", "retry", "error", "applied\n/min", "last\napplied", "state"):
        table.add_column(header, no_wrap=True)
    for lk in report.links:
        name = Text(printable(_label(lk), 200))
        name.append(f"\n  {printable(lk.source, 200)} → {printable(lk.target, 200)}",
                    style="dim")
        table.add_row(name, _n(lk.ready), _n(lk.retry), _n(lk.error),
                      _n(lk.applied_last_minute), _ago(lk.last_applied_at, now), _link_state(lk))
    return table


def _failures(report: StatusReport) -> list[str]:
    """The last failure of every link direction and detector still failing."""
    now = report.checked_at
    out = [f"link {_label(lk)}, {_ago(lk.last_failure_at, now)}: {lk.last_failure}"
           for lk in report.links if lk.last_failure]
    out += [f"detector {d.name}, {_ago(d.last_error_at, now)}: {d.last_error}"
            for d in report.detectors if d.last_error and _failing(d)]
    return [printable(line, 500) for line in out]


def _bullets(lines: list[str]) -> Table:
    """A list whose wrapped lines stay indented under their bullet."""
    grid = Table.grid(padding=(0, 1))
    grid.add_column(no_wrap=True)
    grid.add_column(overflow="fold")
    for line in lines:
        grid.add_row(" -", Text(line))
    return grid


def _label(lk: LinkStatus) -> str:
    """``customers`` for a one-way a → b link; the direction is named otherwise."""
    if lk.two_way or lk.direction != "a2b":
        return f"{lk.name} ({'a → b' if lk.direction == 'a2b' else 'b → a'})"
    return lk.name


def _failing(d: DetectorStatus) -> bool:
    return bool(d.last_error_at and (d.last_poll_at is None or d.last_error_at > d.last_poll_at))


# -- gathering -------------------------------------------------------------------------------


def _state_tables(config: SyncConfig, timeout: float) -> tuple[dict[str, Any] | None, Component]:
    def read() -> dict[str, Any]:
        state = StateStore(config.state.url, connect_timeout=timeout)
        try:
            return {"state": state, "checkpoints": state.checkpoint_rows(),
                    "detectors": state.detector_rows(), "leases": state.lease_owners(),
                    "links": state.link_rows(),
                    "minute": state.activity_since(datetime.now(UTC) - timedelta(minutes=1))}
        except BaseException:
            state.close()
            raise

    url = redact_url(config.state.url)
    ok, value = _within(read, timeout)
    if not ok:
        return None, Component("state store", False, f"{url}: {value}")
    return value, Component("state store", True, url)


def _queue_depths(config: SyncConfig, timeout: float) -> tuple[dict[str, int | None], Component]:
    names: list[str] = []
    for name, link in config.links.items():
        if link.enabled:
            for lq in all_link_queues(name, link):
                names += [lq.work, *(q for _, q in lq.retries)]

    def read() -> dict[str, int | None]:
        return queue_depths(config.broker.url, names, timeout=timeout, name_url=False)

    url = redact_url(config.broker.url)
    ok, value = _within(read, timeout + 5)
    if not ok:
        return {}, Component("broker", False, f"{url}: {value}")
    return value, Component("broker", True, url)


def _probe(config: SyncConfig, timeout: float) -> list[Component]:
    wanted: dict[str, set[str]] = {}
    for link in config.links.values():
        if link.enabled:
            wanted.setdefault(link.source.connection, set()).add(link.source.entity)
            wanted.setdefault(link.target.connection, set()).add(link.target.entity)

    def check(name: str, entities: set[str]) -> Callable[[], str]:
        def run() -> str:
            connector = open_connector(name, config.connections[name])
            try:
                connector.describe(sorted(entities))
            finally:
                connector.close()
            return f"answers ({', '.join(sorted(entities))})"
        return run

    checks = {name: _start(check(name, entities)) for name, entities in sorted(wanted.items())}
    deadline = time.monotonic() + timeout
    out = []
    for name, (thread, box) in checks.items():
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            out.append(Component(name, False, f"no answer within {timeout:g}s"))
        else:
            ok, value = box
            out.append(Component(name, bool(ok), str(value)))
    return out


def _detectors(config: SyncConfig, tables: dict[str, Any] | None, now: datetime,
               max_lag: float | None) -> list[DetectorStatus]:
    sources: dict[tuple[str, str], float] = {}
    for link in config.links.values():
        if link.enabled:
            for direction in link.directions:  # b → a reads side b: its own detector
                src = link.source if direction == "a2b" else link.target
                key = (src.connection, src.entity)
                sources[key] = min(sources.get(key, link.poll_interval), link.poll_interval)
    out = []
    for (conn, entity), interval in sources.items():
        d = DetectorStatus(f"{conn}.{entity}", conn, entity, interval)
        out.append(d)
        if tables is None:
            continue
        cp = tables["checkpoints"].get(d.name) or {}
        polls = tables["detectors"].get(d.name) or {}
        d.cursor, d.last_commit_at = cp.get("cursor"), cp.get("updated_at")
        d.last_change_at = cp.get("last_change_at")
        d.last_poll_at = polls.get("last_ok_at")
        d.last_error, d.last_error_at = polls.get("last_error"), polls.get("last_error_at")
        d.polled_by = tables["leases"].get(d.name)
        alive = max((t for t in (d.last_poll_at, d.last_commit_at) if t), default=None)
        if alive is None:
            d.problem = "never polled (is a worker running?)"
            continue
        d.lag = max(0.0, (now - alive).total_seconds())
        limit = max_lag if max_lag is not None else max(STALE_FACTOR * interval, MIN_STALE)
        if d.lag > limit:
            failing = d.last_error_at is not None and d.last_error_at >= alive
            why = f": {d.last_error}" if failing else " (is a worker running?)"
            d.problem = f"no successful poll for {d.lag:.0f}s (limit {limit:g}s){why}"
    return out


def counter_name(link: str, direction: str) -> str:
    """The name a direction's counters and activity are kept under (as the workers do)."""
    return link if direction == "a2b" else f"{link}.{direction}"


def _link(name: str, link: Any, direction: str, tables: dict[str, Any] | None,
          depths: dict[str, int | None], errors: dict[str, int] | None) -> LinkStatus:
    lq = link_queues(name, link, direction)
    src, dst = (link.source, link.target) if direction == "a2b" else (link.target, link.source)
    st = LinkStatus(name, direction, f"{src.connection}.{src.entity}",
                    f"{dst.connection}.{dst.entity}", two_way=len(link.directions) > 1)
    counters = counter_name(name, direction)
    first = direction == link.directions[0]  # link-wide problems are told once
    if depths:
        st.ready = depths.get(lq.work)
        retries = [depths.get(q) for _, q in lq.retries]
        st.retry = None if any(v is None for v in retries) else sum(v or 0 for v in retries)
        if st.ready is None:
            st.problems.append("its queues do not exist yet (has a worker run this config?)")
    if errors is not None:
        st.error = errors.get(counters, 0)
        if st.error:
            st.problems.append(f"{st.error} transaction(s) in error "
                               f"(syncbus tx list --link {name})")
    if tables is not None:
        pause = tables["links"].get(name) or {}  # pausing a link pauses both directions
        row = tables["links"].get(counters) or {}
        minute = tables["minute"].get(counters) or {}
        st.applied_last_minute = minute.get("applied", 0)
        st.dead_last_minute = minute.get("dead", 0)
        st.last_applied_at = row.get("last_applied_at")
        st.paused = bool(pause.get("paused"))
        if st.paused:
            st.paused_reason, st.paused_by = pause.get("paused_reason"), pause.get("paused_by")
            st.paused_at = pause.get("paused_at")
            if first:
                st.problems.append(f"paused: {st.paused_reason or 'by an operator'} "
                                   f"(syncbus link resume {name})")
        failed_at = row.get("last_failure_at")
        if failed_at is not None and (st.last_applied_at is None or failed_at > st.last_applied_at):
            st.last_failure, st.last_failure_at = row.get("last_failure"), failed_at
    return st


def _problems(report: StatusReport) -> list[str]:
    problems = []
    for component in (report.broker, report.state, *report.connections):
        if not component.ok:
            what = component.name if component.name in ("broker", "state store") else (
                f"connection {component.name}")
            # The broker's detail says why (unreachable, login refused, no such vhost).
            verdict = "not usable" if what == "broker" else "unreachable"
            problems.append(f"{what} {verdict}: {component.detail}")
    problems += [f"detector {d.name}: {d.problem}" for d in report.detectors if d.problem]
    problems += [f"link {_label(lk)}: {p}" for lk in report.links for p in lk.problems]
    return problems


# -- helpers -------------------------------------------------------------------------------


def _start(fn: Callable[[], Any]) -> tuple[threading.Thread, list[Any]]:
    """Run ``fn`` in a daemon thread; the box gets [True, result] or [False, error text]."""
    box: list[Any] = [False, "not finished"]

    def run() -> None:
        try:
            box[:] = [True, fn()]
        except BusError as exc:
            box[:] = [False, exc.message]
        except Exception as exc:  # noqa: BLE001 - report any failure as the check's result
            box[:] = [False, redact_text(f"{type(exc).__name__}: {exc}")]

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, box


def _within(fn: Callable[[], Any], timeout: float) -> tuple[bool, Any]:
    """``fn()`` with a deadline: (True, result) or (False, why not)."""
    thread, box = _start(fn)
    thread.join(timeout)
    if thread.is_alive():
        return False, f"no answer within {timeout:g}s"
    return bool(box[0]), box[1]


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    return value


def _cell(text: str) -> Text:
    """Plain text for a table cell: no markup, control characters escaped."""
    return Text(printable(text, 200))


def _mark(ok: bool) -> Text:
    return Text("ok", style="green") if ok else Text("DOWN", style="bold red")


def _detector_state(d: DetectorStatus, failing: bool) -> Text:
    if d.problem:
        label = "never polled" if d.lag is None else "failing" if failing else "lagging"
        return Text(label, style="bold red")
    if d.lag is None:
        return Text("unknown", style="yellow")  # the state store did not answer
    return Text("failing, retrying", style="yellow") if failing else Text("ok", style="green")


def _link_state(lk: LinkStatus) -> Text:
    """A short label; the details are in the problems list."""
    labels = []
    if lk.paused:
        labels.append("paused")
    if lk.error:
        labels.append("errors")
    if lk.ready is None and lk.retry is None and lk.problems:
        labels.append("no queues")
    if labels:
        return Text(", ".join(labels), style="bold red")
    if lk.ready is None or lk.error is None or lk.applied_last_minute is None:
        return Text("unknown", style="yellow")  # the broker or the state store did not answer
    if lk.last_failure and lk.retry:
        return Text("retrying", style="yellow")
    return Text("ok", style="green")


def _ago(when: datetime | None, now: datetime) -> str:
    if when is None:
        return "never"
    seconds = max(0.0, (now - when).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit} ago"
    return f"{seconds:.0f}s ago"


def _short(text: str | None, width: int = 24) -> str:
    if not text:
        return "-"
    return text if len(text) <= width else text[: width - 1] + "…"


def _n(value: int | None) -> str:
    return "?" if value is None else str(value)
