"""The ensemble runtime and the client side, on the in-process backends."""

from __future__ import annotations

import asyncio
import logging
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from tenacity import wait_fixed

from transport import (
    DeliveryTimeoutError,
    Ensemble,
    InMemoryMetrics,
    Network,
    NoProviderError,
    PermanentTaskError,
    TaskContext,
    Transport,
    WorkRequest,
    WorkResponse,
    set_metrics_sink,
    utcnow,
)
from transport._ops.tracing import TRACEPARENT, parse_traceparent


def trace_id(ctx: TaskContext) -> str:
    parsed = parse_traceparent(ctx.request.headers.get(TRACEPARENT))
    assert parsed is not None
    return parsed[0]


async def test_request_response_with_priorities_served_in_order(transport: Transport) -> None:
    served: list[int] = []
    kitchen = Ensemble("kitchen", transport=transport, concurrency=1, priority_levels=3)

    @kitchen.task("cook")
    async def cook(ctx: TaskContext) -> dict[str, Any]:
        served.append(ctx.request.priority)
        return {"dish": ctx.payload["dish"], "attempt": ctx.attempt}

    caller = Network(transport, caller="front-desk", default_levels=3)
    handles = []
    for i, level in enumerate([2, 1, 0, 2, 0, 1]):
        handles.append(await caller.send("kitchen", "cook", {"dish": f"d{i}"}, priority=level))
    async with kitchen:
        responses = await asyncio.gather(*(h.result(timeout=20) for h in handles))
    assert [r.status for r in responses] == ["completed"] * 6
    assert [r.result["dish"] for r in responses] == [f"d{i}" for i in range(6)]
    assert served == sorted(served), f"backlog not served by priority: {served}"
    assert await caller.pending() == []


async def test_transient_errors_are_retried_with_backoff(transport: Transport) -> None:
    calls: list[int] = []
    ens = Ensemble(
        "flaky", transport=transport, concurrency=1, retry_wait=wait_fixed(0.05), max_attempts=5
    )

    @ens.task("work")
    async def work(ctx: TaskContext) -> str:
        calls.append(ctx.attempt)
        if ctx.attempt < 3:
            raise ConnectionError("downstream hiccup")
        return "ok"

    async with ens:
        response = await Network(transport, caller="c1").request("flaky", "work", timeout=20)
    assert response.status == "completed" and response.result == "ok"
    assert calls == [1, 2, 3]
    assert ens.counts["retried"] == 2


async def test_permanent_error_fails_fast_and_dead_letters(transport: Transport) -> None:
    ens = Ensemble("strict", transport=transport, concurrency=1)

    @ens.task("validate")
    async def validate(ctx: TaskContext) -> None:
        raise PermanentTaskError("payload has no 'order' field")

    async with ens:
        response = await Network(transport, caller="c2").request(
            "strict", "validate", {"x": 1}, timeout=20
        )
        assert response.status == "failed"
        assert response.error is not None and "no 'order' field" in response.error
        dead = await ens.queue.dead_letters()
    assert [d.request.payload for d in dead if d.request] == [{"x": 1}]


async def test_exhausted_retries_answer_failed_and_dead_letter(transport: Transport) -> None:
    calls = 0
    ens = Ensemble(
        "doomed", transport=transport, concurrency=1, max_attempts=3, retry_wait=wait_fixed(0.01)
    )

    @ens.task("work")
    async def work(ctx: TaskContext) -> None:
        nonlocal calls
        calls += 1
        raise RuntimeError(f"boom {ctx.attempt}")

    async with ens:
        response = await Network(transport, caller="c3").request("doomed", "work", timeout=20)
        dead = await ens.queue.dead_letters()
    assert response.status == "failed" and "boom 3" in (response.error or "")
    assert calls == 3
    assert len(dead) == 1 and dead[0].attempts == 3


async def test_unknown_task_and_expired_deadline_are_rejected(transport: Transport) -> None:
    ens = Ensemble("picky", transport=transport, concurrency=1)
    ran: list[str] = []

    @ens.task("known")
    async def known(ctx: TaskContext) -> None:
        ran.append(ctx.request_id)

    caller = Network(transport, caller="c4")
    async with ens:
        unknown = await caller.request("picky", "unknown", timeout=20)
        late = await caller.request(
            "picky", "known", deadline=utcnow() - timedelta(seconds=1), timeout=20
        )
    assert unknown.status == "rejected" and "no task 'unknown'" in (unknown.error or "")
    assert late.status == "rejected" and "deadline" in (late.error or "")
    assert ran == []


async def test_redelivered_request_already_answered_is_not_run_again(transport: Transport) -> None:
    runs: Counter[str] = Counter()
    ens = Ensemble("once", transport=transport, concurrency=1)

    @ens.task("charge")
    async def charge(ctx: TaskContext) -> str:
        runs[ctx.request_id] += 1
        return "charged"

    inbox = transport.delivery_registry("c5")
    request = WorkRequest(task="charge", reply_to="c5")
    pending = await inbox.register(request.request_id)
    queue = transport.request_queue("once")
    await queue.enqueue(request)
    await queue.enqueue(request)  # a duplicate delivery of the same request
    # A marker behind both: with one worker on a FIFO queue, its answer
    # means the duplicate was handled before it.
    marker = WorkRequest(task="charge", reply_to="c5")
    marker_pending = await inbox.register(marker.request_id)
    await queue.enqueue(marker)
    async with ens:
        response = await pending.result(timeout=20)
        await marker_pending.result(timeout=20)
    assert ens.counts["duplicates"] == 1
    assert response.result == "charged"
    assert runs[request.request_id] == 1


async def test_request_nobody_awaits_is_not_run(
    transport: Transport, caplog: pytest.LogCaptureFixture
) -> None:
    """A request naming a registry where nothing is registered for it (its
    response collected long ago, its registration expired, or never made):
    its response could never be delivered, so its handler does not run."""
    runs: Counter[str] = Counter()
    ens = Ensemble("lost", transport=transport, concurrency=1)

    @ens.task("charge")
    async def charge(ctx: TaskContext) -> str:
        runs[ctx.request_id] += 1
        return "charged"

    inbox = transport.delivery_registry("c6")
    stray = WorkRequest(task="charge", reply_to="c6")  # never registered
    queue = transport.request_queue("lost")
    await queue.enqueue(stray)
    marker = WorkRequest(task="charge", reply_to="c6")
    marker_pending = await inbox.register(marker.request_id)
    await queue.enqueue(marker)
    with caplog.at_level(logging.INFO, logger="transport"):
        async with ens:
            await marker_pending.result(timeout=20)
    assert runs == {marker.request_id: 1}
    assert ens.counts["duplicates"] == 1
    assert any(
        stray.request_id in r.getMessage() and "no caller awaits" in r.getMessage()
        for r in caplog.records
    )


async def test_long_handler_keeps_its_lease_automatically(
    runtime_url: str, transport: Transport
) -> None:
    from transport import connect

    runs: list[str] = []
    other = await connect(runtime_url, lease_seconds=0.5)
    ensembles = []
    try:
        for t in (transport, other):
            ens = Ensemble("slow", transport=t, concurrency=1, lease_seconds=0.5, advertise=False)

            @ens.task("think")
            async def think(ctx: TaskContext) -> str:
                runs.append(ctx.request_id)
                await asyncio.sleep(2.0)  # four leases long
                return "thought"

            ensembles.append(ens)
        for ens in ensembles:
            await ens.start()
        response = await Network(transport, caller="c6").request("slow", "think", timeout=20)
        assert response.status == "completed"
        assert len(runs) == 1, "redelivered while the handler was alive"
    finally:
        for ens in ensembles:
            await ens.aclose()
        await other.aclose()


async def test_shutdown_finishes_in_flight_work_within_grace(transport: Transport) -> None:
    started = asyncio.Event()
    ens = Ensemble("graceful", transport=transport, concurrency=1, shutdown_grace=5)

    @ens.task("work")
    async def work(ctx: TaskContext) -> str:
        started.set()
        await asyncio.sleep(0.3)
        return "finished"

    await ens.start()
    pending = await Network(transport, caller="c7").send("graceful", "work")
    await asyncio.wait_for(started.wait(), 10)
    await ens.aclose()
    response = await pending.result(timeout=5)
    assert response.result == "finished"


async def test_work_over_grace_is_given_back_uncounted_and_redone(
    runtime_url: str, transport: Transport
) -> None:
    started = asyncio.Event()
    first = Ensemble(
        "impatient", transport=transport, concurrency=1, shutdown_grace=0.2, advertise=False
    )

    @first.task("work")
    async def stuck(ctx: TaskContext) -> str:
        started.set()
        await asyncio.sleep(60)
        return "never"

    await first.start()
    pending = await Network(transport, caller="c8").send("impatient", "work")
    await asyncio.wait_for(started.wait(), 10)
    # The grace runs out: the request is given back, not lost, and the stop
    # (a deploy) costs it no attempt.
    await first.aclose()
    second = Ensemble("impatient", transport=transport, concurrency=1, advertise=False)

    @second.task("work")
    async def quick(ctx: TaskContext) -> int:
        return ctx.attempt

    async with second:
        response = await pending.result(timeout=20)
    assert (response.status, response.result) == ("completed", 1)


async def test_trace_context_crosses_ensemble_hops(transport: Transport) -> None:
    seen: dict[str, str] = {}
    front = Ensemble("front", transport=transport, concurrency=1)
    back = Ensemble("back", transport=transport, concurrency=1)
    hop = Network(transport, caller="front")

    @front.task("ask")
    async def ask(ctx: TaskContext) -> Any:
        seen["front"] = trace_id(ctx)
        return (await hop.request("back", "answer", timeout=20)).result

    @back.task("answer")
    async def answer(ctx: TaskContext) -> int:
        seen["back"] = trace_id(ctx)
        return 42

    async with front, back:
        response = await Network(transport, caller="c9").request("front", "ask", timeout=20)
    assert response.result == 42
    assert seen["front"] == seen["back"]


async def test_capabilities_are_advertised_refreshed_and_withdrawn(transport: Transport) -> None:
    ens = Ensemble("advertiser", transport=transport, concurrency=1, priority_levels=2)

    @ens.tool("lookup-price", description="prices a dish", input_schema={"type": "object"})
    async def price(ctx: TaskContext) -> int:
        return 7

    registry = transport.capability_registry()
    changes = registry.watch()
    async with ens:
        [cap] = await registry.lookup("lookup-price")
        assert (cap.ensemble, cap.kind, cap.queue, cap.priority_levels) == (
            "advertiser",
            "tool",
            "advertiser",
            2,
        )
        first_expiry = cap.expires_at
        # Refreshed before the 2 s lease runs out: a second advertisement.
        async with asyncio.timeout(10):
            async for change in changes:
                if (
                    change.kind == "advertised"
                    and change.capability
                    and change.capability.expires_at != first_expiry
                ):
                    break
        response = await Network(transport, caller="c10").request(None, "lookup-price", timeout=20)
        assert response.result == 7
    # Withdrawn on stop; other registry objects see it eventually (watch).
    async with asyncio.timeout(10):
        async for change in changes:
            if change.kind == "withdrawn" and change.name == "lookup-price":
                break
    assert await registry.lookup("lookup-price") == []
    with pytest.raises(NoProviderError):
        await Network(transport, caller="c10").send(None, "lookup-price")
    await changes.aclose()


async def _replica(transport: Transport) -> Ensemble:
    """A started replica of ensemble ``kitchen`` (3 levels) serving ``cook``."""
    replica = Ensemble("kitchen", transport=transport, concurrency=1, priority_levels=3)

    @replica.task("cook")
    async def cook(ctx: TaskContext) -> Any:
        return ctx.payload

    await replica.start()
    return replica


def _noted(replica: Ensemble) -> asyncio.Event:
    """An event set once ``replica`` has noted another replica's advertisement."""
    noted = asyncio.Event()
    note = replica._note

    def noting(capability: Any) -> None:
        note(capability)
        if replica._others:
            noted.set()

    replica._note = noting  # type: ignore[method-assign]
    return noted


async def test_a_replica_that_stops_leaves_the_advertisement_to_the_one_running(
    runtime_url: str,
) -> None:
    # A rolling restart: two replicas of one ensemble, one stops. Withdrawing
    # its advertisement hid the ensemble until the other one's next refresh
    # (up to a third of a lease: 10 s by default) and a caller asking for any
    # provider got NoProviderError meanwhile. 30 s leases: no refresh happens
    # during the test, so only the stop decides what callers see.
    from transport import connect

    transports = [await connect(runtime_url, capability_lease_seconds=30.0) for _ in range(3)]
    staying_t, stopping_t, caller_t = transports
    try:
        staying = await _replica(staying_t)
        stopping = await _replica(stopping_t)  # reads the other's advertisement at start
        await stopping.aclose()
        # A fresh handle reads what is committed now.
        [cap] = await caller_t.capability_registry().lookup("cook")
        assert (cap.ensemble, cap.priority_levels) == ("kitchen", 3)
        response = await Network(caller_t, caller="front").request(
            None, "cook", {"dish": "soup"}, timeout=20
        )
        assert response.result == {"dish": "soup"}
        await staying.aclose()
    finally:
        for t in transports:
            await t.aclose()


async def test_the_last_replica_standing_withdraws(transport: Transport) -> None:
    # Leases of 2 s: the replica left alone sees the other's last lease run
    # past half its length (1 s) and withdraws when it stops.
    first = await _replica(transport)
    # The first replica notes the second's advertisement from its registry
    # watch, which a loaded machine can deliver after the second has started.
    noted = _noted(first)
    second = await _replica(transport)
    await asyncio.wait_for(noted.wait(), 10)
    await second.aclose()
    [until] = first._others.values()  # the stopped replica's last lease end
    # The time is what is tested here: wait until that lease has less than
    # half a lease left.
    await asyncio.sleep((until - utcnow()).total_seconds() - 1.0 + 0.05)
    await first.aclose()
    assert await transport.capability_registry().lookup("cook") == []


async def test_an_advertisement_withdrawn_under_a_running_replica_comes_back_at_once(
    runtime_url: str,
) -> None:
    # A replica that stops without having seen this one (it started a moment
    # ago) withdraws the advertisement: the running one advertises again when
    # it sees that, not at its next refresh (10 s away with 30 s leases).
    from transport import connect

    running_t = await connect(runtime_url, capability_lease_seconds=30.0)
    other_t = await connect(runtime_url, capability_lease_seconds=30.0)
    try:
        running = await _replica(running_t)
        registry = other_t.capability_registry()
        assert [c.ensemble for c in await registry.lookup("cook")] == ["kitchen"]
        changes = registry.watch()
        await registry.withdraw("kitchen", "cook")
        kinds = []
        async with asyncio.timeout(5):
            async for change in changes:
                kinds.append(change.kind)
                if change.kind == "advertised":
                    assert change.capability is not None
                    assert change.capability.instance == running.instance
                    break
        assert kinds == ["withdrawn", "advertised"]
        await changes.aclose()
        await running.aclose()
    finally:
        await running_t.aclose()
        await other_t.aclose()


async def test_a_replica_that_saw_the_other_withdraw_withdraws_at_its_own_stop(
    runtime_url: str,
) -> None:
    # The other replica's advertisement is noted, then withdrawn (it
    # stopped): the one left advertises again and, stopping in turn,
    # withdraws. It kept the withdrawn replica's lease end and left its
    # advertisement for callers to find until the lease ran out (seen on
    # Kafka, whose registry replayed an earlier run's advertisement and
    # withdrawal to a replica started again within half a lease).
    from transport import Capability, connect

    running_t = await connect(runtime_url, capability_lease_seconds=30.0)
    other_t = await connect(runtime_url, capability_lease_seconds=30.0)
    try:
        running = await _replica(running_t)
        noted = _noted(running)
        registry = other_t.capability_registry()
        changes = registry.watch()
        await registry.advertise(
            Capability(
                name="cook",
                ensemble="kitchen",
                queue="kitchen",
                priority_levels=3,
                instance="other-replica",
            )
        )
        async with asyncio.timeout(10):
            await noted.wait()
        await registry.withdraw("kitchen", "cook")  # the other replica stopped
        withdrawn = False
        async with asyncio.timeout(10):
            async for change in changes:
                if change.kind == "withdrawn":
                    withdrawn = True
                elif (
                    withdrawn
                    and change.capability is not None
                    and change.capability.instance == running.instance
                ):
                    break  # advertised again by the one left
        await changes.aclose()
        await running.aclose()
        fresh_t = await connect(runtime_url)  # reads what is committed now
        try:
            assert await fresh_t.capability_registry().lookup("cook") == []
        finally:
            await fresh_t.aclose()
    finally:
        await running_t.aclose()
        await other_t.aclose()


async def test_an_ensemble_whose_transport_is_closed_under_it_stops_with_one_error(
    runtime_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The transport closed first (the wrong order): every worker and the
    # forwarder logged "poll failed" every second forever and run() never
    # returned.
    from transport import connect

    transport = await connect(runtime_url)
    ens = Ensemble("kitchen", transport=transport, concurrency=4, priority_levels=3)
    ens.add_task("cook", lambda ctx: asyncio.sleep(0, 1))
    await ens.start()
    running = asyncio.create_task(ens.run(install_signal_handlers=False))
    caplog.set_level(logging.WARNING, logger="transport.runtime")
    await transport.aclose()
    await asyncio.wait_for(running, 10)
    records = [r for r in caplog.records if r.name == "transport.runtime"]
    assert [r.levelname for r in records] == ["ERROR"], [r.getMessage() for r in records]
    assert "closed while the ensemble is running" in records[0].getMessage()


async def test_a_request_whose_attempts_ran_out_without_a_handler_is_answered_failed(
    transport: Transport,
) -> None:
    # Workers that died (or were stopped) holding a request used up its
    # attempts: the queue dead-letters it at the next hand-out, where no
    # handler sees it. Its caller waited until its timeout (for ever without
    # one); the ensemble whose poll found it exhausted now answers it.
    caller = Network(transport, caller="front")
    handle = await caller.send("kitchen", "cook", {"dish": "soup"})
    crashed = transport.request_queue("kitchen", max_attempts=2)
    for attempt in (1, 2):  # taken, never settled: each 2 s lease runs out
        delivery = await crashed.poll(10)
        assert delivery is not None and delivery.attempt == attempt
    ens = Ensemble("kitchen", transport=transport, concurrency=1, max_attempts=2)
    ens.add_task("cook", lambda ctx: asyncio.sleep(0, "never run"))
    async with ens:
        response = await handle.result(timeout=20)
    assert response.status == "failed"
    assert response.error is not None
    assert response.error.startswith("not acknowledged after 2 deliveries")
    assert ens.counts["failed"] == 1 and ens.counts["completed"] == 0
    dead = await transport.request_queue("kitchen").dead_letters()
    assert [d.request_id for d in dead] == [handle.request_id]


async def test_a_caller_keeps_the_levels_of_an_ensemble_restarting(transport: Transport) -> None:
    # Stopped, the ensemble is not advertised: the caller fell back to one
    # level, so send(priority=2) raised ValueError and priority 0 was served
    # at the middle level (through the plain queue's forwarder).
    seen: list[tuple[str, int]] = []

    def kitchen() -> Ensemble:
        ens = Ensemble("kitchen", transport=transport, concurrency=1, priority_levels=3)

        @ens.task("cook")
        async def cook(ctx: TaskContext) -> int:
            seen.append((ctx.payload, ctx.request.priority))
            return ctx.request.priority

        return ens

    caller = Network(transport, caller="desk")
    async with kitchen().serving():
        assert (await caller.request("kitchen", "cook", "up", priority=2, timeout=20)).result == 2
    assert await transport.capability_registry().lookup("cook") == []  # withdrawn
    handles = [await caller.send("kitchen", "cook", f"p{p}", priority=p) for p in (0, 2)]
    async with kitchen().serving():
        assert [(await h.result(timeout=20)).result for h in handles] == [0, 2]
    assert seen == [("up", 2), ("p0", 0), ("p2", 2)]


async def test_a_second_stop_releases_the_running_handlers_at_once(transport: Transport) -> None:
    # Under run(), a second SIGTERM or Ctrl-C during the shutdown grace hit
    # the default action: SIGTERM ended the process with nothing given back
    # (the request waited out its lease), SIGINT raised KeyboardInterrupt.
    # The handlers now stay installed and a second stop() releases the
    # running handlers without waiting out the grace.
    started, never = asyncio.Event(), asyncio.Event()

    async def slow(ctx: TaskContext) -> int:
        started.set()
        await never.wait()
        return 1

    ens = Ensemble("kitchen", transport=transport, concurrency=1, shutdown_grace=60)
    ens.add_task("cook", slow)
    handle = await Network(transport, caller="desk").send("kitchen", "cook")
    running = asyncio.create_task(ens.run(install_signal_handlers=False))
    await asyncio.wait_for(started.wait(), 10)
    ens.stop()  # the first: waits up to 60 s for the handler
    await asyncio.sleep(0)
    assert not running.done()
    ens.stop()  # the second: releases it now
    await asyncio.wait_for(running, 10)
    assert not never.is_set()
    again = transport.request_queue("kitchen")
    delivery = await again.poll(10)  # given back, not left to its lease
    assert delivery is not None and delivery.request.request_id == handle.request_id
    assert delivery.attempt == 1  # uncounted: the stop was no failure of the request
    await delivery.ack()


async def test_a_result_too_large_to_store_fails_the_request_at_once(runtime_url: str) -> None:
    # The response passed the build check but its record was over the size
    # limit: settling failed, the handler ran again one lease apart until
    # the attempts ran out, and the caller got "not acknowledged after N
    # deliveries", which hid the cause.
    from transport import connect

    transport = await connect(runtime_url, max_payload_bytes=4000, lease_seconds=2.0)
    try:
        runs = 0

        async def big(ctx: TaskContext) -> str:
            nonlocal runs
            runs += 1
            return "x" * 5000

        ens = Ensemble("kitchen", transport=transport, concurrency=1, max_attempts=3)
        ens.add_task("cook", big)
        async with ens:
            response = await Network(transport, caller="desk").request(
                "kitchen", "cook", timeout=20
            )
        assert response.status == "failed"
        assert response.error is not None
        assert "the handler's result cannot be sent" in response.error
        assert runs == 1
    finally:
        await transport.aclose()


async def test_caller_reattaches_after_restart(runtime_url: str) -> None:
    from transport import connect

    first = await connect(runtime_url)
    caller = Network(first, caller="restartable")
    handles = [await caller.send("later", "work", {"i": i}) for i in range(3)]
    with pytest.raises(DeliveryTimeoutError):
        await handles[0].result(timeout=0.1)
    await first.aclose()  # the caller goes away with three requests pending
    worker_transport = await connect(runtime_url)
    ens = Ensemble("later", transport=worker_transport, concurrency=2)

    @ens.task("work")
    async def work(ctx: TaskContext) -> int:
        return int(ctx.payload["i"]) * 10

    try:
        async with ens:
            restarted = await connect(runtime_url)
            try:
                again = Network(restarted, caller="restartable")
                ids = [h.request_id for h in handles]
                assert sorted(p.request_id for p in await again.pending()) == sorted(ids)
                results = [await again.collect(rid, timeout=20) for rid in ids]
                assert [r.result for r in results] == [0, 10, 20]
            finally:
                await restarted.aclose()
    finally:
        await worker_transport.aclose()


async def test_metrics_hooks_count_what_happens(transport: Transport) -> None:
    metrics = InMemoryMetrics()
    set_metrics_sink(metrics)
    try:
        queue = transport.request_queue("metered")
        await queue.enqueue(WorkRequest(task="t"))
        await queue.enqueue(WorkRequest(task="t"))
        first = await queue.poll(5)
        assert first is not None
        await first.extend()
        await first.nack()
        for _ in range(2):
            delivery = await queue.poll(5)
            assert delivery is not None
            await delivery.ack()
        await queue.stats()
    finally:
        set_metrics_sink(None)
    assert metrics.count("enqueued", queue="metered") == 2
    assert metrics.count("delivered", queue="metered") == 3
    assert metrics.count("redelivered", queue="metered") == 1
    assert metrics.count("acked", queue="metered") == 2
    assert metrics.count("nacked", queue="metered") == 1
    assert metrics.count("lease_extended", queue="metered") == 1
    assert metrics.gauges[("queue_depth", (("queue", "metered"),))] == 0


def test_ensemble_configuration_errors() -> None:
    with pytest.raises(ValueError):
        Ensemble("bad.name", queue=object())  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        Ensemble("ok")
    ens = Ensemble("ok", queue=object(), advertise=False)  # type: ignore[arg-type]

    async def handler(ctx: TaskContext) -> None:
        return None

    ens.add_task("t", handler)
    with pytest.raises(ValueError):
        ens.add_task("t", handler)


async def test_worker_takes_the_next_request_while_an_ack_is_still_being_made_durable(
    transport: Transport,
) -> None:
    """Acks run in the background (a durable ack can take a flush, e.g.
    Pulsar's 100 ms tick), and close() still waits for them."""
    from transport._spi.metrics import InstrumentedRequestQueue, _InstrumentedDelivery

    gate = asyncio.Event()
    acks_started: list[str] = []

    class GatedDelivery(_InstrumentedDelivery):
        async def ack(self) -> bool:
            acks_started.append(self.request.request_id)
            await gate.wait()
            return await super().ack()

    class GatedQueue(InstrumentedRequestQueue):
        async def poll(self, timeout: float | None = None) -> Any:
            delivery = await self.inner.poll(timeout)
            if delivery is None:
                return None
            return GatedDelivery(delivery, InMemoryMetrics(), {})

    inner = transport.request_queue("gated")
    queue = GatedQueue(inner, InMemoryMetrics())
    handled: list[int] = []
    all_handled = asyncio.Event()
    ens = Ensemble("gated", transport=transport, queue=queue, concurrency=1, advertise=False)

    @ens.task("work")
    async def work(ctx: TaskContext) -> int:
        handled.append(ctx.payload)
        if len(handled) == 3:
            all_handled.set()
        return int(ctx.payload)

    for i in range(3):
        await queue.enqueue(WorkRequest(task="work", payload=i))
    await ens.start()
    # One worker, three requests, no ack has completed: the worker did not wait.
    await asyncio.wait_for(all_handled.wait(), 10)
    assert handled == [0, 1, 2]
    closing = asyncio.create_task(ens.aclose())
    await asyncio.sleep(0.05)
    assert not closing.done(), "close() must wait for the acks in flight"
    gate.set()
    await asyncio.wait_for(closing, 10)
    assert len(acks_started) == 3
    assert ens.counts["completed"] == 3
    check = transport.request_queue("gated")
    assert await check.poll(0.2) is None, "every request was acked before close returned"
    await check.aclose()


async def test_request_sent_before_a_prioritised_ensemble_advertised_is_served(
    transport: Transport,
) -> None:
    """A caller that does not know the target's levels (it has not advertised
    yet) sends to its plain queue; the ensemble moves such requests to the
    middle level of its priority queue instead of leaving them stranded."""
    caller = Network(transport, caller="early-desk")  # default_levels=1
    pending = await caller.send("kitchen3", "cook", {"dish": "soup"})
    kitchen = Ensemble("kitchen3", transport=transport, concurrency=1, priority_levels=3)
    levels_seen: list[int] = []

    @kitchen.task("cook")
    async def cook(ctx: TaskContext) -> str:
        levels_seen.append(ctx.request.priority)
        return str(ctx.payload["dish"])

    async with kitchen:
        response = await pending.result(timeout=20)
    assert response.status == "completed"
    assert response.result == "soup"
    assert levels_seen == [1]  # the middle of three levels


async def test_start_can_be_retried_after_advertising_failed(transport: Transport) -> None:
    from transport import TransientTransportError

    ens = Ensemble("retry-start", transport=transport, concurrency=1)

    @ens.task("work")
    async def work(ctx: TaskContext) -> int:
        return 7

    registry = transport.capability_registry()
    real = registry.advertise
    calls = 0

    async def flaky(capability: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise TransientTransportError("registry unreachable (simulated)")
        return await real(capability)

    ens._capabilities = registry
    registry.advertise = flaky  # type: ignore[method-assign]
    with pytest.raises(TransientTransportError):
        await ens.start()
    await ens.start()  # tries again, and this time starts
    try:
        caller = Network(transport, caller="retry-desk")
        response = await caller.request("retry-start", "work", {}, timeout=20)
        assert response.result == 7
    finally:
        await ens.aclose()


async def test_serving_serves_inside_the_block_and_stops_after_it(transport: Transport) -> None:
    kitchen = Ensemble("kitchen", transport=transport, concurrency=2)

    @kitchen.task("cook")
    async def cook(ctx: TaskContext) -> dict[str, Any]:
        return {"served": ctx.payload["dish"]}

    caller = Network(transport, caller="front-desk")
    registry = transport.capability_registry()
    async with kitchen.serving() as serving:
        assert serving is kitchen
        assert [c.ensemble for c in await registry.lookup("cook")] == ["kitchen"]
        response = await caller.request("kitchen", "cook", {"dish": "soup"}, timeout=20)
        assert (response.status, response.result) == ("completed", {"served": "soup"})
    # (a fresh handle: the first one's view follows the registry's watch feed)
    after = transport.capability_registry()
    assert await after.lookup("cook") == [], "not withdrawn when the block ended"
    # Stopped: a request sent now waits in the queue, unanswered.
    handle = await caller.send("kitchen", "cook", {"dish": "tea"})
    with pytest.raises(DeliveryTimeoutError):
        await handle.result(timeout=0.5)


async def test_serving_stops_and_propagates_when_the_block_raises(transport: Transport) -> None:
    kitchen = Ensemble("kitchen", transport=transport)
    kitchen.add_task("cook", lambda ctx: asyncio.sleep(0, {"ok": True}))
    registry = transport.capability_registry()
    with pytest.raises(RuntimeError, match="caller failed"):
        async with kitchen.serving():
            raise RuntimeError("caller failed")
    assert await registry.lookup("cook") == [], "not withdrawn after the exception"


async def test_idle_workers_share_one_poll_many_and_hold_no_more_than_they_run(
    transport: Transport,
) -> None:
    """With concurrency > 1 the workers lease through ``poll_many``, for as
    many requests as workers are idle: the four workers started together ask
    once for four, and no more requests are ever leased than workers are free
    to run them (a batch never waits for a busy worker)."""
    queue = transport.request_queue("batcher")
    for i in range(12):
        await queue.enqueue(WorkRequest(task="work", payload={"n": i}))
    asked: list[int] = []
    held = most_held = 0
    original = queue.poll_many

    async def poll_many(max_count: int, timeout: float | None = None) -> list[Any]:
        nonlocal held, most_held
        asked.append(max_count)
        batch = await original(max_count, timeout)
        held += len(batch)
        most_held = max(most_held, held)
        return batch

    queue.poll_many = poll_many  # type: ignore[method-assign]
    gate = asyncio.Event()
    four_running = asyncio.Event()
    all_done = asyncio.Event()
    running = 0
    done: list[int] = []
    ens = Ensemble("batcher", queue=queue, concurrency=4, stats_interval=None)

    @ens.task("work")
    async def work(ctx: TaskContext) -> None:
        nonlocal running, held
        running += 1
        if running == 4:
            four_running.set()
        await gate.wait()
        held -= 1
        running -= 1
        done.append(ctx.payload["n"])
        if len(done) == 12:
            all_done.set()

    async with ens:
        await asyncio.wait_for(four_running.wait(), 20)
        assert asked[0] == 4, f"the four idle workers were not asked for together: {asked}"
        assert most_held == 4
        gate.set()
        await asyncio.wait_for(all_done.wait(), 20)
    assert sorted(done) == list(range(12))
    assert max(asked) <= 4 and most_held <= 4, (asked, most_held)
    await queue.aclose()


async def test_a_send_whose_enqueue_fails_leaves_no_registration(runtime_url: str) -> None:
    # Registered, then refused at enqueue (here: over the size limit once
    # encoded): the registration stayed pending for the registry's TTL,
    # listed by pending() after every restart and never answered.
    from transport import PayloadTooLargeError, connect

    transport = await connect(runtime_url, max_payload_bytes=2000)
    try:
        network = Network(transport, caller="desk", default_levels=1)
        with pytest.raises(PayloadTooLargeError):
            await network.send("kitchen", "cook", "x" * 5000)
        assert await network.pending() == []
        again = Network(transport, caller="desk")  # a restarted caller sees none either
        assert await again.pending() == []
        kept = await network.send("kitchen", "cook", "small")  # a send that works stays
        assert [p.request_id for p in await network.pending()] == [kept.request_id]
    finally:
        await transport.aclose()


@pytest.mark.parametrize("collected", [True, False], ids=["collected", "not-collected"])
async def test_a_requeued_dead_letter_runs_again_although_its_caller_was_answered(
    transport: Transport, collected: bool
) -> None:
    # The operator's repair: the handler failed for good (the caller got
    # `failed`, the request was dead-lettered), the bug is fixed, the dead
    # letter is requeued. The ensemble acked it unrun (its caller answered
    # or gone): "requeued 1 of 1", and the work was deleted.
    fixed = asyncio.Event()
    runs: list[bool] = []
    ens = Ensemble("repair", transport=transport, concurrency=1, advertise=False)

    @ens.task("cook")
    async def cook(ctx: TaskContext) -> str:
        runs.append(fixed.is_set())
        if not fixed.is_set():
            raise PermanentTaskError("bug in cook")
        return "cooked"

    caller = Network(transport, caller="repair-desk", default_levels=1)
    queue = transport.request_queue("repair")
    async with ens.serving():
        handle = await caller.send("repair", "cook", {})
        if collected:
            assert (await handle.result(timeout=20)).status == "failed"
        deadline = asyncio.get_running_loop().time() + 20
        while not (dead_letters := await queue.dead_letters()):
            assert asyncio.get_running_loop().time() < deadline, "never dead-lettered"
            await asyncio.sleep(0.05)
        [dead] = dead_letters
        fixed.set()
        assert await queue.requeue_dead_letters([dead.request_id or ""]) == 1
        deadline = asyncio.get_running_loop().time() + 20
        while runs != [False, True]:
            assert asyncio.get_running_loop().time() < deadline, f"runs: {runs}"
            await asyncio.sleep(0.05)
    stats = await queue.stats()
    assert (stats.depth, stats.dead_lettered) == (0, 0)
    if not collected:  # the caller keeps the first answer; the new one cannot replace it
        assert (await handle.result(timeout=5)).status == "failed"


async def test_a_cancelled_re_send_under_a_live_id_keeps_the_first_registration(
    transport: Transport,
) -> None:
    # An idempotent re-send with the same request_id that timed out withdrew
    # the registration the first send made: its response was lost.
    network = Network(transport, caller="desk", default_levels=1)
    first = await network.send("kitchen", "cook", {}, request_id="order-0001")
    queue = network._queue("kitchen", 1)
    gate = asyncio.Event()
    original = queue.enqueue

    async def slow_enqueue(request: WorkRequest) -> WorkRequest:
        await gate.wait()
        return await original(request)

    queue.enqueue = slow_enqueue  # type: ignore[method-assign]
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await network.send("kitchen", "cook", {}, request_id="order-0001")
    queue.enqueue = original  # type: ignore[method-assign]
    assert [p.request_id for p in await network.pending()] == [first.request_id]
    await transport.delivery_registry("desk").complete(
        "order-0001", WorkResponse(request_id="order-0001", result="served")
    )
    assert (await first.result(timeout=5)).result == "served"


async def test_a_send_cancelled_before_its_request_was_stored_leaves_no_registration(
    tmp_path: Path,
) -> None:
    # A caller's timeout or a cancelled task is not a kill: cancelled between
    # register and enqueue, the registration stayed pending for the
    # registry's TTL (days), listed by pending() and never answered.
    from transport import connect

    transport = await connect(f"sqlite:///{tmp_path / 'cancel.db'}")
    try:
        network = Network(transport, caller="desk", default_levels=1)
        cancelled = 0
        for i in range(120):
            try:
                async with asyncio.timeout(0.0005 * (i % 8)):
                    await network.send("kitchen", "cook", i)
            except TimeoutError:
                cancelled += 1
        assert cancelled, "no send was cancelled: the scenario did not run"
        registered = {p.request_id for p in await network.pending()}
        queue = transport.request_queue("kitchen")
        stored = set()
        while (delivery := await queue.poll(0.2)) is not None:
            stored.add(delivery.request.request_id)
            await delivery.ack()
        assert registered - stored == set(), (
            f"{len(registered - stored)} registrations of requests never sent "
            f"({cancelled} of 120 sends cancelled)"
        )
    finally:
        await transport.aclose()


async def test_a_priority_for_an_ensemble_never_seen_names_default_levels(
    transport: Transport,
) -> None:
    # A caller started while the priority ensemble is down knows no levels:
    # the ValueError did not say why, nor what to do.
    network = Network(transport, caller="desk")
    with pytest.raises(ValueError, match=r"never saw them: pass Network\(default_levels=N\)"):
        await network.send("kitchen", "cook", priority=2)
    assert await network.pending() == []
    sized = Network(transport, caller="desk", default_levels=3)
    await sized.send("kitchen", "cook", priority=2)


def test_an_empty_task_name_is_refused_not_replaced_by_the_functions(
    transport: Transport,
) -> None:
    from transport import InvalidNameError

    ens = Ensemble("kitchen", transport=transport, advertise=False)
    with pytest.raises(InvalidNameError):

        @ens.task("")
        async def cook(ctx: TaskContext) -> None: ...


def _first(n: int) -> Callable[[], bool]:
    """True for the first ``n`` calls, then False."""
    left = [n]

    def down() -> bool:
        if left[0]:
            left[0] -= 1
            return True
        return False

    return down


class _Blip:
    """Makes ``obj.name`` (a coroutine method) raise TransientTransportError
    while ``down()`` says so, as in a broker outage; counts those calls."""

    def __init__(self, obj: Any, name: str, what: str, down: Callable[[], bool]) -> None:
        from transport import TransientTransportError

        self.failures = 0
        real = getattr(obj, name)

        async def call(*args: Any, **kwargs: Any) -> Any:
            if down():
                self.failures += 1
                raise TransientTransportError(f"broker unreachable (simulated {what})")
            return await real(*args, **kwargs)

        setattr(obj, name, call)


async def test_settling_that_fails_in_an_outage_is_tried_again_without_running_the_handler_again(
    transport: Transport, caplog: pytest.LogCaptureFixture
) -> None:
    """The broker unreachable around a handler: reading the caller's
    registration failed twice before it ran, recording the response three
    times after, then the ack twice. Each step is tried again under the
    kept lease (2 s here, outlived by the retries) instead of being left to
    the lease, which ran the handler again at attempt 2 (a job of hours, for
    a blip at its end) and answered from a redelivery. The outage is logged
    once at its start and once at its end per step."""
    from transport import TransientTransportError
    from transport._spi.metrics import InstrumentedRequestQueue, _InstrumentedDelivery

    ack_failures = 2

    class FlakyAck(_InstrumentedDelivery):
        async def ack(self) -> bool:
            nonlocal ack_failures
            if ack_failures:
                ack_failures -= 1
                raise TransientTransportError("broker unreachable (simulated ack)")
            return await super().ack()

    class FlakyQueue(InstrumentedRequestQueue):
        async def poll(self, timeout: float | None = None) -> Any:
            delivery = await self.inner.poll(timeout)
            return None if delivery is None else FlakyAck(delivery, InMemoryMetrics(), {})

    queue = FlakyQueue(transport.request_queue("blip"), InMemoryMetrics())
    runs: list[int] = []
    ens = Ensemble("blip", transport=transport, queue=queue, concurrency=1, advertise=False)

    @ens.task("work")
    async def work(ctx: TaskContext) -> str:
        runs.append(ctx.request.attempt)
        return "done"

    registry = ens._registry("blip-desk")
    complete = _Blip(registry, "_complete", "complete", _first(3))
    record = _Blip(registry, "record", "registration read", _first(2))
    inbox = transport.delivery_registry("blip-desk")
    request = WorkRequest(task="work", reply_to="blip-desk")
    pending = await inbox.register(request.request_id)
    await queue.enqueue(request)
    with caplog.at_level(logging.DEBUG, logger="transport.runtime"):
        async with ens:
            response = await pending.result(timeout=30)
            assert response.status == "completed" and response.result == "done"
            while ack_failures:  # noqa: ASYNC110 - the ack is retried in the background
                await asyncio.sleep(0.05)
    assert (record.failures, complete.failures, ack_failures) == (2, 3, 0)
    assert runs == [1], f"the handler ran at attempts {runs}"
    assert ens.counts["completed"] == 1 and ens.counts["duplicates"] == 0, ens.counts
    check = transport.request_queue("blip")
    assert await check.poll(0.5) is None, "the request was acked before close returned"
    await check.aclose()
    what = "ensemble blip: settling a request"
    said = [r for r in caplog.records if r.getMessage().startswith(what)]
    warnings = [r.getMessage() for r in said if r.levelno == logging.WARNING]
    assert len(warnings) == 6, warnings
    assert "simulated registration read" in warnings[0] and "(2 failed tries)" in warnings[1]
    assert "simulated complete" in warnings[2] and "works again" in warnings[3]
    assert "(3 failed tries)" in warnings[3]
    assert "simulated ack" in warnings[4] and "(2 failed tries)" in warnings[5]
    assert sum(r.levelno == logging.DEBUG for r in said) == 4


async def test_a_response_recorded_after_its_lease_ran_out_answers_the_redelivery(
    transport: Transport,
) -> None:
    """A long outage at the end of a handler: the response cannot be
    recorded, nor the lease extended, so the lease (2 s) runs out and the
    request is given out again, to another worker of the same process. The
    response is still recorded once the broker answers, and that delivery
    waits for it and is answered from it: the handler ran once. (In a 40 s
    NATS outage, three of four requests in flight ran a second time.)"""
    from transport import TransientTransportError
    from transport._spi.metrics import InstrumentedRequestQueue, _InstrumentedDelivery

    loop = asyncio.get_running_loop()
    down_until = [float("inf")]  # the outage starts when the handler returns

    class NoExtend(_InstrumentedDelivery):
        async def extend(self, seconds: Any = None) -> bool:
            if loop.time() < down_until[0]:
                raise TransientTransportError("broker unreachable (simulated extend)")
            return await super().extend(seconds)

    class Queue(InstrumentedRequestQueue):
        async def poll_many(self, max_count: int, timeout: float | None = None) -> Any:
            got = await self.inner.poll_many(max_count, timeout)
            return [NoExtend(d, InMemoryMetrics(), {}) for d in got]

    queue = Queue(transport.request_queue("long-blip"), InMemoryMetrics())
    runs: list[int] = []
    ens = Ensemble("long-blip", transport=transport, queue=queue, concurrency=2, advertise=False)

    @ens.task("work")
    async def work(ctx: TaskContext) -> str:
        runs.append(ctx.request.attempt)
        down_until[0] = loop.time() + 4.0  # twice the lease
        return "done"

    registry = ens._registry("long-desk")
    complete = _Blip(registry, "_complete", "complete", lambda: loop.time() < down_until[0])
    inbox = transport.delivery_registry("long-desk")
    request = WorkRequest(task="work", reply_to="long-desk")
    pending = await inbox.register(request.request_id)
    await queue.enqueue(request)
    async with ens:
        response = await pending.result(timeout=30)
        # The redelivery ends answered (a duplicate) or run again.
        async with asyncio.timeout(20):
            while ens.counts["duplicates"] + len(runs) < 2:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
    assert response.status == "completed" and response.result == "done"
    assert complete.failures >= 3, f"the outage outlived the lease: {complete.failures} failures"
    assert runs == [1], f"the handler ran at attempts {runs}"
    assert ens.counts["completed"] == 1 and ens.counts["duplicates"] == 1, ens.counts


async def test_a_stop_in_an_outage_releases_a_request_still_being_settled_after_the_grace(
    transport: Transport, caplog: pytest.LogCaptureFixture
) -> None:
    """Stopping while a finished request's response cannot be written: the
    retries get ``shutdown_grace``, then the request is released, and the
    log says why (it said "handler still running" of a handler long done)."""
    ens = Ensemble("stop-blip", transport=transport, concurrency=1, shutdown_grace=0.5)
    ran = asyncio.Event()

    @ens.task("work")
    async def work(ctx: TaskContext) -> str:
        ran.set()
        return "done"

    registry = ens._registry("stop-desk")
    complete = _Blip(registry, "_complete", "complete", lambda: True)
    inbox = transport.delivery_registry("stop-desk")
    request = WorkRequest(task="work", reply_to="stop-desk")
    await inbox.register(request.request_id)
    await transport.request_queue("stop-blip").enqueue(request)
    with caplog.at_level(logging.WARNING, logger="transport.runtime"):
        await ens.start()
        await asyncio.wait_for(ran.wait(), 20)
        while complete.failures < 2:  # noqa: ASYNC110 - retrying in the worker
            await asyncio.sleep(0.05)
        async with asyncio.timeout(10):
            await ens.aclose()
    said = [r.getMessage() for r in caplog.records]
    assert any("request still being settled" in m and "releasing it" in m for m in said), said
    assert not any("handler still running" in m for m in said), said


@pytest.mark.parametrize("how", ["cancelled during the grace", "left running"])
async def test_a_handler_cancelled_with_its_ensemble_is_given_back_uncounted(
    runtime_url: str, transport: Transport, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Two ways a stop gets cancelled, both seen with scripts: a second
    Ctrl-C under ``serving()`` cancels the close while it waits out the
    grace; ``asyncio.run`` ending with ``run()`` still a task cancels the
    workers before the close runs. Either way the running request came back
    at attempt 2 and the stop line said it had finished."""
    caplog.set_level(logging.INFO, logger="transport.runtime")
    started = asyncio.Event()
    first = Ensemble(
        "cut-short", transport=transport, concurrency=1, shutdown_grace=60, advertise=False
    )

    @first.task("work")
    async def stuck(ctx: TaskContext) -> str:
        started.set()
        await asyncio.Event().wait()  # runs until cancelled
        return "never"

    if how == "left running":
        running = asyncio.create_task(first.run(install_signal_handlers=False))
        pending = await Network(transport, caller="c8").send("cut-short", "work")
        async with asyncio.timeout(10):
            await started.wait()
        # As asyncio.run does at its end: every task cancelled at once.
        for task in (running, *first._workers):
            task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await running
    else:

        async def script() -> None:
            async with first.serving():
                await asyncio.Event().wait()  # until Ctrl-C

        in_grace = asyncio.Event()
        within_grace = first._within_grace

        async def waiting_out_the_grace(tasks: set[asyncio.Task[None]]) -> Any:
            in_grace.set()
            return await within_grace(tasks)

        first._within_grace = waiting_out_the_grace  # type: ignore[method-assign]
        running = asyncio.create_task(script())
        pending = await Network(transport, caller="c8").send("cut-short", "work")
        async with asyncio.timeout(10):
            await started.wait()
        running.cancel()  # the first Ctrl-C: the close waits out the 60 s grace
        async with asyncio.timeout(10):
            await in_grace.wait()
        running.cancel()  # the second one
        with pytest.raises(asyncio.CancelledError):
            await running
    assert first._closed
    [stopped] = [r.getMessage() for r in caplog.records if " stopped: " in r.getMessage()]
    assert "1 in flight at stop, 0 finished, 1 released for redelivery" in stopped, stopped
    second = Ensemble("cut-short", transport=transport, concurrency=1, advertise=False)

    @second.task("work")
    async def quick(ctx: TaskContext) -> int:
        return ctx.attempt

    async with second:
        response = await pending.result(timeout=20)
    assert (response.status, response.result) == ("completed", 1)
