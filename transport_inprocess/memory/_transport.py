"""``MemoryTransport``: connects to the in-process broker named by the URL
and hands out its queues, keyed logs, event bus and event log."""

from __future__ import annotations

from urllib.parse import parse_qsl, urlsplit

from transport import HealthStatus, Transport, TransportCapabilities, TransportConfig
from transport.errors import ConfigurationError
from transport.kit import DoctorFinding, ProvisionPlan
from transport_inprocess.memory._client import _broker
from transport_inprocess.memory._events import MemoryEventBus, MemoryEventLog
from transport_inprocess.memory._queue import MemoryRequestQueue
from transport_inprocess.memory._registries import MemoryKeyedLog

__all__ = ["MemoryTransport", "open_memory"]


class MemoryTransport(Transport):
    backend = "memory"
    # Every queue is in the store: stats() tells a priority level above a
    # worker's holds requests without creating anything.
    _levels_by_stats = True
    _reads_request_codec = True
    capabilities = TransportCapabilities(
        persistent=False,
        ordered=True,
        consumer_groups=False,
        native_delay=True,
        lease_extension=True,
        event_bus=True,
        event_log=True,
    )

    def __init__(self, config: TransportConfig) -> None:
        super().__init__(config)
        parts = urlsplit(config.url)
        given = sorted(
            {*config.options, *(k for k, _ in parse_qsl(parts.query, keep_blank_values=True))}
        )
        if given:
            raise ConfigurationError(f"memory:// takes no options (given: {', '.join(given)})")
        self.broker_name = (parts.netloc + parts.path).strip("/") or "default"
        self._broker = _broker(self.broker_name, config.namespace)

    def _open_queue(
        self, name: str, *, lease_seconds: float, max_attempts: int
    ) -> MemoryRequestQueue:
        return MemoryRequestQueue(
            self._broker,
            name,
            lease_seconds=lease_seconds,
            max_attempts=max_attempts,
            limit=self.config.max_payload_bytes,
        )

    def _open_keyed_log(self, kind: str, name: str) -> MemoryKeyedLog:
        return MemoryKeyedLog(self._broker, f"{kind}:{name}")

    def _open_event_bus(self) -> MemoryEventBus:
        return MemoryEventBus(self._broker.bus, self.config.max_payload_bytes)

    def _open_event_log(self) -> MemoryEventLog:
        return MemoryEventLog(self._broker.events, self.config.max_payload_bytes)

    async def _doctor(self, plan: ProvisionPlan | None) -> list[DoctorFinding]:
        return [
            DoctorFinding(
                severity="warning",
                subject=f"memory://{self.broker_name}",
                finding="everything lives in this process (capability persistent=false)",
                fix="sqlite:// or a broker for anything that must outlive the process",
                guarantee="requests and registry state survive the process",
            )
        ]

    async def health(self) -> HealthStatus:
        return HealthStatus(
            ok=not self._closed, backend="memory", detail=f"broker {self.broker_name!r}"
        )


async def open_memory(config: TransportConfig) -> MemoryTransport:
    """Entry point for ``memory://``."""
    return MemoryTransport(config)
