"""Metrics hooks: counters and gauges named after what happened to requests.

The library calls a :class:`MetricsSink`; the default sink drops everything.
Install one with :func:`set_metrics_sink` — :class:`InMemoryMetrics` for
tests and dashboards in-process, or ``transport.prometheus.PrometheusMetrics``
(extra ``prometheus``) for a scrape endpoint.

Counters: ``enqueued``, ``delivered``, ``redelivered`` (attempt > 1),
``acked``, ``nacked``, ``dead_lettered``, ``lease_extended``,
``handler_failed``, ``duplicate_skipped``. Gauges: ``queue_depth``,
``queue_in_flight``, ``queue_dead_lettered``. Labels: ``queue`` (and
``ensemble``, ``task`` from the runtime).
"""

from __future__ import annotations

import threading
from collections import defaultdict
from collections.abc import Iterable
from datetime import timedelta
from typing import Protocol

from transport._spi.models import DeadLetter, QueueStats, WorkRequest
from transport._spi.queue import Delivery, RequestQueue

__all__ = [
    "InMemoryMetrics",
    "InstrumentedRequestQueue",
    "MetricsSink",
    "get_metrics_sink",
    "set_metrics_sink",
]

Labels = tuple[tuple[str, str], ...]


class MetricsSink(Protocol):
    """Where the library reports counters and gauges. Implementations are
    called inline on the event loop, so they must be fast and should not
    raise: an exception from a sink propagates to the queue operation (or
    the ensemble step) that reported it, after that operation took effect."""

    def increment(self, name: str, labels: dict[str, str], value: float = 1.0) -> None:
        """Add ``value`` to counter ``name`` for the series ``labels``."""
        ...

    def gauge(self, name: str, labels: dict[str, str], value: float) -> None:
        """Set gauge ``name`` for the series ``labels`` to ``value``."""
        ...


class _NullSink:
    def increment(self, name: str, labels: dict[str, str], value: float = 1.0) -> None:
        return None

    def gauge(self, name: str, labels: dict[str, str], value: float) -> None:
        return None


class InMemoryMetrics:
    """Thread-safe counters and gauges kept in a dict (tests, small apps)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: dict[tuple[str, Labels], float] = defaultdict(float)
        self.gauges: dict[tuple[str, Labels], float] = {}

    def increment(self, name: str, labels: dict[str, str], value: float = 1.0) -> None:
        """Add ``value`` to counter ``name`` for ``labels`` (thread-safe).
        Never raises for string labels."""
        with self._lock:
            self.counters[(name, tuple(sorted(labels.items())))] += value

    def gauge(self, name: str, labels: dict[str, str], value: float) -> None:
        """Set gauge ``name`` for ``labels`` to ``value`` (thread-safe).
        Never raises for string labels."""
        with self._lock:
            self.gauges[(name, tuple(sorted(labels.items())))] = value

    def count(self, name: str, **labels: str) -> float:
        """Sum of counter ``name`` over the series whose labels include
        ``labels`` (0.0 if none). A consistent snapshot; never raises."""
        with self._lock:
            return sum(
                v
                for (n, ls), v in self.counters.items()
                if n == name and set(labels.items()) <= set(ls)
            )


_NULL = _NullSink()
_sink: MetricsSink = _NULL


def set_metrics_sink(sink: MetricsSink | None) -> None:
    """Install the process-wide sink (``None`` restores the no-op sink).
    Queues opened afterwards are instrumented."""
    global _sink
    _sink = sink or _NULL


def get_metrics_sink() -> MetricsSink:
    return _sink


def metrics_enabled() -> bool:
    return _sink is not _NULL


class _InstrumentedDelivery(Delivery):
    __slots__ = ("_inner", "_labels", "_sink")

    def __init__(self, inner: Delivery, sink: MetricsSink, labels: dict[str, str]) -> None:
        super().__init__(inner.request)
        self._inner = inner
        self._sink = sink
        self._labels = labels

    async def ack(self) -> bool:
        done = await self._inner.ack()
        if done:
            self._sink.increment("acked", self._labels)
        return done

    async def nack(
        self, delay: float | timedelta | None = None, *, error: str | None = None
    ) -> bool:
        done = await self._inner.nack(delay, error=error)
        if done:
            self._sink.increment("nacked", self._labels)
        return done

    async def extend(self, seconds: float | timedelta | None = None) -> bool:
        done = await self._inner.extend(seconds)
        if done:
            self._sink.increment("lease_extended", self._labels)
        return done

    async def dead_letter(self, error: str) -> bool:
        done = await self._inner.dead_letter(error)
        if done:
            self._sink.increment("dead_lettered", self._labels)
        return done

    async def _release_uncounted(self) -> bool:
        return await self._inner._release_uncounted()


class InstrumentedRequestQueue(RequestQueue):
    """Wraps any queue and reports what happens through it.

    Every method has the wrapped queue's guarantees and raises what it
    raises; a metric is reported only after the operation succeeded, so an
    exception from the sink surfaces after the operation took effect.
    """

    def __init__(self, inner: RequestQueue, sink: MetricsSink) -> None:
        self.inner = inner
        self.name = inner.name
        self.lease_seconds = inner.lease_seconds
        self.max_attempts = inner.max_attempts
        self._sink = sink
        self._labels = {"queue": inner.name}

    async def enqueue(self, request: WorkRequest) -> WorkRequest:
        """As :meth:`RequestQueue.enqueue`, then counts ``enqueued``."""
        stored = await self.inner.enqueue(request)
        self._sink.increment("enqueued", self._labels)
        return stored

    async def poll(self, timeout: float | None = None) -> Delivery | None:
        """As :meth:`RequestQueue.poll`, then counts ``delivered`` (and
        ``redelivered`` for attempt > 1); the delivery counts its
        settlements (``acked``, ``nacked``, ``lease_extended``,
        ``dead_lettered``) when they return ``True``."""
        delivery = await self.inner.poll(timeout)
        if delivery is None:
            return None
        self._sink.increment("delivered", self._labels)
        if delivery.attempt > 1:
            self._sink.increment("redelivered", self._labels)
        return _InstrumentedDelivery(delivery, self._sink, self._labels)

    async def caught_up(self, timeout: float | None = None) -> bool:
        """As :meth:`RequestQueue.caught_up` (nothing is reported)."""
        return await self.inner.caught_up(timeout)

    async def stats(self) -> QueueStats:
        """As :meth:`RequestQueue.stats`, then sets the ``queue_depth``,
        ``queue_in_flight`` (when known) and ``queue_dead_lettered`` gauges."""
        stats = await self.inner.stats()
        if stats.depth is not None:
            self._sink.gauge("queue_depth", self._labels, stats.depth)
        if stats.in_flight is not None:
            self._sink.gauge("queue_in_flight", self._labels, stats.in_flight)
        self._sink.gauge("queue_dead_lettered", self._labels, stats.dead_lettered)
        return stats

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """As :meth:`RequestQueue.dead_letters` (nothing is reported)."""
        return await self.inner.dead_letters(limit)

    async def requeue_dead_letters(self, request_ids: Iterable[str] | None = None) -> int:
        """As :meth:`RequestQueue.requeue_dead_letters` (nothing is reported)."""
        return await self.inner.requeue_dead_letters(request_ids)

    async def aclose(self) -> None:
        """Close the wrapped queue (as :meth:`RequestQueue.aclose`)."""
        await self.inner.aclose()
