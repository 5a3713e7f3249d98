"""Conformance scenarios for the registries (TESTING.md 17, 18)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import pytest

from transport import (
    Capability,
    CapabilityChange,
    DeliveryTimeoutError,
    Transport,
    UnknownDeliveryError,
    WorkResponse,
)
from transport.kit import wait_within
from transport.testing.harness import BackendHarness

pytestmark = [pytest.mark.conformance, pytest.mark.asyncio]


def _response(request_id: str, **kw: Any) -> WorkResponse:
    return WorkResponse(request_id=request_id, result={"for": request_id, **kw})


class DeliveryRegistryConformance:
    async def test_concurrent_requests_matched_to_out_of_order_responses(
        self, transport: Transport, queue_name: str, harness: BackendHarness, make_transport: Any
    ) -> None:
        caller = transport.delivery_registry(queue_name)
        ids = [f"req-{i}" for i in range(100)]
        pending = await asyncio.gather(*(caller.register(i) for i in ids))
        worker = (await make_transport()).delivery_registry(queue_name)
        order = ids[:]
        random.shuffle(order)

        async def complete_all() -> None:
            for n, rid in enumerate(order):
                assert await worker.complete(rid, _response(rid)), (
                    f"complete({rid!r}) returned False after {n} completions: "
                    "the second client did not find its registration"
                )

        # A completion that fails (False or an error) fails the test at once,
        # saying so, instead of leaving the collectors to time out.
        completer = asyncio.ensure_future(complete_all())
        collecting = asyncio.gather(*(p.result(harness.scaled(30)) for p in pending))
        try:
            results, _ = await asyncio.gather(collecting, completer)
        finally:
            collecting.cancel()
            completer.cancel()
        assert [r.request_id for r in results] == ids
        assert all(r.result == {"for": r.request_id} for r in results)

    async def test_timeout_gives_clear_error_and_record_stays(
        self, transport: Transport, queue_name: str, harness: BackendHarness
    ) -> None:
        registry = transport.delivery_registry(queue_name)
        pending = await registry.register("slow-1")
        with pytest.raises(DeliveryTimeoutError) as info:
            await pending.result(timeout=0.2)
        assert "slow-1" in str(info.value)
        assert [p.request_id for p in await registry.pending()] == ["slow-1"]
        assert await registry.complete("slow-1", _response("slow-1"))
        response = await pending.result(harness.scaled(10))
        assert response.result == {"for": "slow-1"}

    async def test_late_and_duplicate_completions_are_harmless(
        self, transport: Transport, queue_name: str, harness: BackendHarness
    ) -> None:
        registry = transport.delivery_registry(queue_name)
        pending = await registry.register("dup-1")
        assert await registry.complete("dup-1", _response("dup-1", n=1)) is True
        assert await registry.complete("dup-1", _response("dup-1", n=2)) is False
        first = await pending.result(harness.scaled(10))
        assert first.result == {"for": "dup-1", "n": 1}
        assert await registry.complete("dup-1", _response("dup-1", n=3)) is False
        assert await pending.result(0.1) == first  # same answer again
        assert [p.request_id for p in await registry.pending()] == []
        with pytest.raises(UnknownDeliveryError):
            await registry.wait("dup-1")

    async def test_mismatched_response_is_rejected(
        self, transport: Transport, queue_name: str
    ) -> None:
        registry = transport.delivery_registry(queue_name)
        await registry.register("a-1")
        with pytest.raises(ValueError):
            await registry.complete("a-1", _response("b-1"))

    async def test_completion_from_another_client_wakes_the_waiter(
        self, transport: Transport, queue_name: str, harness: BackendHarness, make_transport: Any
    ) -> None:
        caller = transport.delivery_registry(queue_name)
        pending = await caller.register("x-1")
        waiter = asyncio.create_task(pending.result(harness.scaled(20)))
        worker = (await make_transport()).delivery_registry(queue_name)
        assert await worker.complete("x-1", _response("x-1"))
        response = await waiter
        assert response.request_id == "x-1"

    async def test_caller_restart_reattaches_and_gets_responses_that_arrived_while_down(
        self, harness: BackendHarness, queue_name: str, make_transport: Any
    ) -> None:
        before = await make_transport()
        registry = before.delivery_registry(queue_name)
        for rid in ("r-1", "r-2", "r-3"):
            await registry.register(rid)
        await before.aclose()  # the caller goes down with three requests pending
        worker = (await make_transport()).delivery_registry(queue_name)
        assert await worker.complete("r-1", _response("r-1"))
        assert await worker.complete("r-2", _response("r-2"))
        after = (await make_transport()).delivery_registry(queue_name)
        pending = {p.request_id: p for p in await after.pending()}
        assert set(pending) == {"r-1", "r-2", "r-3"}
        assert (await pending["r-1"].result(harness.scaled(10))).result == {"for": "r-1"}
        assert (await (await after.wait("r-2")).result(harness.scaled(10))).result == {"for": "r-2"}
        late = asyncio.create_task(pending["r-3"].result(harness.scaled(20)))
        assert await worker.complete("r-3", _response("r-3"))
        assert (await late).result == {"for": "r-3"}

    async def test_a_discarded_registration_is_gone_for_every_client(
        self, harness: BackendHarness, queue_name: str, make_transport: Any
    ) -> None:
        """``discard``: a registration whose request was not sent after all
        (``Network.send`` withdraws it when its enqueue fails)."""
        registry = (await make_transport()).delivery_registry(queue_name)
        waiting = await registry.register("d-1")
        await registry.register("d-2")
        collector = asyncio.create_task(waiting.result(harness.scaled(20)))
        await asyncio.sleep(0)  # let it start waiting (woken by discard, or finding it gone)
        assert await registry.discard("d-1") is True
        with pytest.raises(UnknownDeliveryError):
            await collector
        assert await registry.discard("d-1") is False  # gone already
        assert [p.request_id for p in await registry.pending()] == ["d-2"]
        worker = (await make_transport()).delivery_registry(queue_name)
        assert await worker.complete("d-1", _response("d-1")) is False  # nobody awaits it
        after = (await make_transport()).delivery_registry(queue_name)
        assert [p.request_id for p in await after.pending()] == ["d-2"]

    async def test_a_response_collected_by_two_clients_at_once_goes_to_one(
        self, harness: BackendHarness, queue_name: str, make_transport: Any
    ) -> None:
        """Two processes attached to one registry (an overlapping restart,
        two replicas of one caller) collect the same responses at once: each
        goes to one of them, the other gets ``UnknownDeliveryError``. Where
        the keyed log cannot claim atomically (``atomic_claims`` false:
        Kafka, Pulsar) both may get it (README limit)."""
        first = (await make_transport()).delivery_registry(queue_name)
        second = (await make_transport()).delivery_registry(queue_name)
        ids = [f"both-{i}" for i in range(5)]
        for rid in ids:
            await first.register(rid)
        handles = [await first.wait(rid) for rid in ids] + [await second.wait(rid) for rid in ids]
        collecting = [
            asyncio.ensure_future(handle.result(harness.scaled(20))) for handle in handles
        ]
        worker = (await make_transport()).delivery_registry(queue_name)
        for rid in ids:
            assert await worker.complete(rid, _response(rid))
        outcomes = await asyncio.gather(*collecting, return_exceptions=True)
        atomic = first._log.atomic_claims
        for i, rid in enumerate(ids):
            pair = (outcomes[i], outcomes[i + len(ids)])
            got = [o for o in pair if isinstance(o, WorkResponse)]
            assert all(o.request_id == rid for o in got)
            assert all(isinstance(o, WorkResponse | UnknownDeliveryError) for o in pair), pair
            if atomic:
                assert len(got) == 1, (rid, pair)
            else:
                assert got, (rid, pair)
        after = (await make_transport()).delivery_registry(queue_name)
        assert await after.pending() == []  # nothing left behind by either

    async def test_taken_entries_never_return(
        self, harness: BackendHarness, queue_name: str, make_transport: Any
    ) -> None:
        first = (await make_transport()).delivery_registry(queue_name)
        pending = await first.register("t-1")
        await first.complete("t-1", _response("t-1"))
        await pending.result(harness.scaled(10))
        assert await first.complete("t-1", _response("t-1", late=True)) is False
        again = (await make_transport()).delivery_registry(queue_name)
        assert [p.request_id for p in await again.pending()] == []
        with pytest.raises(UnknownDeliveryError):
            await again.wait("t-1")
        assert await again.complete("t-1", _response("t-1", later=True)) is False

    async def test_a_collected_response_leaves_nothing_and_a_restart_replays_what_is_live(
        self,
        harness: BackendHarness,
        queue_name: str,
        make_transport: Any,
        monkeypatch: pytest.MonkeyPatch,
    ) -> None:
        """300 requests answered, 290 collected: a caller starting afterwards
        reads the 10 live entries and what changed since the last
        checkpoint, not the history of 1,200 writes (registrations,
        responses and their deletions)."""
        from transport._spi import registries

        monkeypatch.setattr(registries, "_CHECKPOINT_EVERY", 100)
        monkeypatch.setattr(registries, "_FORGET_AFTER", 0.0)
        caller = (await make_transport()).delivery_registry(queue_name)
        ids = [f"h-{i:03d}" for i in range(300)]
        pending = [await caller.register(rid) for rid in ids]
        for rid in ids:
            assert await caller.complete(rid, _response(rid))
        for handle in pending[:290]:
            await handle.result(harness.scaled(10))
        assert await caller.complete(ids[0], _response(ids[0], late=True)) is False
        assert sorted(r.request_id for r in await caller.records()) == ids[290:]
        # The caller's view does its background upkeep (checkpoints of a log
        # that keeps history, removal of kept tombstones) once it has seen
        # the 1,180 writes: wait for it.
        async with asyncio.timeout(harness.scaled(60)):
            await caller._view.settled(300 + 300 + 290 * 2)

        replayed: list[str] = []
        fresh = (await make_transport()).delivery_registry(queue_name)
        probe = registries._LogView(fresh._log, lambda key, value: replayed.append(key), "probe")
        try:
            await probe.ready()
        finally:
            await probe.aclose()
        # At most: the records live at the last checkpoint (the 20 live now,
        # plus those deleted by the 100 changes after it), and those changes.
        assert len(replayed) <= 20 + 2 * 100 + 10, (
            f"a restart replayed {len(replayed)} changes for 10 live entries"
        )
        assert sorted(p.request_id for p in await fresh.pending()) == ids[290:]
        with pytest.raises(UnknownDeliveryError):
            await fresh.wait(ids[0])
        response = await (await fresh.wait(ids[295])).result(harness.scaled(10))
        assert response.result == {"for": ids[295]}

    async def test_records_of_an_earlier_release_are_still_served(
        self, harness: BackendHarness, queue_name: str, make_transport: Any
    ) -> None:
        """Registries written before the registration/response split (one
        record per request under its bare id, ``taken`` markers) keep
        working: pending ones complete, completed ones are collected once,
        collected ones stay collected."""
        from transport._spi.registries import DeliveryRecord
        from transport.kit import encode, utcnow

        writer = (await make_transport()).delivery_registry(queue_name)
        now = utcnow()
        later = now + timedelta(hours=1)
        for record in (
            DeliveryRecord(request_id="old-1", state="pending", created_at=now, expires_at=later),
            DeliveryRecord(
                request_id="old-2",
                state="completed",
                response=_response("old-2"),
                created_at=now,
                expires_at=later,
            ),
            DeliveryRecord(request_id="old-3", state="taken", created_at=now, expires_at=later),
        ):
            await writer._log.put(record.request_id, encode(record))
        caller = (await make_transport()).delivery_registry(queue_name)
        assert sorted(p.request_id for p in await caller.pending()) == ["old-1", "old-2"]
        worker = (await make_transport()).delivery_registry(queue_name)
        assert await worker.complete("old-3", _response("old-3")) is False
        assert await worker.complete("old-2", _response("old-2", again=True)) is False
        assert await worker.complete("old-1", _response("old-1"))
        first = await (await caller.wait("old-1")).result(harness.scaled(10))
        assert first.result == {"for": "old-1"}
        second = await (await caller.wait("old-2")).result(harness.scaled(10))
        assert second.result == {"for": "old-2"}
        assert await worker.complete("old-1", _response("old-1", late=True)) is False
        again = (await make_transport()).delivery_registry(queue_name)
        assert [p.request_id for p in await again.pending()] == []
        with pytest.raises(UnknownDeliveryError):
            await again.wait("old-3")


async def _next_change(
    changes: AsyncIterator[CapabilityChange], timeout: float, kind: str, name: str
) -> CapabilityChange:
    async def find() -> CapabilityChange:
        async for change in changes:
            if change.kind == kind and change.name == name:
                return change
        raise AssertionError("watch ended")

    return await wait_within(find(), timeout)


class CapabilityRegistryConformance:
    async def test_advertise_lookup_update_withdraw(
        self, transport: Transport, queue_name: str, harness: BackendHarness
    ) -> None:
        registry = transport.capability_registry()
        cap = Capability(
            name=queue_name, kind="task", ensemble="kitchen", description="v1", queue="kitchen"
        )
        stamped = await registry.advertise(cap)
        assert stamped.expires_at is not None
        [found] = await registry.lookup(queue_name)
        assert (found.ensemble, found.description, found.queue) == ("kitchen", "v1", "kitchen")
        await registry.advertise(cap.model_copy(update={"description": "v2"}))
        [found] = await registry.lookup(queue_name)
        assert found.description == "v2"
        await registry.advertise(Capability(name=queue_name, kind="tool", ensemble="bakery"))
        assert [c.ensemble for c in await registry.lookup(queue_name)] == ["bakery", "kitchen"]
        await registry.withdraw("kitchen", queue_name)
        assert [c.ensemble for c in await registry.lookup(queue_name)] == ["bakery"]
        assert queue_name in {c.name for c in await registry.all()}

    async def test_visible_to_other_clients_and_after_restart(
        self, harness: BackendHarness, queue_name: str, make_transport: Any
    ) -> None:
        observer = (await make_transport()).capability_registry()
        changes = observer.watch()
        first_change = asyncio.ensure_future(
            _next_change(changes, harness.scaled(20), "advertised", queue_name)
        )
        await asyncio.sleep(0)  # let the watch start before advertising
        provider_client = await make_transport()
        await provider_client.capability_registry().advertise(
            Capability(name=queue_name, ensemble="provider"), lease=timedelta(minutes=5)
        )
        change = await first_change
        assert change.capability is not None and change.capability.ensemble == "provider"
        await provider_client.aclose()
        restarted = (await make_transport()).capability_registry()
        assert [c.ensemble for c in await restarted.lookup(queue_name)] == ["provider"]
        await changes.aclose()

    async def test_lease_expiry_removes_silent_providers(
        self, transport: Transport, queue_name: str, harness: BackendHarness
    ) -> None:
        registry = transport.capability_registry()
        changes = registry.watch()
        await registry.advertise(Capability(name=queue_name, ensemble="fleeting"), lease=0.5)
        advertised = await _next_change(changes, harness.scaled(10), "advertised", queue_name)
        assert advertised.capability is not None
        expired = await _next_change(changes, harness.scaled(10), "expired", queue_name)
        assert expired.ensemble == "fleeting"
        assert await registry.lookup(queue_name) == []
        await changes.aclose()

    async def test_a_new_registry_reports_the_state_it_loads_not_the_history(
        self, harness: BackendHarness, queue_name: str, make_transport: Any
    ) -> None:
        # An earlier run advertised and withdrew; another advertisement is
        # live. A registry made now (a replica starting) reports the live
        # one, not the earlier run's changes: on a log that replays its
        # history (Kafka), the new replica's watch yielded that old
        # withdrawal as if it had just happened.
        writer = (await make_transport()).capability_registry()
        await writer.advertise(Capability(name=queue_name, ensemble="gone"), lease=300)
        await writer.withdraw("gone", queue_name)
        await writer.advertise(Capability(name=queue_name, ensemble="live"), lease=300)
        fresh = (await make_transport()).capability_registry()
        changes = fresh.watch()  # before the registry has loaded its state, on most backends

        async def until_marker() -> list[tuple[str, str]]:
            seen: list[tuple[str, str]] = []
            async for change in changes:
                if change.name != queue_name:
                    continue
                if change.ensemble == "marker":
                    return seen
                seen.append((change.kind, change.ensemble))
            raise AssertionError("watch ended")

        collecting = asyncio.ensure_future(wait_within(until_marker(), harness.scaled(20)))
        await asyncio.sleep(0)  # the watch starts (and its load) before the marker
        await writer.advertise(Capability(name=queue_name, ensemble="marker"), lease=300)
        seen = await collecting
        # Nothing of the earlier run; the live advertisement once, or not at
        # all where the registry had its state loaded when watch() was called
        # (then it existed before the call).
        assert seen in ([("advertised", "live")], []), seen
        assert [c.ensemble for c in await fresh.lookup(queue_name)] == ["live", "marker"]
        await changes.aclose()

    async def test_watch_sees_advertise_and_withdraw(
        self, transport: Transport, queue_name: str, harness: BackendHarness
    ) -> None:
        registry = transport.capability_registry()
        changes = registry.watch()
        await registry.advertise(Capability(name=queue_name, ensemble="e1"))
        await _next_change(changes, harness.scaled(10), "advertised", queue_name)
        await registry.withdraw("e1", queue_name)
        gone = await _next_change(changes, harness.scaled(10), "withdrawn", queue_name)
        assert gone.ensemble == "e1"
        await changes.aclose()
