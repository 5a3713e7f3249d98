"""Conformance scenarios for the event bus and the event log."""

from __future__ import annotations

import asyncio
import gc
from collections import Counter
from datetime import datetime, timedelta
from typing import Any

import pytest

from transport import Event, InvalidNameError, Transport, subject_matches, utcnow
from transport.errors import ClosedResourceError
from transport.kit import to_millisecond, wait_within
from transport.testing.harness import BackendHarness

pytestmark = [pytest.mark.conformance, pytest.mark.asyncio]

MATCH_TABLE = [
    ("a.b.c", "a.b.c", True),
    ("a.*.c", "a.b.c", True),
    ("a.*", "a.b.c", False),
    ("a.>", "a.b.c", True),
    ("a.>", "a", False),
    ("*.b.*", "a.b.c", True),
    (">", "a", True),
    ("a.b", "a.b.c", False),
    ("a.b.c", "a.b", False),
    ("*", "a.b", False),
]


async def _ends_when_the_transport_closes(
    client: Transport, iterable: Any, harness: BackendHarness
) -> None:
    """``iterable`` is all the program keeps (what made it was dropped and
    collected): an ``async for`` waiting in it ends, without an error, when
    ``client`` closes."""
    gc.collect()
    started = asyncio.Event()

    async def consume() -> list[Any]:
        started.set()
        return [event.data async for event in iterable]

    task = asyncio.create_task(consume())
    try:
        await started.wait()
        await client.aclose()
        done, _ = await asyncio.wait({task}, timeout=harness.scaled(10))
        assert done, "the iteration went on after the transport closed"
        assert task.result() == []
    finally:
        if not task.done():
            task.cancel()
        await client.aclose()


class EventBusConformance:
    @pytest.fixture(autouse=True)
    def _needs_bus(self, harness: BackendHarness) -> None:
        if not harness.capabilities.event_bus:
            pytest.skip("backend has no event bus (capability 'event_bus' is false)")

    def test_subject_matching_table(self) -> None:
        for pattern, subject, expected in MATCH_TABLE:
            assert subject_matches(pattern, subject) is expected, (pattern, subject)

    async def test_a_subscription_of_a_dropped_bus_ends_when_the_transport_closes(
        self, queue_name: str, harness: BackendHarness, make_transport: Any
    ) -> None:
        """A program keeps only the subscription
        (``await transport.event_bus().subscribe(...)``): closing the
        transport still ends an ``async for`` waiting in it."""
        client = await make_transport()
        subscription = await client.event_bus().subscribe(f"{queue_name}.x")
        await _ends_when_the_transport_closes(client, subscription, harness)

    async def test_wildcard_subscriptions_receive_exactly_their_subjects(
        self, transport: Transport, queue_name: str, harness: BackendHarness
    ) -> None:
        bus = transport.event_bus()
        root = queue_name
        patterns = [f"{root}.a.*", f"{root}.a.>", f"{root}.*.b", f"{root}.a.b", f"{root}.>"]
        subs = {p: await bus.subscribe(p) for p in patterns}
        published = [f"{root}.a.b", f"{root}.a.c", f"{root}.a.b.c", f"{root}.x.b", f"{root}.x"]
        for i, subject in enumerate(published):
            await bus.publish(
                subject, {"i": i}, headers={"traceparent": f"00-{i + 1:032x}-{i + 1:016x}-01"}
            )
        for pattern, sub in subs.items():
            expected = [s for s in published if subject_matches(pattern, s)]
            got: list[str] = []
            for _ in expected:
                event = await sub.next(harness.scaled(5))
                assert event is not None, f"{pattern} missed events; got {got}"
                got.append(event.subject)
                assert event.headers["traceparent"].startswith("00-")
            assert got == expected, pattern
            assert await sub.next(0.2) is None, f"{pattern} received a subject it should not"
            await sub.aclose()

    @pytest.mark.parametrize("bad", ["a.*", "a.>", "a..b", ".a", "a b", "a.$x", "", "a/b"])
    async def test_bad_publish_subjects_are_rejected(self, transport: Transport, bad: str) -> None:
        with pytest.raises(InvalidNameError):
            await transport.event_bus().publish(bad, {})

    @pytest.mark.parametrize("bad", ["a.>.b", "a..b", "a.b*", "", "a.$sys"])
    async def test_bad_patterns_are_rejected(self, transport: Transport, bad: str) -> None:
        with pytest.raises(InvalidNameError):
            await transport.event_bus().subscribe(bad)

    async def test_queue_group_spreads_load_while_plain_subscribers_see_all(
        self, transport: Transport, queue_name: str, harness: BackendHarness, make_transport: Any
    ) -> None:
        bus = transport.event_bus()
        other_bus = (await make_transport()).event_bus()
        members = [await bus.subscribe(f"{queue_name}.work", "workers") for _ in range(2)]
        members.append(await other_bus.subscribe(f"{queue_name}.work", "workers"))
        watcher = await bus.subscribe(f"{queue_name}.work")
        await asyncio.sleep(0)  # subscriptions registered; NATS flushes in subscribe
        for i in range(30):
            await bus.publish(f"{queue_name}.work", i)
        seen = [(await watcher.next(harness.scaled(5))) for _ in range(30)]
        assert [e.data for e in seen if e] == list(range(30))
        counts: Counter[int] = Counter()
        received: list[Any] = []
        for index, member in enumerate(members):
            while (event := await member.next(0.3)) is not None:
                counts[index] += 1
                received.append(event.data)
        assert sorted(received) == list(range(30)), "each event goes to exactly one member"
        assert len(counts) >= 2, f"load not spread: {counts}"

    async def test_request_reply_and_timeout(
        self, transport: Transport, queue_name: str, harness: BackendHarness
    ) -> None:
        bus = transport.event_bus()

        async def answer(event: Event) -> Any:
            return {"echo": event.data}

        server = await bus.serve(f"{queue_name}.ask", answer)
        try:
            reply = await bus.request(f"{queue_name}.ask", {"q": 1}, timeout=harness.scaled(5))
            assert reply.data == {"echo": {"q": 1}}
            started = asyncio.get_running_loop().time()
            # Not a bare TimeoutError: the message names the subject.
            with pytest.raises(TimeoutError, match=f"{queue_name}.nobody-home"):
                await bus.request(f"{queue_name}.nobody-home", {"q": 2}, timeout=0.3)
            assert asyncio.get_running_loop().time() - started < harness.scaled(5)
            # Nobody subscribed: known at once, not after the timeout (a
            # caller with a generous timeout must not hang on a typo).
            started = asyncio.get_running_loop().time()
            with pytest.raises(TimeoutError, match="nobody answers"):
                await bus.request(f"{queue_name}.nobody-home", {"q": 3}, timeout=60)
            waited = asyncio.get_running_loop().time() - started
            assert waited < harness.scaled(5), f"{waited:.1f} s to learn nobody listens"
        finally:
            server.cancel()
            await asyncio.gather(server, return_exceptions=True)


async def _three_read(
    log: Any, stream: str, cursor: str, appended: int, harness: BackendHarness
) -> Any:
    """Append ``appended`` events (0, 1, ...) and return a reader with
    ``cursor`` that has returned the first three."""
    for i in range(appended):
        await log.append(stream, i)
    reader = await log.read(stream, "earliest", cursor=cursor)
    got = [await reader.next(harness.scaled(10)) for _ in range(3)]
    assert [e.data for e in got if e] == [0, 1, 2]
    return reader


class EventLogConformance:
    @pytest.fixture(autouse=True)
    def _needs_log(self, harness: BackendHarness) -> None:
        if not harness.capabilities.event_log:
            pytest.skip("backend has no event log (capability 'event_log' is false)")

    async def test_replay_from_earliest_equals_what_was_appended(
        self, transport: Transport, queue_name: str, harness: BackendHarness
    ) -> None:
        log = transport.event_log()
        positions = [
            await log.append(
                queue_name, {"n": i, "text": "ünïcode ✓"}, key=f"k{i % 3}", headers={"x-n": str(i)}
            )
            for i in range(50)
        ]
        assert len(set(positions)) == 50
        reader = await log.read(queue_name, "earliest")
        got = [await reader.next(harness.scaled(10)) for _ in range(50)]
        assert [e.data["n"] for e in got if e] == list(range(50))
        assert [e.position for e in got if e] == positions
        assert all(
            e is not None
            and e.headers == {"x-n": str(e.data["n"])}
            and e.key == f"k{e.data['n'] % 3}"
            for e in got
        )
        assert await reader.next(0.2) is None
        await reader.aclose()

    async def test_reader_continues_live(
        self, transport: Transport, queue_name: str, harness: BackendHarness, make_transport: Any
    ) -> None:
        log = transport.event_log()
        await log.append(queue_name, "old")
        reader = await log.read(queue_name, "latest")
        # Caught up at the end (nothing old replayed), then waiting live.
        assert await reader.next(0.3) is None, "'latest' replayed an older event"
        waiting = asyncio.ensure_future(reader.next(harness.scaled(10)))
        writer = (await make_transport()).event_log()
        await writer.append(queue_name, "new")
        event = await waiting
        assert event is not None and event.data == "new"
        await reader.aclose()

    async def test_read_from_a_position_is_inclusive_and_streams_are_isolated(
        self, transport: Transport, queue_name: str, harness: BackendHarness
    ) -> None:
        log = transport.event_log()
        await log.append(f"{queue_name}-other", "elsewhere")
        positions = [await log.append(queue_name, i) for i in range(5)]
        reader = await log.read(queue_name, positions[2])
        got = [await reader.next(harness.scaled(10)) for _ in range(3)]
        assert [e.data for e in got if e] == [2, 3, 4]
        assert await reader.next(0.2) is None
        await reader.aclose()

    async def test_seek_to_time_boundary(
        self, transport: Transport, queue_name: str, harness: BackendHarness
    ) -> None:
        log = transport.event_log()
        for i in range(3):
            await log.append(queue_name, f"before-{i}")
        await asyncio.sleep(0.05)  # a gap in time, not synchronisation
        boundary = utcnow()
        await asyncio.sleep(0.05)
        for i in range(3):
            await log.append(queue_name, f"after-{i}")
        reader = await log.read(queue_name, boundary)
        first = await reader.next(harness.scaled(10))
        assert first is not None and first.data == "after-0"
        assert first.appended_at >= boundary
        await reader.seek("earliest")
        again = await reader.next(harness.scaled(10))
        assert again is not None and again.data == "before-0"
        await reader.seek(boundary)
        after_seek = await reader.next(harness.scaled(10))
        assert after_seek is not None and after_seek.data == "after-0"
        await reader.aclose()

    async def test_a_read_from_now_returns_the_event_appended_next(
        self, transport: Transport, queue_name: str, harness: BackendHarness
    ) -> None:
        # The README's pattern: note the time, append, read from that time.
        # appended_at is stamped in milliseconds on Kafka, Pulsar and Redis,
        # and an event of the same millisecond as the time noted (just after
        # it) was skipped: 30 of 30 reads missed it on Kafka.
        log = transport.event_log()
        for i in range(5):
            stream = f"{queue_name}-{i}"
            opened = utcnow()
            await log.append(stream, {"order": i})
            async with await log.read(stream, opened) as reader:
                event = await reader.next(harness.scaled(10))
            assert event is not None and event.data == {"order": i}, (i, opened)

    async def test_read_from_a_time_agrees_with_appended_at(
        self, transport: Transport, queue_name: str, harness: BackendHarness
    ) -> None:
        """Starting at an event's own ``appended_at`` returns that event (or
        an earlier one with the same time) first; starting a microsecond
        later returns the first event appended after it, compared at the
        backend's precision: where ``appended_at`` has milliseconds (Kafka,
        Pulsar, Redis), a time within an event's millisecond still finds it
        (else an event appended just after a time noted in the same
        millisecond would be missed)."""
        log = transport.event_log()
        for i in range(3):
            await log.append(queue_name, i)
        reader = await log.read(queue_name, "earliest")
        events = [await reader.next(harness.scaled(10)) for _ in range(3)]
        assert all(e is not None for e in events)
        appended = [e for e in events if e is not None]
        millis = all(e.appended_at.microsecond % 1000 == 0 for e in appended)

        def stamp(moment: datetime) -> datetime:
            return to_millisecond(moment) if millis else moment

        for event in appended:
            at = event.appended_at
            later = at + timedelta(microseconds=1)
            from_at = await log.read(queue_name, at)
            first = await from_at.next(harness.scaled(10))
            expected = next(e for e in appended if e.appended_at >= at)
            assert first is not None and first.position == expected.position, (at, first)
            await from_at.aclose()
            await reader.seek(later)
            after = [e for e in appended if e.appended_at >= stamp(later)]
            got = await reader.next(harness.scaled(10) if after else 0.3)
            if after:
                assert got is not None and got.position == after[0].position, (later, got)
            else:
                assert got is None, (later, got)
        await reader.aclose()

    async def test_a_malformed_position_is_refused(
        self, transport: Transport, queue_name: str, harness: BackendHarness
    ) -> None:
        log = transport.event_log()
        await log.append(queue_name, "x")
        # "-1" read from the earliest event on memory, sqlite and NATS.
        for malformed in ("not-a-position", "-1", " 1", "+1"):
            with pytest.raises(ValueError):
                await log.read(queue_name, malformed)
        reader = await log.read(queue_name, "earliest")
        with pytest.raises(ValueError):
            await reader.seek("not-a-position")
        first = await reader.next(harness.scaled(10))
        assert first is not None and first.data == "x"
        await reader.aclose()

    @pytest.mark.parametrize("closed_by", ["reader", "transport"])
    async def test_named_cursor_resumes_after_a_restart(
        self, harness: BackendHarness, queue_name: str, make_transport: Any, closed_by: str
    ) -> None:
        """Closing the reader commits its cursor; so does closing the
        transport (or the log) with the reader still open, which closes it:
        a restart resumes after the last event returned."""
        first = await make_transport()
        reader = await _three_read(first.event_log(), queue_name, "audit", 5, harness)
        if closed_by == "reader":
            await reader.aclose()  # commits: resume after event 2
        await first.aclose()
        with pytest.raises(StopAsyncIteration):  # closed, by hand or with its transport
            await reader.next(harness.scaled(1))
        restarted = (await make_transport()).event_log()
        resumed = await restarted.read(queue_name, "earliest", cursor="audit")
        rest = [await resumed.next(harness.scaled(10)) for _ in range(2)]
        assert [e.data for e in rest if e] == [3, 4]
        other = await restarted.read(queue_name, "earliest", cursor="another-reader")
        first_of_other = await other.next(harness.scaled(10))
        assert first_of_other is not None and first_of_other.data == 0
        await resumed.aclose()
        await other.aclose()

    @pytest.mark.parametrize("ended_by", ["error", "cancel", "transport"])
    async def test_an_exception_leaves_the_event_being_handled_to_be_read_again(
        self, harness: BackendHarness, queue_name: str, make_transport: Any, ended_by: str
    ) -> None:
        """A handler's error (or a cancellation, Ctrl-C) leaving ``async
        with`` of the reader -- or of a transport with the reader open --
        while event 2 is handled closes without committing it: a restart
        with the cursor reads event 2 again. The close committed it and the
        event was lost to that consumer (at-least-once: read again rather
        than never)."""
        first = await make_transport()
        log = first.event_log()
        for i in range(5):
            await log.append(queue_name, i)
        handling = asyncio.Event()

        async def consume(reader: Any) -> None:
            async for event in reader:
                if event.data == 2:
                    handling.set()
                    if ended_by == "cancel":
                        await asyncio.Event().wait()  # a handler that is cancelled
                    raise RuntimeError("the handler failed")

        if ended_by == "error":
            with pytest.raises(RuntimeError):
                async with await log.read(queue_name, "earliest", cursor="billing") as reader:
                    await consume(reader)
        elif ended_by == "cancel":

            async def task() -> None:
                async with await log.read(queue_name, "earliest", cursor="billing") as reader:
                    await consume(reader)

            running = asyncio.create_task(task())
            await wait_within(handling.wait(), harness.scaled(10))
            running.cancel()
            with pytest.raises(asyncio.CancelledError):
                await running
        else:
            reader = await log.read(queue_name, "earliest", cursor="billing")  # left open
            with pytest.raises(RuntimeError):
                async with first:
                    await consume(reader)
        await first.aclose()
        restarted = await make_transport()
        resumed = await restarted.event_log().read(queue_name, "earliest", cursor="billing")
        again = await resumed.next(harness.scaled(10))
        assert again is not None and again.data == 2, again
        await resumed.aclose()
        # A block left without an exception commits what it returned.
        async with await restarted.event_log().read(
            queue_name, "earliest", cursor="billing"
        ) as reader:
            event = await reader.next(harness.scaled(10))
            assert event is not None and event.data == 3, event
        resumed = await restarted.event_log().read(queue_name, "earliest", cursor="billing")
        last = await resumed.next(harness.scaled(10))
        assert last is not None and last.data == 4, last
        await resumed.aclose()

    @pytest.mark.parametrize("closing", ["reader", "log", "transport"])
    async def test_closing_a_reader_ends_an_iteration_waiting_in_it(
        self, transport: Transport, queue_name: str, harness: BackendHarness, closing: str
    ) -> None:
        """A task iterating a reader that waits for the next event ends
        (``StopAsyncIteration``: the ``async for`` finishes) when the reader
        or its log is closed, without an error and without a later append."""
        log = transport.event_log()
        reader = await log.read(queue_name, "latest")
        started = asyncio.Event()

        async def consume() -> list[Any]:
            seen = []
            started.set()
            async for event in reader:
                seen.append(event.data)
            return seen

        task = asyncio.create_task(consume())
        await started.wait()
        await asyncio.sleep(0.2)  # into its wait for an event (nothing signals that)
        closer: Any = {"reader": reader, "log": log, "transport": transport}[closing]
        await closer.aclose()
        done, _ = await asyncio.wait({task}, timeout=harness.scaled(10))
        assert done, "the iteration did not end when its reader was closed"
        assert task.result() == []

    async def test_a_reader_of_a_dropped_log_ends_when_the_transport_closes(
        self, queue_name: str, harness: BackendHarness, make_transport: Any
    ) -> None:
        """A program keeps only the reader
        (``await transport.event_log().read(...)``): closing the transport
        still ends an ``async for`` waiting in it."""
        client = await make_transport()
        reader = await client.event_log().read(queue_name, "latest")
        await _ends_when_the_transport_closes(client, reader, harness)

    async def test_a_closed_reader_refuses_to_seek_and_keeps_its_cursor(
        self, transport: Transport, queue_name: str, harness: BackendHarness
    ) -> None:
        log = transport.event_log()
        reader = await _three_read(log, queue_name, "closed-seek", 4, harness)
        await reader.aclose()
        with pytest.raises(ClosedResourceError):
            await reader.seek("earliest")
        await reader.commit()  # nothing to commit after the close
        resumed = await log.read(queue_name, "earliest", cursor="closed-seek")
        first = await resumed.next(harness.scaled(10))
        assert first is not None and first.data == 3, first
        await resumed.aclose()

    async def test_a_refused_seek_leaves_the_reader_and_its_cursor_as_they_were(
        self, transport: Transport, queue_name: str, harness: BackendHarness
    ) -> None:
        log = transport.event_log()
        reader = await _three_read(log, queue_name, "refused-seek", 5, harness)
        with pytest.raises(ValueError):
            await reader.seek("not-a-position")
        await reader.aclose()
        resumed = await log.read(queue_name, "earliest", cursor="refused-seek")
        rest = [await resumed.next(harness.scaled(10)) for _ in range(2)]
        assert [e.data for e in rest if e] == [3, 4]
        await resumed.aclose()

    async def test_a_position_beyond_64_bits_is_refused(
        self, transport: Transport, queue_name: str
    ) -> None:
        log = transport.event_log()
        await log.append(queue_name, "x")
        for huge in ("9223372036854775808", "18446744073709551616", "9" * 40):
            with pytest.raises(ValueError):
                reader = await log.read(queue_name, huge)
                await reader.aclose()
        reader = await log.read(queue_name, "earliest")
        with pytest.raises(ValueError):
            await reader.seek("9" * 40)
        await reader.aclose()

    async def test_a_named_cursor_that_read_nothing_resumes_where_it_was_placed(
        self, harness: BackendHarness, queue_name: str, make_transport: Any
    ) -> None:
        """A cursor opened at ``latest`` and closed before any event came
        stores where it stood: events appended while its reader was down are
        read after the restart (they were skipped: the cursor began at
        ``latest`` again). Likewise a cursor moved by ``seek``."""
        first = await make_transport()
        log = first.event_log()
        await log.append(queue_name, "before")
        placed = await log.read(queue_name, "latest", cursor="late")
        await placed.aclose()
        sought = await log.read(queue_name, "latest", cursor="sought")
        await sought.seek("earliest")
        await sought.aclose()
        await first.aclose()
        second = await make_transport()
        log = second.event_log()
        await log.append(queue_name, "while-down")
        resumed = await log.read(queue_name, "latest", cursor="late")
        got = await resumed.next(harness.scaled(10))
        assert got is not None and got.data == "while-down", got
        again = await log.read(queue_name, "latest", cursor="sought")
        from_seek = [await again.next(harness.scaled(10)) for _ in range(2)]
        assert [e.data for e in from_seek if e] == ["before", "while-down"]
        await again.seek("earliest")  # after reading: the seek is what is stored
        await again.aclose()
        await resumed.aclose()
        back = await log.read(queue_name, "latest", cursor="sought")
        first_back = await back.next(harness.scaled(10))
        assert first_back is not None and first_back.data == "before", first_back
        await back.aclose()
