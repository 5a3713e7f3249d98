"""Metrics hooks: counters and gauges named after what happened to requests.

The library calls a :class:`MetricsSink`; the default sink drops everything.
Install one with :func:`set_metrics_sink` — :class:`InMemoryMetrics` for
tests and dashboards in-process, or ``transport.prometheus.PrometheusMetrics``
(extra ``prometheus``) for a scrape endpoint.

Counters: ``enqueued``, ``delivered``, ``redelivered`` (attempt > 1),
``acked``, ``nacked``, ``dead_lettered``, ``lease_extended``,
``handler_failed``, ``duplicate_skipped``. Gauges: ``queue_depth``,
``queue_in_flight``, ``queue_dead_lettered``, ``queue_partition_lag``
(labels ``queue`` and ``partition``; Kafka). Histograms (seconds):
``queue_wait_seconds`` (first enqueue to first delivery, labels ``queue``
and ``task``), ``handler_seconds`` (a handler's run, whatever its outcome,
labels ``ensemble``, ``queue``, ``task``). Labels: ``queue`` (and
``ensemble``, ``task`` from the runtime).
"""

from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Protocol

from transport._spi.models import DeadLetter, QueueStats, WorkRequest, utcnow
from transport._spi.queue import Delivery, ExhaustedHook, RequestQueue

__all__ = [
    "SECONDS_BUCKETS",
    "Histogram",
    "InMemoryMetrics",
    "InstrumentedRequestQueue",
    "MetricsSink",
    "get_metrics_sink",
    "set_metrics_sink",
]

Labels = tuple[tuple[str, str], ...]

#: Upper bounds (seconds) of the histogram buckets: from a millisecond to
#: an hour, for requests that wait and run from milliseconds to hours.
SECONDS_BUCKETS: tuple[float, ...] = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
    30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
)  # fmt: skip


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

    def observe(self, name: str, labels: dict[str, str], value: float) -> None:
        """Add one observation ``value`` (seconds) to histogram ``name``.

        Optional: a sink written before histograms existed may lack it; the
        library then reports no observations to it."""
        ...


def observer(sink: MetricsSink) -> Callable[[str, dict[str, str], float], None] | None:
    """``sink.observe``, or None for a sink without histograms."""
    return getattr(sink, "observe", None)


class _NullSink:
    def increment(self, name: str, labels: dict[str, str], value: float = 1.0) -> None:
        return None

    def gauge(self, name: str, labels: dict[str, str], value: float) -> None:
        return None

    def observe(self, name: str, labels: dict[str, str], value: float) -> None:
        return None


@dataclass
class Histogram:
    """Observations of one series: ``counts[i]`` of them were at most
    ``SECONDS_BUCKETS[i]`` and above the bound before (the last count: above
    every bound)."""

    count: int = 0
    sum: float = 0.0
    counts: list[int] = field(default_factory=lambda: [0] * (len(SECONDS_BUCKETS) + 1))

    def add(self, value: float) -> None:
        self.count += 1
        self.sum += value
        self.counts[bisect.bisect_left(SECONDS_BUCKETS, value)] += 1

    def quantile(self, q: float) -> float | None:
        """Upper bound of the bucket holding quantile ``q`` (0..1): an
        estimate no lower than the true value (None without observations;
        ``inf`` when it lies above the last bound)."""
        if not self.count:
            return None
        rank = q * self.count
        seen = 0
        for bound, n in zip((*SECONDS_BUCKETS, float("inf")), self.counts, strict=True):
            seen += n
            if seen >= rank and n:
                return bound
        return float("inf")


class InMemoryMetrics:
    """Thread-safe counters and gauges kept in a dict (tests, small apps)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.counters: dict[tuple[str, Labels], float] = defaultdict(float)
        self.gauges: dict[tuple[str, Labels], float] = {}
        self.histograms: dict[tuple[str, Labels], Histogram] = {}

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

    def observe(self, name: str, labels: dict[str, str], value: float) -> None:
        """Add ``value`` to histogram ``name`` for ``labels`` (thread-safe,
        bounded memory: bucket counts, not the values). Never raises for
        string labels and a number."""
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            histogram = self.histograms.get(key)
            if histogram is None:
                histogram = self.histograms[key] = Histogram()
            histogram.add(value)

    def histogram(self, name: str, **labels: str) -> Histogram:
        """Histogram ``name`` merged over the series whose labels include
        ``labels`` (empty if none). A consistent snapshot; never raises."""
        merged = Histogram()
        with self._lock:
            for (n, ls), h in self.histograms.items():
                if n == name and set(labels.items()) <= set(ls):
                    merged.count += h.count
                    merged.sum += h.sum
                    merged.counts = [a + b for a, b in zip(merged.counts, h.counts, strict=True)]
        return merged

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
    __slots__ = ("_inner", "_labels", "_last", "_sink")

    def __init__(
        self,
        inner: Delivery,
        sink: MetricsSink,
        labels: dict[str, str],
        max_attempts: int | None = None,
    ) -> None:
        super().__init__(inner.request)
        self._inner = inner
        self._sink = sink
        self._labels = labels
        # Its last attempt: a nack moves it to the dead letters.
        self._last = max_attempts is not None and inner.attempt >= max_attempts

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
            if self._last:  # its last attempt: the nack moved it to the dead letters
                self._sink.increment("dead_lettered", self._labels)
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

    def _mark_unseen(self, unseen: bool) -> None:
        self._inner._mark_unseen(unseen)

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
        self._observe = observer(sink)
        self._labels = {"queue": inner.name}
        # The queue's own dead-lettering (attempts used up at a hand-out or
        # a lease's expiry) is counted here, then reported to the hook set.
        inner.set_exhausted_hook(self._exhausted)

    def set_exhausted_hook(self, hook: ExhaustedHook | None) -> None:
        """As :meth:`RequestQueue.set_exhausted_hook` of the wrapped queue."""
        super().set_exhausted_hook(hook)

    def _exhausted(self, request: WorkRequest, reason: str) -> None:
        # The hook first: a sink that raises must not keep the Ensemble's
        # hook from answering the caller `failed`.
        self._report_exhausted(request, reason)
        self._sink.increment("dead_lettered", self._labels)

    async def enqueue(self, request: WorkRequest) -> WorkRequest:
        """As :meth:`RequestQueue.enqueue`, then counts ``enqueued``."""
        stored = await self.inner.enqueue(request)
        self._sink.increment("enqueued", self._labels)
        return stored

    async def enqueue_many(self, requests: Iterable[WorkRequest]) -> list[WorkRequest]:
        """As :meth:`RequestQueue.enqueue_many` of the wrapped queue (its
        native batch, where it has one), then counts ``enqueued`` for each."""
        stored = await self.inner.enqueue_many(requests)
        if stored:
            self._sink.increment("enqueued", self._labels, len(stored))
        return stored

    async def poll(self, timeout: float | None = None) -> Delivery | None:
        """As :meth:`RequestQueue.poll`, then counts ``delivered`` (and
        ``redelivered`` for attempt > 1) and, on a first delivery, observes
        ``queue_wait_seconds`` (since the first enqueue, by the enqueuer's
        clock); the delivery counts its settlements (``acked``, ``nacked``,
        ``lease_extended``, ``dead_lettered``) when they return ``True``."""
        delivery = await self.inner.poll(timeout)
        if delivery is None:
            return None
        return self._delivered(delivery)

    async def poll_many(self, max_count: int, timeout: float | None = None) -> list[Delivery]:
        """As :meth:`RequestQueue.poll_many` of the wrapped queue (its native
        batch, where it has one); each delivery reported as by :meth:`poll`."""
        return [self._delivered(d) for d in await self.inner.poll_many(max_count, timeout)]

    async def ack_many(self, deliveries: Iterable[Delivery]) -> list[bool]:
        """As :meth:`RequestQueue.ack_many` of the wrapped queue; counts
        ``acked`` per ``True``. Deliveries of this wrapper are unwrapped."""
        items = [d._inner if isinstance(d, _InstrumentedDelivery) else d for d in deliveries]
        results = await self.inner.ack_many(items)
        done = sum(1 for r in results if r)
        if done:
            self._sink.increment("acked", self._labels, done)
        return results

    def _delivered(self, delivery: Delivery) -> Delivery:
        self._sink.increment("delivered", self._labels)
        if delivery.attempt > 1:
            self._sink.increment("redelivered", self._labels)
        elif self._observe is not None and delivery.request.enqueued_at is not None:
            waited = (utcnow() - delivery.request.enqueued_at).total_seconds()
            labels = {"queue": self.name, "task": delivery.request.task}
            self._observe("queue_wait_seconds", labels, max(waited, 0.0))
        return _InstrumentedDelivery(delivery, self._sink, self._labels, self.max_attempts)

    async def caught_up(self, timeout: float | None = None) -> bool:
        """As :meth:`RequestQueue.caught_up` (nothing is reported)."""
        return await self.inner.caught_up(timeout)

    async def stats(self) -> QueueStats:
        """As :meth:`RequestQueue.stats`, then sets the ``queue_depth``,
        ``queue_in_flight`` (when known), ``queue_dead_lettered`` and, per
        partition (Kafka), ``queue_partition_lag`` gauges."""
        stats = await self.inner.stats()
        if stats.depth is not None:
            self._sink.gauge("queue_depth", self._labels, stats.depth)
        if stats.in_flight is not None:
            self._sink.gauge("queue_in_flight", self._labels, stats.in_flight)
        self._sink.gauge("queue_dead_lettered", self._labels, stats.dead_lettered)
        for partition, lag in (stats.partition_lag or {}).items():
            self._sink.gauge(
                "queue_partition_lag", {"queue": self.name, "partition": partition}, lag
            )
        return stats

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        """As :meth:`RequestQueue.dead_letters` (nothing is reported)."""
        return await self.inner.dead_letters(limit)

    async def requeue_dead_letters(self, request_ids: Iterable[str] | None = None) -> int:
        """As :meth:`RequestQueue.requeue_dead_letters`, then counts
        ``enqueued`` for each request requeued."""
        moved = await self.inner.requeue_dead_letters(request_ids)
        if moved:
            self._sink.increment("enqueued", self._labels, moved)
        return moved

    async def replace_dead_letter(self, dead_letter_id: str, request: WorkRequest) -> bool:
        """As :meth:`RequestQueue.replace_dead_letter`, then counts ``enqueued``."""
        done = await self.inner.replace_dead_letter(dead_letter_id, request)
        if done:
            self._sink.increment("enqueued", self._labels)
        return done

    async def aclose(self) -> None:
        """Close the wrapped queue (as :meth:`RequestQueue.aclose`)."""
        await self.inner.aclose()
