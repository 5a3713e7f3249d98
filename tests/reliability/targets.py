"""Backends the reliability suite runs against, each started on demand."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from transport import TransportConfig
from transport.testing.harness import BackendHarness
from transport_inprocess import SqliteTransport


@contextlib.asynccontextmanager
async def sqlite_target() -> AsyncIterator[BackendHarness]:
    with tempfile.TemporaryDirectory(prefix="reliability-sqlite-") as tmp:
        config = TransportConfig(
            url=f"sqlite:///{Path(tmp) / 'reliability.db'}", options={"poll_interval": 0.02}
        )
        harness = BackendHarness(config, SqliteTransport.capabilities)
        harness.lease_seconds = 1.0
        yield harness


TARGETS: dict[str, Callable[[], Any]] = {"sqlite": sqlite_target}
