"""Prometheus exporter and OpenTelemetry trace pick-up."""

from __future__ import annotations

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
