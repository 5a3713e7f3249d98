"""The registries' watch of their keyed log ends when the registry closes,
even over a client library that turns a cancellation into an error of its
own (redis-py's read timeout racing the cancel on Python 3.11 did: the watch
then re-watched a closed log every 2 s until the event loop's shutdown hung
on it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from transport import CAUGHT_UP, DeliveryRegistry, KeyedChange, KeyedLog
from transport.errors import ClosedResourceError, TransientTransportError

pytestmark = pytest.mark.timeout(30)


class _SwallowingLog(KeyedLog):
    """A keyed log whose watch turns every cancellation into a transient
    error, as a client library with a timeout racing the cancel can."""

    def __init__(self) -> None:
        self.state: dict[str, bytes] = {}
        self.closed = False
        self.watches = 0
        self.swallowed = 0

    async def put(self, key: str, value: bytes) -> None:
        self.state[key] = value

    async def delete(self, key: str) -> None:
        self.state.pop(key, None)

    async def get(self, key: str) -> bytes | None:
        return self.state.get(key)

    async def watch(self) -> AsyncIterator[KeyedChange | object]:
        if self.closed:
            raise ClosedResourceError("log is closed")
        self.watches += 1
        for key, value in list(self.state.items()):
            yield KeyedChange(key, value)
        yield CAUGHT_UP
        while True:
            if self.closed:
                raise ClosedResourceError("log is closed")
            try:
                await asyncio.sleep(0.05)
            except asyncio.CancelledError:
                self.swallowed += 1
                raise TransientTransportError("read timed out") from None

    async def aclose(self) -> None:
        self.closed = True


def _view_tasks() -> set[asyncio.Task[object]]:
    return {t for t in asyncio.all_tasks() if t.get_name().startswith("view:")}


async def test_a_closed_registry_stops_watching_although_the_log_swallows_the_cancel() -> None:
    log_ = _SwallowingLog()
    registry = DeliveryRegistry("swallow", log_)
    await registry.register("r-1")
    (task,) = _view_tasks()
    await registry.aclose()
    # The cancellation was swallowed (turned into an error) ...
    assert log_.swallowed == 1
    # ... and still the watch ended instead of re-watching the closed log.
    await asyncio.wait_for(task, timeout=5)
    assert log_.watches == 1
    assert not _view_tasks()


async def test_a_log_closed_under_a_live_registry_ends_its_watch() -> None:
    log_ = _SwallowingLog()
    registry = DeliveryRegistry("closed-under", log_)
    await registry.register("r-1")
    (task,) = _view_tasks()
    await log_.aclose()  # e.g. the transport's connection closed first
    await asyncio.wait_for(task, timeout=5)
    assert log_.watches == 1
    await registry.aclose()


async def test_a_registry_dropped_in_another_thread_is_closed_on_its_loop() -> None:
    """A registry a program dropped is collected wherever the last
    reference went: here in another thread. Its view stops and its log
    closes on the loop its tasks run on, and nothing is raised there."""
    import gc
    import threading

    from transport import connect

    async with connect("memory://") as transport:
        kept = [transport.capability_registry() for _ in range(3)]
        for registry in kept:
            await registry.all()  # starts its view and janitor
        del registry

        def views() -> list[asyncio.Task[object]]:
            return [t for t in asyncio.all_tasks() if t.get_name().startswith("view:")]

        assert len(views()) == 3
        errors: list[BaseException] = []

        def drop() -> None:
            try:
                kept.clear()
                gc.collect()
            except BaseException as exc:  # pragma: no cover - reported below
                errors.append(exc)

        running = views()
        thread = threading.Thread(target=drop)
        thread.start()
        thread.join()
        assert not errors
        _, still = await asyncio.wait(running, timeout=5)
        assert not still, f"views of dropped registries still running: {still}"


def test_a_registry_collected_after_its_loop_ended_does_nothing() -> None:
    """Collected after ``asyncio.run`` returned (its loop closed): the
    finalizer has no loop to act on and does nothing (no exception, no
    warning; the test runs with warnings as errors)."""
    import gc

    from transport import connect

    left: list[object] = []

    async def main() -> None:
        transport = await connect("memory://")
        registry = transport.capability_registry()
        await registry.all()
        left.append(registry)
        await transport.aclose()

    asyncio.run(main())
    left.clear()
    gc.collect()
