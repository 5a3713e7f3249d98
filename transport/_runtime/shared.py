"""Sharing one asynchronous read among concurrent callers, and a
timeout that never loses a cancellation."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

__all__ = ["InFlight", "SharedRun", "retrieve", "wait_within"]

T = TypeVar("T")
K = TypeVar("K")


class InFlight(Generic[K]):
    """At most one run of an operation per key at a time, shared by the
    callers that ask for it while it runs (creating a topic or a stream
    that a burst of first calls all find missing). A caller cancelled does
    not cancel the run for the others; a run's error reaches every caller
    that waited for it, and the next call after it starts a new run.
    Keyed per event loop too: a run belongs to the loop that started it.
    """

    def __init__(self) -> None:
        self._runs: dict[tuple[asyncio.AbstractEventLoop, K], asyncio.Task[None]] = {}

    async def run(self, key: K, fn: Callable[[], Awaitable[None]]) -> None:
        """Join the run for ``key`` in progress, or start ``fn()`` as it."""
        loop = asyncio.get_running_loop()
        slot = (loop, key)
        task = self._runs.get(slot)
        if task is None:

            async def run_fn() -> None:
                await fn()

            task = loop.create_task(run_fn())
            self._runs[slot] = task
            task.add_done_callback(lambda done: self._finished(slot, done))
        await asyncio.shield(task)

    def _finished(
        self, slot: tuple[asyncio.AbstractEventLoop, K], task: asyncio.Task[None]
    ) -> None:
        if self._runs.get(slot) is task:
            del self._runs[slot]
        retrieve(task)  # every caller waiting for it got its error


class SharedRun(Generic[T]):
    """Runs ``fn`` for callers that need a result taken *after* their call
    began (read-your-writes: a watermark, a catch-up), sharing runs among
    concurrent callers.

    A caller joins the next run that has not started yet; runs never
    overlap. So a burst of N callers costs two runs (the one in progress
    when the burst began, which none of them may use, and one for all of
    them), not N runs queued one behind the other. A cancelled caller
    does not cancel the run others wait for.
    """

    def __init__(self, fn: Callable[[], Awaitable[T]]) -> None:
        self._fn = fn
        self._next: asyncio.Future[T] | None = None
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    async def __call__(self) -> T:
        waiting = self._next
        if waiting is None:
            loop = asyncio.get_running_loop()
            waiting = self._next = loop.create_future()
            waiting.add_done_callback(retrieve)
            task = loop.create_task(self._run(waiting))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await asyncio.shield(waiting)

    async def _run(self, result: asyncio.Future[T]) -> None:
        async with self._lock:
            if self._next is result:  # started: later callers wait for the next run
                self._next = None
            try:
                value = await self._fn()
            except asyncio.CancelledError:
                result.cancel()
                raise
            except Exception as exc:
                if not result.done():
                    result.set_exception(exc)
            else:
                if not result.done():
                    result.set_result(value)

    async def aclose(self) -> None:
        """Cancel the runs in progress or waiting."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def retrieve(future: asyncio.Future[Any]) -> None:
    """Done callback: mark a future's exception as seen (whoever awaited it
    may be gone), so asyncio does not log it as never retrieved."""
    if not future.cancelled():
        future.exception()


async def wait_within(aw: Awaitable[T], timeout: float | None) -> T:
    """``await aw``, failing with :class:`TimeoutError` (and ``aw``
    cancelled) after ``timeout`` seconds; ``None`` waits without limit.

    Use it instead of :func:`asyncio.wait_for`: on Python 3.11, a caller
    cancelled just as the awaitable completes gets the awaitable's result
    from ``wait_for`` and the cancellation is gone, so a loop around it
    never ends (a program's tasks are cancelled at exit and one keeps
    running: the interpreter does not exit). This is built on
    :func:`asyncio.timeout`, as ``wait_for`` is from 3.12 on, which lets a
    cancellation through whatever else happened meanwhile."""
    if timeout is None:
        return await aw
    async with asyncio.timeout(timeout):
        return await aw
