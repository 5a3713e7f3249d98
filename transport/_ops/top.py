"""``transport top``: a live view of queues and delivery registries.

Everything shown comes from the SPI (``stats()``, ``records()``, the
capability registry), so it works the same on every backend. The rendering
uses ``rich`` (the ``cli`` extra), imported only when a view is drawn.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any

from transport._spi.doctor import ProvisionPlan
from transport._spi.models import Capability, utcnow
from transport._spi.queue import RequestQueue
from transport._spi.transport import Transport
from transport.errors import BackendNotAvailableError, TransportError, UnsupportedFeatureError

if TYPE_CHECKING:
    from rich.console import Console, RenderableType

__all__ = ["QueueRow", "RegistryRow", "Snapshot", "TopCollector", "render", "require_rich"]


@dataclass(frozen=True)
class QueueRow:
    queue: str
    levels: int
    depth: int | None
    in_flight: int | None
    delayed: int | None
    dead_lettered: int
    #: Change of the depth per second since the last refresh: positive while
    #: the backlog grows, negative while the workers drain it.
    depth_rate: float | None
    #: How long the request next in line has waited since its first enqueue
    #: (None: nothing waits, or the backend cannot tell).
    head_age_seconds: float | None = None
    #: Lag per partition (Kafka; keyed "<level>:<partition>" for priority
    #: queues); None where the backend has no partitions.
    partition_lag: dict[str, int] | None = None


@dataclass(frozen=True)
class RegistryRow:
    registry: str
    #: Requests sent and still awaiting their response.
    pending: int
    #: Responses recorded and not yet collected by the caller.
    completed: int


@dataclass(frozen=True)
class Snapshot:
    at: datetime
    backend: str
    queues: list[QueueRow] = field(default_factory=list)
    registries: list[RegistryRow] = field(default_factory=list)
    error: str | None = None
    #: Named queues and registries that do not exist on the backend (shown
    #: as such: a view never creates them), e.g. ``["queue 'orders'"]``.
    missing: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["at"] = self.at.isoformat(timespec="seconds")
        return data


def require_rich() -> None:
    """Raises: BackendNotAvailableError (a ConfigurationError) saying what to
    install, when ``rich`` is missing."""
    try:
        import rich  # noqa: F401
    except ImportError as exc:
        raise BackendNotAvailableError(
            "cli", "transport top needs rich: pip install 'agentensemble-transport[cli]'"
        ) from exc


def advertised_levels(capabilities: Iterable[Capability]) -> dict[str, int]:
    """Each advertised queue (an ensemble's queue, else its name) and its
    priority levels (the most any advertisement of it declares)."""
    found: dict[str, int] = {}
    for cap in capabilities:
        name = cap.queue or cap.ensemble
        found[name] = max(found.get(name, 1), cap.priority_levels)
    return found


#: Seconds the CLI waits for the capability registry to learn a queue's levels.
_LEVELS_LOOKUP_S = 10.0


async def queue_levels(transport: Transport, names: list[str], given: int | None) -> dict[str, int]:
    """Each queue's priority levels: ``--levels`` if given, else as the
    capability registry advertises them (the queue of a live ensemble),
    else 1. A registry that does not exist, or cannot be read within
    :data:`_LEVELS_LOOKUP_S`, counts as advertising nothing.

    Raises: TransientTransportError if the broker cannot be asked."""
    if given is not None:
        return dict.fromkeys(names, given)
    advertised = await advertised_queue_levels(transport)
    return {name: advertised.get(name, 1) for name in names}


async def advertised_queue_levels(transport: Transport) -> dict[str, int]:
    """The levels of every queue the capability registry advertises; empty
    if it does not exist (it is not created), cannot be read without
    creating it, or does not answer within :data:`_LEVELS_LOOKUP_S`.

    Raises: TransientTransportError if the broker cannot be asked."""
    # Read only a registry that exists: a read-only command creates nothing
    # (and an unreachable broker is reported once, by this check).
    try:
        if await transport.missing(ProvisionPlan(capability_registry=True)):
            return {}
    except UnsupportedFeatureError:
        # The backend cannot tell without creating (Pulsar without an admin
        # URL, whose readers create topics): not read.
        return {}
    advertised: dict[str, int] = {}
    with contextlib.suppress(TransportError, UnsupportedFeatureError, TimeoutError):
        async with asyncio.timeout(_LEVELS_LOOKUP_S):
            advertised = advertised_levels(await transport.capability_registry().all())
    return advertised


class TopCollector:
    """Reads one :class:`Snapshot` per call. Named queues are shown as given;
    without names, every queue advertised in the capability registry (with
    its advertised priority levels)."""

    def __init__(
        self,
        transport: Transport,
        queues: list[str],
        registries: list[str],
        levels: int | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.transport = transport
        self.timeout = timeout
        self.queues = list(queues)
        self.registries = list(registries)
        self.levels = levels
        self._handles: dict[tuple[str, int], RequestQueue] = {}
        self._last: dict[str, tuple[float, int]] = {}
        #: Objects seen to exist (a named one is looked for, never created,
        #: until it does: a typo must not create topics or streams).
        self._exist: set[tuple[str, str, int]] = set()
        self._levels: dict[str, int] | None = None

    async def _absent(self, kind: str, name: str, levels: int = 1) -> bool:
        """Whether a named queue or registry does not exist (looked up until
        it does; a backend that cannot tell without creating counts it as
        existing, as ``transport stats`` does)."""
        key = (kind, name, levels)
        if key in self._exist:
            return False
        if kind == "queue":
            plan = ProvisionPlan(queues={name: levels})
        else:
            plan = ProvisionPlan(delivery_registries=[name])
        try:
            if await self.transport.missing(plan):
                return True
        except UnsupportedFeatureError:
            pass
        self._exist.add(key)
        return False

    def _queue(self, name: str, levels: int) -> RequestQueue:
        handle = self._handles.get((name, levels))
        if handle is None:
            if levels > 1:
                handle = self.transport.priority_queue(name, levels=levels)
            else:
                handle = self.transport.request_queue(name)
            self._handles[(name, levels)] = handle
        return handle

    async def _targets(self) -> list[tuple[str, int]]:
        if self.queues:
            if self._levels is None:  # as given, else as advertised (looked up once)
                self._levels = await queue_levels(self.transport, self.queues, self.levels)
            return [(name, self._levels[name]) for name in self.queues]
        # Every advertised queue: none while there is no capability registry
        # (reading it would create it).
        with contextlib.suppress(UnsupportedFeatureError):
            if await self.transport.missing(ProvisionPlan(capability_registry=True)):
                return []
        found = advertised_levels(await self.transport.capability_registry().all())
        return sorted(found.items())

    async def snapshot(self) -> Snapshot:
        """Never raises for an unreachable backend: the snapshot carries the
        error (also when it does not answer within ``timeout`` seconds)."""
        backend = self.transport.config.redacted_url()
        try:
            async with asyncio.timeout(self.timeout):
                return await self._read(backend)
        except TimeoutError:
            error = f"no answer within {self.timeout:g}s"
        except (TransportError, OSError) as exc:
            error = f"{type(exc).__name__}: {exc}"
        return Snapshot(utcnow(), backend, error=error)

    async def _read(self, backend: str) -> Snapshot:
        rows = []
        missing: list[str] = []
        for name, levels in await self._targets():
            if self.queues and await self._absent("queue", name, levels):
                missing.append(f"queue {name!r}")
                continue
            stats = await self._queue(name, levels).stats()
            now = time.monotonic()
            rate = None
            previous = self._last.get(name)
            if stats.depth is not None:
                if previous is not None and now > previous[0]:
                    rate = (stats.depth - previous[1]) / (now - previous[0])
                self._last[name] = (now, stats.depth)
            head = stats.head_enqueued_at
            rows.append(
                QueueRow(
                    name,
                    levels,
                    stats.depth,
                    stats.in_flight,
                    stats.delayed,
                    stats.dead_lettered,
                    rate,
                    None if head is None else max((utcnow() - head).total_seconds(), 0.0),
                    stats.partition_lag,
                )
            )
        registries = []
        for name in self.registries:
            if await self._absent("registry", name):
                missing.append(f"delivery registry {name!r}")
                continue
            states = Counter(
                r.state for r in await self.transport.delivery_registry(name).records()
            )
            registries.append(RegistryRow(name, states["pending"], states["completed"]))
        return Snapshot(utcnow(), backend, rows, registries, missing=missing)

    async def aclose(self) -> None:
        for handle in self._handles.values():
            await handle.aclose()
        self._handles.clear()


def _lags(lags: dict[str, int] | None) -> str:
    """``0:12 1:0 2:3`` (partition:lag), the largest first past eight."""
    if not lags:
        return ""
    shown = sorted(lags.items(), key=lambda kv: -kv[1])[:8] if len(lags) > 8 else lags.items()
    more = f" +{len(lags) - 8}" if len(lags) > 8 else ""
    return " ".join(f"{k}:{v}" for k, v in shown) + more


def _n(value: int | None) -> str:
    return "?" if value is None else f"{value:,}"


def _age(row: QueueRow) -> str:
    """The head's wait: ``-`` when nothing waits, ``?`` when the backend
    cannot tell."""
    seconds = row.head_age_seconds
    if seconds is None:
        return "-" if row.depth == 0 else "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{int(seconds // 3600)}h{int(seconds % 3600 // 60):02d}m"


def render(snapshot: Snapshot) -> RenderableType:
    """The view of one snapshot: a table of queues, one of registries."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    # One line, cut at the terminal's width rather than wrapped (long URLs).
    title = Text(
        f"transport top — {snapshot.at:%Y-%m-%d %H:%M:%S} UTC — {snapshot.backend}",
        no_wrap=True,
        overflow="ellipsis",
    )
    queues = Table(expand=False)
    queues.add_column("QUEUE")
    queues.add_column("LEVELS", justify="right")
    queues.add_column("DEPTH", justify="right")
    queues.add_column("IN FLIGHT", justify="right")
    queues.add_column("DELAYED", justify="right")
    queues.add_column("DEAD", justify="right")
    queues.add_column("DEPTH/S", justify="right")
    queues.add_column("HEAD AGE", justify="right")
    # Only where a backend reports partitions (Kafka): narrow terminals.
    show_lag = any(row.partition_lag for row in snapshot.queues)
    if show_lag:
        queues.add_column("LAG BY PARTITION")
    for row in snapshot.queues:
        rate = "" if row.depth_rate is None else f"{row.depth_rate:+.1f}"
        cells: list[RenderableType] = [
            row.queue,
            str(row.levels),
            _n(row.depth),
            _n(row.in_flight),
            _n(row.delayed),
            Text(_n(row.dead_lettered), style="bold red" if row.dead_lettered else ""),
            rate,
            _age(row),
        ]
        if show_lag:
            cells.append(_lags(row.partition_lag))
        queues.add_row(*cells)
    parts: list[RenderableType] = [title, queues]
    if not snapshot.queues and snapshot.error is None and not snapshot.missing:
        parts.append(Text("no queues: name some, or start an ensemble that advertises"))
    if snapshot.registries:
        registries = Table(expand=False)
        registries.add_column("REGISTRY")
        registries.add_column("AWAITING RESPONSE", justify="right")
        registries.add_column("ANSWERED, NOT COLLECTED", justify="right")
        for reg in snapshot.registries:
            registries.add_row(reg.registry, f"{reg.pending:,}", f"{reg.completed:,}")
        parts.append(registries)
    if snapshot.missing:
        parts.append(
            Text(
                f"does not exist (nothing created): {', '.join(snapshot.missing)}",
                style="bold yellow",
            )
        )
    if snapshot.error is not None:
        parts.append(Text(f"backend unreachable: {snapshot.error}", style="bold red"))
    return Group(*parts)


async def run_top(
    collector: TopCollector,
    *,
    interval: float,
    count: int | None,
    as_json: bool,
    console: Console | None = None,
) -> Snapshot:
    """Refresh every ``interval`` seconds, ``count`` times (``None``: until
    cancelled); returns the last snapshot."""
    import json

    from rich.console import Console
    from rich.live import Live

    if console is None:
        console = Console()
        if not console.is_terminal:
            # Piped or redirected: rich assumes 80 columns and cut queue
            # names to fit; a file has no width to respect.
            console = Console(width=max(console.width, 240))
    refreshes = 0
    snapshot = await collector.snapshot()
    if as_json:
        while True:
            print(json.dumps(snapshot.to_json()), flush=True)
            refreshes += 1
            if count is not None and refreshes >= count:
                return snapshot
            await asyncio.sleep(interval)
            snapshot = await collector.snapshot()
    try:
        with Live(render(snapshot), console=console, auto_refresh=False) as live:
            while True:
                live.update(render(snapshot), refresh=True)
                refreshes += 1
                if count is not None and refreshes >= count:
                    return snapshot
                await asyncio.sleep(interval)
                snapshot = await collector.snapshot()
    finally:
        console.line()
