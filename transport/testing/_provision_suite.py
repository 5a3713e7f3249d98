"""Conformance scenario for provisioning: looking creates nothing,
``provision`` creates every broker object of a plan, idempotently, and what
it created is what the queues, registries and streams then use."""

from __future__ import annotations

from typing import Any

import pytest

from transport import ProvisionPlan, Transport, WorkRequest
from transport.testing.harness import BackendHarness

pytestmark = [pytest.mark.conformance, pytest.mark.asyncio]


class ProvisioningConformance:
    async def test_looking_creates_nothing_and_provision_is_idempotent(
        self, transport: Transport, queue_name: str, harness: BackendHarness, make_transport: Any
    ) -> None:
        if not transport.capabilities.inspect_without_create:
            pytest.skip("the backend cannot look at an object without creating it")
        plan = ProvisionPlan(
            queues={queue_name: 1, f"{queue_name}-pq": 2},
            delivery_registries=[queue_name],
            event_streams=[queue_name] if transport.capabilities.event_log else [],
        )
        dry = await transport.provision(plan, dry_run=True)
        assert [(s.kind, s.name) for s in dry] == plan.objects()
        # Fresh names: every broker object is missing (the in-process
        # backends have none per object: one shared store).
        with_objects = [s for s in dry if s.broker_objects]
        assert all(s.status == "missing" for s in with_objects), dry
        assert all(s.status == "exists" for s in dry if not s.broker_objects), dry
        first = await transport.missing(plan)
        assert first == with_objects
        assert all(s.missing_objects == s.broker_objects for s in first), first
        # Looking again sees the same: neither look created anything.
        assert await transport.missing(plan) == first, "looking created something"

        steps = await transport.provision(plan)
        assert [(s.name, s.status) for s in steps] == [
            (s.name, "created" if s.broker_objects else "exists") for s in dry
        ]
        assert await transport.missing(plan) == []
        again = await transport.provision(plan)
        assert {s.status for s in again} == {"exists"}

        # What provision made is what the objects use: a request enqueued by
        # another transport is polled here.
        other = await make_transport()
        await other.request_queue(queue_name).enqueue(WorkRequest(task="t", request_id="p-1"))
        delivery = await transport.request_queue(queue_name).poll(timeout=harness.scaled(20))
        assert delivery is not None, "the provisioned queue did not deliver"
        assert delivery.request.request_id == "p-1"
        await delivery.ack()
        assert await transport.missing(plan) == []
