"""Fault scenarios, each against any backend described by a harness.

Every scenario returns one row for RELIABILITY.md and never asserts: the
test module and the report decide what the figures mean.
"""

from __future__ import annotations

import asyncio
import random
import sys
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tenacity import wait_fixed

from tests.reliability._checker import Ledger
from transport import (
    Ensemble,
    Network,
    Outbox,
    TaskContext,
    TransportError,
    WorkRequest,
)
from transport.testing._crash_suite import WorkerProcess
from transport.testing.harness import BackendHarness

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Sizes:
    requests: int  # for the SIGKILL scenario
    kills: int
    outage_seconds: float
    churn_seconds: float

    @classmethod
    def quick(cls) -> Sizes:
        return cls(requests=1000, kills=3, outage_seconds=3.0, churn_seconds=6.0)

    @classmethod
    def full(cls) -> Sizes:
        return cls(requests=10_000, kills=8, outage_seconds=120.0, churn_seconds=30.0)


def _qname(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


async def _worker(
    harness: BackendHarness, queue: str, lease: float, *, concurrency: int = 8, work_ms: float = 5.0
) -> WorkerProcess:
    # Eight concurrent handlers per worker process, as an ensemble would run.
    worker = await WorkerProcess.start(
        harness,
        "--queue",
        queue,
        "--mode",
        "process",
        "--lease",
        str(lease),
        "--concurrency",
        str(concurrency),
        "--work-ms",
        str(work_ms),
    )
    await worker.wait_for("STARTED", harness.scaled(60))
    return worker


def _completed(workers: list[WorkerProcess]) -> set[str]:
    return {
        ln.split()[1] for w in workers for ln in w.lines if ln.startswith(("ACKED ", "ACKING "))
    }


async def _drain_ledger(
    ledger: Ledger,
    queue: Any,
    workers: list[WorkerProcess],
    finished: list[WorkerProcess],
    timeout: float,
) -> bool:
    """Wait until every acknowledged request was completed by some worker
    (live or gone) and the queue holds nothing, reading live output as it
    comes. Returns whether that happened before ``timeout``."""
    done_before = _completed(finished)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ledger.acknowledged <= done_before | _completed(workers):
            stats = await queue.stats()
            if not stats.depth and not stats.in_flight:
                return True
        await asyncio.sleep(0.1)  # workers' output is read in the background
    return False


async def _drain_past_broker_gap(
    harness: BackendHarness,
    ledger: Ledger,
    queue: Any,
    workers: list[WorkerProcess],
    finished: list[WorkerProcess],
    timeout: float,
) -> tuple[bool, dict[str, Any]]:
    """:func:`_drain_ledger`; if that times out and the test broker logged
    its documented defect (:meth:`BackendHarness.known_broker_gap`:
    pulsar-lite keeps the messages of a consumer whose connection was reset
    until it restarts), the broker is restarted and the drain tried once
    more, to tell requests stuck at the broker from lost ones. Returns
    whether the first drain finished, and details for the row."""
    drained = await _drain_ledger(ledger, queue, workers, finished, timeout)
    if drained or not harness.can_restart_broker or not harness.known_broker_gap():
        return drained, {}
    stuck = ledger.acknowledged - _completed(finished) - _completed(workers)
    await harness.restart_broker()
    after = await _drain_ledger(ledger, queue, workers, finished, harness.scaled(120))
    return drained, {
        "stuck_until_broker_restart": len(stuck),
        "drained_after_broker_restart": after,
    }


async def _busy_worker(workers: list[WorkerProcess], timeout: float) -> WorkerProcess | None:
    """A worker that has leased work since it was last picked (the first to
    do so, or one at random among those that already had), or None."""
    waits = {asyncio.ensure_future(w.wait_for("LEASED", timeout)): w for w in workers}
    try:
        done, _ = await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        busy = [waits[t] for t in done if not t.cancelled() and t.exception() is None]
        return random.choice(busy) if busy else None
    finally:
        for task in waits:
            task.cancel()
        await asyncio.gather(*waits, return_exceptions=True)


async def sigkill_workers(backend: str, harness: BackendHarness, sizes: Sizes) -> dict[str, Any]:
    """Workers killed with SIGKILL in the middle of their work.

    A producer feeds the queue, one batch per planned kill (the next batch
    once that kill happened), while two worker processes (16 handlers each,
    0-20 ms of work per request) drain it. Each kill picks
    a worker that has leased work (at random among those that have; on a
    one-partition Kafka queue only the partition's owner has), lets it run a
    random 50-400 ms more and kills it with SIGKILL, so every kill lands on
    requests in flight; a fresh worker replaces it.
    """
    lease = harness.lease_seconds
    queue_name = _qname("kill")
    ledger = Ledger()
    transport = await harness.connect(max_attempts=1000)
    try:
        queue = transport.request_queue(queue_name, lease_seconds=lease)
        await queue.stats()  # the queue exists before the first worker joins
        requests = [WorkRequest(task="job", payload={"i": i}) for i in range(sizes.requests)]
        sem = asyncio.Semaphore(64)

        async def send(r: WorkRequest) -> None:
            async with sem:
                ledger.attempted.add(r.request_id)
                try:
                    await queue.enqueue(r)
                    ledger.acknowledged.add(r.request_id)
                except TransportError:
                    ledger.indeterminate.add(r.request_id)

        killed = [asyncio.Event() for _ in range(sizes.kills)]

        async def produce() -> None:
            # One batch per planned kill, about 1.5 s of work sent in 50 ms
            # slices; the next batch starts once that kill happened, so every
            # kill finds work however slowly a replacement worker starts.
            per_slice = max(1, round(sizes.requests / (sizes.kills * 1.5) * 0.05))
            per_kill = -(-len(requests) // sizes.kills)
            for k in range(sizes.kills):
                batch = requests[k * per_kill : (k + 1) * per_kill]
                for start in range(0, len(batch), per_slice):
                    await asyncio.gather(*(send(r) for r in batch[start : start + per_slice]))
                    await asyncio.sleep(0.05)
                if k + 1 < sizes.kills:
                    await killed[k].wait()

        producer = asyncio.create_task(produce())
        env_harness = _with(harness, max_attempts=1000)
        workers = [
            await _worker(env_harness, queue_name, lease, concurrency=16, work_ms=20)
            for _ in range(2)
        ]
        dead: list[WorkerProcess] = []
        kills = 0
        for _ in range(sizes.kills):
            victim = await _busy_worker(workers, harness.scaled(60))
            if victim is None:
                break  # nothing left to work on
            workers.remove(victim)
            await asyncio.sleep(random.uniform(0.05, 0.4))
            await victim.reap()
            kills += 1
            killed[kills - 1].set()
            ledger.fault(victim.lines)
            dead.append(victim)
            workers.append(
                await _worker(env_harness, queue_name, lease, concurrency=16, work_ms=20)
            )
        for event in killed:
            event.set()  # a producer still waiting for a kill that did not come
        await producer
        drained, gap = await _drain_past_broker_gap(
            harness, ledger, queue, workers, dead, harness.scaled(300)
        )
        for worker in workers:
            await worker.reap()
        for worker in dead + workers:
            ledger.read_lines(worker.lines)
        ledger.dead_lettered = (await queue.stats()).dead_lettered
        dup_ok = (
            ledger.duplicated <= ledger.in_flight_at_faults
            or not harness.capabilities.individual_acks
        )
        return ledger.row(
            backend,
            f"SIGKILL of workers ×{kills}",
            window=len(ledger.in_flight_at_faults),
            duplicates_outside_window=len(ledger.duplicated - ledger.in_flight_at_faults),
            drained=drained,
            **gap,
            ok=not ledger.lost and dup_ok and drained and kills == sizes.kills,
        )
    finally:
        await transport.aclose()


def _with(harness: BackendHarness, **overrides: Any) -> BackendHarness:
    clone = BackendHarness(harness.config.model_copy(update=overrides), harness.capabilities)
    clone.lease_seconds = harness.lease_seconds
    clone.timeout_scale = harness.timeout_scale
    clone.embedded = harness.embedded
    return clone


async def broker_restart(backend: str, harness: BackendHarness, sizes: Sizes) -> dict[str, Any]:
    """The broker is killed with SIGKILL and restarted while a producer and a
    worker run; for an embedded store (``harness.embedded``: sqlite://)
    every process holding the file is killed. If the worker that lived
    through the restart stops consuming, a fresh one finishes the drain
    (telling a stalled consumer from lost data) and the row says so
    (``surviving_worker_stalled``, and it is not ok)."""
    lease = harness.lease_seconds
    queue_name = _qname("restart")
    ledger = Ledger()
    env_harness = _with(harness, max_attempts=1000)
    producer = await WorkerProcess.start(
        env_harness, "--queue", queue_name, "--mode", "produce", "--count", "1000000"
    )
    await producer.wait_for("STARTED", harness.scaled(60))
    worker = await _worker(env_harness, queue_name, lease)
    processes = [producer, worker]
    await asyncio.sleep(1.0)
    if harness.embedded:
        for proc in processes:
            await proc.reap()
            ledger.fault(proc.lines)
        producer = await WorkerProcess.start(
            env_harness, "--queue", queue_name, "--mode", "produce", "--count", "1000000"
        )
        worker = await _worker(env_harness, queue_name, lease)
        processes += [producer, worker]
    else:
        await harness.restart_broker()
    await asyncio.sleep(2.0)
    await producer.reap()  # stop producing; everything acknowledged must be processed
    for proc in processes:
        if proc is not worker:
            ledger.read_lines(proc.lines)
    transport = await harness.connect()
    fresh: WorkerProcess | None = None
    stalled = False
    try:
        queue = transport.request_queue(queue_name, lease_seconds=lease)
        finished = [p for p in processes if p is not worker]
        drained = await _drain_ledger(ledger, queue, [worker], finished, harness.scaled(90))
        if not drained:
            # The worker that lived through the restart stalled. A fresh one
            # tells a stalled consumer (availability) from lost data.
            stalled = True
            await worker.reap()
            finished.append(worker)
            fresh = await _worker(env_harness, queue_name, lease)
            drained = await _drain_ledger(ledger, queue, [fresh], finished, harness.scaled(90))
    finally:
        await worker.reap()
        if fresh is not None:
            await fresh.reap()
        await transport.aclose()
    ledger.read_lines(worker.lines)
    if fresh is not None:
        ledger.read_lines(fresh.lines)
    return ledger.row(
        backend,
        "SIGKILL of every process on the file" if harness.embedded else "broker SIGKILL + restart",
        drained=drained,
        surviving_worker_stalled=stalled,
        ok=not ledger.lost and drained and not stalled,
    )


async def outbox_outage(
    backend: str, harness: BackendHarness, sizes: Sizes, tmp: Path
) -> dict[str, Any]:
    """The broker is unreachable for a sustained period; an outbox is in front."""
    ledger = Ledger()
    queue_name = _qname("outbox")
    transport = await harness.connect()
    try:
        async with Outbox(
            transport, tmp / f"{queue_name}.db", retry_wait=wait_fixed(0.2)
        ) as outbox:
            await harness.stop_broker()
            sent: list[str] = []
            start = time.monotonic()
            while time.monotonic() - start < sizes.outage_seconds:
                # One ordering key: FIFO is then observable on every backend
                # (a partitioned queue orders per key).
                request = await outbox.enqueue(
                    queue_name, WorkRequest(task="job", payload=len(sent), ordering_key="outbox")
                )
                sent.append(request.request_id)
                await asyncio.sleep(0.01)
            held = await outbox.depth()
            await harness.start_broker()
            await outbox.flush(timeout=harness.scaled(120))
            ledger.acknowledged.update(sent)
            ledger.attempted.update(sent)
            dead = len(await outbox.dead_letters())
        consumer = await harness.connect()
        try:
            queue = consumer.request_queue(queue_name)
            order: list[str] = []
            # One consumer polls in order; acks run alongside (up to 256 at
            # once) so a backend whose ack waits for durability still drains
            # a two-minute backlog in reasonable time.
            acking = asyncio.Semaphore(256)
            acks: list[asyncio.Task[None]] = []

            async def settle(delivery: Any) -> None:
                try:
                    if await delivery.ack():
                        ledger.acked.add(delivery.request.request_id)
                finally:
                    acking.release()

            while len(order) < len(sent):
                await acking.acquire()
                delivery = await queue.poll(harness.scaled(10))
                if delivery is None:
                    acking.release()
                    break
                order.append(delivery.request.request_id)
                ledger.processed[delivery.request.request_id] += 1
                acks.append(asyncio.create_task(settle(delivery)))
            await asyncio.gather(*acks)
        finally:
            await consumer.aclose()
        fifo = [rid for rid in order if rid in set(sent)] == sent[: len(order)]
        ledger.dead_lettered = dead
        return ledger.row(
            backend,
            f"broker unreachable {sizes.outage_seconds:g}s, outbox in front",
            held_during_outage=held,
            fifo=fifo,
            ok=not ledger.lost and fifo and dead == 0,
        )
    finally:
        await transport.aclose()


async def poison(backend: str, harness: BackendHarness, sizes: Sizes) -> dict[str, Any]:
    """One request always fails; the rest must flow."""
    ledger = Ledger()
    name = _qname("poison")
    transport = await harness.connect()
    deliveries = 0
    try:
        ens = Ensemble(
            name,
            transport=transport,
            concurrency=4,
            max_attempts=3,
            retry_wait=wait_fixed(0.05),
            advertise=False,
            lease_seconds=harness.lease_seconds * 5,
        )

        @ens.task("job")
        async def job(ctx: TaskContext) -> int:
            nonlocal deliveries
            ledger.processed[ctx.request_id] += 1
            if ctx.payload == "poison":
                deliveries += 1
                raise RuntimeError("poisoned")
            return 1

        caller = Network(transport, caller=f"{name}-caller")
        async with ens:
            handles = [await caller.send(name, "job", "poison")]
            handles += [await caller.send(name, "job", i) for i in range(200)]
            for h in handles:
                ledger.acknowledged.add(h.request_id)
            responses = await asyncio.gather(
                *(h.result(timeout=harness.scaled(120)) for h in handles)
            )
            dead = await ens.queue.dead_letters()
        ledger.dead_lettered = len(dead)
        ledger.acked = {r.request_id for r in responses}  # answered (completed or failed)
        completed = sum(r.status == "completed" for r in responses)
        return ledger.row(
            backend,
            "poison request (max_attempts=3)",
            poison_deliveries=deliveries,
            others_completed=completed,
            ok=deliveries == 3
            and len(dead) == 1
            and completed == 200
            and "poisoned" in dead[0].error,
        )
    finally:
        await transport.aclose()


async def long_job(backend: str, harness: BackendHarness, sizes: Sizes) -> dict[str, Any]:
    """A job running 3× its lease, two workers: never executed twice at once.
    The lease is at least 3 s so that a briefly stalled event loop on a busy
    machine is not mistaken for a dead worker."""
    lease = max(harness.lease_seconds, 3.0)
    name = _qname("long")
    running: set[str] = set()
    executions: Counter[str] = Counter()
    concurrent = 0
    runs = 0
    transports = [await harness.connect() for _ in range(2)]
    ensembles = []
    try:
        for t in transports:
            ens = Ensemble(name, transport=t, concurrency=2, lease_seconds=lease, advertise=False)

            @ens.task("job")
            async def job(ctx: TaskContext) -> str:
                nonlocal concurrent, runs
                runs += 1
                executions[ctx.request_id] += 1
                if ctx.request_id in running:
                    concurrent += 1
                running.add(ctx.request_id)
                try:
                    await asyncio.sleep(3 * lease)
                finally:
                    running.discard(ctx.request_id)
                return "done"

            ensembles.append(ens)
        for ens in ensembles:
            await ens.start()
        caller = Network(transports[0], caller=f"{name}-caller")
        handles = [await caller.send(name, "job", i) for i in range(4)]
        ledger = Ledger()
        ledger.acknowledged = {h.request_id for h in handles}
        results = await asyncio.gather(
            *(h.result(timeout=harness.scaled(120)) for h in handles), return_exceptions=True
        )
        # Processed = handler executions per request, as counted by the
        # handlers; lost = sent but never answered "completed".
        ledger.processed = executions
        ledger.acked = {
            h.request_id
            for h, r in zip(handles, results, strict=True)
            if not isinstance(r, BaseException) and r.status == "completed"
        }
        return ledger.row(
            backend,
            "job 3× its lease, two workers",
            executions=runs,
            concurrent_duplicates=concurrent,
            ok=concurrent == 0 and runs == 4 and not ledger.lost,
        )
    finally:
        for ens in ensembles:
            await ens.aclose()
        for t in transports:
            await t.aclose()


async def churn(backend: str, harness: BackendHarness, sizes: Sizes) -> dict[str, Any]:
    """Workers join and leave (SIGTERM or SIGKILL) every second or so under load."""
    lease = harness.lease_seconds
    queue_name = _qname("churn")
    ledger = Ledger()
    env_harness = _with(harness, max_attempts=1000)
    transport = await harness.connect()
    try:
        queue = transport.request_queue(queue_name, lease_seconds=lease)
        stop = asyncio.Event()

        async def produce() -> None:
            i = 0
            while not stop.is_set():
                r = WorkRequest(task="job", payload=i)
                ledger.attempted.add(r.request_id)
                try:
                    await queue.enqueue(r)
                    ledger.acknowledged.add(r.request_id)
                except TransportError:
                    ledger.indeterminate.add(r.request_id)
                i += 1
                await asyncio.sleep(0.005)

        producer = asyncio.create_task(produce())
        workers = [await _worker(env_harness, queue_name, lease)]
        gone: list[WorkerProcess] = []
        start = time.monotonic()
        while time.monotonic() - start < sizes.churn_seconds:
            await asyncio.sleep(random.uniform(0.5, 1.5))
            if len(workers) < 3 and (len(workers) == 1 or random.random() < 0.5):
                workers.append(await _worker(env_harness, queue_name, lease))
            else:
                leaving = workers.pop(random.randrange(len(workers)))
                await leaving.reap()
                ledger.fault(leaving.lines)
                gone.append(leaving)
        stop.set()
        await producer
        drained, gap = await _drain_past_broker_gap(
            harness, ledger, queue, workers, gone, harness.scaled(120)
        )
        for w in workers:
            await w.reap()
        for w in gone + workers:
            ledger.read_lines(w.lines)
        return ledger.row(
            backend,
            f"workers joining/leaving for {sizes.churn_seconds:g}s under load",
            drained=drained,
            **gap,
            ok=not ledger.lost and drained,
        )
    finally:
        await transport.aclose()


async def caller_restart(backend: str, harness: BackendHarness, sizes: Sizes) -> dict[str, Any]:
    """A caller is killed with SIGKILL with requests pending, then restarted."""

    async def start(*args: str) -> WorkerProcess:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.runtime._procs",
            *args,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env=harness.subprocess_env(),
            cwd=ROOT,
        )
        return WorkerProcess(proc)

    caller = await start("send", "20")
    try:
        await caller.wait_for("READY", harness.scaled(60))
    finally:
        await caller.reap()
    sent = {ln.split()[1] for ln in caller.lines if ln.startswith("SENT")}
    kitchen = await start("ensemble", "0.01")
    collector = await start("collect")
    try:
        await kitchen.wait_for("SERVING", harness.scaled(60))
        await collector.wait_for("COLLECTED", harness.scaled(120))
    except (TimeoutError, AssertionError):
        pass
    finally:
        await kitchen.reap()
        await collector.reap()
    got = {ln.split()[1] for ln in collector.lines if ln.startswith("GOT")}
    ledger = Ledger()
    ledger.acknowledged = sent
    # Processed = handler completions printed by the ensemble (DONE lines);
    # lost = sent but never collected by the restarted caller.
    ledger.processed.update(ln.split()[1] for ln in kitchen.lines if ln.startswith("DONE "))
    ledger.acked = got
    return ledger.row(
        backend,
        "caller SIGKILL with 20 pending, restarted",
        collected=len(got),
        ok=sent == got and len(sent) == 20 and not ledger.duplicated,
    )


async def run_all(
    backend: str, harness: BackendHarness, sizes: Sizes, tmp: Path, progress: Any = print
) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    plan: list[tuple[str, Any]] = [
        ("sigkill", lambda: sigkill_workers(backend, harness, sizes)),
        ("poison", lambda: poison(backend, harness, sizes)),
        ("long job", lambda: long_job(backend, harness, sizes)),
        ("churn", lambda: churn(backend, harness, sizes)),
        ("caller restart", lambda: caller_restart(backend, harness, sizes)),
    ]
    caps = harness.capabilities
    if (harness.embedded and caps.persistent) or (
        caps.restart_broker and harness.can_restart_broker
    ):
        plan.append(("broker restart", lambda: broker_restart(backend, harness, sizes)))
    else:
        rows.append(
            {
                "backend": backend,
                "fault": "broker SIGKILL + restart",
                "ok": None,
                "note": "not measured: this test broker cannot be restarted with its data"
                if caps.restart_broker
                else "not meaningful: the backend keeps no data across a broker restart",
            }
        )
    if harness.embedded or not harness.can_stop_broker:
        rows.append(
            {
                "backend": backend,
                "fault": "broker unreachable, outbox in front",
                "ok": None,
                "note": "not meaningful: no network between the caller and an embedded store"
                if harness.embedded
                else "not measured: this harness cannot stop the broker",
            }
        )
    else:
        plan.append(("outbox outage", lambda: outbox_outage(backend, harness, sizes, tmp)))
    for label, scenario in plan:
        progress(f"{backend}: {label}")
        started = time.monotonic()
        harness.mark_test_start()
        row = await scenario()
        row["seconds"] = round(time.monotonic() - started, 1)
        if row.get("ok") is False and (gap := harness.known_broker_gap()):
            # Still a failed row; it names the test broker's documented defect
            # it hit, with the evidence (e.g. pulsar-lite's reset consumers).
            row["broker_gap"] = gap
        rows.append(row)
    return rows
