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
from transport_kafka._client import _Reports


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
