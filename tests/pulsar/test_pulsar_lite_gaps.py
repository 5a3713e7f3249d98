"""What pulsar-lite does differently from Apache Pulsar, pinned down.

Each test asserts Apache Pulsar's documented behaviour. Against pulsar-lite
they are strict xfails with the reason: when pulsar-lite gains the feature,
the test passes, the xfail turns into a failure, and the workaround in the
backend (and the line in docs/backends/pulsar.md) can be revisited.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
import uuid

import pulsar
import pytest

from transport_pulsar import PulsarTransport
from transport_pulsar._client import AsyncPulsarClient

from .conftest import ON_PULSAR_LITE, PulsarHarness

pytestmark = [pytest.mark.broker]


def lite_gap(reason: str, *, every_run: bool = True) -> pytest.MarkDecorator:
    """A pulsar-lite gap: the test fails there (strictly, unless the gap
    shows in most runs only: ``every_run=False``)."""
    return pytest.mark.xfail(ON_PULSAR_LITE, strict=every_run, reason=f"pulsar-lite 0.2: {reason}")


async def _client(harness: PulsarHarness) -> tuple[PulsarTransport, AsyncPulsarClient]:
    transport = await harness.connect()
    assert isinstance(transport, PulsarTransport)
    return transport, transport.client


def _topic(transport: PulsarTransport) -> str:
    return transport.topic("gap", f"g{uuid.uuid4().hex[:10]}")


@lite_gap("deliverAfter/deliverAt are accepted and ignored: the message is dispatched at once")
async def test_deliver_after_is_honoured(transport_harness: PulsarHarness) -> None:
    transport, client = await _client(transport_harness)
    try:
        topic = _topic(transport)
        consumer = await transport.subscribe(topic)
        producer = await client.create_producer(topic)
        sent_at = time.monotonic()
        await producer.send(b"later", deliver_after=1.5)
        message = await consumer.next(10)
        assert message is not None
        assert time.monotonic() - sent_at >= 1.4
    finally:
        await transport.aclose()


@lite_gap(
    "GetLastMessageId on a topic that never held a message fails with 'Topic has no messages'"
)
async def test_reader_on_an_empty_topic_has_no_message_available(
    transport_harness: PulsarHarness,
) -> None:
    transport, client = await _client(transport_harness)
    try:
        reader = await client.create_reader(_topic(transport))
        assert await reader.has_message_available() is False
    finally:
        await transport.aclose()


@lite_gap(
    "CommandConsumerStats is not implemented ('Unsupported command type: 25'), and there is no admin API"
)
async def test_subscription_backlog_is_reported(transport_harness: PulsarHarness) -> None:
    transport, _ = await _client(transport_harness)
    try:
        queue = transport.request_queue(f"g{uuid.uuid4().hex[:10]}")
        await queue.enqueue(__import__("transport").WorkRequest(task="count-me"))
        assert await transport.subscription_backlog(queue.topic) == 1  # type: ignore[attr-defined]
    finally:
        await transport.aclose()


@lite_gap(
    "consumer ids are scoped per subscription instead of per connection: a second client whose "
    "consumer has the same id is refused ('Consumer 0 already exists') until the ids differ"
)
def test_two_clients_join_one_subscription_at_once(pulsar_url: str) -> None:
    topic = f"persistent://public/default/gap-ids-{uuid.uuid4().hex[:8]}"
    first = pulsar.Client(pulsar_url, operation_timeout_seconds=3)
    second = pulsar.Client(pulsar_url, operation_timeout_seconds=3)
    try:
        first.subscribe(topic, "workers", consumer_type=pulsar.ConsumerType.Shared)
        second.subscribe(topic, "workers", consumer_type=pulsar.ConsumerType.Shared)
    finally:
        first.close()
        second.close()


@lite_gap(
    "a refused subscribe ('Consumer 0 already exists') makes the broker close the refused "
    "client's whole connection, and the client retries the subscribe until its operation "
    "timeout: the same client's other consumers are disconnected each time and the broker "
    "hands the messages they hold to other consumers while they still process them"
)
def test_a_refused_subscribe_leaves_the_clients_other_consumers_alone(pulsar_url: str) -> None:
    topic = f"persistent://public/default/gap-refused-{uuid.uuid4().hex[:8]}"
    shared = {"consumer_type": pulsar.ConsumerType.Shared, "receiver_queue_size": 1}
    first = pulsar.Client(pulsar_url, operation_timeout_seconds=10)
    worker = pulsar.Client(pulsar_url, operation_timeout_seconds=3)
    other = pulsar.Client(pulsar_url, operation_timeout_seconds=10)
    try:
        held_by_first = first.subscribe(topic, "workers", **shared)  # consumer 0
        producer = first.create_producer(topic, batching_enabled=False)
        for i in range(50):
            producer.send(b"m%d" % i)
        held_by_first.receive(10_000)

        def refused() -> None:  # consumer 0 again: refused, retried for 3 s
            with contextlib.suppress(pulsar.Timeout):
                worker.subscribe(topic, "workers", **shared)

        attempt = threading.Thread(target=refused)
        attempt.start()
        time.sleep(0.3)
        working = worker.subscribe(topic, "workers", **shared)  # consumer 1
        held = {working.receive(10_000).data() for _ in range(3)}
        for i in range(60):  # another client's consumers never collide with these ids
            other.subscribe(f"{topic}-other", f"s{i}")
        rival = other.subscribe(topic, "workers", **shared)  # consumer 60
        seen: set[bytes] = set()
        end = time.monotonic() + 5
        while time.monotonic() < end:
            try:
                message = rival.receive(500)
            except pulsar.Timeout:
                continue
            seen.add(message.data())
            rival.acknowledge(message)
        attempt.join()
        assert not held & seen, f"held by a live consumer, also delivered elsewhere: {held & seen}"
    finally:
        for client in (first, worker, other):
            client.close()


#: A consumer in a child process: joins, says READY, then sleeps holding
#: whatever the broker dispatches to it (up to 10 messages).
_HOLDER = """
import sys, time, pulsar
client = pulsar.Client(sys.argv[1], operation_timeout_seconds=10,
                       logger=pulsar.ConsoleLogger(pulsar.LoggerLevel.Error))
client.subscribe(sys.argv[2], "workers", consumer_type=pulsar.ConsumerType.Shared,
                 receiver_queue_size=10)
print("READY", flush=True)
time.sleep(600)
"""


@lite_gap(
    "a consumer whose connection ends with a TCP reset (a SIGKILLed process with unread bytes "
    "in its socket) stays registered and keeps its unacknowledged messages: they are never "
    "redelivered until the broker restarts"
)
def test_messages_of_a_consumer_killed_with_unread_bytes_are_redelivered(
    pulsar_url: str,
) -> None:
    topic = f"persistent://public/default/gap-reset-{uuid.uuid4().hex[:8]}"
    client = pulsar.Client(pulsar_url, operation_timeout_seconds=10)
    holder = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, pulsar_url, topic],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().strip() == "READY", "the holder did not join"
        producer = client.create_producer(topic, batching_enabled=False)
        # Stopped, the holder reads nothing: what the broker dispatches to it
        # stays in its socket, so the kernel answers the SIGKILL with a reset
        # instead of an orderly close. Stopping is what a CPU-starved worker
        # looks like to the broker.
        os.kill(holder.pid, signal.SIGSTOP)
        sent = {f"m{i}".encode() for i in range(10)}
        for body in sorted(sent):
            producer.send(body)
        time.sleep(0.5)  # the dispatch to the holder reaches its socket
        os.kill(holder.pid, signal.SIGKILL)
        holder.wait(10)
        # The holder's consumer had id 0 (see the consumer-id gaps above):
        # one reader moves this client's next consumer id past it.
        client.create_reader(topic, pulsar.MessageId.latest).close()
        survivor = client.subscribe(
            topic, "workers", consumer_type=pulsar.ConsumerType.Shared, receiver_queue_size=10
        )
        got: set[bytes] = set()
        deadline = time.monotonic() + 10
        while got != sent and time.monotonic() < deadline:
            try:
                message = survivor.receive(500)
            except pulsar.Timeout:
                continue
            got.add(message.data())
            survivor.acknowledge(message)
        assert got == sent, f"{len(sent - got)} of 10 never redelivered within 10 s of the kill"
    finally:
        if holder.poll() is None:
            os.kill(holder.pid, signal.SIGKILL)
            holder.wait(10)
        if holder.stdout is not None:
            holder.stdout.close()
        client.close()


@lite_gap(
    "a reader following a topic gets messages published concurrently more than once: the one "
    "just read again (hundreds of times in 2,000), and now and then earlier ones (up to a few "
    "hundred back) followed by the rest again; readers in the backend skip what is not after "
    "the last message they read (AsyncReader.fresh); seen in most runs, not all",
    every_run=False,
)
def test_a_reader_gets_concurrently_published_messages_once_in_order(pulsar_url: str) -> None:
    topic = f"persistent://public/default/gap-copies-{uuid.uuid4().hex[:8]}"
    client = pulsar.Client(pulsar_url, operation_timeout_seconds=10)
    try:
        producer = client.create_producer(topic, batching_enabled=False)
        producer.send(b"first")
        reader = client.create_reader(topic, pulsar.MessageId.earliest, receiver_queue_size=200)
        total = 1 + 50 * 40
        read: list[tuple[int, int]] = []
        everything = threading.Event()
        stop = threading.Event()

        def follow() -> None:
            while not stop.is_set():
                try:
                    message = reader.read_next(200)
                except pulsar.Timeout:
                    continue
                read.append((message.message_id().ledger_id(), message.message_id().entry_id()))
                if len(set(read)) == total:
                    everything.set()

        follower = threading.Thread(target=follow)
        follower.start()
        receipts = threading.Semaphore(0)
        for _ in range(50):  # bursts of 40 sends in flight at once
            for i in range(40):
                producer.send_async(b"x", lambda *_: receipts.release(), partition_key=f"k{i}")
            for _ in range(40):
                receipts.acquire()
        everything.wait(10)
        time.sleep(0.5)  # a window for copies sent after the last message
        stop.set()
        follower.join()
        sent = total
        assert len(set(read)) == sent
        assert read == sorted(set(read)), f"{len(read) - sent} copies among {len(read)} reads"
    finally:
        client.close()


@lite_gap(
    "a seek is confirmed and then ignored, so a reader at MessageId.latest with "
    "startMessageIdInclusive (placed on the last message by a seek) waits for the next message; "
    "the registry checkpoints ask a consumer for the last message id instead"
)
def test_an_inclusive_reader_at_latest_reads_the_last_message(pulsar_url: str) -> None:
    topic = f"persistent://public/default/gap-latest-{uuid.uuid4().hex[:8]}"
    client = pulsar.Client(pulsar_url, operation_timeout_seconds=10)
    try:
        producer = client.create_producer(topic, batching_enabled=False)
        for i in range(3):
            producer.send(f"m{i}".encode())
        reader = client.create_reader(
            topic, pulsar.MessageId.latest, start_message_id_inclusive=True
        )
        assert reader.has_message_available()  # the client seeks to the last message here
        assert reader.read_next(3000).data() == b"m2"
    finally:
        client.close()


def test_the_last_message_is_found_through_a_consumer_and_read_inclusively(
    pulsar_url: str,
) -> None:
    """What the registry checkpoints rely on instead (works on both)."""
    topic = f"persistent://public/default/gap-last-{uuid.uuid4().hex[:8]}"
    client = pulsar.Client(pulsar_url, operation_timeout_seconds=10)
    try:
        producer = client.create_producer(topic, batching_enabled=False)
        ids = [producer.send(f"m{i}".encode()) for i in range(3)]
        asker = client.subscribe(topic, f"ae-last-{uuid.uuid4().hex[:8]}", receiver_queue_size=0)
        last = asker.get_last_message_id()
        asker.unsubscribe()
        assert (last.ledger_id(), last.entry_id()) == (ids[-1].ledger_id(), ids[-1].entry_id())
        reader = client.create_reader(topic, last, start_message_id_inclusive=True)
        assert reader.read_next(3000).data() == b"m2"
    finally:
        client.close()


async def test_redelivery_count_grows_on_nack_close_and_disconnect(
    transport_harness: PulsarHarness,
) -> None:
    """The backend's ``attempt`` relies on this (Apache Pulsar increments the
    count on negative acks and redeliveries; pulsar-lite also on close)."""
    transport, client = await _client(transport_harness)
    try:
        topic = _topic(transport)
        consumer = await transport.subscribe(topic)
        producer = await client.create_producer(topic)
        await producer.send(b"x")
        first = await consumer.next(10)
        assert first is not None and first.redelivery_count() == 0
        consumer.negative_acknowledge(first)
        second = await consumer.next(10)
        assert second is not None and second.redelivery_count() == 1
        await consumer.close(5)
        other = await transport.subscribe(topic)
        third = await other.next(10)
        assert third is not None and third.redelivery_count() >= 1
        await other.acknowledge(third, 5)
    finally:
        await transport.aclose()


async def test_null_value_tombstones_round_trip(transport_harness: PulsarHarness) -> None:
    transport, client = await _client(transport_harness)
    try:
        topic = _topic(transport)
        producer = await client.create_producer(topic)
        await producer.send(b"", key="k", null_value=True)
        reader = await client.create_reader(topic)
        message = await reader.read_next(10)
        assert message is not None
        assert message.has_null_value() and message.partition_key() == "k"
    finally:
        await transport.aclose()


def test_sync_client_sanity(pulsar_url: str) -> None:
    """The plain client works against the broker (guards the fixture)."""
    client = pulsar.Client(pulsar_url, operation_timeout_seconds=10)
    try:
        topic = f"persistent://public/default/sanity-{uuid.uuid4().hex[:8]}"
        producer = client.create_producer(topic)
        producer.send(b"hello")
    finally:
        client.close()


@lite_gap(
    "a seek by publish time is confirmed and then, most of the time (8 of 10 tries here), "
    "nothing is delivered"
)
def test_seek_by_publish_time(pulsar_url: str) -> None:
    client = pulsar.Client(pulsar_url, operation_timeout_seconds=5)
    try:
        # It works now and then (about 2 tries in 10): every try must work.
        # 40 tries: all 40 working by chance (an XPASS, strict) is ~1e-4.
        for _ in range(40):
            topic = f"persistent://public/default/gap-seek-{uuid.uuid4().hex[:8]}"
            producer = client.create_producer(topic)
            for i in range(3):
                producer.send(f"m{i}".encode())
            reader = client.create_reader(
                topic, pulsar.MessageId.earliest, start_message_id_inclusive=True
            )
            reader.seek(0)  # every message was published after the epoch
            assert reader.read_next(1500).data() == b"m0"
            reader.close()
            producer.close()
    finally:
        client.close()


@lite_gap(
    "Key_Shared dispatches strictly in topic order: once the next message's key belongs to a "
    "consumer with no permits (its receiver queue is full because it is busy), dispatch stops "
    "for every consumer of the subscription until that one takes a message"
)
def test_key_shared_busy_consumer_does_not_stall_the_others(pulsar_url: str) -> None:
    topic = f"persistent://public/default/gap-ks-{uuid.uuid4().hex[:8]}"
    client = pulsar.Client(pulsar_url, operation_timeout_seconds=5)
    try:
        options = {
            "consumer_type": pulsar.ConsumerType.KeyShared,
            "receiver_queue_size": 1,
            "initial_position": pulsar.InitialPosition.Earliest,
        }
        busy = client.subscribe(topic, "workers", consumer_name="busy", **options)
        free = client.subscribe(topic, "workers", consumer_name="free", **options)
        producer = client.create_producer(topic, batching_enabled=False)
        for i in range(40):
            producer.send(f"m{i}".encode(), partition_key=f"key{i}")
        # "busy" never receives: it holds one prefetched message. The other
        # consumer owns about half of the 40 keys and should get all of them
        # (Apache Pulsar sets a blocked consumer's messages aside for later).
        received = 0
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            try:
                message = free.receive(300)
            except pulsar.Timeout:
                continue
            free.acknowledge(message)
            received += 1
        assert received >= 5
        busy.close()
    finally:
        client.close()
