"""An ensemble stopped and started again on Kafka withdraws its tasks when it
stops: the capability registry's topic keeps the earlier run's
advertisement and withdrawal, which a new run replays when it loads."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest

from transport import Ensemble, TaskContext, connect

pytestmark = [pytest.mark.broker, pytest.mark.timeout(120)]


async def test_an_ensemble_started_again_withdraws_at_its_stop(
    kafka_config_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # Seen by a user: the second run took the first run's withdrawal for one
    # made while it ran ("advertising it again"), kept the first run's lease
    # end as another replica's, and left its own advertisement at stop
    # ("another replica advertises ...; its advertisement stays") for the
    # rest of the lease, although no other replica ran.
    name = f"kitchen{uuid.uuid4().hex[:6]}"
    task = f"cook{uuid.uuid4().hex[:6]}"
    config = kafka_config_factory(capability_lease_seconds=60.0)
    caplog.set_level(logging.INFO, logger="transport.runtime")
    for run in range(2):
        async with await connect(config) as transport:
            ensemble = Ensemble(name, transport=transport, concurrency=1)

            @ensemble.task(task)
            async def cook(ctx: TaskContext) -> int:
                return 1

            async with ensemble.serving():
                [cap] = await transport.capability_registry().lookup(task)
                assert cap.instance == ensemble.instance, run
                assert ensemble._others == {}, run  # no other replica was ever running
        async with await connect(config) as fresh:
            assert await fresh.capability_registry().lookup(task) == [], run
    runtime = [r.getMessage() for r in caplog.records if r.name == "transport.runtime"]
    assert not [m for m in runtime if "withdrawn while this replica runs" in m], runtime
    assert not [m for m in runtime if "its advertisement stays" in m], runtime
