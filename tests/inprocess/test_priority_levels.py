"""How a priority queue asks its levels for their heads."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from transport import WorkRequest, connect
from transport.errors import ClosedResourceError


async def test_empty_levels_are_asked_for_their_head_at_once_not_one_after_the_other() -> None:
    """A level's "nothing now" costs a broker round trip or more (a NATS
    pull held 20 ms): asked level by level, a queue with work only at its
    lowest level paid it once per empty level on every poll (43 ms a poll
    on NATS with three levels). Here each empty level's ``poll(0)`` waits
    until the other one has been asked too: asked one after the other,
    the first would wait for ever."""
    async with await connect("memory://levels") as transport:
        queue = transport.priority_queue("orders", levels=3)
        sent = await queue.enqueue(WorkRequest(task="t"), 2)
        both_asked = asyncio.Event()
        asked: list[int] = []
        for level in (0, 1):
            level_queue: Any = queue._queues[level]  # type: ignore[attr-defined]
            poll = level_queue.poll

            async def asking(timeout: float | None = None, *, _lv: int = level, _poll: Any = poll):
                asked.append(_lv)
                if len(asked) == 2:
                    both_asked.set()
                async with asyncio.timeout(5):
                    await both_asked.wait()
                return await _poll(timeout)

            level_queue.poll = asking
        delivery = await queue.poll(1)
        assert sorted(asked) == [0, 1]
        assert delivery is not None and delivery.request.request_id == sent.request_id
        assert await delivery.ack()
        await queue.aclose()


def _record_extends(level_queue: Any) -> list[int]:
    """The tokens a ``memory://`` level queue renews from now on, in order."""
    extended: list[int] = []
    extend = level_queue._extend

    def recording(token: int, seconds: float | None) -> bool:
        extended.append(token)
        result: bool = extend(token, seconds)
        return result

    level_queue._extend = recording
    return extended


async def test_a_head_held_past_a_tenth_of_its_lease_goes_out_with_a_whole_lease() -> None:
    """A head that lost a comparison is held here and renewed only every
    third of a lease, so it could go out with two thirds of the lease the
    handler is promised. Held for more than a tenth of the lease, it is
    renewed to a whole lease before it is handed out; held briefly (the
    common case: from the poll before), it is handed out without a write."""
    async with await connect("memory://renew-held") as transport:
        queue = transport.priority_queue("orders", levels=2, lease_seconds=2.0)
        for level in (1, 1, 0, 0):
            await queue.enqueue(WorkRequest(task="t"), level)
        slots: Any = queue._slots  # type: ignore[attr-defined]
        held_since: list[float] = queue._held_since  # type: ignore[attr-defined]
        first = await queue.poll(1)
        assert first is not None
        held = slots[1]
        assert held is not None
        level_queue: Any = held._queue
        extended = _record_extends(level_queue)
        # Held since the poll before, a moment ago: no renewal on the way out.
        second = await queue.poll(1)
        assert second is not None and second is not held  # the other high one
        assert extended == []
        # Held for half a second: a quarter of the lease gone.
        held_since[1] -= 0.5
        third = await queue.poll(1)
        assert third is held
        assert extended == [held._token]
        _, deadline = level_queue._state.inflight[held._token]
        assert deadline - time.monotonic() > 1.9
        for delivery in (first, second, third):
            assert await delivery.ack()
        await queue.aclose()


def _two_levels_answering(
    queue: Any, level_0: Callable[[Any, asyncio.Event, Any], Awaitable[Any]]
) -> tuple[asyncio.Event, Callable[[], None]]:
    """Level 1's ``poll`` of ``queue`` sets the returned event once it has
    answered; level 0's becomes ``level_0(level 1's queue, that event, its
    own poll)``. Also returns what restores both polls."""
    answered = asyncio.Event()
    quick, slow = queue._queues[1], queue._queues[0]
    quick_poll, slow_poll = quick.poll, slow.poll

    async def answering(timeout: float | None = None) -> Any:
        delivery = await quick_poll(timeout)
        answered.set()
        return delivery

    async def answering_level_0(timeout: float | None = None) -> Any:
        return await level_0(quick, answered, lambda: slow_poll(timeout))

    def restore() -> None:
        quick.poll, slow.poll = quick_poll, slow_poll

    quick.poll, slow.poll = answering, answering_level_0
    return answered, restore


def _level_0_answers_late(queue: Any, delay: float) -> Any:
    """Make level 0's ``poll`` answer ``delay`` seconds after level 1's has
    (a loaded broker), and then take back every lease that ran out, as a
    broker does (``memory://`` reclaims lazily). Returns level 1's queue."""

    async def late(quick: Any, answered: asyncio.Event, poll: Any) -> Any:
        async with asyncio.timeout(5):
            await answered.wait()
        await asyncio.sleep(delay)  # the slow broker round trip itself
        with quick._broker.lock:
            quick._reclaim(time.monotonic())
        return await poll()

    _two_levels_answering(queue, late)
    return queue._queues[1]


async def test_a_head_is_held_from_when_its_level_answered_not_from_the_slowest_level() -> None:
    """The empty levels are asked together. On a loaded broker one level
    answered seconds after another (CI, Pulsar), and the head the quick
    level had leased was held as if leased when the slow one answered: it
    went out without the renewal its age called for, and its lease could
    run out before the handler's ack. Here level 0 answers half a second (a
    quarter of the lease) after level 1: level 1's head goes out renewed to
    a whole lease."""
    async with await connect("memory://held-from-answer") as transport:
        queue = transport.priority_queue("orders", levels=2, lease_seconds=2.0)
        sent = await queue.enqueue(WorkRequest(task="t"), 1)
        quick = _level_0_answers_late(queue, 0.5)
        extended = _record_extends(quick)
        delivery = await queue.poll(3)
        assert delivery is not None and delivery.request.request_id == sent.request_id
        assert extended == [delivery._token]  # type: ignore[attr-defined]
        _, deadline = quick._state.inflight[delivery._token]  # type: ignore[attr-defined]
        assert deadline - time.monotonic() > 1.9
        assert await delivery.ack()
        await queue.aclose()


async def test_a_head_is_kept_alive_while_a_slower_level_answers_past_its_lease() -> None:
    """Level 0 answers after more than a whole lease: level 1's head, taken
    at once, is held (and renewed) from then on, so it goes out at its
    first attempt and its ack counts; not lost to its own lease while the
    poll waited for the slow level."""
    async with await connect("memory://held-past-lease") as transport:
        queue = transport.priority_queue("orders", levels=2, lease_seconds=0.6)
        sent = await queue.enqueue(WorkRequest(task="t"), 1)
        _level_0_answers_late(queue, 1.0)
        delivery = await queue.poll(5)
        assert delivery is not None and delivery.request.request_id == sent.request_id
        assert delivery.attempt == 1
        assert await delivery.ack()
        await queue.aclose()


async def _cancel_a_poll_after_level_1_answered(queue: Any) -> None:
    """Poll ``queue`` (two levels) while level 0 never answers, and cancel
    the poll once level 1 has answered; the levels' polls are restored."""

    async def never(quick: Any, answered: asyncio.Event, poll: Any) -> Any:
        async with asyncio.timeout(5):
            await asyncio.Event().wait()  # until the poll is cancelled

    answered, restore = _two_levels_answering(queue, never)
    try:
        polling = asyncio.create_task(queue.poll(5))
        async with asyncio.timeout(5):
            await answered.wait()
        polling.cancel()
        with pytest.raises(asyncio.CancelledError):
            await polling
    finally:
        restore()


async def _next_poll_gets_at_attempt_1(queue: Any, sent: WorkRequest) -> None:
    delivery = await queue.poll(1)
    assert delivery is not None and delivery.request.request_id == sent.request_id
    assert delivery.attempt == 1
    assert await delivery.ack()


async def test_a_poll_cancelled_while_a_level_answers_keeps_the_heads_others_took() -> None:
    """A poll cancelled (a caller's timeout, a shutdown) while one level
    is still answering: the head another level already leased is held for
    the next poll, not dropped to run out its lease and come back one
    attempt later."""
    async with await connect("memory://cancelled-ask") as transport:
        queue = transport.priority_queue("orders", levels=2, lease_seconds=30.0)
        sent = await queue.enqueue(WorkRequest(task="t"), 1)
        await _cancel_a_poll_after_level_1_answered(queue)
        await _next_poll_gets_at_attempt_1(queue, sent)
        await queue.aclose()


async def test_with_one_attempt_a_cancelled_poll_gives_back_what_its_levels_took() -> None:
    """With ``max_attempts=1`` a priority queue holds no head between polls:
    held, a head is dead-lettered unseen if the process is killed. A poll
    cancelled while one level still answers gives back, uncounted and at
    once, the head another level already took (it used to stay held until
    the keeper's idle round, a third of a lease later)."""
    async with await connect("memory://one-attempt-cancelled") as transport:
        queue = transport.priority_queue("orders", levels=2, max_attempts=1, lease_seconds=30.0)
        sent = await queue.enqueue(WorkRequest(task="t"), 1)
        await _cancel_a_poll_after_level_1_answered(queue)
        giving: set[Any] = getattr(queue, "_giving", set())
        assert giving, "nothing is being given back: the head stays held"
        await asyncio.gather(*giving)
        level = await queue._queues[1].stats()  # type: ignore[attr-defined]
        assert (level.depth, level.in_flight) == (1, 0)
        await _next_poll_gets_at_attempt_1(queue, sent)
        await queue.aclose()


async def test_a_head_a_level_answers_with_after_aclose_gave_back_the_rest_is_given_back_too() -> (
    None
):
    """``aclose()`` gives the held heads back uncounted, then closes the
    levels; a level that answers a poll still running in between used to
    leave its head in a slot after the close, and the poll handed it out
    from the closed queue (the level's close then counted it: attempt 2
    for the next worker). Now it is given back uncounted and the poll ends
    with ``ClosedResourceError``, as a poll still waiting on a closed
    handle does: the next worker gets the request at attempt 1."""
    async with await connect("memory://closing-ask") as transport:
        queue = transport.priority_queue("orders", levels=2, lease_seconds=30.0)
        sent = await queue.enqueue(WorkRequest(task="t"), 1)
        unheld, asked = asyncio.Event(), asyncio.Event()
        levels: list[Any] = queue._queues  # type: ignore[attr-defined]
        polls = [level.poll for level in levels]

        def answering_after_unhold(poll: Any) -> Any:
            async def answer(timeout: float | None = None) -> Any:
                asked.set()
                async with asyncio.timeout(5):
                    await unheld.wait()
                return await poll(timeout)

            return answer

        for level, poll in zip(levels, polls, strict=True):
            level.poll = answering_after_unhold(poll)
        polling = asyncio.create_task(queue.poll(5))
        async with asyncio.timeout(5):
            await asked.wait()  # the poll is asking the levels

        def closing_after_the_poll(close: Any) -> Any:
            async def closing() -> None:
                unheld.set()  # aclose() gave its held heads back: now the levels answer
                await asyncio.wait({polling}, timeout=5)
                await close()

            return closing

        for level in levels:
            level.aclose = closing_after_the_poll(level.aclose)
        await queue.aclose()
        with pytest.raises(ClosedResourceError):
            await polling
        for level, poll in zip(levels, polls, strict=True):
            level.poll = poll
        again = transport.priority_queue("orders", levels=2, lease_seconds=30.0)
        delivery = await again.poll(1)
        assert delivery is not None and delivery.request.request_id == sent.request_id
        assert delivery.attempt == 1
        assert await delivery.ack()
        await again.aclose()


async def test_a_held_head_whose_lease_ran_out_is_not_handed_out() -> None:
    """A held head whose lease was lost meanwhile (the event loop stalled
    past a renewal, and the level took the request back) is someone else's:
    it is not handed out; the request comes back through its level, one
    attempt later."""
    async with await connect("memory://lost-held") as transport:
        queue = transport.priority_queue("orders", levels=2, lease_seconds=2.0)
        low = await queue.enqueue(WorkRequest(task="t"), 1)
        await queue.enqueue(WorkRequest(task="t"), 0)
        first = await queue.poll(1)
        assert first is not None and first.request.request_id != low.request_id
        slots: Any = queue._slots  # type: ignore[attr-defined]
        held = slots[1]
        assert held is not None and held.request.request_id == low.request_id
        level_queue: Any = held._queue
        with level_queue._broker.lock:
            level_queue._reclaim(time.monotonic() + 10)  # every lease runs out
        queue._held_since[1] -= 1.0  # type: ignore[attr-defined]
        again = await queue.poll(1)
        assert again is not None and again is not held
        assert (again.request.request_id, again.attempt) == (low.request_id, 2)
        assert await held.ack() is False
        assert await again.ack()
        assert await first.ack()
        await queue.aclose()


async def test_empty_levels_are_asked_once_and_then_kept_asking_in_the_background() -> None:
    """An empty level's "nothing now" costs a round trip or more (a pull
    held 20 ms on NATS, where a priority queue with work only at its lowest
    level drained 45 requests/s). A level found empty is asked once, and
    then kept asked in the background while the winners are handled: the
    next polls do not ask it again, and what arrives there still wins the
    next poll."""
    async with await connect("memory://keep-asking") as transport:
        queue = transport.priority_queue("orders", levels=3)
        for _ in range(4):
            await queue.enqueue(WorkRequest(task="t"), 2)
        asked_now = {0: 0, 1: 0}
        for level in (0, 1):
            level_queue: Any = queue._queues[level]  # type: ignore[attr-defined]
            poll = level_queue.poll

            async def counting(
                timeout: float | None = None, *, _lv: int = level, _poll: Any = poll
            ):
                if timeout == 0:
                    asked_now[_lv] += 1
                return await _poll(timeout)

            level_queue.poll = counting
        got = [await queue.poll(1) for _ in range(3)]
        assert all(d is not None and d.request.task == "t" for d in got)
        assert asked_now == {0: 1, 1: 1}, "empty levels asked again on every poll"
        urgent = await queue.enqueue(WorkRequest(task="urgent"), 0)
        first = await queue.poll(1)
        assert first is not None and first.request.request_id == urgent.request_id
        last = await queue.poll(1)
        assert last is not None and last.request.task == "t"
        for delivery in (*got, first, last):
            assert delivery is not None and await delivery.ack()
        await queue.aclose()
