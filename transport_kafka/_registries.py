"""Registries on Kafka: one compacted topic per keyed log.

``NS.registry.delivery.<name>`` and ``NS.registry.capability.capabilities``
hold one record per key (the registry's pending / completed / taken
records); a delete is a tombstone (null value), which compaction eventually
removes. ``watch()`` assigns every partition from the beginning (no consumer
group, nothing committed), replays to the high watermark taken when the
watch starts, yields ``CAUGHT_UP``, then keeps reading live. ``get(key)`` is
served from a materialised view that has read at least up to the high
watermark taken at call time, so it reflects every write that returned
before the call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition

from transport import CAUGHT_UP, CapabilityRegistry, DeliveryRegistry, KeyedChange, KeyedLog
from transport.errors import ClosedResourceError, TransientTransportError
from transport_kafka._client import (
    ConsumerThread,
    KafkaClients,
    KafkaContext,
    RawRecord,
    TopicSpec,
    _client_logger,
    consume_available,
    raw_record,
)
from transport_kafka._errors import map_kafka_errors

__all__ = ["KafkaCapabilityRegistry", "KafkaDeliveryRegistry", "KafkaKeyedLog"]

#: The registries are the shared implementations over :class:`KafkaKeyedLog`.
KafkaDeliveryRegistry = DeliveryRegistry
KafkaCapabilityRegistry = CapabilityRegistry

_Event = tuple[str, Any]


class _Tail:
    """Reads every partition of a topic from the beginning, live, on its own
    thread, and feeds ``("rec", RawRecord)`` / ``("eof", (p, offset))`` /
    ``("error", exc)`` events to an asyncio queue."""

    def __init__(self, clients: KafkaClients, topic: str, partitions: list[int]) -> None:
        self.queue: asyncio.Queue[_Event] = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        with map_kafka_errors(f"reading {topic}"):
            self._consumer = Consumer({**clients.reader_config(), "logger": _client_logger()})
            self._consumer.assign([TopicPartition(topic, p, -2) for p in partitions])
        self._thread = ConsumerThread(f"kafka-tail-{topic}", self._step, self._consumer.close)
        self._thread.start()
        self._close_timeout = clients.settings.options.close_timeout_s

    def _step(self) -> None:
        events: list[_Event] = []
        for msg in consume_available(self._consumer, 500, 0.05):
            err = msg.error()
            if err is None:
                events.append(("rec", raw_record(msg)))
            elif err.code() == KafkaError._PARTITION_EOF:
                events.append(("eof", (msg.partition(), msg.offset())))
            else:
                events.append(("error", KafkaException(err)))
        if events:
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._deliver, events)

    def _deliver(self, events: list[_Event]) -> None:
        for event in events:
            self.queue.put_nowait(event)

    async def aclose(self) -> None:
        await self._thread.join(self._close_timeout + 5)


class _View:
    """The materialised last value per key behind ``get``."""

    def __init__(self, partitions: list[int]) -> None:
        self.partitions = partitions
        self.data: dict[str, bytes] = {}
        self.positions: dict[int, int] = {}
        self.changed = asyncio.Event()
        self.error: BaseException | None = None


def registry_spec(topic: str) -> TopicSpec:
    """A registry topic: compacted (the last record of every key, kept)."""
    return TopicSpec(topic, 1, {"cleanup.policy": "compact"}, what="a registry")


class KafkaKeyedLog(KeyedLog):
    """A keyed log on one compacted topic (one partition)."""

    def __init__(self, ctx: KafkaContext, topic: str) -> None:
        self.topic = topic
        self._clients = ctx.clients
        self._view: _View | None = None
        self._view_task: asyncio.Task[None] | None = None
        self._closed = False

    def __repr__(self) -> str:
        return f"<KafkaKeyedLog {self.topic!r}>"

    async def _ready(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"keyed log {self.topic!r} is closed")
        await self._clients.ensure_topics([registry_spec(self.topic)])

    async def put(self, key: str, value: bytes) -> None:
        await self._ready()
        await self._clients.produce(self.topic, key.encode(), value, what=f"put to {self.topic}")

    async def delete(self, key: str) -> None:
        await self._ready()
        await self._clients.produce(self.topic, key.encode(), None, what=f"delete in {self.topic}")

    async def get(self, key: str) -> bytes | None:
        await self._ready()
        view = self._view
        # The view reads the partitions it was started with; their list is
        # only looked up once (a keyed log topic has one partition).
        if view is None:
            view = await self._ensure_view(await self._clients.partitions(self.topic))
        marks = await self._clients.watermarks(self.topic, view.partitions)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._clients.timeout
        while any(view.positions.get(p, 0) < high for p, (_, high) in marks.items()):
            if view.error is not None:
                raise TransientTransportError(f"reading {self.topic}: {view.error}")
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise TransientTransportError(f"reading {self.topic}: timed out catching up")
            event = view.changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), min(remaining, 0.5))
        return view.data.get(key)

    async def _ensure_view(self, partitions: list[int]) -> _View:
        if self._view is None:
            view = self._view = _View(partitions)
            tail = _Tail(self._clients, self.topic, partitions)
            self._view_task = asyncio.create_task(self._feed_view(view, tail))
        return self._view

    async def _feed_view(self, view: _View, tail: _Tail) -> None:
        try:
            while True:
                kind, item = await tail.queue.get()
                if kind == "rec":
                    rec: RawRecord = item
                    key = (rec.key or b"").decode("utf-8", "replace")
                    if rec.value is None:
                        view.data.pop(key, None)
                    else:
                        view.data[key] = rec.value
                    view.positions[rec.partition] = max(
                        view.positions.get(rec.partition, 0), rec.offset + 1
                    )
                elif kind == "eof":
                    p, offset = item
                    view.positions[p] = max(view.positions.get(p, 0), offset)
                else:
                    view.error = item
                if tail.queue.empty():
                    view.changed.set()
                    view.changed = asyncio.Event()
        finally:
            await tail.aclose()

    async def watch(self) -> AsyncIterator[KeyedChange | object]:
        await self._ready()
        partitions = await self._clients.partitions(self.topic)
        marks = await self._clients.watermarks(self.topic, partitions)
        targets = {p: high for p, (low, high) in marks.items() if high > low}
        positions: dict[int, int] = {}
        tail = _Tail(self._clients, self.topic, partitions)
        caught_up = False
        try:
            if not targets:
                caught_up = True
                yield CAUGHT_UP
            while True:
                kind, item = await tail.queue.get()
                if kind == "rec":
                    rec: RawRecord = item
                    positions[rec.partition] = rec.offset + 1
                    yield KeyedChange((rec.key or b"").decode("utf-8", "replace"), rec.value)
                elif kind == "eof":
                    p, offset = item
                    positions[p] = max(positions.get(p, 0), offset)
                else:
                    raise TransientTransportError(f"reading {self.topic}: {item}")
                if not caught_up and all(positions.get(p, 0) >= t for p, t in targets.items()):
                    caught_up = True
                    yield CAUGHT_UP
        finally:
            await tail.aclose()

    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._view_task is not None:
            self._view_task.cancel()
            with contextlib.suppress(BaseException):
                await self._view_task
