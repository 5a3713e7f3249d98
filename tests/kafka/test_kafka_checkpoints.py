"""Resumable keyed logs on Kafka: positions, ``watch_from`` and checkpoints.

The dev broker (Tansu) never compacts, so without a checkpoint a reader
replays a registry's whole history; with one it replays from the resume
position. Every scenario compares the state a reader ends with against the
state the writes produce (and against a full replay).
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

import transport._spi.registries as registries
import transport_kafka._registries as kafka_registries
from transport import CAUGHT_UP, KeyedChange, WorkResponse, connect
from transport._spi.registries import DeliveryRecord, _LogView
from transport.kit import encode, read_checkpoint, utcnow
from transport_kafka import KafkaKeyedLog, KafkaTransport
from transport_kafka._registries import _starts

pytestmark = [pytest.mark.broker]  # asyncio_mode = "auto"

KEYS = 300
CHANGES = 5_000


def _name() -> str:
    return f"c{uuid.uuid4().hex[:8]}"


async def _kafka(kafka_config_factory: Any) -> KafkaTransport:
    transport = await connect(kafka_config_factory())
    assert isinstance(transport, KafkaTransport)
    return transport


def _history(seed: int = 7) -> tuple[list[tuple[str, bytes | None]], dict[str, bytes]]:
    """CHANGES puts and deletes of KEYS keys, and the state they leave."""
    rng = random.Random(seed)
    ops: list[tuple[str, bytes | None]] = []
    for i in range(CHANGES):
        key = f"k{rng.randrange(KEYS)}"
        ops.append((key, None if rng.random() < 0.2 else f"v{i}-{key}".encode()))
    state: dict[str, bytes] = {}
    for key, value in ops:
        if value is None:
            state.pop(key, None)
        else:
            state[key] = value
    return ops, state


async def _write(
    log: KafkaKeyedLog, ops: list[tuple[str, bytes | None]], workers: int = 32
) -> None:
    """Write ``ops`` in order per key (each key's writes by one worker, one
    at a time; keys spread over concurrent workers)."""
    lanes: list[list[tuple[str, bytes | None]]] = [[] for _ in range(workers)]
    for key, value in ops:
        lanes[hash(key) % workers].append((key, value))

    async def lane(items: list[tuple[str, bytes | None]]) -> None:
        for key, value in items:
            if value is None:
                await log.delete(key)
            else:
                await log.put(key, value)

    await asyncio.gather(*(lane(items) for items in lanes))


@dataclass
class Probe:
    """What a view asked of its log: which watch, how many changes it
    replayed before catching up, and the checkpoints saved."""

    watches: list[bytes | None] = field(default_factory=list)
    replayed: int = 0
    saved: list[bytes] = field(default_factory=list)
    saved_event: asyncio.Event = field(default_factory=asyncio.Event)


def _instrument(log: KafkaKeyedLog) -> Probe:
    probe = Probe()
    watch, watch_from, save = log.watch, log.watch_from, log.save_checkpoint

    async def counted(
        changes: AsyncIterator[KeyedChange | object],
    ) -> AsyncIterator[KeyedChange | object]:
        caught_up = False
        async for item in changes:
            if item is CAUGHT_UP:
                caught_up = True
            elif not caught_up:
                probe.replayed += 1
            yield item

    def watch_() -> AsyncIterator[KeyedChange | object]:
        probe.watches.append(None)
        return counted(watch())

    def watch_from_(position: bytes) -> AsyncIterator[KeyedChange | object]:
        probe.watches.append(position)
        return counted(watch_from(position))

    async def save_(data: bytes) -> None:
        await save(data)
        probe.saved.append(data)
        probe.saved_event.set()

    log.watch = watch_  # type: ignore[method-assign]
    log.watch_from = watch_from_  # type: ignore[method-assign]
    log.save_checkpoint = save_  # type: ignore[method-assign]
    return probe


class _State:
    """A view's applier: the last value per key."""

    def __init__(self) -> None:
        self.data: dict[str, bytes] = {}
        self._changed = asyncio.Event()

    def apply(self, key: str, value: bytes | None) -> None:
        if value is None:
            self.data.pop(key, None)
        else:
            self.data[key] = value
        self._changed.set()

    async def until(self, wanted: dict[str, bytes]) -> None:
        """Return once the applied state is ``wanted`` (woken by each apply)."""
        while self.data != wanted:
            self._changed.clear()
            await self._changed.wait()


async def _full_replay(log: KafkaKeyedLog) -> tuple[dict[str, bytes], int]:
    """The state of a plain ``watch()`` to its catch-up, and its length."""
    state = _State()
    count = 0
    watch = log.watch()
    try:
        async with asyncio.timeout(60):
            async for item in watch:
                if item is CAUGHT_UP:
                    break
                assert isinstance(item, KeyedChange)
                state.apply(item.key, item.value)
                count += 1
    finally:
        await watch.aclose()  # type: ignore[attr-defined]
    return state.data, count


@pytest.mark.parametrize("carry_bytes", [None, 2_000], ids=["carries-all", "carries-some"])
async def test_a_new_reader_starts_at_the_checkpoint_and_ends_with_the_full_replays_state(
    kafka_config_factory: Any, monkeypatch: pytest.MonkeyPatch, carry_bytes: int | None
) -> None:
    if carry_bytes is not None:
        # The checkpoint carries only the oldest live records: the new
        # reader replays from the first one it does not carry.
        monkeypatch.setattr(registries, "_CARRY_BYTES", carry_bytes)
    name = _name()
    ops, expected = _history()
    first, second = await _kafka(kafka_config_factory), await _kafka(kafka_config_factory)
    try:
        writer = first._open_keyed_log("delivery", name)
        await _write(writer, ops)
        # A view that replays everything saves a checkpoint once caught up.
        log1 = first._open_keyed_log("delivery", name)
        probe1 = _instrument(log1)
        state1 = _State()
        view1 = _LogView(log1, state1.apply, "first reader")
        await asyncio.wait_for(view1.ready(), 60)
        assert probe1.watches == [None] and probe1.replayed == CHANGES
        assert state1.data == expected
        await asyncio.wait_for(probe1.saved_event.wait(), 30)
        resume, carried = read_checkpoint(probe1.saved[0])
        if carry_bytes is None:
            assert {key for key, _, _ in carried} == set(expected)
        else:
            assert 0 < len(carried) < len(expected), len(carried)
        await view1.aclose()

        # A new reader (another transport) loads it and replays from there.
        log2 = second._open_keyed_log("delivery", name)
        assert await log2.load_checkpoint() == probe1.saved[0]
        probe2 = _instrument(log2)
        state2 = _State()
        view2 = _LogView(log2, state2.apply, "second reader")
        await asyncio.wait_for(view2.ready(), 60)
        assert probe2.watches == [resume]
        # Exactly the changes from the resume position on (that one again),
        # a fraction of the history.
        assert probe2.replayed == CHANGES - int(resume.split(b":")[1])
        assert probe2.replayed < CHANGES // 4, probe2.replayed
        full, length = await _full_replay(second._open_keyed_log("delivery", name))
        assert length == CHANGES
        assert state2.data == full == expected

        # It follows the log live from there.
        more = [("k1", b"after-1"), ("k2", None), ("fresh", b"after-2")]
        await _write(writer, more)
        expected.update({"k1": b"after-1", "fresh": b"after-2"})
        expected.pop("k2", None)
        await asyncio.wait_for(state2.until(expected), 30)
        await view2.aclose()
    finally:
        await first.aclose()
        await second.aclose()


async def test_a_restarted_caller_replays_what_is_live_not_the_collected_history(
    kafka_config_factory: Any,
) -> None:
    """The delivery registry on a registry of collected responses (what a
    caller leaves: per response a registration and a completion, both
    deleted when collected), some pending and some answered requests."""
    name = _name()
    first, second = await _kafka(kafka_config_factory), await _kafka(kafka_config_factory)
    try:
        log_ = first._open_keyed_log("delivery", name)
        now = utcnow()
        expires = now + timedelta(days=1)

        def records(rid: str) -> tuple[bytes, bytes]:
            pending = DeliveryRecord(
                request_id=rid, state="pending", created_at=now, expires_at=expires
            )
            done = DeliveryRecord(
                request_id=rid,
                state="completed",
                response=WorkResponse(request_id=rid, status="completed", result={"id": rid}),
                created_at=now,
                expires_at=expires,
            )
            return encode(pending), encode(done)

        collected = [f"gone-{i}" for i in range(1_300)]
        waiting = [f"wait-{i}" for i in range(20)]
        answered = [f"done-{i}" for i in range(10)]
        ops: list[tuple[str, bytes | None]] = []
        for rid in collected:
            pending, done = records(rid)
            ops += [
                (f"p.{rid}", pending),
                (f"c.{rid}", done),
                (f"p.{rid}", None),
                (f"c.{rid}", None),
            ]
        for rid in waiting:
            ops.append((f"p.{rid}", records(rid)[0]))
        for rid in answered:
            pending, done = records(rid)
            ops += [(f"p.{rid}", pending), (f"c.{rid}", done)]
        await _write(log_, ops)

        registry = first.delivery_registry(name)
        probe1 = _instrument(registry._log)  # type: ignore[arg-type]
        assert len(await registry.pending()) == len(waiting) + len(answered)
        assert probe1.replayed == len(ops)
        await asyncio.wait_for(probe1.saved_event.wait(), 30)

        restarted = second.delivery_registry(name)
        probe2 = _instrument(restarted._log)  # type: ignore[arg-type]
        live = await asyncio.wait_for(restarted.pending(), 60)
        assert sorted(p.request_id for p in live) == sorted(waiting + answered)
        assert probe2.watches and probe2.watches[0] is not None
        assert probe2.replayed <= 10, probe2.replayed
        # Committed reads (the keyed log's own view, from the checkpoint too).
        record = await restarted.record(waiting[0])
        assert record is not None and record.state == "pending"
        assert await restarted.record(collected[0]) is None
        assert await restarted._log.get(f"p.{collected[-1]}") is None
        assert await restarted._log.get(f"c.{answered[0]}") is not None
        response = await live[[p.request_id for p in live].index(answered[0])].result(10)
        assert response.result == {"id": answered[0]}
        assert (
            await restarted.complete(
                collected[1], WorkResponse(request_id=collected[1], status="completed")
            )
            is False
        )
    finally:
        await first.aclose()
        await second.aclose()


async def test_get_starts_from_the_checkpoint_and_sees_later_writes(
    kafka_config_factory: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = _name()
    ops, expected = _history(seed=11)
    first, second = await _kafka(kafka_config_factory), await _kafka(kafka_config_factory)
    try:
        writer = first._open_keyed_log("capability", name)
        await _write(writer, ops)
        log1 = first._open_keyed_log("capability", name)
        probe = _instrument(log1)
        view = _LogView(log1, _State().apply, "checkpointing reader")
        await asyncio.wait_for(view.ready(), 60)
        await asyncio.wait_for(probe.saved_event.wait(), 30)
        await view.aclose()
        resume, carried = read_checkpoint(probe.saved[0])
        # After the checkpoint: a carried key overwritten, one deleted, a new one.
        carried_keys = [key for key, _, _ in carried]
        changed, deleted = carried_keys[0], carried_keys[1]
        later = [(changed, b"later"), (deleted, None), ("brand-new", b"new")]
        await _write(writer, later)
        expected.update({changed: b"later", "brand-new": b"new"})
        expected.pop(deleted)

        starts: list[dict[int, int]] = []
        tail = kafka_registries._Tail

        class RecordingTail(tail):  # type: ignore[misc,valid-type]
            def __init__(self, clients: Any, topic: str, where: dict[int, int]) -> None:
                starts.append(dict(where))
                super().__init__(clients, topic, where)

        monkeypatch.setattr(kafka_registries, "_Tail", RecordingTail)
        reader = second._open_keyed_log("capability", name)
        assert await reader.get(changed) == b"later"
        assert starts == [{0: int(resume.split(b":")[1])}]
        assert await reader.get(deleted) is None
        assert await reader.get("brand-new") == b"new"
        for key in [f"k{i}" for i in range(KEYS)]:
            assert await reader.get(key) == expected.get(key), key
        # A write that returned before the call is seen.
        await writer.put(changed, b"latest")
        assert await reader.get(changed) == b"latest"
    finally:
        await first.aclose()
        await second.aclose()


async def test_watch_from_the_head_and_from_the_last_change(kafka_config_factory: Any) -> None:
    transport = await _kafka(kafka_config_factory)
    try:
        log_ = transport._open_keyed_log("delivery", _name())
        for i in range(5):
            await log_.put(f"k{i}", b"%d" % i)
        _, high = (await transport.clients.watermarks(log_.topic, [0]))[0]
        assert high == 5
        # At the high watermark: caught up at once, then live.
        watch = log_.watch_from(b"0:5")
        assert await asyncio.wait_for(watch.__anext__(), 10) is CAUGHT_UP
        await log_.put("k9", b"9")
        assert await asyncio.wait_for(watch.__anext__(), 10) == KeyedChange("k9", b"9", b"0:5")
        await watch.aclose()  # type: ignore[attr-defined]
        # From the last change: that change again, then caught up.
        watch = log_.watch_from(b"0:5")
        assert await asyncio.wait_for(watch.__anext__(), 10) == KeyedChange("k9", b"9", b"0:5")
        assert await asyncio.wait_for(watch.__anext__(), 10) is CAUGHT_UP
        await watch.aclose()  # type: ignore[attr-defined]
        # From the middle: in offset order, each with its position.
        seen: list[Any] = []
        watch = log_.watch_from(b"0:2")
        async with asyncio.timeout(10):
            async for item in watch:
                seen.append(item)
                if item is CAUGHT_UP:
                    break
        await watch.aclose()  # type: ignore[attr-defined]
        assert seen == [
            KeyedChange("k2", b"2", b"0:2"),
            KeyedChange("k3", b"3", b"0:3"),
            KeyedChange("k4", b"4", b"0:4"),
            KeyedChange("k9", b"9", b"0:5"),
            CAUGHT_UP,
        ]
        # A position this log cannot read: replayed from the beginning.
        history, _ = await _full_replay_from(log_, b"not-a-position")
        assert [c.key for c in history] == ["k0", "k1", "k2", "k3", "k4", "k9"]
    finally:
        await transport.aclose()


async def _full_replay_from(log_: KafkaKeyedLog, position: bytes) -> tuple[list[KeyedChange], Any]:
    seen: list[KeyedChange] = []
    watch = log_.watch_from(position)
    async with asyncio.timeout(10):
        async for item in watch:
            if item is CAUGHT_UP:
                break
            assert isinstance(item, KeyedChange)
            seen.append(item)
    await watch.aclose()  # type: ignore[attr-defined]
    return seen, watch


def test_a_resume_offset_below_the_low_watermark_starts_at_the_earliest() -> None:
    # Retention removed offsets 0-99 (the dev broker cannot delete records,
    # so the rule is checked on the watermarks it is given).
    assert _starts({0: (100, 200)}, (0, 50)) == ({0: -2}, {0: 200})
    assert _starts({0: (100, 200)}, (0, 150)) == ({0: 150}, {0: 200})
    # At (or past, as a broker that reports a batch's base offset + 1 as
    # its high watermark may show) the head: caught up at the first record
    # or end-of-partition read there.
    assert _starts({0: (0, 200)}, (0, 200)) == ({0: 200}, {0: 200})
    assert _starts({0: (0, 200)}, (0, 201)) == ({0: 201}, {0: 201})
    # Empty topic; no position; other partitions from their beginning.
    assert _starts({0: (0, 0)}, (0, 0)) == ({0: -2}, {})
    assert _starts({0: (0, 7), 1: (0, 3)}, None) == ({0: -2, 1: -2}, {0: 7, 1: 3})
    assert _starts({0: (0, 7), 1: (0, 3)}, (1, 2)) == ({0: -2, 1: 2}, {0: 7, 1: 3})


async def test_a_log_without_a_checkpoint_answers_none_at_once(kafka_config_factory: Any) -> None:
    transport = await _kafka(kafka_config_factory)
    try:
        log_ = transport._open_keyed_log("delivery", _name())
        await log_.put("k", b"v")
        started = time.monotonic()
        assert await log_.load_checkpoint() is None
        # The operation timeout is 10 s: this was no wait for one.
        assert time.monotonic() - started < 2.0
    finally:
        await transport.aclose()


async def test_a_checkpoint_is_ignored_for_a_recreated_topic_or_past_delete_retention(
    kafka_config_factory: Any, kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = _name()
    first = await _kafka(kafka_config_factory)
    try:
        log_ = first._open_keyed_log("delivery", name)
        await log_.put("old", b"1")
        await log_.save_checkpoint(b"checkpoint-1")
        assert await log_.load_checkpoint() == b"checkpoint-1"
        # Older than delete.retention.ms (not reported by the dev broker:
        # Kafka's default applies, made negative here: any age is too old).
        monkeypatch.setattr(kafka_registries, "_DEFAULT_DELETE_RETENTION_MS", -1)
        assert await log_.load_checkpoint() is None
        monkeypatch.undo()
        assert await log_.load_checkpoint() == b"checkpoint-1"
    finally:
        await first.aclose()
    # The registry topic is deleted and re-created: the checkpoint topic
    # still holds the old topic's checkpoint, which must not be applied.
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for future in admin.delete_topics([log_.topic], operation_timeout=10).values():
        future.result(10)
    second = await _kafka(kafka_config_factory)
    try:
        fresh = second._open_keyed_log("delivery", name)

        async def recreated() -> None:
            while True:
                try:
                    await fresh.put("new", b"2")
                    return
                except Exception:  # the deletion may still be in progress
                    await asyncio.sleep(0.2)

        await asyncio.wait_for(recreated(), 30)
        assert await fresh.load_checkpoint() is None
        # A checkpoint saved now is for the new topic.
        await fresh.save_checkpoint(b"checkpoint-2")
        assert await fresh.load_checkpoint() == b"checkpoint-2"
    finally:
        await second.aclose()


async def test_a_position_of_a_recreated_topic_is_replayed_from_the_beginning(
    kafka_config_factory: Any, kafka_bootstrap: str
) -> None:
    # A view re-watches from the last position it saw; if the topic was
    # deleted and re-created meanwhile (or the broker lost its data), the
    # new topic's records below that offset must not be skipped.
    name = _name()
    first, second = await _kafka(kafka_config_factory), await _kafka(kafka_config_factory)
    try:
        log_ = first._open_keyed_log("delivery", name)
        for i in range(5):
            await log_.put(f"old{i}", b"1")
        history, _ = await _full_replay_from(log_, b"0:0")
        assert history[-1].position == b"0:4"
        admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
        for future in admin.delete_topics([log_.topic], operation_timeout=10).values():
            future.result(10)
        fresh = second._open_keyed_log("delivery", name)

        async def recreated() -> None:
            while True:
                try:
                    await fresh.put("new0", b"2")
                    return
                except Exception:  # the deletion may still be in progress
                    await asyncio.sleep(0.2)

        await asyncio.wait_for(recreated(), 30)
        await fresh.put("new1", b"2")
        replayed, _ = await _full_replay_from(log_, b"0:4")
        assert [c.key for c in replayed] == ["new0", "new1"]
    finally:
        await first.aclose()
        await second.aclose()


async def test_watch_from_past_a_batchs_reported_high_watermark_reads_the_batch(
    kafka_config_factory: Any, kafka_bootstrap: str
) -> None:
    # Tansu reports the high watermark after a batch of several records as
    # the batch's base offset + 1: a resume offset inside that batch is past
    # it, and the records there were written before the watch started.
    transport = await _kafka(kafka_config_factory)
    try:
        log_ = transport._open_keyed_log("delivery", _name())
        await log_.put("k0", b"0")  # creates the topics

        def batch() -> None:
            producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 200})
            for i in range(1, 6):
                producer.produce(log_.topic, key=b"k%d" % i, value=b"%d" % i)
            assert producer.flush(10) == 0

        await asyncio.to_thread(batch)
        _, high = (await transport.clients.watermarks(log_.topic, [0]))[0]
        assert 2 <= high <= 6, high  # 2 on Tansu, 6 on a broker that reports the end
        seen: list[Any] = []
        watch = log_.watch_from(b"0:4")
        async with asyncio.timeout(10):
            async for item in watch:
                seen.append(item)
                if len(seen) == 3:
                    break
        await watch.aclose()  # type: ignore[attr-defined]
        assert seen[0] == KeyedChange("k4", b"4", b"0:4")
        assert [x for x in seen if x is not CAUGHT_UP] == [
            KeyedChange("k4", b"4", b"0:4"),
            KeyedChange("k5", b"5", b"0:5"),
        ]
    finally:
        await transport.aclose()
