"""Default-configuration scenarios: the backend as a user first meets it.

The rest of the suite runs with settings tuned for fast tests (short fetch
waits and timeouts) and polls through empty results, so a start-up delay or
a slow default never shows. Here every client comes from
``harness.default_config()`` (the same broker and namespace, every other
setting at the library's default) and work is taken with the loop a user
writes: ``poll(timeout=5)``, where an empty answer while work is waiting is
a failure, not a reason to poll again.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

import pytest

from transport import Transport
from transport.testing._util import enqueue_all, make_requests
from transport.testing.harness import BackendHarness

pytestmark = [pytest.mark.conformance, pytest.mark.asyncio]

if TYPE_CHECKING:
    from pytest_asyncio import fixture as _async_fixture
else:
    try:  # part of the ``test`` extra; the module must import without it
        from pytest_asyncio import fixture as _async_fixture
    except ImportError:  # the tests that use it fail, saying what to install
        _async_fixture = pytest.fixture

#: The timeout a user writes in a worker loop.
USER_POLL_TIMEOUT = 5.0


class DefaultConfigurationConformance:
    """A small subset of the queue contract on default settings."""

    @_async_fixture
    async def default_clients(self, harness: BackendHarness) -> AsyncIterator[list[Transport]]:
        """Clients on the default configuration, closed after the test."""
        made: list[Transport] = []
        yield made
        for client in reversed(made):
            await client.aclose()

    async def _client(self, harness: BackendHarness, made: list[Transport]) -> Transport:
        client = await harness.connect_default()
        made.append(client)
        return client

    async def test_a_users_poll_loop_takes_every_waiting_request(
        self, harness: BackendHarness, queue_name: str, default_clients: list[Transport]
    ) -> None:
        producer = (await self._client(harness, default_clients)).request_queue(queue_name)
        sent = await enqueue_all(producer, make_requests(10))
        worker_client = await self._client(harness, default_clients)
        worker = worker_client.request_queue(queue_name)
        got: list[str] = []
        for _ in sent:
            delivery = await worker.poll(timeout=USER_POLL_TIMEOUT)
            assert delivery is not None, (
                f"poll(timeout={USER_POLL_TIMEOUT:g}) on default settings returned nothing with "
                f"{len(sent) - len(got)} of {len(sent)} requests waiting"
            )
            assert await delivery.ack()
            got.append(delivery.request.request_id)
        assert sorted(got) == sorted(r.request_id for r in sent), "a request twice"
        if worker_client.capabilities.ordered:  # on default settings (Kafka: not)
            assert got == [r.request_id for r in sent], "not in enqueue order"

    async def test_a_short_poll_of_a_new_worker_finds_the_waiting_backlog(
        self, harness: BackendHarness, queue_name: str, default_clients: list[Transport]
    ) -> None:
        """A new worker's first ``poll(timeout=1)`` with requests waiting
        returns one: a backend still joining (a Kafka consumer group's first
        join takes about 3 s, the broker's ``group.initial.rebalance.delay.ms``)
        extends the poll until it knows its head, instead of answering
        ``None``, which a drain loop reads as "done" (one ended at once on a
        cold start with 200 requests waiting)."""
        producer = (await self._client(harness, default_clients)).request_queue(queue_name)
        sent = await enqueue_all(producer, make_requests(3))
        worker = (await self._client(harness, default_clients)).request_queue(queue_name)
        delivery = await worker.poll(timeout=1.0)
        assert delivery is not None, (
            f"a new worker's poll(timeout=1) on default settings returned nothing with "
            f"{len(sent)} requests waiting"
        )
        assert delivery.request.request_id in {r.request_id for r in sent}
        assert await delivery.ack()

    async def test_a_short_poll_of_a_new_priority_worker_serves_the_best_waiting_level(
        self, harness: BackendHarness, queue_name: str, default_clients: list[Transport]
    ) -> None:
        """As above for a priority queue: its first ``poll(timeout=1)`` waits
        until every level knows its head, then serves the best one (a Kafka
        priority queue served nothing of 15 waiting requests to a drain loop
        of ``poll(timeout=3)``)."""
        producer = (await self._client(harness, default_clients)).priority_queue(
            queue_name, levels=3
        )
        sent = {}
        for level in (2, 1, 0):
            [request] = make_requests(1)
            sent[level] = await producer.enqueue(request, priority=level)
        worker = (await self._client(harness, default_clients)).priority_queue(queue_name, levels=3)
        delivery = await worker.poll(timeout=1.0)
        assert delivery is not None, (
            "a new priority worker's poll(timeout=1) on default settings returned nothing "
            "with a request waiting on each of 3 levels"
        )
        assert delivery.request.request_id == sent[0].request_id, "not the best level first"
        assert await delivery.ack()

    async def test_a_request_enqueued_while_a_worker_waits_is_delivered_to_it(
        self, harness: BackendHarness, queue_name: str, default_clients: list[Transport]
    ) -> None:
        worker = (await self._client(harness, default_clients)).request_queue(queue_name)
        assert await worker.poll(timeout=0.5) is None  # joined, nothing there yet
        producer = (await self._client(harness, default_clients)).request_queue(queue_name)
        [request] = await enqueue_all(producer, make_requests(1))
        delivery = await worker.poll(timeout=USER_POLL_TIMEOUT)
        assert delivery is not None, (
            f"a waiting worker on default settings did not get a new request within "
            f"{USER_POLL_TIMEOUT:g} s"
        )
        assert delivery.request.request_id == request.request_id
        assert await delivery.ack()

    async def test_a_nacked_request_comes_back(
        self, harness: BackendHarness, queue_name: str, default_clients: list[Transport]
    ) -> None:
        queue = (await self._client(harness, default_clients)).request_queue(queue_name)
        [request] = await enqueue_all(queue, make_requests(1))
        # A second poll is allowed for the first delivery only: how long a
        # new consumer takes to join is the first scenario's check.
        first = await queue.poll(timeout=USER_POLL_TIMEOUT) or await queue.poll(
            timeout=USER_POLL_TIMEOUT
        )
        assert first is not None, "nothing delivered on default settings"
        assert await first.nack()
        again = await queue.poll(timeout=USER_POLL_TIMEOUT)
        assert again is not None, (
            f"a nacked request did not come back within {USER_POLL_TIMEOUT:g} s on default settings"
        )
        assert again.request.request_id == request.request_id
        assert again.attempt == 2
        assert await again.ack()
