"""The whole conformance suite on ``sqlite://``."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from transport import Transport, TransportConfig
from transport.testing import (
    BackendHarness,
    CapabilityRegistryConformance,
    CleanRestartConformance,
    CrashConformance,
    DefaultConfigurationConformance,
    DeliveryRegistryConformance,
    EventBusConformance,
    EventLogConformance,
    ForeignMessageConformance,
    ForgottenCloseConformance,
    NamespaceConformance,
    PriorityAsRequestQueueConformance,
    PriorityQueueConformance,
    ProvisioningConformance,
    RequestQueueConformance,
)
from transport_inprocess import SqliteTransport, sqlite_path


class SqliteHarness(BackendHarness):
    lease_seconds = 0.8
    # No broker process: the store is the file. What a broker restart tests
    # elsewhere (nothing accepted is lost when the store's process dies) is
    # SIGKILL of every process on the file: CrashConformance and
    # test_sqlite_durability.py. can_restart_broker stays false, so the
    # broker-restart class is skipped here rather than passing on a no-op.
    embedded = True

    async def inject_raw(self, transport: Transport, queue_name: str, data: bytes) -> None:
        assert isinstance(transport, SqliteTransport)
        queue_name = f"{transport.config.namespace}/{queue_name}"  # as stored: namespace/name
        path, _ = sqlite_path(self.config.url)
        with sqlite3.connect(path) as conn:
            conn.execute(
                "INSERT INTO messages(queue, seq, request_id, body, available_at)"
                " VALUES (?, (SELECT COALESCE(MAX(seq), 0) + 1 FROM messages WHERE queue = ?), NULL, ?, 0)",
                (queue_name, queue_name, data),
            )


@pytest.fixture
def transport_harness(tmp_path: Path) -> SqliteHarness:
    config = TransportConfig(
        url=f"sqlite:///{tmp_path / 'conformance.db'}", options={"poll_interval": 0.02}
    )
    return SqliteHarness(config, SqliteTransport.capabilities)


class TestSqliteQueue(RequestQueueConformance): ...


class TestSqlitePriority(PriorityQueueConformance): ...


class TestSqlitePriorityAsQueue(PriorityAsRequestQueueConformance): ...


class TestSqliteDeliveryRegistry(DeliveryRegistryConformance): ...


class TestSqliteCapabilityRegistry(CapabilityRegistryConformance): ...


class TestSqliteCrash(CrashConformance): ...


class TestSqliteEventBus(EventBusConformance): ...


class TestSqliteEventLog(EventLogConformance): ...


class TestSqliteProvisioning(ProvisioningConformance): ...


class TestSqliteCleanRestart(CleanRestartConformance): ...


class TestSqliteNamespaces(NamespaceConformance): ...


class TestSqliteForgottenClose(ForgottenCloseConformance): ...


class TestSqliteForeignMessages(ForeignMessageConformance): ...


class TestSqliteDefaultConfiguration(DefaultConfigurationConformance):
    """Default settings and a user's poll(timeout=5) loop (no test tuning)."""
