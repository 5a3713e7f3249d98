"""RequestQueue.enqueue_many's default path (the one third-party backends
and Kafka, NATS, Pulsar and Redis use): bounded in flight, no store started
after a failure, the first error raised once those in flight have ended."""

from __future__ import annotations

import asyncio

import pytest

from transport import RequestQueue, TransientTransportError, WorkRequest, connect
from transport._spi.queue import ENQUEUE_WINDOW
from transport_inprocess.memory._queue import MemoryRequestQueue

pytestmark = pytest.mark.asyncio


class _DefaultPath(MemoryRequestQueue):
    """memory:// with the base class's _store_requests, each store yielding
    once so that concurrent stores overlap, in flight counted."""

    _store_requests = RequestQueue._store_requests
    in_flight = 0
    most = 0
    fail_task: str | None = None
    started = 0

    async def _store_request(self, request: WorkRequest, body: bytes) -> None:
        cls = type(self)
        cls.started += 1
        cls.in_flight += 1
        cls.most = max(cls.most, cls.in_flight)
        try:
            await asyncio.sleep(0)  # let the other stores of the window start
            if request.task == cls.fail_task:
                raise TransientTransportError("broker said no")
            await super()._store_request(request, body)
        finally:
            cls.in_flight -= 1


async def _default_path_queue(name: str) -> _DefaultPath:
    transport = await connect(f"memory://{name}")
    plain = transport.request_queue("q")
    inner = plain.inner if hasattr(plain, "inner") else plain
    assert isinstance(inner, MemoryRequestQueue)
    inner.__class__ = _DefaultPath
    _DefaultPath.in_flight = _DefaultPath.most = _DefaultPath.started = 0
    _DefaultPath.fail_task = None
    return inner  # type: ignore[return-value]


async def test_a_large_call_keeps_at_most_the_window_in_flight_and_stores_all() -> None:
    queue = await _default_path_queue("em-window")
    count = 3 * ENQUEUE_WINDOW + 7
    stored = await queue.enqueue_many(WorkRequest(task="t", payload=i) for i in range(count))
    assert [r.payload for r in stored] == list(range(count))
    assert 1 < _DefaultPath.most <= ENQUEUE_WINDOW, _DefaultPath.most
    got = await queue.poll_many(count + 1, 1)
    assert sorted(d.request.payload for d in got) == list(range(count))


async def test_every_store_is_attempted_and_the_first_error_raised_after() -> None:
    queue = await _default_path_queue("em-error")
    _DefaultPath.fail_task = "bad"
    batch = [WorkRequest(task="t", payload=i) for i in range(5)]
    batch.insert(2, WorkRequest(task="bad", payload="x"))
    with pytest.raises(TransientTransportError, match="broker said no"):
        await queue.enqueue_many(batch)
    assert _DefaultPath.in_flight == 0, "raised before every store had ended"
    got = await queue.poll_many(10, 1)
    assert sorted(d.request.payload for d in got) == [0, 1, 2, 3, 4]


async def test_after_a_failure_no_further_store_starts() -> None:
    """A broker that is down fails every store after its timeout: a call of
    many windows must wait out one timeout, not one per window."""
    queue = await _default_path_queue("em-stop")
    _DefaultPath.fail_task = "t"
    count = 4 * ENQUEUE_WINDOW
    with pytest.raises(TransientTransportError):
        await queue.enqueue_many(WorkRequest(task="t", payload=i) for i in range(count))
    assert _DefaultPath.started <= 2 * ENQUEUE_WINDOW, _DefaultPath.started
    assert _DefaultPath.in_flight == 0
