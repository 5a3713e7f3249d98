"""Unit tests of the delivery-report bridge (no broker): reports resolve
their callers in batches, and a report that never comes fails its caller
instead of hanging it."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from confluent_kafka import KafkaError

from transport.errors import PermanentTransportError, TransientTransportError
from transport_kafka._client import _Pace, _Reports


class _Msg:
    def __init__(self, partition: int, offset: int) -> None:
        self._p, self._o = partition, offset

    def partition(self) -> int:
        return self._p

    def offset(self) -> int:
        return self._o


async def test_reports_from_another_thread_resolve_their_futures() -> None:
    loop = asyncio.get_running_loop()
    reports = _Reports(loop, bound=30.0)
    futures: list[asyncio.Future[tuple[int, int]]] = [loop.create_future() for _ in range(50)]
    for future in futures:
        reports.watch(future, "test")

    def producer_thread() -> None:
        for i, future in enumerate(futures):
            reports.add(future, None, _Msg(0, i), "test")

    thread = threading.Thread(target=producer_thread)
    thread.start()
    results = await asyncio.gather(*futures)
    thread.join()
    assert results == [(0, i) for i in range(50)]


async def test_a_failed_report_raises_the_mapped_error() -> None:
    loop = asyncio.get_running_loop()
    reports = _Reports(loop, bound=30.0)
    future: asyncio.Future[tuple[int, int]] = loop.create_future()
    reports.watch(future, "test")
    reports.add(future, KafkaError(KafkaError.TOPIC_AUTHORIZATION_FAILED), None, "test")
    with pytest.raises(PermanentTransportError):
        await future


async def test_a_report_that_never_comes_fails_the_waiter() -> None:
    loop = asyncio.get_running_loop()
    reports = _Reports(loop, bound=0.05)
    done: asyncio.Future[tuple[int, int]] = loop.create_future()
    lost: asyncio.Future[tuple[int, int]] = loop.create_future()
    reports.watch(done, "first")
    reports.watch(lost, "second")
    reports.add(done, None, _Msg(0, 7), "first")
    assert await done == (0, 7)
    with pytest.raises(TransientTransportError, match="second: no delivery report"):
        await lost
    # A later wait is bounded too (the timer is armed again).
    again: asyncio.Future[Any] = loop.create_future()
    reports.watch(again, "third")
    with pytest.raises(TransientTransportError, match="third"):
        await again


def test_records_far_apart_are_lone_and_records_close_together_linger() -> None:
    """A record the producer holds alone is sent at once while records come
    further apart than linger.ms; under load they linger to share requests,
    and after a pause the next one is sent at once again."""
    pace = _Pace(0.001)  # linger.ms = 1
    now = 100.0
    assert pace.lone(now, 0), "the first record after start"
    assert not pace.lone(now, 1), "the producer holds another record"
    # A round trip's writes, one after the other, ~0.5-3 ms apart: lone.
    for gap in (0.0005, 0.003, 0.002, 0.0005, 0.0025) * 4:
        now += gap
        assert pace.lone(now, 0)
    # 5,000 records a second: they linger (after a few, the average falls).
    busy = []
    for _ in range(200):
        now += 0.0002
        busy.append(pace.lone(now, 0))
    assert not any(busy[20:]), "records 0.2 ms apart still sent without lingering"
    # A pause of a second: the next lone record goes at once.
    now += 1.0
    assert pace.lone(now, 0)
    assert not _Pace(0.0).lone(now, 0), "linger.ms 0: nothing lingers anyway"
