"""Provisioning and ``doctor`` on ``pulsar://`` without ``admin_url``
(pulsar-lite has no admin API: only a metrics endpoint). What cannot be
looked at or set without it is reported, never claimed."""

from __future__ import annotations

import pytest

from transport import ProvisionPlan, WorkRequest, connect
from transport.errors import UnsupportedFeatureError

from .conftest import make_config

_PLAN = ProvisionPlan(
    queues={"orders": 2, "mail": 1},
    delivery_registries=["inbox"],
    capability_registry=True,
    event_streams=["audit"],
)


async def test_without_admin_url_doctor_says_retention_was_not_checked(pulsar_url: str) -> None:
    transport = await connect(make_config(pulsar_url))
    try:
        report = await transport.doctor(_PLAN)
    finally:
        await transport.aclose()
    assert report.ok
    [finding] = report.findings
    assert finding.severity == "warning"
    assert "retention and deduplication not checked" in finding.finding
    assert "admin_url" in finding.fix and finding.guarantee


async def test_without_admin_url_provision_ensures_every_topic_and_the_queue_subscription(
    pulsar_url: str,
) -> None:
    transport = await connect(make_config(pulsar_url))
    try:
        with pytest.raises(UnsupportedFeatureError, match="admin_url"):
            await transport.missing(_PLAN)
        dry = await transport.provision(_PLAN, dry_run=True)
        assert {s.status for s in dry} == {"unknown"}
        steps = await transport.provision(_PLAN)
        assert {s.status for s in steps} == {"ensured"}
        assert len(steps) == 6  # two levels, one queue, two registries, one stream
        # The provisioned queue is usable, and from another connection.
        queue = transport.request_queue("mail")
        await queue.enqueue(WorkRequest(task="t", request_id="r1"))
    finally:
        await transport.aclose()
    transport = await connect(make_config(pulsar_url, namespace=transport.config.namespace))
    try:
        delivery = await transport.request_queue("mail").poll(timeout=20)
        assert delivery is not None and delivery.request.request_id == "r1"
        await delivery.ack()
    finally:
        await transport.aclose()
