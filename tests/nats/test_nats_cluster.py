"""Queues, registries and the event log on a real three-server JetStream
cluster (R3 streams): the stream leader SIGKILLed mid-run and restarted, and
the leader cut off for 30 s (SIGSTOP: its connections stay open and go
silent, as in a network partition). One client rides through each fault by
itself; nothing acknowledged is lost, and duplicates stay within what was in
flight at the fault."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import nats
import pytest
import pytest_asyncio

from tests.reliability._cluster import IN_FLIGHT_WINDOW, raw_connection, run_through
from transport.testing._util import Budget
from transport.testing.brokers import NatsCluster

pytestmark = [pytest.mark.broker, pytest.mark.crash, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsCluster]:
    if os.environ.get("NATS_URL"):
        pytest.skip("runs its own three-server cluster")
    cluster = NatsCluster(tmp_path_factory.mktemp("nats-cluster"))
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.close()


@pytest_asyncio.fixture
async def raw(cluster: NatsCluster) -> AsyncIterator[nats.NATS]:
    """A plain nats-py connection, to ask JetStream who leads a stream."""
    nc = await raw_connection(cluster, Budget(60))
    yield nc
    await nc.close()


async def test_the_stream_leader_killed_and_restarted_mid_run(
    cluster: NatsCluster, raw: nats.NATS
) -> None:
    budget = Budget(180)
    run, _ = await run_through(cluster, raw, "kill", budget)
    assert not run.missing(), run.report()
    duplicated = sum(n - 1 for n in run.processed.values())
    assert duplicated <= IN_FLIGHT_WINDOW, (run.processed.most_common(5), run.report())
    assert len(run.acknowledged) + len(run.indeterminate) == run.requests


async def test_the_stream_leader_partitioned_away_for_30_s(
    cluster: NatsCluster, raw: nats.NATS
) -> None:
    budget = Budget(200)
    run, processed_during = await run_through(cluster, raw, "pause", budget)
    assert not run.missing(), run.report()
    # The two others elected a leader and went on while it was cut off.
    assert processed_during > 0, "no request was processed while the leader was cut off"
    duplicated = sum(n - 1 for n in run.processed.values())
    assert duplicated <= IN_FLIGHT_WINDOW, (run.processed.most_common(5), run.report())


def test_the_cluster_launcher_refuses_fewer_than_three(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="at least 3"):
        NatsCluster(tmp_path, size=2)
