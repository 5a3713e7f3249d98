"""Resumable keyed topics: positions, ``watch_from``, checkpoints in the
companion ``<topic>__checkpoint`` topic, and restarts that replay from the
checkpoint instead of the whole history — against the real broker."""

from __future__ import annotations

import asyncio
import itertools
import random
import uuid
from collections.abc import AsyncIterator, Callable

import _pulsar
import pytest

from transport import CAUGHT_UP, DeliveryRegistry, KeyedChange, KeyedLog, WorkResponse
from transport._spi.registries import _CARRY_BYTES, _LogView
from transport.errors import TransientTransportError
from transport.kit import read_checkpoint
from transport_pulsar import PulsarTransport
from transport_pulsar import _registries as pulsar_registries
from transport_pulsar._errors import PulsarResultError
from transport_pulsar._registries import PulsarKeyedLog

from .conftest import PulsarHarness

pytestmark = [pytest.mark.broker, pytest.mark.timeout(300)]


class CountingLog(KeyedLog):
    """A resumable log passed through, counting the changes its watches
    yield and telling when a checkpoint was saved."""

    def __init__(self, inner: PulsarKeyedLog) -> None:
        self.inner = inner
        self.resumable = inner.resumable
        self.yielded = 0
        #: Changes yielded by each watch, in the order they were opened.
        self.yields: list[int] = []
        self.watched_from: list[bytes | None] = []
        self.saved: list[bytes] = []
        self.saved_event = asyncio.Event()

    async def put(self, key: str, value: bytes) -> None:
        await self.inner.put(key, value)

    async def delete(self, key: str) -> None:
        await self.inner.delete(key)

    async def get(self, key: str) -> bytes | None:
        return await self.inner.get(key)

    async def _count(
        self, changes: AsyncIterator[KeyedChange | object]
    ) -> AsyncIterator[KeyedChange | object]:
        index = len(self.yields)
        self.yields.append(0)
        async for item in changes:
            if isinstance(item, KeyedChange):
                self.yielded += 1
                self.yields[index] += 1
            yield item

    def watch(self) -> AsyncIterator[KeyedChange | object]:
        self.watched_from.append(None)
        return self._count(self.inner.watch())

    def watch_from(self, position: bytes) -> AsyncIterator[KeyedChange | object]:
        self.watched_from.append(position)
        return self._count(self.inner.watch_from(position))

    def resumed_only(self) -> bool:
        """Whether every watch after the first was from a position: a view
        whose reader was given up (a stalled pulsar-lite reader, under load)
        reads on from where it was, never from the start again."""
        return all(position is not None for position in self.watched_from[1:])

    async def load_checkpoint(self) -> bytes | None:
        return await self.inner.load_checkpoint()

    async def save_checkpoint(self, data: bytes) -> None:
        await self.inner.save_checkpoint(data)
        self.saved.append(data)
        self.saved_event.set()

    async def aclose(self) -> None:
        await self.inner.aclose()


class State(dict[str, bytes]):
    """A view's state, applied from the log; :meth:`until` waits for a
    condition on it, woken by every change applied."""

    def __init__(self) -> None:
        super().__init__()
        self.changed = asyncio.Event()

    def apply(self, key: str, value: bytes | None) -> None:
        if value is None:
            self.pop(key, None)
        else:
            self[key] = value
        self.changed.set()

    async def until(self, condition: Callable[[State], bool]) -> None:
        while not condition(self):
            self.changed.clear()
            await self.changed.wait()


async def _connect(harness: PulsarHarness) -> PulsarTransport:
    transport = await harness.connect()
    assert isinstance(transport, PulsarTransport)
    return transport


async def _until_caught_up(
    changes: AsyncIterator[KeyedChange | object], seen: list[KeyedChange] | None = None
) -> list[KeyedChange]:
    """The changes up to CAUGHT_UP, appended to ``seen`` (kept if the
    watch raises) and returned."""
    seen = [] if seen is None else seen
    async for item in changes:
        if item is CAUGHT_UP:
            return seen
        assert isinstance(item, KeyedChange)
        seen.append(item)
    raise AssertionError("the watch ended before catching up")


async def _replayed(log: KeyedLog) -> list[KeyedChange]:
    """Every change up to CAUGHT_UP, watching again from the last change
    seen when the reader stalls, as the registries' views do: pulsar-lite's
    reader now and then stops delivering within a long replay (the watch
    then raises ``TransientTransportError``: "the reader stopped
    delivering"). The change watched again from is seen twice, which
    ``_fold`` does not mind; any other failure fails the test."""
    seen: list[KeyedChange] = []
    for _ in range(3):
        position = seen[-1].position if seen else None
        changes = log.watch() if position is None else log.watch_from(position)
        try:
            return await _until_caught_up(changes, seen)
        except TransientTransportError as exc:
            if "stopped delivering" not in str(exc):
                raise
    raise AssertionError("the reader stalled three times in one replay")


def _fold(changes: list[KeyedChange]) -> dict[str, bytes]:
    state: dict[str, bytes] = {}
    for change in changes:
        if change.value is None:
            state.pop(change.key, None)
        else:
            state[change.key] = change.value
    return state


async def _write_history(log: KeyedLog, ops: int, keys: int, seed: int) -> dict[str, bytes]:
    """``ops`` puts (2 KB values) and deletes over ``keys`` keys, in rounds
    of distinct keys written concurrently; the state they leave."""
    rng = random.Random(seed)
    expected: dict[str, bytes] = {}
    done = 0
    while done < ops:
        batch = rng.sample(range(keys), min(100, ops - done))
        writes = []
        for k in batch:
            key = f"k{k}"
            if rng.random() < 0.7:
                value = f"{done}:{key}:".encode() + rng.randbytes(1000).hex().encode()
                expected[key] = value
                writes.append(log.put(key, value))
            else:
                expected.pop(key, None)
                writes.append(log.delete(key))
            done += 1
        await asyncio.gather(*writes)
    return expected


async def test_a_restart_replays_from_the_checkpoint_and_ends_in_the_same_state(
    transport_harness: PulsarHarness,
) -> None:
    transport = await _connect(transport_harness)
    name = f"cp{uuid.uuid4().hex[:8]}"
    views: list[_LogView] = []
    try:
        writer = transport._open_keyed_log("delivery", name)
        assert writer.resumable
        assert await writer.load_checkpoint() is None  # none saved yet
        history = 5_000
        expected = await _write_history(writer, history, keys=300, seed=7)
        # Live values are worth more than a checkpoint carries: it resumes
        # in the middle of the topic, not after its last change.
        assert sum(len(k) + len(v) for k, v in expected.items()) > _CARRY_BYTES

        # A first reader replays everything and then saves a checkpoint.
        first_log = CountingLog(transport._open_keyed_log("delivery", name))
        first_state = State()
        first = _LogView(first_log, first_state.apply, "first")
        views.append(first)
        await first.ready()
        assert first_log.watched_from[0] is None and first_log.resumed_only()
        assert first_log.yields[0] == history or len(first_log.yields) > 1
        # A re-watch re-reads from its position, not the whole topic again.
        assert history <= first_log.yielded < history + history // 2, first_log.yields
        assert first_state == expected
        await asyncio.wait_for(first_log.saved_event.wait(), 30)
        resume, carried = read_checkpoint(first_log.saved[-1])
        assert 0 < len(carried) < len(expected)

        # A new reader starts at the checkpoint: the records it carries,
        # then the topic from its resume position on.
        second_log = CountingLog(transport._open_keyed_log("delivery", name))
        second_state = State()
        second = _LogView(second_log, second_state.apply, "second")
        views.append(second)
        await second.ready()
        assert second_log.watched_from[0] == resume and second_log.resumed_only()
        assert 0 < second_log.yielded < history // 2, second_log.yields
        assert second_state == expected
        # ... and ends where a full replay ends.
        full = _fold(await _replayed(writer))
        assert full == expected == second_state

        # It follows the topic live from there.
        await writer.put("after", b"restart")
        await writer.delete("k1")
        await asyncio.wait_for(second_state.until(lambda s: "k1" not in s and "after" in s), 20)
        expected.pop("k1", None)
        assert second_state == {**expected, "after": b"restart"}
    finally:
        for view in views:
            await view.aclose()
        await transport.aclose()


async def test_watch_from_the_last_message_and_from_positions_the_topic_lacks(
    transport_harness: PulsarHarness,
) -> None:
    transport = await _connect(transport_harness)
    try:
        log = transport._open_keyed_log("delivery", f"wf{uuid.uuid4().hex[:8]}")
        other = transport._open_keyed_log("delivery", f"wo{uuid.uuid4().hex[:8]}")
        for i in range(5):
            await log.put(f"k{i}", f"v{i}".encode())
        await log.delete("k2")
        await other.put("x", b"1")
        history = await _until_caught_up(log.watch())
        assert [(c.key, c.value) for c in history][-1] == ("k2", None)

        # At a position: that change again, the later ones, CAUGHT_UP.
        changes = await _until_caught_up(log.watch_from(history[3].position or b""))
        assert changes == history[3:]

        # At the last message: that change, CAUGHT_UP, then what comes later.
        watch = log.watch_from(history[-1].position or b"")
        assert await _until_caught_up(watch) == history[-1:]
        await log.put("k9", b"later")
        later = await asyncio.wait_for(anext(watch), 20)
        assert isinstance(later, KeyedChange) and (later.key, later.value) == ("k9", b"later")
        await watch.aclose()
        history.append(later)

        # Positions this topic does not hold: from the earliest message.
        [foreign] = await _until_caught_up(other.watch())
        beyond = _pulsar.MessageId(-1, 1 << 40, 0, -1).serialize()
        for missing in (foreign.position or b"", beyond, b"not a message id"):
            assert await _until_caught_up(log.watch_from(missing)) == history
        await log.aclose()
        await other.aclose()
    finally:
        await transport.aclose()


async def test_get_starts_from_the_checkpoint_and_sees_every_value(
    transport_harness: PulsarHarness,
) -> None:
    transport = await _connect(transport_harness)
    name = f"cg{uuid.uuid4().hex[:8]}"
    try:
        writer = transport._open_keyed_log("delivery", name)
        expected = await _write_history(writer, 2_500, keys=200, seed=11)
        saver = CountingLog(transport._open_keyed_log("delivery", name))
        view = _LogView(saver, State().apply, "saver")
        await view.ready()
        await asyncio.wait_for(saver.saved_event.wait(), 30)
        await view.aclose()
        _, carried = read_checkpoint(saver.saved[-1])
        assert carried and len(carried) < len(expected)
        # Written after the checkpoint: found by the reader that resumes.
        await writer.put("k0", b"new")
        await writer.put("fresh", b"1")
        await writer.delete("k5")
        expected.update(k0=b"new", fresh=b"1")
        expected.pop("k5", None)

        reader = transport._open_keyed_log("delivery", name)
        topic = reader._topic
        loads: list[object] = []
        load = topic._load_checkpoint

        async def spy() -> object:
            loaded = await load()
            loads.append(loaded)
            return loaded

        topic._load_checkpoint = spy  # type: ignore[method-assign]
        for key in [*expected, "k5", "never"]:
            assert await reader.get(key) == expected.get(key), key
        assert len(loads) == 1 and loads[0] is not None  # the view started at the checkpoint
        assert dict(topic._state) == expected
        await writer.aclose()
        await reader.aclose()
    finally:
        await transport.aclose()


async def test_a_delivery_registry_saves_checkpoints_as_it_goes_and_restarts_from_them(
    transport_harness: PulsarHarness,
) -> None:
    transport = await _connect(transport_harness)
    name = f"dr{uuid.uuid4().hex[:8]}"
    try:
        log = CountingLog(transport._open_keyed_log("delivery", name))
        registry = DeliveryRegistry(name, log)
        await registry.pending()  # the view is loaded, then follows the writes
        ids = [f"r{i}" for i in range(600)]
        for chunk in range(0, len(ids), 40):
            handles = await asyncio.gather(*(registry.register(i) for i in ids[chunk : chunk + 40]))
            answered = [h for h in handles if not h.request_id.endswith("7")]
            await asyncio.gather(
                *(
                    registry.complete(h.request_id, WorkResponse(request_id=h.request_id))
                    for h in answered
                )
            )
            await asyncio.gather(*(h.result(timeout=20) for h in answered))
        live = sorted(i for i in ids if i.endswith("7"))
        # About 2,000 changes (two writes per registration, two deletes per
        # collection): the view saved a checkpoint while following them.
        await asyncio.wait_for(log.saved_event.wait(), 30)
        await registry.aclose()

        restarted_log = CountingLog(transport._open_keyed_log("delivery", name))
        restarted = DeliveryRegistry(name, restarted_log)
        try:
            assert sorted(p.request_id for p in await restarted.pending()) == live
            assert restarted_log.watched_from[0] is not None

            assert restarted_log.yielded < 500, restarted_log.yielded
            assert await restarted.complete("r7", WorkResponse(request_id="r7"))
            assert (await restarted.wait("r7")).done()
        finally:
            await restarted.aclose()
    finally:
        await transport.aclose()


async def test_a_view_whose_reader_stops_delivering_reads_on_from_its_last_position(
    transport_harness: PulsarHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A registry view's reader on pulsar-lite once went quiet with messages
    due (a 200,000-response benchmark fill never settled): every caller
    waiting on that view would wait for good. The view's reader is made to
    withhold every message here; the view notices the due message when it
    has been idle, gives the reader up and reads on from its last position,
    and the caller gets the response another process wrote."""
    monkeypatch.setattr(pulsar_registries, "_IDLE_CHECK", 0.5)
    caller = await _connect(transport_harness)
    worker = await _connect(transport_harness)
    name = f"st{uuid.uuid4().hex[:8]}"
    try:
        log = CountingLog(caller._open_keyed_log("delivery", name))
        registry = DeliveryRegistry(name, log)
        handle = await registry.register("r1")
        await registry.pending()  # the view caught up and follows the topic
        (reader,) = log.inner._topic._readers

        async def withheld(timeout: float | None = None) -> None:
            await asyncio.sleep(3600 if timeout is None else timeout)

        monkeypatch.setattr(reader, "read_next", withheld)
        assert await worker.delivery_registry(name).complete(
            "r1", WorkResponse(request_id="r1", result=1)
        )
        assert (await handle.result(timeout=60)).result == 1
        # Read on from where it was: a position, not the start again.
        assert len(log.watched_from) == 2 and log.watched_from[1] is not None
        await registry.aclose()
    finally:
        await worker.aclose()
        await caller.aclose()


async def test_a_live_watch_yields_each_change_once_in_topic_order(
    transport_harness: PulsarHarness,
) -> None:
    """pulsar-lite sends a reader concurrently published messages more than
    once, now and then earlier ones again after later ones
    (test_pulsar_lite_gaps.py): a copy applied out of order would bring back
    an overwritten value, and a view's checkpoint relies on log order."""
    transport = await _connect(transport_harness)
    try:
        log = transport._open_keyed_log("delivery", f"lw{uuid.uuid4().hex[:8]}")
        watch = log.watch()
        assert await _until_caught_up(watch) == []
        written = 0
        for burst in range(25):
            await asyncio.gather(*(log.put(f"k{i}", b"%d" % burst) for i in range(80)))
            written += 80
        await log.put("last", b"1")
        seen: list[KeyedChange] = []
        async with asyncio.timeout(30):
            while not seen or seen[-1].key != "last":
                item = await anext(watch)
                assert isinstance(item, KeyedChange)
                seen.append(item)
        assert len(seen) == written + 1
        ids = [_pulsar.MessageId.deserialize(c.position or b"") for c in seen]
        assert all(a < b for a, b in itertools.pairwise(ids))
        assert _fold(seen) == {**{f"k{i}": b"24" for i in range(80)}, "last": b"1"}
        await watch.aclose()
        await log.aclose()
    finally:
        await transport.aclose()


async def test_a_checkpoint_topic_the_broker_does_not_create_means_a_full_replay(
    transport_harness: PulsarHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker without topic auto-creation, and a registry provisioned
    before checkpoints existed: the registry works as before (replays its
    topic from the start); a failure that may go away is raised (the view
    retries)."""
    transport = await _connect(transport_harness)
    try:
        log = transport._open_keyed_log("delivery", f"nf{uuid.uuid4().hex[:8]}")
        await log.put("a", b"1")
        failure = "TopicNotFound"

        async def refused(topic: str) -> object:
            raise TransientTransportError(f"subscribe to {topic}: {failure}") from (
                PulsarResultError(failure)
            )

        monkeypatch.setattr(transport.client, "last_message_id", refused)
        assert await log.load_checkpoint() is None
        state = State()
        view = _LogView(log, state.apply, "no checkpoint topic")
        await view.ready()
        await view.aclose()
        assert state == {"a": b"1"}
        assert await log.get("a") == b"1"
        failure = "Timeout"
        with pytest.raises(TransientTransportError, match="Timeout"):
            await log.load_checkpoint()
        await log.aclose()
    finally:
        await transport.aclose()
