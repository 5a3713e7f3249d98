"""redis-server killed with SIGKILL and restarted (same port, same data
directory, ``appendfsync always``) under the registries, the event log and
the event bus of clients that stay up: each carries on by itself."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from transport import Transport, TransportConfig, WorkResponse, connect
from transport.errors import TransientTransportError
from transport.testing.brokers import RedisServer

pytestmark = [pytest.mark.asyncio, pytest.mark.broker, pytest.mark.timeout(120)]


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A server of this test alone: restarting it disturbs no other test."""
    if os.environ.get("REDIS_URL"):
        pytest.skip("an external REDIS_URL server cannot be restarted by the test")
    server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def _connect(server: RedisServer, namespace: str) -> Transport:
    options = {"request_timeout": 2.0, "connect_timeout": 1.0, "claim_interval": 0.1}
    return await connect(TransportConfig(url=server.url, namespace=namespace, options=options))


async def _retrying(what: str, action: object, timeout: float = 30.0) -> object:
    """Run ``action()`` until it stops failing transiently (the server is
    coming back)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return await action()  # type: ignore[operator]
        except TransientTransportError:
            assert time.monotonic() < deadline, f"{what} did not recover"
            await asyncio.sleep(0.1)


async def test_registry_waiter_resolves_after_a_server_restart(
    own_server: RedisServer, namespace: str
) -> None:
    caller = await _connect(own_server, namespace)
    worker = await _connect(own_server, namespace)
    try:
        registry = caller.delivery_registry("inbox")
        pending = await registry.register("req-1")
        await asyncio.to_thread(own_server.kill)
        await asyncio.to_thread(own_server.start)
        answers = worker.delivery_registry("inbox")
        response = WorkResponse(request_id="req-1", status="completed", result={"ok": 1})
        await _retrying("complete", lambda: answers.complete("req-1", response))
        got = await pending.result(timeout=30)
        assert got.result == {"ok": 1}
    finally:
        await caller.aclose()
        await worker.aclose()


def _read_lines(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.getMessage().startswith("event log audit: read")]


async def test_event_log_reader_continues_after_a_server_restart(
    own_server: RedisServer, namespace: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The reader waits through the outage and reads on; it logs the outage
    once when it starts and once when it is over (it logged a warning for
    every retry, one a second for as long as the server was down)."""
    client = await _connect(own_server, namespace)
    try:
        log = client.event_log()
        await log.append("audit", "before")
        reader = await log.read("audit", "earliest")
        first = await reader.next(10)
        assert first is not None and first.data == "before"
        with caplog.at_level(logging.DEBUG, logger="transport.redis"):
            waiting = asyncio.ensure_future(reader.next(40))
            await asyncio.to_thread(own_server.kill)
            async with asyncio.timeout(20):  # the reader meets the outage three times
                while len(_read_lines(caplog)) < 3:  # noqa: ASYNC110
                    await asyncio.sleep(0.05)
            await asyncio.to_thread(own_server.start)
            await _retrying("append", lambda: log.append("audit", "after"))
            event = await waiting
        assert event is not None and event.data == "after", "the reader lost its place"
        said = _read_lines(caplog)
        warnings = [r.getMessage() for r in said if r.levelno == logging.WARNING]
        assert len(warnings) == 2, warnings
        assert "read failed" in warnings[0] and "read works again after" in warnings[1]
        assert sum(r.levelno == logging.DEBUG for r in said) >= 2
        await reader.aclose()
    finally:
        await client.aclose()


async def test_bus_subscription_receives_again_after_a_server_restart(
    own_server: RedisServer, namespace: str
) -> None:
    client = await _connect(own_server, namespace)
    try:
        bus = client.event_bus()
        sub = await bus.subscribe("alerts.*")
        await bus.publish("alerts.one", 1)
        first = await sub.next(10)
        assert first is not None and first.data == 1
        await asyncio.to_thread(own_server.kill)
        await asyncio.to_thread(own_server.start)
        # At most once: events published before the subscription is back are
        # gone. Publish until one arrives (the client re-subscribes by itself).
        deadline = time.monotonic() + 30
        got = None
        n = 1
        while got is None:
            assert time.monotonic() < deadline, "the subscription never received again"
            n += 1
            with contextlib.suppress(TransientTransportError):
                await bus.publish("alerts.two", n)
            got = await sub.next(0.5)
        assert got.subject == "alerts.two"
    finally:
        await client.aclose()
