"""``sqlite://`` batching: concurrent enqueues share one INSERT, concurrent
polls one leasing round; each caller still sees exactly its own outcome."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from transport import WorkRequest, WorkResponse, connect
from transport.kit import SqliteStore
from transport_inprocess.sqlite import _queue as sqlite_queue


async def test_concurrent_enqueues_keep_order_and_concurrent_polls_lease_distinct_rows(
    tmp_path: Path,
) -> None:
    transport = await connect(f"sqlite:///{tmp_path / 'b.db'}")
    try:
        queue = transport.request_queue("q")
        requests = [WorkRequest(task="t", payload=i) for i in range(60)]
        # Submitted together: they end up in one group commit, in this order.
        stored = await asyncio.gather(*(queue.enqueue(r) for r in requests))
        assert [s.request_id for s in stored] == [r.request_id for r in requests]
        assert all(s.enqueued_at is not None for s in stored)

        deliveries = await asyncio.gather(*(queue.poll(5) for _ in range(40)))
        assert all(d is not None for d in deliveries)
        got = [d.request.payload for d in deliveries if d is not None]
        assert sorted(got) == list(range(40))  # the 40 oldest, each once
        assert len({d._token for d in deliveries if d is not None}) == 40

        first = deliveries[0]
        assert first is not None
        assert await first.nack()
        acks = await asyncio.gather(*(d.ack() for d in deliveries[1:] if d is not None))
        assert acks == [True] * 39
        assert await first.ack() is False  # already given back: its lease is gone
        assert not any(await asyncio.gather(*(d.ack() for d in deliveries[1:] if d is not None)))

        rest = await asyncio.gather(*(queue.poll(5) for _ in range(21)))
        payloads = [d.request.payload for d in rest if d is not None]
        assert sorted(payloads) == [0, *range(40, 60)]
        again = next(d for d in rest if d is not None and d.request.payload == 0)
        assert again.request.attempt == 2
        assert all(await asyncio.gather(*(d.ack() for d in rest if d is not None)))
        stats = await queue.stats()
        assert stats.depth == 0 and stats.in_flight == 0
    finally:
        await transport.aclose()


async def test_ack_many_settles_rows_of_several_leasing_rounds_and_refuses_stale_ones(
    tmp_path: Path,
) -> None:
    transport = await connect(f"sqlite:///{tmp_path / 'b.db'}")
    try:
        queue = transport.request_queue("q")
        other = transport.request_queue("other")
        for i in range(6):
            await queue.enqueue(WorkRequest(task="t", payload=i))
        await other.enqueue(WorkRequest(task="t", payload="elsewhere"))
        first = await queue.poll_many(3, 5)  # one leasing round
        second = await queue.poll_many(3, 5)  # another: other tokens
        foreign = await other.poll(5)
        assert len(first) == 3 and len(second) == 3 and foreign is not None
        stale = second[1]
        assert await stale.nack()  # given back: its lease is gone
        again = await queue.poll(5)  # and leased anew (a third round)
        assert again is not None and again.request.payload == stale.request.payload

        results = await queue.ack_many([*first, foreign, *second, first[0]])
        assert results == [True, True, True, True, True, False, True, False]  # once each
        assert await again.ack()  # the stale ack took nothing from its new holder
        assert await queue.ack_many(first) == [False, False, False]  # already settled
        for q in (queue, other):
            stats = await q.stats()
            assert stats.depth == 0 and stats.in_flight == 0
    finally:
        await transport.aclose()


async def test_two_concurrent_acks_of_one_delivery_take_effect_once(tmp_path: Path) -> None:
    transport = await connect(f"sqlite:///{tmp_path / 'b.db'}")
    try:
        queue = transport.request_queue("q")
        await queue.enqueue(WorkRequest(task="t"))
        delivery = await queue.poll(5)
        assert delivery is not None
        # Submitted in one iteration: they share one combined DELETE.
        results = await asyncio.gather(delivery.ack(), delivery.ack())
        assert sorted(results) == [False, True]
    finally:
        await transport.aclose()


@pytest.mark.parametrize("returning", [True, False], ids=["returning", "sqlite-before-3.35"])
async def test_a_stale_and_a_current_ack_of_one_row_in_one_call_credit_the_current_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, returning: bool
) -> None:
    monkeypatch.setattr(sqlite_queue, "_RETURNING", returning)
    transport = await connect(f"sqlite:///{tmp_path / 'b.db'}")
    try:
        queue = transport.request_queue("q")
        for settle in ("ack_many", "gather"):
            await queue.enqueue(WorkRequest(task="t", payload=settle))
            stale = await queue.poll(5)
            assert stale is not None
            assert await stale.nack()  # its lease is gone; the row is leased anew
            fresh = await queue.poll(5)
            assert fresh is not None and fresh.request.payload == stale.request.payload
            if settle == "ack_many":
                results = await queue.ack_many([stale, fresh])
            else:  # two acks of one iteration share one combined DELETE
                results = list(await asyncio.gather(stale.ack(), fresh.ack()))
            assert results == [False, True], settle
        stats = await queue.stats()
        assert stats.depth == 0 and stats.in_flight == 0
    finally:
        await transport.aclose()


async def test_only_leases_commit_without_their_own_fsync(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    levels: list[tuple[str, str]] = []  # (what the transaction held, its commit level)
    original = SqliteStore._write_group

    def spy(self: SqliteStore, conn: sqlite3.Connection, ops: list[Any]) -> None:
        original(self, conn, ops)
        names = {getattr(getattr(op.fn, "func", op.fn), "__name__", "") for op in ops}
        what = "lease" if names == {"_lease_op"} else "other"
        levels.append((what, self._level))

    monkeypatch.setattr(SqliteStore, "_write_group", spy)
    transport = await connect(f"sqlite:///{tmp_path / 'b.db'}")  # synchronous=FULL
    try:
        queue = transport.request_queue("q")
        registry = transport.delivery_registry("caller")
        await registry.register("r1")
        await queue.enqueue(WorkRequest(task="t", request_id="r1", reply_to="caller"))
        delivery = await queue.poll(5)
        assert delivery is not None
        await registry.complete("r1", WorkResponse(request_id="r1"))
        assert await delivery.ack()
    finally:
        await transport.aclose()
    assert ("lease", "NORMAL") in levels
    assert all(level == "FULL" for what, level in levels if what == "other"), levels
    assert all(level == "NORMAL" for what, level in levels if what == "lease"), levels


async def test_a_poll_after_the_last_ready_request_asks_with_a_read_not_a_write(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A lease that took everything ready says so: the next poll (a worker
    going back for more) reads first instead of opening a write transaction
    that leases nothing and holds up the other writers of the file."""
    transport = await connect(f"sqlite:///{tmp_path / 'b.db'}")
    try:
        queue = transport.request_queue("q")
        for i in range(3):
            await queue.enqueue(WorkRequest(task="t", payload=i))
        leases: list[int] = []
        original = sqlite_queue.SqliteRequestQueue._lease_op

        def counting(self: Any, conn: sqlite3.Connection, limit: int, **kw: Any) -> Any:
            out = original(self, conn, limit, **kw)
            leases.append(len(out[0] if isinstance(out, tuple) else out))
            return out

        monkeypatch.setattr(sqlite_queue.SqliteRequestQueue, "_lease_op", counting)
        first = await queue.poll_many(2, 5)  # two of three: more are ready
        second = await queue.poll(5)  # leases straight away: the last one
        assert len(first) == 2 and second is not None
        assert await queue.poll(0.05) is None  # drained: no write transaction
        assert leases == [2, 1]
        await queue.enqueue(WorkRequest(task="t", payload=3))  # and it still sees new work
        late = await queue.poll(5)
        assert late is not None and late.request.payload == 3
        assert leases == [2, 1, 1]
        assert all(await queue.ack_many([*first, second, late]))
    finally:
        await transport.aclose()
