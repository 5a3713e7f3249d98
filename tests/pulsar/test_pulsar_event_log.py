"""Pulsar specifics of the event log that pulsar-lite alone would not catch."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from transport_pulsar import PulsarTransport
from transport_pulsar._client import AsyncPulsarClient, AsyncReader

from .conftest import PulsarHarness

pytestmark = [pytest.mark.broker]


async def test_latest_is_exclusive_and_positions_are_inclusive(
    transport_harness: PulsarHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An inclusive reader at ``MessageId.latest`` is placed on the last
    existing message on Apache Pulsar (pulsar-lite ignores the flag there),
    so "latest" must ask for an exclusive reader; a position is inclusive."""
    transport = await transport_harness.connect()
    assert isinstance(transport, PulsarTransport)
    requested: list[bool] = []
    create_reader = AsyncPulsarClient.create_reader

    async def spy(self: AsyncPulsarClient, *args: Any, inclusive: bool = False) -> AsyncReader:
        requested.append(inclusive)
        return await create_reader(self, *args, inclusive=inclusive)

    monkeypatch.setattr(AsyncPulsarClient, "create_reader", spy)
    try:
        log = transport.event_log()
        stream = f"s{uuid.uuid4().hex[:8]}"
        position = await log.append(stream, "old")
        latest = await log.read(stream, "latest")
        assert requested == [False]
        await latest.seek(position)
        assert requested == [False, True]
        again = await latest.next(10)
        assert again is not None and again.data == "old"
        await latest.seek("latest")
        assert requested == [False, True, False]
        assert await latest.next(0.3) is None
        await latest.aclose()
    finally:
        await transport.aclose()


async def test_appended_at_is_the_message_event_time(transport_harness: PulsarHarness) -> None:
    transport = await transport_harness.connect()
    assert isinstance(transport, PulsarTransport)
    try:
        log = transport.event_log()
        stream = f"s{uuid.uuid4().hex[:8]}"
        await log.append(stream, 1)
        event = await (await log.read(stream, "earliest")).next(10)
        assert event is not None
        assert event.appended_at.microsecond % 1000 == 0  # what milliseconds can hold
        raw = await transport.client.create_reader(transport.topic("log", stream))
        message = await raw.read_next(10)
        assert message is not None
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        assert epoch + timedelta(milliseconds=message.event_timestamp()) == event.appended_at
    finally:
        await transport.aclose()


async def test_events_appended_concurrently_are_read_once_in_order(
    transport_harness: PulsarHarness,
) -> None:
    """pulsar-lite sends a reader copies of messages published concurrently
    (the one just read again, now and then a few hundred earlier ones): a
    reader of the log hands out each event once, in position order."""
    transport = await transport_harness.connect()
    try:
        log = transport.event_log()
        stream = f"s{uuid.uuid4().hex[:8]}"
        n = 2_000
        numbers = iter(range(n))

        async def appender() -> None:
            for i in numbers:
                await log.append(stream, i)

        # The reader follows the stream while it is written (pulsar-lite's
        # copies go to readers that are at the end when messages arrive).
        await log.append(stream, -1)
        reader = await log.read(stream, "earliest")
        first = await reader.next(10)
        assert first is not None and first.data == -1
        seen: list[int] = []

        async def read_all() -> None:
            while len(seen) < n:
                event = await reader.next(10)
                assert event is not None, f"only {len(seen)} of {n} events read"
                seen.append(event.data)

        reading = asyncio.create_task(read_all())
        await asyncio.gather(*(appender() for _ in range(64)))
        await asyncio.wait_for(reading, 60)
        extra = await reader.next(1.0)
        await reader.aclose()
        assert extra is None, f"an event handed out again: {extra.data if extra else None}"
        assert sorted(seen) == list(range(n)), "an event read twice, or one missing"
    finally:
        await transport.aclose()


async def _withheld(timeout: float | None = None) -> None:
    """A reader's ``read_next`` that delivers nothing: a reader gone quiet."""
    await asyncio.sleep(3600 if timeout is None else timeout)


@pytest.mark.parametrize("polling", ["one wait", "short waits"])
@pytest.mark.parametrize("start", ["earliest", "latest", "cursor"])
async def test_a_reader_that_stops_delivering_is_replaced_where_it_was(
    transport_harness: PulsarHarness,
    monkeypatch: pytest.MonkeyPatch,
    start: str,
    polling: str,
) -> None:
    """A reader on pulsar-lite has been seen to go quiet with messages due
    (a registry's keyed topic). Here the event reader's reader withholds
    every message: the event reader notices the due event when it has been
    idle, replaces the reader where it was and returns the next event once,
    neither an earlier one again nor one appended before a ``latest``
    reader was opened. A caller polling with ``next(timeout)`` shorter than
    the idle period is guarded as well as one waiting for good."""
    from transport_pulsar import _events

    monkeypatch.setattr(_events, "_IDLE_CHECK", 0.5)
    transport = await transport_harness.connect()
    assert isinstance(transport, PulsarTransport)
    try:
        log = transport.event_log()
        assert isinstance(log, _events.PulsarEventLog)
        log._timeout = 2.0  # how long a due event may take before the reader is replaced
        stream = f"s{uuid.uuid4().hex[:8]}"
        await log.append(stream, "before")
        if start == "cursor":
            first = await log.read(stream, cursor="c")
            event = await first.next(10)
            assert event is not None and event.data == "before"
            await first.aclose()  # commits "before": a resumed reader starts after it
            reader = await log.read(stream, cursor="c")
        else:
            reader = await log.read(stream, start)
        if start == "earliest":
            event = await reader.next(10)
            assert event is not None and event.data == "before"
        assert isinstance(reader, _events.PulsarEventReader)
        quiet = reader._reader

        monkeypatch.setattr(quiet, "read_next", _withheld)
        await log.append(stream, "after")
        if polling == "one wait":
            event = await reader.next(60)
        else:
            for _ in range(150):  # 60 s in calls shorter than the idle period
                if (event := await reader.next(0.4)) is not None:
                    break
        assert event is not None and event.data == "after"
        assert reader._reader is not quiet  # replaced
        assert await reader.next(1.5) is None  # nothing twice
        await reader.aclose()
    finally:
        await transport.aclose()


async def test_a_stalled_reader_that_cannot_be_replaced_waits_on_and_tries_again(
    transport_harness: PulsarHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """If no new reader can be created when one is due (the broker refuses),
    the event reader keeps the old one, does not raise to the caller, and
    tries again after another idle period."""
    from transport.errors import TransientTransportError
    from transport_pulsar import _events

    monkeypatch.setattr(_events, "_IDLE_CHECK", 0.5)
    transport = await transport_harness.connect()
    assert isinstance(transport, PulsarTransport)
    try:
        log = transport.event_log()
        assert isinstance(log, _events.PulsarEventLog)
        log._timeout = 1.0
        stream = f"s{uuid.uuid4().hex[:8]}"
        reader = await log.read(stream, "earliest")
        assert isinstance(reader, _events.PulsarEventReader)
        quiet = reader._reader

        monkeypatch.setattr(quiet, "read_next", _withheld)
        client = log._ctx.client
        create = client.create_reader
        refused = 0

        async def refuse_once(*args: object, **kwargs: object) -> object:
            nonlocal refused
            if refused == 0:
                refused += 1
                raise TransientTransportError("refused (test)")
            return await create(*args, **kwargs)  # type: ignore[arg-type]

        monkeypatch.setattr(client, "create_reader", refuse_once)
        await log.append(stream, "only")
        event = await reader.next(60)
        assert event is not None and event.data == "only"
        assert refused == 1 and reader._reader is not quiet
        await reader.aclose()
    finally:
        await transport.aclose()


async def test_a_position_is_two_numbers_within_64_bits(
    transport_harness: PulsarHarness,
) -> None:
    """``<ledger>-<entry>``, digits only: a number past 2**63-1 was a
    TypeError from the client's constructor, and ``" 1-2"`` was accepted."""
    transport = await transport_harness.connect()
    try:
        log = transport.event_log()
        stream = f"pos{uuid.uuid4().hex[:8]}"
        await log.append(stream, "x")
        for bad in ("9223372036854775808-0", "0-9223372036854775808", " 1-2", "+1-2", "1-2-3"):
            with pytest.raises(ValueError):
                await log.read(stream, bad)
        reader = await log.read(stream, "earliest")
        with pytest.raises(ValueError):
            await reader.seek("9223372036854775808-0")
        await reader.aclose()
    finally:
        await transport.aclose()
