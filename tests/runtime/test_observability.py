"""Prometheus exporter and OpenTelemetry trace pick-up."""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any

import pytest

from transport import (
    DeadLetter,
    Delivery,
    Ensemble,
    Network,
    QueueStats,
    RequestQueue,
    TaskContext,
    Transport,
    WorkRequest,
    set_metrics_sink,
)
from transport._ops.tracing import TRACEPARENT, parse_traceparent


async def test_prometheus_exporter_counts_queue_events(transport: Transport) -> None:
    prometheus_client = pytest.importorskip("prometheus_client")
    from transport.prometheus import PrometheusMetrics

    registry = prometheus_client.CollectorRegistry()
    set_metrics_sink(PrometheusMetrics(registry=registry))
    try:
        queue = transport.request_queue("prom")
        await queue.enqueue(WorkRequest(task="t"))
        delivery = await queue.poll(5)
        assert delivery is not None
        await delivery.ack()
        await queue.stats()
    finally:
        set_metrics_sink(None)
    text = prometheus_client.generate_latest(registry).decode()
    assert 'transport_enqueued_total{queue="prom"} 1.0' in text
    assert 'transport_acked_total{queue="prom"} 1.0' in text
    assert 'transport_queue_depth{queue="prom"} 0.0' in text
    assert 'transport_queue_wait_seconds_count{queue="prom",task="t"} 1.0' in text
    assert 'transport_queue_wait_seconds_bucket{le="3600.0",queue="prom",task="t"} 1.0' in text


async def test_histograms_of_queue_wait_and_handler_time(transport: Transport) -> None:
    """How long a request waited for its first delivery (by its first enqueue
    time: a redelivery is not a second wait) and how long its handler ran."""
    from transport import InMemoryMetrics
    from transport.kit import replace_fields, utcnow

    metrics = InMemoryMetrics()
    set_metrics_sink(metrics)
    try:
        queue = transport.request_queue("waited")
        old = replace_fields(WorkRequest(task="slow"), enqueued_at=utcnow() - timedelta(seconds=40))
        await queue.enqueue(old)
        first = await queue.poll(5)
        assert first is not None and first.attempt == 1
        assert await first.nack()
        again = await queue.poll(5)
        assert again is not None and again.attempt == 2
        assert await again.ack()
        waited = metrics.histogram("queue_wait_seconds", queue="waited", task="slow")
        assert waited.count == 1  # the redelivery is not counted as a wait
        assert 40 <= waited.sum < 40 + 30
        assert waited.quantile(0.5) == 60.0  # the bucket (30, 60]

        ens = Ensemble("timed", transport=transport, advertise=False)

        @ens.task("nap")
        async def nap(ctx: TaskContext) -> str:
            await asyncio.sleep(0.05)  # the work being measured
            return "rested"

        caller = Network(transport, caller="timer")
        async with ens:
            pending = await caller.send("timed", "nap", {})
            assert (await pending.result(timeout=10)).result == "rested"
        ran = metrics.histogram("handler_seconds", ensemble="timed", queue="timed", task="nap")
        assert ran.count == 1 and 0.05 <= ran.sum < 5
    finally:
        set_metrics_sink(None)


async def test_active_opentelemetry_span_is_propagated(transport: Transport) -> None:
    pytest.importorskip("opentelemetry.sdk")
    from opentelemetry.sdk.trace import TracerProvider

    tracer = TracerProvider().get_tracer("test")
    caller = Network(transport, caller="otel-caller")
    with tracer.start_as_current_span("checkout") as span:
        pending = await caller.send("otel-target", "work", {})
    delivery = await transport.request_queue("otel-target").poll(5)
    assert delivery is not None and delivery.request.request_id == pending.request_id
    parsed = parse_traceparent(delivery.request.headers[TRACEPARENT])
    assert parsed is not None
    assert parsed[0] == f"{span.get_span_context().trace_id:032x}"
    assert parsed[1] != f"{span.get_span_context().span_id:016x}"  # a child span id


async def test_running_ensemble_refreshes_queue_gauges(transport: Transport) -> None:
    """Queue depth (lag on Kafka) is reported while an ensemble runs, not only
    when somebody calls stats()."""
    from transport import Ensemble, InMemoryMetrics

    metrics = InMemoryMetrics()
    set_metrics_sink(metrics)
    try:
        ens = Ensemble("gauged", transport=transport, advertise=False, stats_interval=0.05)

        @ens.task("work")
        async def work(ctx: TaskContext) -> None:
            return None

        key = ("queue_depth", (("queue", "gauged"),))
        async with ens:
            deadline = asyncio.get_running_loop().time() + 10
            while key not in metrics.gauges:  # no event to wait on: the gauge is polled
                assert asyncio.get_running_loop().time() < deadline, "no queue_depth gauge"
                await asyncio.sleep(0.02)
        assert metrics.gauges[key] == 0
    finally:
        set_metrics_sink(None)


async def test_json_logs_carry_the_ensemble_and_request_fields(transport: Transport) -> None:
    import io
    import json
    import logging

    from tenacity import wait_fixed

    from transport import Ensemble, configure_logging

    stream = io.StringIO()
    handler = configure_logging("INFO", fmt="json", stream=stream)
    done = asyncio.Event()
    try:
        ens = Ensemble("logged", transport=transport, advertise=False, retry_wait=wait_fixed(0.01))

        @ens.task("work")
        async def work(ctx: TaskContext) -> str:
            if ctx.attempt == 1:
                raise RuntimeError("first try fails")
            done.set()
            return "ok"

        request = await transport.request_queue("logged").enqueue(WorkRequest(task="work"))
        async with ens:
            await asyncio.wait_for(done.wait(), 20)
    finally:
        logging.getLogger().removeHandler(handler)
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    failed = [r for r in lines if "failed on attempt" in r["message"]]
    assert failed, lines
    assert failed[0]["level"] == "WARNING"
    assert failed[0]["ensemble"] == "logged"
    assert failed[0]["task"] == "work"
    assert failed[0]["request_id"] == request.request_id
    assert failed[0]["attempt"] == 1
    assert any(r["message"].startswith("ensemble logged started") for r in lines)


def test_configure_logging_refuses_an_unknown_format() -> None:
    from transport import configure_logging

    with pytest.raises(ValueError, match="log format"):
        configure_logging(fmt="xml")  # type: ignore[arg-type]


def _runtime_lines(caplog: pytest.LogCaptureFixture, needle: str, level: str = "INFO") -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "transport.runtime" and r.levelname == level and needle in r.getMessage()
    ]


async def test_an_ensemble_logs_its_start_and_a_graceful_stop(
    transport: Transport, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="transport.runtime")
    started = asyncio.Event()
    finish = asyncio.Event()
    kitchen = Ensemble(
        "kitchen", transport=transport, concurrency=3, priority_levels=2, shutdown_grace=0.5
    )

    @kitchen.task("cook")
    async def cook(ctx: TaskContext) -> dict[str, Any]:
        started.set()
        if ctx.payload["slow"]:
            await asyncio.sleep(60)  # still running after shutdown_grace: released
        await finish.wait()
        return {}

    @kitchen.task("plate")
    async def plate(ctx: TaskContext) -> None:
        return None

    caller = Network(transport, caller="front-desk", default_levels=2)
    await caller.send("kitchen", "cook", {"slow": True})
    await caller.send("kitchen", "cook", {"slow": False})
    async with kitchen.serving():
        (line,) = _runtime_lines(caplog, "started")
        scheme = transport.config.scheme
        assert line.startswith(f"ensemble kitchen started on {scheme}:"), line
        assert "queue kitchen (2 priority levels), concurrency 3, tasks cook, plate" in line
        await asyncio.wait_for(started.wait(), 10)
        deadline = asyncio.get_running_loop().time() + 10
        while len(kitchen._busy) < 2:  # both requests taken by a worker
            assert asyncio.get_running_loop().time() < deadline, "requests not taken"
            await asyncio.sleep(0.01)
        asyncio.get_running_loop().call_later(0.1, finish.set)
    (line,) = _runtime_lines(caplog, "stopped")
    assert line.startswith(
        "ensemble kitchen stopped: 2 in flight at stop, 1 finished, 1 released for redelivery;"
    ), line
    assert "completed 1" in line


async def test_an_ensemble_logs_a_growing_backlog(
    transport: Transport, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="transport.runtime")
    release = asyncio.Event()
    kitchen = Ensemble(
        "slowpoke", transport=transport, concurrency=1, stats_interval=0.1, shutdown_grace=0.1
    )

    @kitchen.task("cook")
    async def cook(ctx: TaskContext) -> None:
        await release.wait()  # the only worker is stuck: the backlog grows

    caller = Network(transport, caller="front-desk")
    async with kitchen.serving():
        deadline = asyncio.get_running_loop().time() + 15
        while not _runtime_lines(caplog, "backlog growing"):
            assert asyncio.get_running_loop().time() < deadline, "no backlog line logged"
            await caller.send("slowpoke", "cook", {})
            await asyncio.sleep(0.05)
        release.set()
    line = _runtime_lines(caplog, "backlog growing")[0]
    assert line.startswith("ensemble slowpoke: backlog growing: "), line
    assert "waiting (was " in line and "in flight" in line
    assert "; the next in line has waited " in line, line


async def test_batches_keep_the_backends_own_batch_and_are_counted(transport: Transport) -> None:
    """An instrumented queue's enqueue_many, poll_many and ack_many are the wrapped
    queue's (its native batch, where it has one), each delivery counted."""
    from transport import InMemoryMetrics
    from transport._spi.metrics import InstrumentedRequestQueue

    metrics = InMemoryMetrics()
    set_metrics_sink(metrics)
    try:
        queue = transport.request_queue("batched")
        assert isinstance(queue, InstrumentedRequestQueue)
        inner = queue.inner
        calls: list[str] = []
        native_poll_many, native_ack_many = inner.poll_many, inner.ack_many
        native_enqueue_many = inner.enqueue_many

        async def enqueue_many(requests: Any) -> Any:
            items = list(requests)
            calls.append(f"enqueue_many({len(items)})")
            return await native_enqueue_many(items)

        async def poll_many(max_count: int, timeout: float | None = None) -> Any:
            calls.append(f"poll_many({max_count})")
            return await native_poll_many(max_count, timeout)

        async def ack_many(deliveries: Any) -> Any:
            items = list(deliveries)
            calls.append(f"ack_many({len(items)})")
            return await native_ack_many(items)

        inner.poll_many = poll_many  # type: ignore[method-assign]
        inner.ack_many = ack_many  # type: ignore[method-assign]
        inner.enqueue_many = enqueue_many  # type: ignore[method-assign]
        await queue.enqueue_many([WorkRequest(task="t", payload=i) for i in range(5)])
        assert metrics.count("enqueued", queue="batched") == 5
        got = await queue.poll_many(5, timeout=5)
        assert len(got) == 5
        assert await queue.ack_many(got) == [True] * 5
        assert calls == ["enqueue_many(5)", "poll_many(5)", "ack_many(5)"]
        assert metrics.count("delivered", queue="batched") == 5
        assert metrics.count("acked", queue="batched") == 5
        assert await queue.ack_many(got) == [False] * 5  # settled already: not counted again
        assert metrics.count("acked", queue="batched") == 5
    finally:
        set_metrics_sink(None)


class _Stalled(RequestQueue):
    """A queue whose consumer gets nothing (a stalled consumer group): polls
    come back empty while the requests wait; stats are the real queue's."""

    def __init__(self, inner: RequestQueue) -> None:
        self.inner = inner
        self.name = inner.name
        self.lease_seconds = inner.lease_seconds
        self.max_attempts = inner.max_attempts
        self.readings = 0

    async def enqueue(self, request: WorkRequest) -> WorkRequest:
        return await self.inner.enqueue(request)

    async def poll(self, timeout: float | None = None) -> Delivery | None:
        await asyncio.sleep(min(timeout or 0.0, 0.05))
        return None

    async def stats(self) -> QueueStats:
        self.readings += 1
        return await self.inner.stats()

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return []

    async def requeue_dead_letters(self, request_ids: Any = None) -> int:
        return 0

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_an_ensemble_warns_once_when_the_backlog_does_not_move(
    transport: Transport, caplog: pytest.LogCaptureFixture
) -> None:
    # A consumer group that stopped getting requests (Kafka after rebalances
    # it never completed) left workers idle and the backlog standing with
    # nothing logged: "backlog growing" is said only while it grows.
    caplog.set_level(logging.INFO, logger="transport.runtime")
    inner = transport.request_queue("stuck")
    await inner.enqueue(WorkRequest(task="cook"))
    stalled = _Stalled(inner)
    kitchen = Ensemble("stuck", queue=stalled, concurrency=1, stats_interval=0.05, advertise=False)
    kitchen.add_task("cook", lambda ctx: None)
    async with kitchen.serving():
        deadline = asyncio.get_running_loop().time() + 10
        while not _runtime_lines(caplog, "backlog not moving", "WARNING"):
            assert asyncio.get_running_loop().time() < deadline, "no warning"
            await asyncio.sleep(0.05)
        seen = stalled.readings
        while stalled.readings < seen + 3:  # more readings of the same stall
            assert asyncio.get_running_loop().time() < deadline, "no more readings"
            await asyncio.sleep(0.05)
    (line,) = _runtime_lines(caplog, "backlog not moving", "WARNING")  # once per stall
    assert line.startswith("ensemble stuck: backlog not moving: 1 waiting, the next in line"), line


async def test_every_way_to_the_dead_letters_is_counted_and_requeues_are_enqueues(
    transport: Transport,
) -> None:
    # Only Delivery.dead_letter() was counted: a nack on the last attempt
    # (which dead-letters) counted as `nacked` only, a request found with its
    # attempts used up at a hand-out not at all, and requeueing counted no
    # `enqueued` (replacing did). Alerts on `dead_lettered` missed them.
    from transport import InMemoryMetrics

    sink = InMemoryMetrics()
    set_metrics_sink(sink)
    try:
        queue = transport.request_queue("dl-metrics", max_attempts=2, lease_seconds=0.3)
        reported: list[str] = []
        queue.set_exhausted_hook(lambda request, reason: reported.append(request.request_id))
        nacked = await queue.enqueue(WorkRequest(task="nacked"))
        for attempt in (1, 2):  # nacked at each attempt: the second dead-letters it
            delivery = await queue.poll(5)
            assert delivery is not None and delivery.attempt == attempt
            assert await delivery.nack()
        expired = await queue.enqueue(WorkRequest(task="expired"))
        for attempt in (1, 2):  # leases left to run out: found used up at the next poll
            delivery = await queue.poll(5)
            assert delivery is not None and delivery.request.request_id == expired.request_id
            assert delivery.attempt == attempt
        assert await queue.poll(1.0) is None
        explicit = await queue.enqueue(WorkRequest(task="explicit"))
        delivery = await queue.poll(5)
        assert delivery is not None and await delivery.dead_letter("bad")
        dead = {d.request_id for d in await queue.dead_letters()}
        assert dead == {nacked.request_id, expired.request_id, explicit.request_id}
        assert sink.count("dead_lettered", queue="dl-metrics") == 3
        assert reported == [expired.request_id]  # the user's hook still hears of it
        enqueued = sink.count("enqueued", queue="dl-metrics")
        assert await queue.requeue_dead_letters() == 3
        assert sink.count("enqueued", queue="dl-metrics") == enqueued + 3
    finally:
        set_metrics_sink(None)


async def test_a_sink_that_raises_does_not_keep_the_exhausted_hook_from_running(
    transport: Transport,
) -> None:
    # The count came first: a sink raising there kept the hook (the
    # Ensemble's, which answers the caller `failed`) from running.
    from transport import InMemoryMetrics

    class Raising(InMemoryMetrics):
        def increment(self, name: str, labels: dict[str, str], value: float = 1.0) -> None:
            if name == "dead_lettered":
                raise RuntimeError("sink down")
            super().increment(name, labels, value)

    set_metrics_sink(Raising())
    try:
        queue = transport.request_queue("dl-hook", max_attempts=1, lease_seconds=0.3)
        reported: list[str] = []
        queue.set_exhausted_hook(lambda request, reason: reported.append(request.request_id))
        sent = await queue.enqueue(WorkRequest(task="t"))
        assert await queue.poll(5) is not None  # its lease runs out
        assert await queue.poll(1.0) is None  # found used up: dead-lettered
        assert reported == [sent.request_id]
    finally:
        set_metrics_sink(None)
