"""Queues, registries and the event log on a real three-server JetStream
cluster (R3 streams): the stream leader SIGKILLed mid-run and restarted, and
the leader cut off for 30 s (SIGSTOP: its connections stay open and go
silent, as in a network partition). One client rides through each fault by
itself; nothing acknowledged is lost, and duplicates stay within what was in
flight at the fault."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio

from transport import Transport, TransportConfig, TransportError, WorkRequest, WorkResponse, connect
from transport.testing._util import Budget
from transport.testing.brokers import NatsCluster, NatsServer

pytestmark = [pytest.mark.broker, pytest.mark.crash, pytest.mark.timeout(240)]

REQUESTS = 300
#: Requests in flight at a fault: the worker holds one at a time (prefetch 1,
#: one poller), so at most the one it held and one the server had sent.
IN_FLIGHT_WINDOW = 2


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    if os.environ.get("NATS_URL"):
        pytest.skip("runs its own three-server cluster")
    cluster = NatsCluster(tmp_path_factory.mktemp("nats-cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest_asyncio.fixture
async def raw(cluster: NatsCluster) -> AsyncIterator[nats.NATS]:
    """A plain nats-py connection, to ask JetStream who leads a stream."""
    for member in cluster.members:  # a member a previous test left down
        if not member.running:
            await asyncio.to_thread(member.start)
    nc = await nats.connect(
        servers=cluster.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.1
    )
    # Elected is not yet placing: wait until an R3 stream can be created.
    js = nc.jetstream(timeout=2.0)
    budget = Budget(60)
    probe = f"probe{uuid.uuid4().hex[:8]}"
    while True:
        try:
            await js.add_stream(name=probe, subjects=[f"{probe}.>"], num_replicas=3)
            await js.delete_stream(probe)
            break
        except (TimeoutError, nats.errors.Error):
            assert not budget.expired(), "the cluster never placed an R3 stream"
            await asyncio.sleep(0.2)
    yield nc
    await nc.close()


async def _leader(raw: nats.NATS, stream: str, budget: Budget) -> str:
    js = raw.jetstream(timeout=2.0)
    while True:
        try:
            info = await js.stream_info(stream)
            if info.cluster is not None and info.cluster.leader:
                return info.cluster.leader
        except (TimeoutError, nats.errors.Error):
            pass
        assert not budget.expired(), f"stream {stream} has no leader"
        await asyncio.sleep(0.1)


def _config(
    cluster: NatsCluster, first: NatsServer, namespace: str, *, only_first: bool = False
) -> TransportConfig:
    """R3 everywhere; the client knows every server (it picks one at random,
    and moves to another when its connection breaks), or only ``first``."""
    return TransportConfig(
        url=first.url,
        namespace=namespace,
        options={
            "servers": [] if only_first else [u for u in cluster.urls if u != first.url],
            "replicas": 3,
            "pull_expires": 2.0,
            "request_timeout": 3.0,
            "reconnect_time_wait": 0.1,
        },
    )


class Run:
    """One producer and one worker on an R3 queue, answering through an R3
    registry and logging to an R3 stream, until ``REQUESTS`` are sent and
    every acknowledged one is processed."""

    def __init__(self, transport: Transport, queue: str) -> None:
        self.transport = transport
        self.queue = transport.request_queue(queue, lease_seconds=2.0, max_attempts=1000)
        self.registry = transport.delivery_registry("callers")
        self.log = transport.event_log()
        self.acknowledged: set[str] = set()
        self.indeterminate: set[str] = set()
        self.processed: Counter[str] = Counter()
        self.sent = 0
        self.progress = asyncio.Event()

    async def produce(self) -> None:
        for n in range(REQUESTS):
            request = WorkRequest(task="t", payload=n, reply_to="callers")
            try:
                await self.registry.register(request.request_id)
                await self.queue.enqueue(request)
            except TransportError:
                self.indeterminate.add(request.request_id)  # may or may not be stored
            else:
                self.acknowledged.add(request.request_id)
            self.sent += 1

    async def work(self, until: asyncio.Event) -> None:
        while not until.is_set():
            try:
                delivery = await self.queue.poll(1.0)
                if delivery is None:
                    continue
                request_id = delivery.request.request_id
                await self.registry.complete(
                    request_id, WorkResponse(request_id=request_id, result=delivery.request.payload)
                )
                await self.log.append("done", request_id)
                await delivery.ack()
            except TransportError:
                continue  # the cluster is electing a leader: the lease brings it back
            self.processed[request_id] += 1
            self.progress.set()

    def missing(self) -> set[str]:
        return self.acknowledged - set(self.processed)


async def _run_through(
    cluster: NatsCluster, raw: nats.NATS, fault: str, budget: Budget
) -> tuple[Run, int]:
    namespace = f"c{uuid.uuid4().hex[:10]}"
    queue = "jobs"
    stream = f"{namespace}__{queue}"
    # Create the stream through a client on any member, then start the
    # client that rides through the fault on a member that is not its leader.
    setup = await connect(_config(cluster, cluster.members[0], namespace))
    await setup.request_queue(queue).stats()
    await setup.aclose()
    info = await raw.jetstream(timeout=2.0).stream_info(stream)
    assert info.config.num_replicas == 3, info.config
    leader = cluster.by_name(await _leader(raw, stream, budget))
    first = next(m for m in cluster.members if m is not leader)
    # A killed server closes its connections, so a client on it moves to
    # another at once; a cut-off one keeps them open and silent until the
    # client's ping timeout (minutes). The partition is of the leader from
    # its peers, with the client on the majority side.
    transport = await connect(_config(cluster, first, namespace, only_first=fault == "pause"))
    run = Run(transport, queue)
    done = asyncio.Event()
    worker = asyncio.create_task(run.work(done))
    producer = asyncio.create_task(run.produce())
    processed_during = 0
    try:
        while run.sent < REQUESTS // 3:  # a third sent: the fault strikes mid-run
            assert not budget.expired(), "the producer made no progress before the fault"
            await asyncio.sleep(0.05)
        if fault == "kill":
            old_name = f"test_{leader.port}"
            await asyncio.to_thread(leader.kill)
            # The two others elect a new leader while it is dead.
            while (await _leader(raw, stream, budget)) == old_name:
                assert not budget.expired(), "no new stream leader after the kill"
                await asyncio.sleep(0.1)
            await asyncio.to_thread(leader.start)
        else:
            await asyncio.to_thread(leader.pause)
            before = sum(run.processed.values())
            await asyncio.sleep(30.0)  # the partition lasts 30 s
            processed_during = sum(run.processed.values()) - before
            await asyncio.to_thread(leader.resume)
        await asyncio.wait_for(producer, budget.left())
        while run.missing():
            assert not budget.expired(), (
                f"{len(run.missing())} acknowledged requests never processed after the {fault}"
            )
            run.progress.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(run.progress.wait(), 1.0)
    finally:
        done.set()
        producer.cancel()
        await asyncio.gather(worker, producer, return_exceptions=True)
    # Every answer reached the registry, and the log holds every completion.
    for request_id in list(run.acknowledged)[:20]:
        record = await run.registry.record(request_id)
        assert record is not None and record.state == "completed", request_id
    reader = await run.log.read("done", "earliest")
    logged: set[str] = set()
    async with asyncio.timeout(budget.left(60)):
        while not run.acknowledged <= logged:
            logged.add(str((await anext(reader)).data))
    await reader.aclose()
    await transport.aclose()
    return run, processed_during


async def test_the_stream_leader_killed_and_restarted_mid_run(
    cluster: NatsCluster, raw: nats.NATS
) -> None:
    budget = Budget(180)
    run, _ = await _run_through(cluster, raw, "kill", budget)
    assert not run.missing()
    duplicated = sum(n - 1 for n in run.processed.values())
    assert duplicated <= IN_FLIGHT_WINDOW, run.processed.most_common(5)
    assert len(run.acknowledged) + len(run.indeterminate) == REQUESTS


async def test_the_stream_leader_partitioned_away_for_30_s(
    cluster: NatsCluster, raw: nats.NATS
) -> None:
    budget = Budget(200)
    run, processed_during = await _run_through(cluster, raw, "pause", budget)
    assert not run.missing()
    # The two others elected a leader and went on while it was cut off.
    assert processed_during > 0, "no request was processed while the leader was cut off"
    duplicated = sum(n - 1 for n in run.processed.values())
    assert duplicated <= IN_FLIGHT_WINDOW, run.processed.most_common(5)


def test_the_cluster_launcher_refuses_fewer_than_three(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 3"):
        NatsCluster(tmp_path, size=2)
