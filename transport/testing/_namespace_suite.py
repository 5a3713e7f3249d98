"""Namespaces isolate (TESTING.md lifecycle: two namespaces on one store):
two clients of one backend with different ``TransportConfig.namespace`` share
no queue, delivery record or capability, even under the same names."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from transport import Capability, Transport, WorkRequest, WorkResponse
from transport.testing.harness import BackendHarness

pytestmark = [pytest.mark.conformance, pytest.mark.asyncio]


async def _pair(make_transport: Any) -> tuple[Transport, Transport]:
    tag = uuid.uuid4().hex[:8]
    alpha: Transport = await make_transport(namespace=f"alpha{tag}")
    beta: Transport = await make_transport(namespace=f"beta{tag}")
    return alpha, beta


class NamespaceConformance:
    """Subclass it in the backend's tests, no body."""

    async def test_request_is_never_delivered_in_another_namespace(
        self, harness: BackendHarness, queue_name: str, make_transport: Any
    ) -> None:
        alpha, beta = await _pair(make_transport)
        in_alpha = alpha.request_queue(queue_name, lease_seconds=harness.lease_seconds)
        in_beta = beta.request_queue(queue_name, lease_seconds=harness.lease_seconds)
        sent_alpha = await in_alpha.enqueue(WorkRequest(task="ns", payload="alpha"))
        sent_beta = await in_beta.enqueue(WorkRequest(task="ns", payload="beta"))
        # Each consumer first gets its own request (so it is attached and
        # receiving), then must find nothing else: the other namespace's
        # request, enqueued before either poll, would be there by now.
        for queue, mine, theirs in (
            (in_beta, sent_beta, sent_alpha),
            (in_alpha, sent_alpha, sent_beta),
        ):
            first = await queue.poll(harness.scaled(30))
            assert first is not None, f"{mine.payload}: its own request was never delivered"
            assert first.request.request_id == mine.request_id, (
                f"{mine.payload}: got the request enqueued in the other namespace"
            )
            await first.ack()
            extra = await queue.poll(harness.scaled(1.0))
            assert extra is None or extra.request.request_id != theirs.request_id, (
                f"{mine.payload}: the request enqueued in the other namespace was delivered"
            )

    async def test_delivery_records_are_per_namespace(
        self, harness: BackendHarness, queue_name: str, make_transport: Any
    ) -> None:
        alpha, beta = await _pair(make_transport)
        in_alpha = alpha.delivery_registry(queue_name)
        in_beta = beta.delivery_registry(queue_name)
        await in_alpha.register("ns-req-1")
        assert await in_beta.record("ns-req-1") is None, "beta sees alpha's record"
        assert await in_beta.pending() == [], "beta lists alpha's pending request"
        # Completing an id alpha registered does nothing in beta (nobody
        # registered it there); registered in beta too, the completion
        # writes beta's own record only.
        response = WorkResponse(request_id="ns-req-1", result="from beta")
        assert await in_beta.complete("ns-req-1", response) is False
        await in_beta.register("ns-req-1")
        assert await in_beta.complete("ns-req-1", response)
        record = await in_alpha.record("ns-req-1")
        assert record is not None and record.state == "pending", (
            f"alpha's record changed by a completion in beta: {record}"
        )
        fresh_alpha = (await make_transport(namespace=alpha.config.namespace)).delivery_registry(
            queue_name
        )
        assert [p.request_id for p in await fresh_alpha.pending()] == ["ns-req-1"]
        assert not (await fresh_alpha.pending())[0].done()

    async def test_capabilities_are_per_namespace(
        self, harness: BackendHarness, queue_name: str, make_transport: Any
    ) -> None:
        alpha, beta = await _pair(make_transport)
        await alpha.capability_registry().advertise(Capability(name=queue_name, ensemble="a-ens"))
        await beta.capability_registry().advertise(Capability(name=queue_name, ensemble="b-ens"))
        # Fresh clients load each registry from the backend.
        for namespace, expected in (
            (alpha.config.namespace, "a-ens"),
            (beta.config.namespace, "b-ens"),
        ):
            reader = (await make_transport(namespace=namespace)).capability_registry()
            found = [c.ensemble for c in await reader.lookup(queue_name)]
            assert found == [expected], f"namespace {namespace}: providers {found}"

    async def test_event_streams_are_per_namespace(
        self, harness: BackendHarness, queue_name: str, make_transport: Any
    ) -> None:
        if not harness.capabilities.event_log:
            pytest.skip("backend has no event log (capability 'event_log' is false)")
        alpha, beta = await _pair(make_transport)
        await alpha.event_log().append(queue_name, {"from": "alpha"})
        await beta.event_log().append(queue_name, {"from": "beta"})
        for client, name in ((alpha, "alpha"), (beta, "beta")):
            reader = await client.event_log().read(queue_name, "earliest")
            first = await reader.next(harness.scaled(10))
            assert first is not None, f"{name}: its own event was never read"
            assert first.data == {"from": name}, f"{name} read {first.data}"
            extra = await reader.next(harness.scaled(0.5))
            assert extra is None, f"{name} read the other namespace's event {extra.data}"
            await reader.aclose()
