"""Conformance scenarios for clean restarts: attempts count deliveries (a
request handed to a handler), not sessions. A clean close gives back what
it reserved or prefetched without counting it; a request polled and
released by a clean close comes back with exactly one more attempt."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from typing import Any

import pytest

from transport import Delivery, RequestQueue, Transport
from transport.testing._util import enqueue_all, make_requests
from transport.testing.harness import BackendHarness

pytestmark = [pytest.mark.conformance, pytest.mark.asyncio]

MAX_ATTEMPTS = 3


class CleanRestartConformance:
    """Short sessions (connect, poll, settle, ``aclose()``) one after the
    other on one queue, each a new client of the backend. No capability
    gate: every backend shares a queue between clients (``memory://``
    between the clients of one process, which is all these need)."""

    def open_queue(self, transport: Transport, name: str) -> RequestQueue:
        return transport.request_queue(name, max_attempts=MAX_ATTEMPTS)

    async def _session(
        self, make_transport: Any, name: str, harness: BackendHarness, *, ack: bool
    ) -> Delivery | None:
        """One session: connect, poll one request, ack it (or not), close."""
        client = await make_transport()
        try:
            queue = self.open_queue(client, name)
            delivery = await queue.poll(harness.scaled(20))
            if delivery is not None and ack:
                assert await delivery.ack(), "ack of a live delivery did not take effect"
            return delivery
        finally:
            await client.aclose()

    async def test_clean_sessions_count_only_deliveries(
        self, transport: Transport, queue_name: str, harness: BackendHarness, make_transport: Any
    ) -> None:
        producer = self.open_queue(transport, queue_name)
        sent = await enqueue_all(producer, make_requests(5))
        wanted = {r.request_id for r in sent}
        handed: Counter[str] = Counter()  # deliveries seen per request
        acked: set[str] = set()
        log: list[str] = []
        # Seven sessions: the second closes without acking; the other six ack
        # what they get (five requests + one redelivery = six deliveries).
        index = {r.request_id: i for i, r in enumerate(sent)}
        for session in range(1, 7):
            ack = session != 2
            delivery = await self._session(make_transport, queue_name, harness, ack=ack)
            assert delivery is not None, f"session {session} got nothing ({log})"
            rid = delivery.request.request_id
            assert rid in wanted
            assert rid not in acked, f"acked request {rid} delivered again ({log})"
            handed[rid] += 1
            log.append(f"s{session}:r{index[rid]}@{delivery.attempt}{'' if ack else ' released'}")
            # Exact: one attempt per handing to a handler, nothing for the
            # sessions that prefetched or reserved it without handing it out.
            assert delivery.attempt == handed[rid], (
                f"request delivered {handed[rid]} time(s) has attempt {delivery.attempt} ({log})"
            )
            if ack:
                acked.add(rid)
        # The seventh session gets a request enqueued only now, at attempt 1:
        # nothing of the five is left over, and the session is live.
        [late] = await enqueue_all(producer, make_requests(1))
        seventh = await self._session(make_transport, queue_name, harness, ack=True)
        assert seventh is not None, f"session 7 got nothing ({log})"
        assert (seventh.request.request_id, seventh.attempt) == (late.request_id, 1), (
            f"session 7 got {index.get(seventh.request.request_id, 'the late request')} "
            f"at attempt {seventh.attempt} ({log})"
        )
        assert acked == wanted, f"not every request was delivered and acked ({log})"
        assert sorted(handed.values()) == [1, 1, 1, 1, 2], log
        dead = await producer.dead_letters()
        assert dead == [], f"dead-lettered: {[(d.request_id, d.error) for d in dead]} ({log})"

    async def test_released_at_every_attempt_dead_letters_only_that_request(
        self, transport: Transport, queue_name: str, harness: BackendHarness, make_transport: Any
    ) -> None:
        producer = self.open_queue(transport, queue_name)
        sent = await enqueue_all(producer, make_requests(3))
        # The first request handed out is released by a clean close at each
        # of its attempts; it comes back with exactly one more each time.
        first = await self._session(make_transport, queue_name, harness, ack=False)
        assert first is not None and first.attempt == 1
        released = first.request.request_id
        attempts = [first.attempt]
        others: dict[str, int] = {}
        sessions = 1
        while len(attempts) < MAX_ATTEMPTS or len(others) < len(sent) - 1:
            sessions += 1
            assert sessions <= 2 * len(sent) + MAX_ATTEMPTS, (
                f"too many sessions: released at {attempts}, others {others}"
            )
            client = await make_transport()
            try:
                queue = self.open_queue(client, queue_name)
                delivery = await queue.poll(harness.scaled(20))
                assert delivery is not None, (
                    f"session {sessions} got nothing: released at {attempts}, others {others}"
                )
                rid = delivery.request.request_id
                if rid == released:
                    attempts.append(delivery.attempt)  # closed without acking
                else:
                    assert rid not in others, f"acked request {rid} delivered again"
                    others[rid] = delivery.attempt
                    assert await delivery.ack()
            finally:
                await client.aclose()
        assert attempts == list(range(1, MAX_ATTEMPTS + 1)), attempts
        assert set(others.values()) == {1}, f"never released, yet attempt > 1: {others}"
        # Its last lease was released at the last attempt: dead-lettered, not
        # delivered again; nothing else is. A request enqueued now shows
        # that the last session was live.
        [late] = await enqueue_all(producer, make_requests(1))
        last = await self._session(make_transport, queue_name, harness, ack=True)
        assert last is not None, "the last session got nothing"
        assert (last.request.request_id, last.attempt) == (late.request_id, 1), (
            f"{last.request.request_id} delivered at attempt {last.attempt}, "
            f"expected the late request (released one: {released}, after {attempts})"
        )
        dead = await wait_for_dead_letters(producer, 1, harness.scaled(10))
        assert [(d.request_id, d.attempts) for d in dead] == [(released, MAX_ATTEMPTS)], [
            (d.request_id, d.attempts, d.error) for d in dead
        ]


async def wait_for_dead_letters(queue: RequestQueue, count: int, timeout: float) -> list[Any]:
    """The queue's dead letters once there are ``count`` (or at ``timeout``)."""
    deadline = time.monotonic() + timeout
    while True:
        dead = await queue.dead_letters()
        if len(dead) >= count or time.monotonic() >= deadline:
            return dead
        await asyncio.sleep(0.1)
