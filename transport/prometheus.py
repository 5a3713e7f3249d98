"""Prometheus exporter for the metrics hooks (extra ``prometheus``)::

    from transport import set_metrics_sink
    from transport.prometheus import PrometheusMetrics

    set_metrics_sink(PrometheusMetrics())     # then prometheus_client.start_http_server(9100)

Counters are exported as ``transport_<name>_total``, gauges as
``transport_<name>`` and histograms as ``transport_<name>`` (``_bucket``,
``_sum``, ``_count``; buckets :data:`transport.SECONDS_BUCKETS`, a
millisecond to an hour), labelled by ``queue`` / ``ensemble`` / ``task``.
"""

from __future__ import annotations

import threading
from typing import Any

try:
    import prometheus_client
except ImportError as exc:  # pragma: no cover - exercised without the extra
    raise ImportError("pip install 'agentensemble-transport[prometheus]'") from exc

from transport import SECONDS_BUCKETS

__all__ = ["PrometheusMetrics"]


class PrometheusMetrics:
    """A :class:`~transport.MetricsSink` backed by ``prometheus_client``."""

    def __init__(self, registry: Any = None, namespace: str = "transport") -> None:
        self._registry = registry if registry is not None else prometheus_client.REGISTRY
        self._namespace = namespace
        self._lock = threading.Lock()
        self._counters: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._gauges: dict[tuple[str, tuple[str, ...]], Any] = {}
        self._histograms: dict[tuple[str, tuple[str, ...]], Any] = {}

    def _metric(
        self,
        kind: type[Any],
        store: dict[tuple[str, tuple[str, ...]], Any],
        name: str,
        labels: dict[str, str],
    ) -> Any:
        key = (name, tuple(sorted(labels)))
        with self._lock:
            metric = store.get(key)
            if metric is None:
                extra: dict[str, Any] = (
                    {"buckets": SECONDS_BUCKETS} if kind is prometheus_client.Histogram else {}
                )
                metric = kind(
                    name,
                    f"{name.replace('_', ' ')} ({self._namespace})",
                    list(key[1]),
                    namespace=self._namespace,
                    registry=self._registry,
                    **extra,
                )
                store[key] = metric
        return metric.labels(**labels) if labels else metric

    def increment(self, name: str, labels: dict[str, str], value: float = 1.0) -> None:
        self._metric(prometheus_client.Counter, self._counters, name, labels).inc(value)

    def gauge(self, name: str, labels: dict[str, str], value: float) -> None:
        self._metric(prometheus_client.Gauge, self._gauges, name, labels).set(value)

    def observe(self, name: str, labels: dict[str, str], value: float) -> None:
        self._metric(prometheus_client.Histogram, self._histograms, name, labels).observe(value)
