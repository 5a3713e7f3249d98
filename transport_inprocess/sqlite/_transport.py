"""``SqliteTransport``: opens the store, builds the context its queues, keyed
logs and event log share, and hands them out."""

from __future__ import annotations

import time

from transport import (
    HealthStatus,
    Transport,
    TransportCapabilities,
    TransportConfig,
)
from transport.errors import TransportError
from transport.kit import DoctorFinding, ProvisionPlan, SqliteStore
from transport_inprocess.sqlite._client import SqliteContext
from transport_inprocess.sqlite._config import SqliteSettings
from transport_inprocess.sqlite._doctor import sqlite_doctor
from transport_inprocess.sqlite._events import SqliteEventLog
from transport_inprocess.sqlite._queue import SqliteRequestQueue
from transport_inprocess.sqlite._registries import SqliteKeyedLog
from transport_inprocess.sqlite._schema import EVENTS_SCHEMA, SCHEMA, adopt_unscoped

__all__ = ["SqliteTransport", "open_sqlite"]


class SqliteTransport(Transport):
    backend = "sqlite"
    # Every queue is in the store: stats() tells a priority level above a
    # worker's holds requests without creating anything.
    _levels_by_stats = True
    capabilities = TransportCapabilities(
        persistent=True,
        ordered=True,
        consumer_groups=True,
        native_delay=True,
        lease_extension=True,
        restart_broker=True,
        event_log=True,
    )

    def __init__(self, config: TransportConfig) -> None:
        super().__init__(config)
        settings = SqliteSettings.from_config(config)
        self.path = settings.path
        self.poll_interval = settings.poll_interval
        self._store = SqliteStore(
            settings.path,
            synchronous=settings.synchronous,
            busy_timeout_ms=settings.busy_timeout_ms,
            schema=SCHEMA + EVENTS_SCHEMA,
        )
        self._ctx = SqliteContext(
            self._store,
            namespace=config.namespace,
            poll_interval=settings.poll_interval,
            max_payload_bytes=config.max_payload_bytes,
            check_open=self._check_open,
        )

    async def _start(self) -> None:
        await self._store.open()
        await self._store.write(adopt_unscoped)

    def _open_queue(
        self, name: str, *, lease_seconds: float, max_attempts: int
    ) -> SqliteRequestQueue:
        return SqliteRequestQueue(
            self._ctx, name, lease_seconds=lease_seconds, max_attempts=max_attempts
        )

    def _open_keyed_log(self, kind: str, name: str) -> SqliteKeyedLog:
        return SqliteKeyedLog(self._ctx, self._ctx.scoped(f"{kind}:{name}"))

    def _open_event_log(self) -> SqliteEventLog:
        return SqliteEventLog(self._ctx)

    async def _doctor(self, plan: ProvisionPlan | None) -> list[DoctorFinding]:
        return await sqlite_doctor(self._store, self.path)

    async def health(self) -> HealthStatus:
        start = time.perf_counter()
        try:
            await self._store.read(lambda conn: conn.execute("SELECT 1").fetchone())
        except (TransportError, RuntimeError) as exc:
            return HealthStatus(ok=False, backend="sqlite", detail=f"{self.path}: {exc}")
        return HealthStatus(
            ok=True,
            backend="sqlite",
            detail=f"{self.path} (synchronous={self._store.synchronous})",
            latency_ms=(time.perf_counter() - start) * 1000,
        )

    async def _close_backend(self) -> None:
        self._ctx.store_closed = True
        await self._store.aclose()


async def open_sqlite(config: TransportConfig) -> SqliteTransport:
    """Entry point for ``sqlite://``."""
    transport = SqliteTransport(config)
    await transport._start()
    return transport
