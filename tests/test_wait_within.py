"""transport.kit.wait_within: a timeout like ``asyncio.wait_for`` that never
loses the caller's cancellation (Python 3.11's ``wait_for`` returns the
result instead when the awaited future completes as the caller is
cancelled, and a loop around it then never ends)."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from transport.kit import wait_within


async def _cancelled_as_it_completes(
    wait: Callable[[Awaitable[int], float], Awaitable[int]],
) -> asyncio.Task[int]:
    """A task waiting through ``wait`` on a future that completes in the
    same turn of the loop as the task is cancelled; the task, ended."""
    future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(wait(future, 10.0))
    await asyncio.sleep(0)  # the task now waits
    future.set_result(1)
    task.cancel()
    await asyncio.wait({task})
    return task


async def test_a_cancellation_as_the_future_completes_is_not_lost() -> None:
    task = await _cancelled_as_it_completes(wait_within)
    assert task.cancelled()


@pytest.mark.skipif(sys.version_info >= (3, 12), reason="asyncio.wait_for is fixed in 3.12")
async def test_asyncio_wait_for_on_this_python_loses_it() -> None:
    """Why the helper exists: the same race through ``asyncio.wait_for``."""
    task = await _cancelled_as_it_completes(asyncio.wait_for)
    assert not task.cancelled() and task.result() == 1


async def test_the_result_within_the_timeout_and_a_timeout_after_it() -> None:
    future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_later(0.01, future.set_result, "done")
    assert await wait_within(future, 5.0) == "done"

    slow: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        await wait_within(slow, 0.01)
    assert slow.cancelled()  # as wait_for does: what timed out is cancelled


async def test_no_timeout_waits_without_limit_and_a_shielded_future_survives_one() -> None:
    inner: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    with pytest.raises(TimeoutError):
        await wait_within(asyncio.shield(inner), 0.01)
    assert not inner.cancelled()
    inner.set_result(7)
    assert await wait_within(inner, None) == 7


def test_the_library_waits_only_through_it() -> None:
    """No ``asyncio.wait_for`` in the library or its conformance suite."""
    root = Path(__file__).resolve().parents[1]
    found = [
        f"{path.relative_to(root)}:{number}"
        for path in sorted(root.glob("transport*/**/*.py"))
        for number, line in enumerate(path.read_text().splitlines(), 1)
        if "asyncio.wait_for(" in line
    ]
    assert found == []
