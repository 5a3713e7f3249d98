"""``memory://`` as the test double: deliveries are decoded from the stored
bytes through the same models as every backend (no state shared with the
producer), and settled leases do not leave their timers behind."""

from __future__ import annotations

import uuid

from transport import WorkRequest, connect
from transport_inprocess import MemoryRequestQueue, reset_memory


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
