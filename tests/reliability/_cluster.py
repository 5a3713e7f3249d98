"""Faults of a three-server JetStream cluster (R3 streams), as scenarios
shared by ``tests/nats/test_nats_cluster.py`` and ``make reliability``
(backend ``nats-cluster``): the stream leader SIGKILLed mid-run and
restarted, and the leader cut off for a while (SIGSTOP: its connections stay
open and go silent, as in a network partition). One client rides through
each fault by itself."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from typing import Any

import nats

from transport import Transport, TransportConfig, TransportError, WorkRequest, WorkResponse, connect
from transport.testing._util import Budget
from transport.testing.brokers import NatsCluster, NatsServer

#: Requests in flight at a fault: the worker holds one at a time (prefetch 1,
#: one poller), so at most the one it held and one the server had sent.
IN_FLIGHT_WINDOW = 2


async def raw_connection(cluster: NatsCluster, budget: Budget) -> nats.NATS:
    """A plain nats-py connection to the cluster, once JetStream places R3
    streams (elected is not yet serving)."""
    for member in cluster.members:  # a member an earlier scenario left down
        if not member.running:
            await asyncio.to_thread(member.start)
    nc = await nats.connect(
        servers=cluster.urls, max_reconnect_attempts=-1, reconnect_time_wait=0.1
    )
    # Elected is not yet placing: wait until an R3 stream can be created.
    js = nc.jetstream(timeout=2.0)
    probe = f"probe{uuid.uuid4().hex[:8]}"
    while True:
        try:
            await js.add_stream(name=probe, subjects=[f"{probe}.>"], num_replicas=3)
            await js.delete_stream(probe)
            break
        except (TimeoutError, nats.errors.Error):
            assert not budget.expired(), "the cluster never placed an R3 stream"
            await asyncio.sleep(0.2)
    return nc


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
    registry and logging to an R3 stream, until ``requests`` are sent and
    every acknowledged one is processed."""

    def __init__(self, transport: Transport, queue: str, requests: int) -> None:
        self.requests = requests
        self.transport = transport
        self.queue = transport.request_queue(queue, lease_seconds=2.0, max_attempts=1000)
        self.registry = transport.delivery_registry("callers")
        self.log = transport.event_log()
        self.acknowledged: set[str] = set()
        self.indeterminate: set[str] = set()
        self.processed: Counter[str] = Counter()
        self.sent = 0
        self.progress = asyncio.Event()
        #: What the worker's failed attempts raised (type and message), counted.
        self.errors: Counter[str] = Counter()
        #: Seconds into the run at which each phase ended, in order.
        self.phases: dict[str, float] = {}

    def report(self) -> str:
        """What a failed assertion shows: the phases, what is missing and
        what the worker met."""
        phases = ", ".join(f"{name} at {t:.0f} s" for name, t in self.phases.items())
        return (
            f"{len(self.acknowledged)} acknowledged, {len(self.indeterminate)} indeterminate,"
            f" {len(self.processed)} processed, {len(self.missing())} missing; phases: {phases};"
            f" worker errors: {self.errors.most_common(3)}"
        )

    async def produce(self) -> None:
        for n in range(self.requests):
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
            done = False
            try:
                delivery = await self.queue.poll(1.0)
                if delivery is None:
                    continue
                request_id = delivery.request.request_id
                await self.registry.complete(
                    request_id, WorkResponse(request_id=request_id, result=delivery.request.payload)
                )
                await self.log.append("done", request_id)
                # The work is done (answered and logged): an ack that fails
                # from here on may still have taken effect, in which case the
                # request is not delivered again; if it did not, the lease
                # brings it back and it counts as a duplicate.
                done = True
                await delivery.ack()
            except TransportError as exc:
                # The cluster is electing a leader: the lease brings it back.
                self.errors[f"{type(exc).__name__}: {str(exc)[:120]}"] += 1
                if not done:
                    continue
            self.processed[request_id] += 1
            self.progress.set()

    def missing(self) -> set[str]:
        return self.acknowledged - set(self.processed)


async def run_through(
    cluster: NatsCluster,
    raw: nats.NATS,
    fault: str,
    budget: Budget,
    *,
    requests: int = 300,
    cut_off_seconds: float = 30.0,
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
    run = Run(transport, queue, requests)
    done = asyncio.Event()
    worker = asyncio.create_task(run.work(done))
    producer = asyncio.create_task(run.produce())
    processed_during = 0
    started = time.monotonic()

    def phase(name: str) -> None:
        run.phases[name] = time.monotonic() - started

    try:
        try:
            while run.sent < requests // 3:  # a third sent: the fault strikes mid-run
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
                await asyncio.sleep(cut_off_seconds)  # the partition lasts this long
                processed_during = sum(run.processed.values()) - before
                await asyncio.to_thread(leader.resume)
            phase("fault over")
            try:
                await asyncio.wait_for(producer, budget.left())
            except TimeoutError:
                raise AssertionError(f"the producer did not finish: {run.report()}") from None
            phase("all sent")
            while run.missing() and not budget.expired():  # what is still missing then: lost
                run.progress.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(run.progress.wait(), 1.0)
            phase("all processed" if not run.missing() else "out of time")
        finally:
            done.set()
            producer.cancel()
            await asyncio.gather(worker, producer, return_exceptions=True)
        if run.missing():
            return run, processed_during  # the caller's check says what is missing
        # Every answer reached the registry, and the log holds every completion.
        for request_id in list(run.acknowledged)[:20]:
            record = await run.registry.record(request_id)
            assert record is not None and record.state == "completed", (request_id, record)
        phase("registry read")
        reader = await run.log.read("done", "earliest")
        logged: set[str] = set()
        try:
            # At least 20 s, past the budget if need be (the test's timeout
            # leaves room): the read is the scenario's last step.
            async with asyncio.timeout(max(budget.left(), 20.0)):
                while not (run.acknowledged - run.missing()) <= logged:
                    logged.add(str((await anext(reader)).data))
        except TimeoutError:
            unlogged = len(run.acknowledged - run.missing() - logged)
            raise AssertionError(
                f"{unlogged} completions not read back from the event log: {run.report()}"
            ) from None
        finally:
            await reader.aclose()
    finally:
        await transport.aclose()
    return run, processed_during


async def cluster_fault(
    cluster: NatsCluster, fault: str, *, requests: int, cut_off_seconds: float, budget: Budget
) -> dict[str, Any]:
    """One reliability row: ``fault`` is ``"kill"`` (the stream leader
    SIGKILLed mid-run, restarted once a new leader is elected) or ``"pause"``
    (the leader cut off for ``cut_off_seconds``, the client on the majority
    side). Never asserts; ``ok`` says whether nothing acknowledged was lost,
    duplicates stayed within the in-flight window and (for a cut-off) work
    went on meanwhile."""
    raw = await raw_connection(cluster, budget)
    try:
        run, during = await run_through(
            cluster, raw, fault, budget, requests=requests, cut_off_seconds=cut_off_seconds
        )
    finally:
        await raw.close()
    duplicated = sum(n - 1 for n in run.processed.values())
    lost = len(run.missing())
    row: dict[str, Any] = {
        "backend": "nats-cluster",
        "fault": "stream leader SIGKILL + restart (R3)"
        if fault == "kill"
        else f"stream leader cut off {cut_off_seconds:g} s (R3)",
        "enqueued": requests,
        "acknowledged": len(run.acknowledged),
        "indeterminate": len(run.indeterminate),
        "processed": len(run.processed),
        "lost": lost,
        "duplicated": duplicated,
        "dead_lettered": 0,
        "window": IN_FLIGHT_WINDOW,
    }
    if fault == "pause":
        row["processed_while_cut_off"] = during
    row["ok"] = lost == 0 and duplicated <= IN_FLIGHT_WINDOW and (fault == "kill" or during > 0)
    return row
