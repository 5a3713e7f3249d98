"""Common mistakes with the Ensemble's task API fail with a message that
says what to write instead."""

from __future__ import annotations

import asyncio
import enum
import logging
import re
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from transport import (
    Delivery,
    Ensemble,
    InMemoryMetrics,
    Network,
    WorkRequest,
    connect,
    set_metrics_sink,
)


async def test_task_without_parentheses_is_refused_at_once() -> None:
    transport = await connect("memory://misuse-a")
    try:
        ensemble = Ensemble("misuse", transport=transport)
        with pytest.raises(TypeError, match=r"@ensemble.task\(\)"):

            @ensemble.task  # type: ignore[arg-type]
            async def cook(ctx: object) -> int:
                return 1

        assert ensemble.tasks == {}
    finally:
        await transport.aclose()


async def test_a_plain_def_handler_fails_the_request_at_once_saying_why() -> None:
    transport = await connect("memory://misuse-b")
    try:
        ensemble = Ensemble("misuse", transport=transport)

        @ensemble.task("cook")
        def cook(ctx: object) -> dict[str, int]:  # not async
            return {"ok": 1}

        caller = Network(transport, caller="misuse-caller")
        async with ensemble:
            response = await caller.request("misuse", "cook", {}, timeout=10)
        assert response.status == "failed"
        assert "async def" in (response.error or ""), response.error
        [dead] = await transport.request_queue("misuse").dead_letters()
        assert dead.attempts == 1  # not retried
    finally:
        await transport.aclose()


async def _cancelled_elsewhere() -> object:
    # The handler awaits something cancelled elsewhere: CancelledError comes
    # out of it although nobody cancelled the worker.
    future: asyncio.Future[object] = asyncio.get_running_loop().create_future()
    future.cancel()
    return await future


class _Unprintable(Exception):
    def __str__(self) -> str:
        raise RuntimeError("no message")


async def _raises_unprintable() -> object:
    raise _Unprintable


@pytest.mark.parametrize(
    ("bad", "settings", "named"),
    [
        (
            _cancelled_elsewhere,
            {"concurrency": 2, "max_attempts": 2, "lease_seconds": 1},
            "CancelledError",
        ),
        (_raises_unprintable, {"max_attempts": 1}, "_Unprintable"),
    ],
    ids=["cancelled-error", "unprintable-exception"],
)
async def test_a_handler_exception_that_ended_its_worker_fails_the_request_and_workers_go_on(
    bad: Callable[[], Awaitable[object]], settings: dict[str, Any], named: str
) -> None:
    # Each ended the worker silently (a CancelledError one per redelivery,
    # until the ensemble served nothing; an exception whose message raises
    # while its error was written).
    transport = await connect(f"memory://misuse-{named}")
    try:
        ensemble = Ensemble("misuse", transport=transport, **settings)

        @ensemble.task("bad")
        async def bad_task(ctx: object) -> object:
            return await bad()

        @ensemble.task("good")
        async def good_task(ctx: object) -> dict[str, bool]:
            return {"ok": True}

        caller = Network(transport, caller="misuse-caller")
        async with ensemble.serving():
            failed = await caller.request("misuse", "bad", {}, timeout=20)
            good = await caller.request("misuse", "good", {}, timeout=20)
        assert failed.status == "failed" and named in (failed.error or ""), failed
        assert good.status == "completed", good
    finally:
        await transport.aclose()


async def test_a_metrics_sink_that_raises_does_not_stop_the_workers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # One exception from a sink (here at the first delivery) ended the worker
    # and, through the shared fetch, every worker: nothing logged, nothing
    # served, only a "backlog not moving" warning blaming the broker.
    class RaisesOnce(InMemoryMetrics):
        raised = 0

        def increment(self, name: str, labels: dict[str, str], value: float = 1.0) -> None:
            if name == "delivered" and not self.raised:
                self.raised += 1
                raise RuntimeError("sink down")
            super().increment(name, labels, value)

    sink = RaisesOnce()
    set_metrics_sink(sink)
    transport = await connect("memory://misuse-sink")
    try:
        ensemble = Ensemble("misuse", transport=transport, concurrency=4, lease_seconds=1)

        @ensemble.task("good")
        async def good_task(ctx: object) -> dict[str, bool]:
            return {"ok": True}

        caller = Network(transport, caller="misuse-caller")
        with caplog.at_level(logging.ERROR, logger="transport"):
            async with ensemble.serving():
                answers = [await caller.request("misuse", "good", {}, timeout=20) for _ in range(3)]
        assert sink.raised == 1
        assert [a.status for a in answers] == ["completed"] * 3
        assert any("sink down" in (r.exc_text or "") for r in caplog.records), caplog.text
    finally:
        set_metrics_sink(None)
        await transport.aclose()


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        ({"poll_timeout": -1}, "poll_timeout must be a finite number of seconds above 0"),
        ({"poll_timeout": float("nan")}, "poll_timeout must be a finite"),
        ({"poll_timeout": "1"}, "poll_timeout must be a number of seconds"),
        ({"stats_interval": -5}, "stats_interval must be a finite"),
        ({"shutdown_grace": -1}, "shutdown_grace must be a finite number of seconds 0 or more"),
        ({"concurrency": 2.5}, "concurrency must be an integer of at least 1, got 2.5"),
        ({"concurrency": True}, "concurrency must be an integer"),
        ({"priority_levels": "3"}, "priority_levels must be an integer"),
        ({"priority_levels": 3, "aging_interval": float("nan")}, "aging_interval must be"),
        ({"priority_levels": 3, "aging_interval": "5"}, "aging_interval must be a timedelta"),
    ],
)
async def test_settings_that_would_serve_nothing_are_refused_when_built(
    settings: dict[str, object], error: str
) -> None:
    # Each was accepted; the ensemble then failed at start, or its workers
    # failed every poll (a negative poll timeout) and it served nothing.
    transport = await connect("memory://misuse-settings")
    try:
        with pytest.raises(ValueError, match=re.escape(error)):
            Ensemble("misuse", transport=transport, **settings)  # type: ignore[arg-type]
    finally:
        await transport.aclose()


async def test_a_priority_that_is_not_an_int_is_refused() -> None:
    transport = await connect("memory://misuse-priority")
    try:
        queue = transport.priority_queue("misuse", levels=3)
        for bad in (True, 1.0, "1"):
            with pytest.raises(ValueError, match="priority must be"):
                await queue.enqueue(WorkRequest(task="t"), priority=bad)  # type: ignore[arg-type]
            with pytest.raises(ValueError, match="priority must be an int"):
                await Network(transport, caller="c", default_levels=3).send(
                    "misuse",
                    "t",
                    priority=bad,  # type: ignore[arg-type]
                )
        with pytest.raises(ValueError, match="levels must be a positive integer"):
            transport.priority_queue("misuse", levels=True)
        assert await queue.poll(0) is None

        class Level(enum.IntEnum):
            LOW = 2

        stored = await queue.enqueue(WorkRequest(task="t"), priority=Level.LOW)
        assert stored.priority == 2 and type(stored.priority) is int
    finally:
        await transport.aclose()


async def test_a_handler_that_ignores_cancellation_does_not_keep_the_ensemble_from_stopping(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Past shutdown_grace its worker is cancelled; this handler catches that
    # and goes on. aclose() waited for it without limit: the process never
    # stopped, whatever the signals.
    transport = await connect("memory://misuse-stubborn")
    release = asyncio.Event()
    started = asyncio.Event()
    try:
        ensemble = Ensemble("misuse", transport=transport, shutdown_grace=0.2)

        @ensemble.task("stubborn")
        async def stubborn(ctx: object) -> None:
            started.set()
            while not release.is_set():
                try:  # noqa: SIM105 - the mistake, written as users write it
                    await asyncio.sleep(0.05)
                except asyncio.CancelledError:
                    pass  # the mistake

        await ensemble.start()
        await Network(transport, caller="misuse-caller").send("misuse", "stubborn", {})
        await asyncio.wait_for(started.wait(), 10)
        with caplog.at_level(logging.ERROR, logger="transport"):
            await asyncio.wait_for(ensemble.aclose(), 20)
        assert "ignored their cancellation" in caplog.text, caplog.text
    finally:
        release.set()  # let the stray task end before the loop does
        await asyncio.sleep(0.1)
        await transport.aclose()


@pytest.mark.parametrize("backend", ["memory", "sqlite"])
async def test_a_priority_queue_closed_while_giving_heads_back_counts_no_attempt(
    backend: str, tmp_path: Path
) -> None:
    # The keeper gives held heads back when nobody polls; aclose() cancelled
    # it in the middle, and the level queue's close released those heads
    # counted: a head no handler saw came back at attempt 2.
    url = f"sqlite:///{tmp_path / 'p.db'}" if backend == "sqlite" else "memory://misuse-keeper"
    transport = await connect(url)
    try:
        hour = timedelta(hours=1)
        queue = transport.priority_queue("keeper", levels=2, aging_interval=hour, lease_seconds=0.6)
        await queue.enqueue(WorkRequest(task="t", payload="hi"), priority=0)
        low = await queue.enqueue(WorkRequest(task="t", payload="lo"), priority=1)
        got = await queue.poll(5)
        assert got is not None and got.request.payload == "hi"  # `lo` is held
        original = queue._give_back
        giving = asyncio.Event()

        async def slow_give_back(delivery: Delivery) -> None:
            giving.set()
            await asyncio.sleep(0.3)  # a broker round trip
            await original(delivery)

        queue._give_back = slow_give_back  # type: ignore[method-assign]
        # Nobody polls: the keeper starts giving the held head back.
        await asyncio.wait_for(giving.wait(), 10)
        await got.ack()
        await queue.aclose()
        again = transport.priority_queue("keeper", levels=2, aging_interval=hour)
        back = await again.poll(5)
        assert back is not None and back.request.request_id == low.request_id
        assert back.attempt == 1, "a held head nobody handled came back counted"
        await back.ack()
    finally:
        await transport.aclose()
