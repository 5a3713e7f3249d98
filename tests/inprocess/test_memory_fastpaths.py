"""``memory://`` fast paths: requests this backend encoded itself are parsed
without re-validation (same result as ``decode``), and settled leases do not
leave their timers behind."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta, timezone

from transport import WorkRequest, connect, decode, encode
from transport._spi.models import replace_fields
from transport_inprocess import MemoryRequestQueue, reset_memory
from transport_inprocess._memory import _decode_own


def _same(a: WorkRequest, b: WorkRequest) -> None:
    assert a == b
    assert a.__dict__ == b.__dict__
    assert list(a.__dict__) == list(b.__dict__)
    assert a.model_fields_set == b.model_fields_set
    for key in ("enqueued_at", "deadline"):
        x, y = getattr(a, key), getattr(b, key)
        assert (x is None) == (y is None)
        if x is not None:
            assert x.utcoffset() == y.utcoffset()
            assert type(x.tzinfo) is type(y.tzinfo)


def test_own_encodings_decode_exactly_as_decode_does() -> None:
    cases = [
        WorkRequest(task="t"),
        WorkRequest(
            task="work",
            payload={"a": [1, 2.5, None, True, "x"], "big": 2**70, "nested": {"k": []}},
            reply_to="caller-1",
            priority=9,
            headers={"traceparent": "00-abc-def-01", "x-key": "v"},
            deadline=datetime(2030, 1, 2, 3, 4, 5, 678, tzinfo=timezone(timedelta(hours=2))),
            attempt=4,
            ordering_key="tenant/ü 7",
        ),
        replace_fields(WorkRequest(task="t", payload="s"), enqueued_at=datetime.now(UTC)),
        WorkRequest(task="t", enqueued_at=datetime(2026, 1, 1, 12, 0)),  # naive: taken as UTC
    ]
    for request in cases:
        data = encode(request)
        _same(_decode_own(data), decode(WorkRequest, data))


async def test_deliveries_do_not_share_mutable_state_with_the_producer() -> None:
    name = f"fast-{uuid.uuid4().hex[:8]}"
    transport = await connect(f"memory://{name}")
    try:
        queue = transport.request_queue("q")
        payload = {"items": [1, 2]}
        headers = {"h": "1"}
        await queue.enqueue(WorkRequest(task="t", payload=payload, headers=headers))
        payload["items"].append(3)
        delivery = await queue.poll(1)
        assert delivery is not None
        assert delivery.request.payload == {"items": [1, 2]}
        delivery.request.payload["items"].append(99)
        delivery.request.headers["h"] = "changed"
        assert await delivery.nack()
        again = await queue.poll(1)
        assert again is not None and again.attempt == 2
        assert again.request.payload == {"items": [1, 2]}
        assert again.request.headers == {"h": "1"}
        assert await again.ack()
    finally:
        await transport.aclose()
        reset_memory(name)


class _Annotated(WorkRequest):
    note: str = "extra"


async def test_a_request_subclass_is_delivered_as_a_plain_work_request() -> None:
    name = f"fast-{uuid.uuid4().hex[:8]}"
    transport = await connect(f"memory://{name}")
    try:
        queue = transport.request_queue("q")
        await queue.enqueue(_Annotated(task="t", payload=1))
        delivery = await queue.poll(1)
        assert delivery is not None
        assert type(delivery.request) is WorkRequest
        assert "note" not in delivery.request.__dict__
        assert delivery.request.payload == 1
        assert await delivery.ack()
    finally:
        await transport.aclose()
        reset_memory(name)


async def test_settled_leases_do_not_leave_their_timers_behind() -> None:
    name = f"fast-{uuid.uuid4().hex[:8]}"
    transport = await connect(f"memory://{name}")
    try:
        queue = transport.request_queue("q", lease_seconds=3600)
        assert isinstance(queue, MemoryRequestQueue)
        for _ in range(1000):
            await queue.enqueue(WorkRequest(task="t"))
        held = []
        for i in range(1000):
            delivery = await queue.poll(1)
            assert delivery is not None
            if i % 100 == 0:
                held.append(delivery)  # still in flight
            else:
                assert await delivery.ack()
        state = queue._state
        assert len(state.inflight) == 10
        assert len(state.leases) <= 4 * len(state.inflight) + 64
        # The leases still held keep their timers: they expire and come back.
        assert {token for _, token in state.leases} >= set(state.inflight)
        for delivery in held:
            assert await delivery.extend(0.01)
        back = []
        for _ in held:
            delivery = await queue.poll(5)
            assert delivery is not None and delivery.attempt == 2
            back.append(delivery.request.request_id)
            assert await delivery.ack()
        assert sorted(back) == sorted(d.request.request_id for d in held)
        for delivery in held:
            assert await delivery.ack() is False
    finally:
        await transport.aclose()
        reset_memory(name)
