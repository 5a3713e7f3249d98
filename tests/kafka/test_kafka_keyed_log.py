"""The keyed log on a compacted topic: durable writes, tombstones, replay."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from transport import CAUGHT_UP, KeyedChange, connect
from transport_kafka import KafkaKeyedLog, KafkaTransport

pytestmark = [pytest.mark.broker, pytest.mark.asyncio]


async def _until_caught_up(log: KafkaKeyedLog, timeout: float = 15) -> tuple[list[Any], Any]:
    watch = log.watch()
    seen: list[Any] = []

    async def run() -> None:
        async for item in watch:
            if item is CAUGHT_UP:
                return
            seen.append(item)

    await asyncio.wait_for(run(), timeout)
    return seen, watch


async def test_put_get_delete_and_replay_after_restart(kafka_config_factory: Any) -> None:
    name = f"r{uuid.uuid4().hex[:8]}"
    writer = await connect(kafka_config_factory())
    reader = await connect(kafka_config_factory())
    assert isinstance(writer, KafkaTransport) and isinstance(reader, KafkaTransport)
    try:
        log = writer._open_keyed_log("delivery", name)
        assert log.topic.endswith(f".registry.delivery.{name}")
        await log.put("a", b"1")
        await log.put("b", b"2")
        await log.put("a", b"3")
        await log.delete("b")
        await log.delete("never-written")
        assert await log.get("a") == b"3"
        assert await log.get("b") is None
        # Another client sees every write that returned before its call.
        other = reader._open_keyed_log("delivery", name)
        assert await other.get("a") == b"3"
        await log.put("c", b"4")
        assert await other.get("c") == b"4"
        for i in range(20):  # each read waits for the high watermark taken after its call
            await log.put("n", b"%d" % i)
            assert await other.get("n") == b"%d" % i
        await log.delete("n")
        # A fresh watch replays the history in write order, tombstones included.
        history, watch = await _until_caught_up(other)
        state: dict[str, bytes] = {}
        for change in history:
            assert isinstance(change, KeyedChange)
            if change.value is None:
                state.pop(change.key, None)
            else:
                state[change.key] = change.value
        assert state == {"a": b"3", "c": b"4"}
        assert [c.key for c in history][:3] == ["a", "b", "a"]
        # Each change carries its position: partition and offset.
        assert [c.position for c in history] == [b"0:%d" % i for i in range(len(history))]
        # ...then live changes.
        await log.put("d", b"5")
        live = await asyncio.wait_for(watch.__anext__(), 10)
        assert live == KeyedChange("d", b"5", b"0:%d" % len(history))
        await watch.aclose()
        await log.aclose()
        await other.aclose()
    finally:
        await writer.aclose()
        await reader.aclose()


async def test_watch_of_an_empty_log_is_caught_up_at_once(kafka_config_factory: Any) -> None:
    transport = await connect(kafka_config_factory())
    assert isinstance(transport, KafkaTransport)
    try:
        log = transport._open_keyed_log("capability", f"e{uuid.uuid4().hex[:8]}")
        history, watch = await _until_caught_up(log, timeout=5)
        assert history == []
        await log.put("k", b"v")
        assert await asyncio.wait_for(watch.__anext__(), 10) == KeyedChange("k", b"v", b"0:0")
        await watch.aclose()
        await log.aclose()
    finally:
        await transport.aclose()


async def test_a_read_error_the_client_recovers_from_does_not_break_get(
    kafka_config_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # librdkafka reports a failed fetch (a broker connection reset, a fetch
    # timing out under load) as an error message and fetches again. One such
    # report used to fail every later get() that had to wait for the view.
    from confluent_kafka import KafkaError, KafkaException

    from transport_kafka import _registries

    tails: list[Any] = []
    original = _registries._Tail.__init__

    def remember(self: Any, *args: Any, **kwargs: Any) -> None:
        original(self, *args, **kwargs)
        tails.append(self)

    monkeypatch.setattr(_registries._Tail, "__init__", remember)
    name = f"r{uuid.uuid4().hex[:8]}"
    transport = await connect(kafka_config_factory())
    assert isinstance(transport, KafkaTransport)
    try:
        log = transport._open_keyed_log("delivery", name)
        await log.put("a", b"1")
        assert await log.get("a") == b"1"
        [tail] = tails  # the view behind get()
        tail.queue.put_nowait(("error", KafkaException(KafkaError(KafkaError._TRANSPORT))))
        for i in range(3):
            await log.put("a", str(i).encode())
            assert await log.get("a") == str(i).encode()
    finally:
        await transport.aclose()
