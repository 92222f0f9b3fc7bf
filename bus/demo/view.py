"""What ``syncbus demo`` shows: a live table of the links on a terminal, plain lines elsewhere.

On a terminal a rich live table of every link direction (events upserted, deleted,
skipped, in conflict, retried, dead-lettered) stays at the bottom and refreshes four
times a second while the step lines scroll above it. Elsewhere (CI, a pipe) there is
no live view: the step lines are printed as they are, and :meth:`DemoView.totals`
gives the same counts as plain lines at the end.
"""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from bus.amqp.consumer import BatchConsumer
from bus.worker.worker import RunSummary, Worker
from consumers.apply import LinkApplier

__all__ = ["DemoView"]

#: Columns of the table and of the plain totals, after the link and its route.
_COLUMNS = ("upserted", "deleted", "skipped", "conflicts", "retried", "dead")


class DemoView:
    """Where the demo's lines go.

    Args:
        echo: Prints one plain line (used when ``live`` is false).
        live: Show the live table (only on a terminal).
        labels: Short names of connections in the table ("dynamics" for "demo_crm").
    """

    def __init__(self, echo: Callable[[str], None], *, live: bool,
                 labels: dict[str, str] | None = None) -> None:
        self.echo = echo
        self.live = live
        self.labels = labels or {}
        self.status = ""
        self._worker: Worker | None = None
        self._published: dict[str, int] = {}
        self._echoes = 0
        self._live: Live | None = None

    def __enter__(self) -> DemoView:
        if self.live:
            self._live = Live(get_renderable=self._render, console=Console(),
                              refresh_per_second=4, transient=False)
            self._live.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._live is not None:
            self._live.stop()
            self._live = None

    def line(self, text: str) -> None:
        """Print one line (above the live table when there is one)."""
        if self._live is not None:
            self._live.console.print(Text(text), soft_wrap=True)
        else:
            self.echo(text)

    def watch(self, worker: Worker) -> None:
        """Show the link directions of ``worker`` (opened) from now on."""
        self._worker = worker

    def polled(self, summary: RunSummary) -> None:
        """Count the events a sync pass published, per detector."""
        for name, result in summary.detected.items():
            self._published[name] = self._published.get(name, 0) + result.changes
            self._echoes += result.echoes

    def totals(self) -> list[str]:
        """The table's counts as plain lines, one per link direction."""
        lines = [f"{label} ({route}): " + ", ".join(f"{n} {c}" for c, n in zip(_COLUMNS, counts,
                                                                             strict=True))
                 for label, route, counts in self._rows()]
        if self._published:
            lines.append(self._detected())
        return lines

    # -- rendering --------------------------------------------------------------------------

    def _rows(self) -> list[tuple[str, str, tuple[int, ...]]]:
        if self._worker is None:
            return []
        return [self._row(consumer, applier) for consumer, applier in self._worker.consumers]

    def _detected(self) -> str:
        parts = [f"{self._name(name)} {n}" for name, n in sorted(self._published.items())]
        return (f"published by the detectors: {', '.join(parts)}; {self._echoes} echoes of "
                "syncbus's own writes left out")

    def _name(self, detector: str) -> str:
        """``connection.entity`` with the connection's short label."""
        connection, _, entity = detector.partition(".")
        return f"{self.labels.get(connection, connection)}.{entity}"

    def _row(self, consumer: BatchConsumer, applier: LinkApplier,
             ) -> tuple[str, str, tuple[int, ...]]:
        flow, st, ap = applier.flow, consumer.stats, applier.stats
        label = applier.name if flow.direction == "a2b" else flow.name
        route = (f"{self._name(f'{flow.source.connection}.{flow.source.entity}')} → "
                 f"{self._name(f'{flow.target.connection}.{flow.target.entity}')}")
        return label, route, (ap.upserted, ap.deleted, ap.skipped, ap.conflicts, st.retried,
                              st.dead)

    def _render(self) -> RenderableType:
        table = Table(title="syncbus demo: events per link direction", title_justify="left",
                      expand=False)
        table.add_column("link")
        table.add_column("from → to")
        for column in _COLUMNS:
            table.add_column(column, justify="right")
        for label, route, counts in self._rows():
            table.add_row(label, route, *(str(n) for n in counts),
                          style="red" if counts[-1] else None)
        parts: list[RenderableType] = [table]
        if self._published:
            parts.append(Text(self._detected(), style="dim"))
        if self.status:
            parts.append(Text(self.status, style="bold"))
        return Group(*parts)

