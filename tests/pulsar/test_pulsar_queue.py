from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from typing import Any

import pytest

from transport import CAUGHT_UP, KeyedChange, WorkRequest
from transport_pulsar import PulsarDelivery, PulsarTransport

from .conftest import PulsarHarness

pytestmark = pytest.mark.broker


async def test_round_trip_ack_nack(transport_harness: PulsarHarness) -> None:
    t = await transport_harness.connect()
    try:
        q = t.request_queue("smoke", lease_seconds=1.0, max_attempts=2)
        r = await q.enqueue(WorkRequest(task="x", payload={"a": 1}))
        d = await q.poll(5)
        assert d is not None and d.request.request_id == r.request_id and d.attempt == 1
        assert await d.nack(error="e1")
        d2 = await q.poll(5)
        assert d2 is not None and d2.attempt == 2
        assert await d2.nack()
        dead = await q.dead_letters()
        assert len(dead) == 1 and dead[0].error == "e1"
        assert await q.requeue_dead_letters() == 1
        d3 = await q.poll(5)
        assert d3 is not None and d3.attempt == 1
        assert await d3.ack()
        assert await q.poll(0.3) is None
    finally:
        await t.aclose()


async def test_keyed_log(transport_harness: PulsarHarness) -> None:
    t = await transport_harness.connect()
    assert isinstance(t, PulsarTransport)
    try:
        log = t._open_keyed_log("delivery", "kv")
        assert await log.get("a") is None
        await log.put("a", b"1")
        await log.put("b", b"2")
        await log.delete("a")
        assert await log.get("a") is None
        assert await log.get("b") == b"2"
        watch = log.watch()
        items = []
        async for item in watch:
            items.append(item)
            if item is CAUGHT_UP:
                break
        # Every change in topic order, each with its position (the history,
        # not a fold: the registries' checkpoints rely on the order).
        changes = items[:-1]
        assert items[-1] is CAUGHT_UP
        assert [(c.key, c.value) for c in changes] == [("a", b"1"), ("b", b"2"), ("a", None)]
        positions = [c.position for c in changes]
        assert all(positions) and len(set(positions)) == 3
        await log.put("c", b"3")
        live = await anext(watch)
        assert isinstance(live, KeyedChange) and (live.key, live.value) == ("c", b"3")
        assert live.position is not None and live.position not in positions
        await watch.aclose()
        await log.aclose()
    finally:
        await t.aclose()


async def test_poll_zero_is_prompt_and_finds_waiting_work(transport_harness: PulsarHarness) -> None:
    t = await transport_harness.connect()
    try:
        q = t.request_queue(f"z{uuid.uuid4().hex[:8]}")
        started = time.monotonic()
        assert await q.poll(0) is None
        # The first poll joins the subscription (a broker round trip or a few,
        # seconds on a loaded machine): it must not wait out a receive window
        # or the operation timeout on top of that.
        joined = time.monotonic() - started
        assert joined < transport_harness.config.options["operation_timeout_seconds"], joined
        started = time.monotonic()
        assert await q.poll(0) is None
        assert time.monotonic() - started < 0.5  # no join now: poll(0) does not wait
        request = await q.enqueue(WorkRequest(task="x"))
        found = None
        deadline = time.monotonic() + 5
        while found is None and time.monotonic() < deadline:
            found = await q.poll(0)
            await asyncio.sleep(0.01)
        assert found is not None and found.request.request_id == request.request_id
        assert await found.ack()
    finally:
        await t.aclose()


async def test_a_cancelled_poll_loses_nothing(transport_harness: PulsarHarness) -> None:
    t = await transport_harness.connect()
    try:
        q = t.request_queue(f"c{uuid.uuid4().hex[:8]}")
        await q.poll(0)  # join the subscription first
        for _ in range(20):
            task = asyncio.create_task(q.poll(5))
            await asyncio.sleep(0)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                got = await task
                if got is not None:  # it won the race: give it back
                    assert await got.nack()
        request = await q.enqueue(WorkRequest(task="x"))
        task = asyncio.create_task(q.poll(5))
        await asyncio.sleep(0.05)  # the message may be in flight to the buffer now
        task.cancel()
        delivery = None
        with contextlib.suppress(asyncio.CancelledError):
            delivery = await task  # it finished before the cancel landed
        if delivery is None:
            delivery = await q.poll(5)
        assert delivery is not None, "the request was lost with the cancelled poll"
        assert delivery.request.request_id == request.request_id
        assert delivery.attempt == 1, "a cancelled poll must not cost a delivery"
        assert await delivery.ack()
        assert await q.poll(1) is None, "delivered twice"
    finally:
        await t.aclose()


async def test_extend_keeps_a_lease_past_pulsars_ack_timeout_minimum(
    transport_harness: PulsarHarness,
) -> None:
    """Work longer than the client's 10 s ackTimeout floor, with 2 s leases."""
    owner, rival_client = await transport_harness.connect(), await transport_harness.connect()
    try:
        name = f"l{uuid.uuid4().hex[:8]}"
        q = owner.request_queue(name, lease_seconds=2.0)
        request = await q.enqueue(WorkRequest(task="long"))
        delivery = await q.poll(10)
        assert delivery is not None
        # The rival's first poll joins the subscription, which can take longer
        # than a 2 s lease on a loaded machine: hold the lease across the join.
        assert await delivery.extend(60)
        rival = rival_client.request_queue(name, lease_seconds=2.0)
        assert await rival.poll(0) is None, "handed to a second worker while leased"
        end = time.monotonic() + 11
        while time.monotonic() < end:
            assert await delivery.extend()
            assert await rival.poll(0.5) is None, "redelivered while the owner kept extending"
        assert await delivery.ack()
        assert await rival.poll(2.5) is None, "redelivered after it was acked"
        assert delivery.request.request_id == request.request_id
    finally:
        await owner.aclose()
        await rival_client.aclose()


async def test_the_ordering_key_is_the_partition_key(transport_harness: PulsarHarness) -> None:
    t = await transport_harness.connect()
    try:
        q = t.request_queue(f"o{uuid.uuid4().hex[:8]}", max_attempts=3)
        keyed = await q.enqueue(WorkRequest(task="x", ordering_key="customer-42"))
        plain = await q.enqueue(WorkRequest(task="x"))
        seen: dict[str, str] = {}
        for _ in range(2):
            d = await q.poll(5)
            assert isinstance(d, PulsarDelivery)
            seen[d.request.request_id] = d._message.partition_key()
            if d.request.request_id == keyed.request_id:
                assert await d.nack(error="again")  # republished as a copy
            else:
                assert await d.ack()
        assert seen == {keyed.request_id: "customer-42", plain.request_id: plain.request_id}
        again = await q.poll(5)
        assert isinstance(again, PulsarDelivery)
        assert again.request.request_id == keyed.request_id and again.attempt == 2
        assert again._message.partition_key() == "customer-42"
        assert await again.ack()
    finally:
        await t.aclose()


async def test_a_refused_subscribe_takes_nothing_from_the_processs_other_consumers(
    transport_harness: PulsarHarness,
) -> None:
    """pulsar-lite refuses a consumer id another connection uses on the
    subscription and closes the refused connection; the client retries the
    refused subscribe until its timeout. Were the retries on the connection
    of the process's working consumer, the broker would hand the requests it
    holds to other workers while it still processes them. Consumer ids are
    not spread here, so every consumer is refused id 0 (and the third id 1)."""
    options = {**transport_harness.config.options, "consumer_id_spread": 0}
    first, second, third = [await transport_harness.connect(options=options) for _ in range(3)]
    try:
        name = f"z{uuid.uuid4().hex[:8]}"
        leases = dict(lease_seconds=60.0)
        sent = {
            r.request_id
            for r in [
                await first.request_queue(name, **leases).enqueue(
                    WorkRequest(task="x", payload={"i": i})
                )
                for i in range(40)
            ]
        }
        a = first.request_queue(name, **leases)
        held_a = await a.poll(10)  # consumer 0 on the subscription
        w = second.request_queue(name, **leases)
        held_w = [await w.poll(15) for _ in range(5)]  # consumer 0 refused: it joins as 1
        assert held_a is not None and all(d is not None for d in held_w)
        held = {held_a.request.request_id} | {d.request.request_id for d in held_w if d}
        other = third.request_queue(name, **leases)
        seen: list[str] = []
        # Long enough for the refused attempt's retries to have run their course.
        end = time.monotonic() + transport_harness.config.options["operation_timeout_seconds"] + 2
        while time.monotonic() < end:
            d = await other.poll(0.5)
            if d is not None:
                seen.append(d.request.request_id)
                assert await d.ack()
        assert not held & set(seen), "requests still held were handed to another worker"
        assert len(seen) == len(set(seen)) and set(seen) <= sent - held
        for d in [held_a, *held_w]:
            assert d is not None and await d.ack()
    finally:
        for t in (first, second, third):
            await t.aclose()


@pytest.mark.parametrize("receipts", [True, False], ids=["default", "no_receipts"])
async def test_a_sequential_poll_ack_loop_is_not_paced_by_the_ack_flush(
    transport_harness: PulsarHarness, receipts: bool
) -> None:
    """Acks are sent at once: each ack() completes on the broker's ack
    receipt (with ack_receipts=False: when the client has handed it to the
    connection), not after the client's 100 ms ack-grouping tick (150 ms
    with the flush wait): a worker looping poll -> ack is bounded by round
    trips."""
    n = 40
    options = {**transport_harness.config.options}
    if not receipts:
        options["ack_receipts"] = False
    t = await transport_harness.connect(options=options)
    try:
        q = t.request_queue(f"s{uuid.uuid4().hex[:8]}")
        sent = {
            (await q.enqueue(WorkRequest(task="x", payload={"i": i}))).request_id for i in range(n)
        }
        first = await q.poll(10)  # joins the subscription (not timed)
        assert first is not None and await first.ack()
        consumer = q._consumer  # type: ignore[attr-defined]
        assert consumer is not None and consumer.acks_at_once, (
            "acks cannot be sent at once with this pulsar-client build: "
            "ack() falls back to waiting out the client's ack flush"
        )
        assert consumer.ack_receipts is receipts
        got = {first.request.request_id}
        started = time.monotonic()
        for _ in range(n - 1):
            delivery = await q.poll(10)
            assert delivery is not None, f"only {len(got)} of {n} requests delivered"
            assert await delivery.ack()
            got.add(delivery.request.request_id)
        elapsed = time.monotonic() - started
        assert got == sent
        # 39 acks paced by a 100 ms tick take at least 3.9 s.
        assert elapsed < 2.0, f"{n - 1} sequential poll -> ack took {elapsed:.2f} s"
    finally:
        await t.aclose()


async def test_an_ack_counts_the_next_hand_out_ahead_and_a_failed_count_is_written_again(
    transport_harness: PulsarHarness,
) -> None:
    """A worker's ack writes the next request's count beside it; the poll that
    hands that request out then writes nothing. A count ahead whose write
    failed is written again by the poll (never handed out uncounted), and a
    clean close leaves no count behind."""
    from transport.errors import TransientTransportError
    from transport_pulsar._queue import PulsarRequestQueue, _message_key, _parse_count

    t = await transport_harness.connect()
    assert isinstance(t, PulsarTransport)
    name = f"a{uuid.uuid4().hex[:8]}"
    writes: list[tuple[str, bytes | None, bool]] = []  # key, value, during a poll
    fail_next = [False]
    try:
        q = t._open_queue(name, lease_seconds=5.0, max_attempts=3)
        assert isinstance(q, PulsarRequestQueue)
        for i in range(6):
            await q.enqueue(WorkRequest(task="x", payload=i))
        write = q._attempts.write

        async def recording(key: str, value: bytes | None) -> Any:
            writes.append((key, value, bool(q._admitting)))
            if fail_next[0] and value is not None:
                fail_next[0] = False
                raise TransientTransportError("injected: count write failed")
            return await write(key, value)

        q._attempts.write = recording  # type: ignore[method-assign]
        first = await q.poll(10)
        assert first is not None and first.attempt == 1
        # The next request must be with the client (prefetched) for the ack
        # to count it ahead. The C++ client signals no such arrival: look,
        # within a bound (it comes within milliseconds, later under load).
        consumer = q._consumer
        assert consumer is not None
        for _ in range(500):
            if consumer.ahead(1):
                break
            await asyncio.sleep(0.01)
        else:
            raise AssertionError("the next request was not prefetched within 5 s")
        writes.clear()
        assert await first.ack()
        # The count ahead is looked up, then written, in the background.
        if q._count_writes:
            await asyncio.wait(list(q._count_writes.values()), timeout=10)
        ahead = [k for k, v, polling in writes if _parse_count(v) == 1 and not polling]
        assert ahead, f"the ack counted nothing ahead: {writes}"
        writes.clear()
        second = await q.poll(10)
        assert second is not None and second.attempt == 1
        assert _message_key(second._message) == ahead[0]
        counted = [(k, v) for k, v, polling in writes if polling and v is not None]
        assert counted == [], f"the poll wrote a count although it was written ahead: {writes}"
        # The next count ahead fails: the poll writes it again.
        fail_next[0] = True
        writes.clear()
        assert await second.ack()
        for _ in range(100):  # the write ahead runs in the background
            if not fail_next[0]:
                break
            await asyncio.sleep(0.01)
        assert not fail_next[0], f"no count was written ahead: {writes}"
        third = await q.poll(10)
        assert third is not None and third.attempt == 1
        key = _message_key(third._message)
        again = [k for k, v, polling in writes if k == key and _parse_count(v) == 1 and polling]
        assert again, f"the failed count was not written again before the hand-out: {writes}"
        assert await third.ack()
        await q.aclose()  # a handle of _open_queue is not closed by the transport
    finally:
        await t.aclose()
    # A clean close withdrew what was counted ahead: the rest come at attempt 1.
    t2 = await transport_harness.connect()
    try:
        q2 = t2.request_queue(name, lease_seconds=5.0, max_attempts=3)
        rest = []
        for _ in range(3):
            d = await q2.poll(10)
            assert d is not None
            rest.append(d.attempt)
            assert await d.ack()
        assert rest == [1, 1, 1], rest
    finally:
        await t2.aclose()


async def test_a_new_workers_count_lookup_starts_at_the_last_checkpoint(
    transport_harness: PulsarHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers save checkpoints of their view of the hand-out counts, so a
    new worker's first lookup reads from the last one, not the topic's whole
    history — and still finds a count written long before: a request a
    worker held while it handled twelve others, then gave back by closing,
    comes to the next worker at attempt 2."""
    from transport_pulsar import _queue as pulsar_queue

    monkeypatch.setattr(pulsar_queue, "_COUNTS_CHECKPOINT_EVERY", 6)
    name = f"c{uuid.uuid4().hex[:8]}"
    first = await transport_harness.connect()
    try:
        queue = first.request_queue(name, max_attempts=5)
        for i in range(30):
            await queue.enqueue(WorkRequest(task="x", payload=i))
        held = await queue.poll(10)
        assert held is not None and held.attempt == 1
        for _ in range(12):
            delivery = await queue.poll(10)
            assert delivery is not None and delivery.attempt == 1
            assert await delivery.ack()
    finally:
        await first.aclose()  # gives back the held request, counted once

    second = await transport_harness.connect()
    try:
        assert isinstance(second, PulsarTransport)
        queue2 = second._open_queue(name, lease_seconds=5.0, max_attempts=5)
        assert isinstance(queue2, pulsar_queue.PulsarRequestQueue)
        attempts = queue2._attempts
        load = attempts._load_checkpoint
        loaded: list[object] = []

        async def spying() -> Any:
            result = await load()
            loaded.append(result)
            return result

        attempts._load_checkpoint = spying  # type: ignore[method-assign]
        seen = {}
        for _ in range(17):
            delivery = await queue2.poll(10)
            assert delivery is not None, f"got {len(seen)} of 17"
            seen[delivery.request.payload] = delivery.attempt
            assert await delivery.ack()
        assert loaded and loaded[0] is not None, "the first lookup did not start at a checkpoint"
        assert seen[held.request.payload] == 2, seen
        assert sorted(a for p, a in seen.items() if p != held.request.payload) == [1] * 16
        await queue2.aclose()  # a handle of _open_queue is not closed by the transport
    finally:
        await second.aclose()


async def test_a_batch_is_taken_from_what_the_consumer_holds_and_a_failed_count_goes_back(
    transport_harness: PulsarHarness,
) -> None:
    """``poll_many`` takes the rest of its batch from the messages the
    consumer holds, counting them together. A message whose count write
    fails is not handed out, nor lost: it is the next one polled, at the
    attempt it would have had. A delayed copy that is due joins a batch."""
    from transport.errors import TransientTransportError
    from transport_pulsar._queue import PulsarRequestQueue

    config = transport_harness.config
    # A consumer that prefetches (the default, 1, holds one message ahead).
    options = {**config.options, "receiver_queue_size": 16}
    t = await transport_harness.connect(options=options)
    assert isinstance(t, PulsarTransport)
    name = f"b{uuid.uuid4().hex[:8]}"
    try:
        q = t._open_queue(name, lease_seconds=10.0, max_attempts=3)
        assert isinstance(q, PulsarRequestQueue)
        sent = [await q.enqueue(WorkRequest(task="x", payload=i)) for i in range(8)]
        write = q._attempts.write
        failed: list[str] = []

        async def failing_once(key: str, value: bytes | None) -> Any:
            if value is not None and not failed and q._admitting and len(q._admitting) > 1:
                failed.append(key)  # a count of the batch's rest
                raise TransientTransportError("injected: count write failed")
            return await write(key, value)

        q._attempts.write = failing_once  # type: ignore[method-assign]
        got: list[Any] = []
        deadline = time.monotonic() + 30
        while len(got) < 7 and time.monotonic() < deadline:
            got += await q.poll_many(8, 5)
        assert failed, "no count of a batch's rest was written (nothing was batched)"
        assert len(got) == 7, [d.request.payload for d in got]
        again = await q.poll(10)
        assert again is not None and again.attempt == 1, "the failed one was lost or miscounted"
        ids = sorted(d.request.request_id for d in [*got, again])
        assert ids == sorted(r.request_id for r in sent)
        assert all(d.attempt == 1 for d in got)
        # A delayed copy that is due is taken with the batch.
        assert await again.nack(delay=0.3)
        assert await q.ack_many(got[1:]) == [True] * 6
        await asyncio.sleep(0.5)  # the nack's delay runs out (the copy is held by this handle)
        batch = await q.poll_many(4, 10)
        assert [d.request.request_id for d in batch] == [again.request.request_id]
        assert batch[0].attempt == 2
        assert await q.ack_many([*batch, got[0]]) == [True, True]
        assert await q.ack_many(batch) == [False]  # settled already
        await q.aclose()
    finally:
        await t.aclose()


async def test_a_batch_cancelled_while_it_is_counted_loses_nothing(
    transport_harness: PulsarHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``poll_many`` cancelled right after taking the rest of its batch from
    the consumer, before counting any of it: those messages go back to the
    line and are the next ones polled, at attempt 1 (the first delivery,
    leased already, comes back after its lease, as the contract allows)."""
    from transport_pulsar._client import AsyncConsumer

    config = transport_harness.config
    t = await transport_harness.connect(options={**config.options, "receiver_queue_size": 16})
    try:
        q = t.request_queue(f"c{uuid.uuid4().hex[:8]}", lease_seconds=2.0)
        sent = {(await q.enqueue(WorkRequest(task="x", payload=i))).request_id for i in range(6)}
        first = await q.poll(10)  # the consumer now holds the rest prefetched
        assert first is not None
        assert await first.nack()  # back to the broker, to be the batch's first again
        take_now = AsyncConsumer.take_now
        taken: list[int] = []

        def take_then_cancel(self: AsyncConsumer, count: int) -> list[Any]:
            got = take_now(self, count)
            taken.append(len(got))
            task = asyncio.current_task()
            assert task is not None
            asyncio.get_running_loop().call_soon(task.cancel)
            return got

        monkeypatch.setattr(AsyncConsumer, "take_now", take_then_cancel)
        deadline = time.monotonic() + 15
        while not taken and time.monotonic() < deadline:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.create_task(q.poll_many(6, 5))
        assert taken and taken[0] > 0, "the batch took nothing from the consumer"
        monkeypatch.setattr(AsyncConsumer, "take_now", take_now)
        seen: dict[str, int] = {}
        deadline = time.monotonic() + 15
        while len(seen) < len(sent) and time.monotonic() < deadline:
            delivery = await q.poll(1)
            if delivery is not None:
                seen.setdefault(delivery.request.request_id, delivery.attempt)
                assert await delivery.ack()
        assert set(seen) == sent, f"lost: {sorted(sent - set(seen))}"
        assert sorted(seen.values())[: taken[0]] == [1] * taken[0], seen
    finally:
        await t.aclose()


async def test_concurrent_first_enqueues_to_a_broker_that_is_down_fail_within_one_timeout() -> None:
    """They share one producer creation: each used to wait out its own
    operation timeout behind the others (20 of them: over 200 s at 30 s)."""
    from transport import TransientTransportError, TransportConfig, connect
    from transport.testing.brokers import free_port

    timeout = 2.0
    config = TransportConfig(
        url=f"pulsar://127.0.0.1:{free_port()}",
        options={"operation_timeout_seconds": timeout},
    )
    transport = await connect(config)
    try:
        queue = transport.request_queue("down")
        started = time.monotonic()
        results = await asyncio.gather(
            *(queue.enqueue(WorkRequest(task="t", payload=i)) for i in range(10)),
            return_exceptions=True,
        )
        waited = time.monotonic() - started
        assert all(isinstance(r, TransientTransportError) for r in results), results
        assert waited < 4 * timeout, f"{waited:.1f} s for 10 enqueues (one after the other: 10 x)"
    finally:
        await transport.aclose()


async def test_right_after_a_hand_out_caught_up_waits_for_the_next_dispatch(
    transport_harness: PulsarHarness,
) -> None:
    # With the default prefetch of 1 the consumer holds nothing right after a
    # hand-out: the broker is still dispatching the next message on the
    # permit it returned. caught_up() said so at once, and a priority queue
    # took the empty receive queue for an empty level and served a lower one
    # (seen in a loaded CI run: [0, 0, 1, 0, 0, ...]).
    t = await transport_harness.connect()
    try:
        q = t.request_queue(f"hd{uuid.uuid4().hex[:6]}")
        for i in range(3):
            await q.enqueue(WorkRequest(task="x", payload=i))
        for i in range(3):
            d = await q.poll(10)
            assert d is not None and d.request.payload == i
            assert await q.caught_up(0)
            if i < 2:  # the next one is in line, without waiting in poll
                consumer = q._consumer  # type: ignore[attr-defined]
                assert consumer is not None and consumer._ready, f"after {i}"
            await d.ack()
        started = time.monotonic()
        assert await q.caught_up(0)  # nothing more: waits out the grace, once
        assert time.monotonic() - started < 1.0
    finally:
        await t.aclose()


async def test_consumer_ids_are_spread_with_readers_on_a_topic_of_their_own(
    transport_harness: PulsarHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The readers that use up consumer ids go to the namespace's ``ids``
    topic, never to the queue's: pulsar-lite keeps a closed reader's cursor,
    and every later send to that topic costs more for each (a queue topic
    with 60 closed readers took sends at about a third of the rate)."""
    from transport_pulsar._client import AsyncPulsarClient

    skipped: list[tuple[str, int]] = []
    original = AsyncPulsarClient._skip_consumer_ids

    async def recording(self: AsyncPulsarClient, topic: str, count: int, timeout: float) -> bool:
        skipped.append((topic, count))
        return await original(self, topic, count, timeout)

    monkeypatch.setattr(AsyncPulsarClient, "_skip_consumer_ids", recording)
    monkeypatch.setattr("transport_pulsar._client.random.randrange", lambda n: 5)
    options = {**transport_harness.config.options, "consumer_id_spread": 128}
    t = await transport_harness.connect(options=options)
    assert isinstance(t, PulsarTransport)
    try:
        q = t.request_queue(f"ids{uuid.uuid4().hex[:8]}")
        sent = await q.enqueue(WorkRequest(task="x"))  # the subscription is created
        got = await q.poll(10)  # the queue's consumer joins
        assert got is not None and got.request.request_id == sent.request_id
        assert await got.ack()
        ids_topic = t.ctx.topic("ids", "skipped")
        assert skipped == [(ids_topic, 5), (ids_topic, 5)]
        assert q.topic not in {topic for topic, _ in skipped}
    finally:
        await t.aclose()


async def test_a_refused_ids_topic_leaves_ids_unspread_and_says_so_once(
    pulsar_url: str, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A broker that refuses readers on the ids topic (no auto-creation, no
    permission) does not fail the subscribe: the consumer joins without a
    spread id, one warning says so, and the client does not try again."""
    from transport_pulsar._client import AsyncPulsarClient

    monkeypatch.setattr("transport_pulsar._client.random.randrange", lambda n: 5)
    client = AsyncPulsarClient(
        pulsar_url, operation_timeout=10, close_timeout=5, send_timeout_ms=10_000
    )
    topic = f"persistent://public/default/refused-ids-{uuid.uuid4().hex[:8]}"
    consumers = []
    try:
        for _ in range(2):
            consumer = await client.subscribe(
                topic,
                "s",
                key_shared=False,
                receiver_queue_size=1,
                nack_delay_ms=1000,
                ack_flush_wait=0.0,
                attempt_timeout=5.0,
                budget=10.0,
                id_spread=64,
                id_topic="persistent://refused",  # not a topic name: every reader refused
            )
            consumers.append(consumer)
        warnings = [r for r in caplog.records if "consumer ids are not spread" in r.getMessage()]
        assert len(warnings) == 1 and client._ids_refused
    finally:
        for consumer in consumers:
            await consumer.close(5)
        await client.close()
