"""Prometheus exporter and OpenTelemetry trace pick-up."""

from __future__ import annotations

import asyncio

import pytest

from transport import Network, Transport, WorkRequest, set_metrics_sink
from transport._tracing import TRACEPARENT, parse_traceparent


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
    from transport import Ensemble, InMemoryMetrics, TaskContext

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

    from transport import Ensemble, TaskContext, configure_logging

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
