"""A process that closes its transport and exits must exit cleanly.

pulsar-client finishes ``close`` on a detached C++ thread that drops the
Python callback after calling it; if the interpreter is already finalizing,
that thread is torn down inside a destructor and the process aborts
("terminate called without an active exception"). ``aclose()`` waits for the
release, so a short-lived program never dies at exit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from .conftest import make_config

pytestmark = [pytest.mark.broker, pytest.mark.timeout(240)]

PROGRAM = """
import asyncio, os
from transport import WorkRequest, connect

async def main():
    transport = await connect()
    queue = transport.request_queue("exit-check")
    registry = transport.delivery_registry("exit-check")
    await registry.register("r-1")
    await queue.enqueue(WorkRequest(task="t", payload={}))
    delivery = await queue.poll(5)
    assert delivery is not None
    await delivery.ack()
    await transport.aclose()
    print("CLOSED", flush=True)

asyncio.run(main())
"""

RUNS = 8


def test_processes_exit_cleanly_after_aclose(pulsar_url: str) -> None:
    failures = []
    for _ in range(RUNS):
        config = make_config(pulsar_url)
        env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSPORT_")}
        env.update(
            TRANSPORT_URL=pulsar_url,
            TRANSPORT_NAMESPACE=config.namespace,
            TRANSPORT_OPTIONS=json.dumps(config.options),
        )
        result = subprocess.run(
            [sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=60
        )
        if result.returncode != 0 or "CLOSED" not in result.stdout:
            failures.append((result.returncode, result.stderr[-1500:]))
    assert not failures, failures


FORGETFUL_WORKER = """
import asyncio
from transport import connect

async def main():
    transport = await connect()
    queue = transport.request_queue("forgetful", max_attempts=3)
    for _ in range(3):  # back to back: the acks count the next requests ahead
        delivery = await queue.poll(10)
        assert delivery is not None and delivery.attempt == 1, delivery
        assert await delivery.ack()
    print("DONE", flush=True)  # returns without aclose()

asyncio.run(main())
"""


def test_a_worker_that_forgets_aclose_leaves_no_count_behind(pulsar_url: str) -> None:
    """Counts written ahead by its acks are withdrawn at interpreter exit:
    the next worker gets every request it did not handle at attempt 1."""
    import asyncio

    from transport import WorkRequest, connect

    config = make_config(pulsar_url)
    env = {k: v for k, v in os.environ.items() if not k.startswith("TRANSPORT_")}
    env.update(
        TRANSPORT_URL=pulsar_url,
        TRANSPORT_NAMESPACE=config.namespace,
        TRANSPORT_OPTIONS=json.dumps(config.options),
    )

    async def fill() -> None:
        transport = await connect(config)
        queue = transport.request_queue("forgetful", max_attempts=3)
        for i in range(8):
            await queue.enqueue(WorkRequest(task="t", payload=i))
        await transport.aclose()

    async def rest() -> list[int]:
        transport = await connect(config)
        queue = transport.request_queue("forgetful", max_attempts=3)
        attempts = []
        try:
            for _ in range(5):
                delivery = await queue.poll(10)
                assert delivery is not None, f"got {len(attempts)} of 5"
                attempts.append(delivery.attempt)
                assert await delivery.ack()
        finally:
            await transport.aclose()
        return attempts

    asyncio.run(fill())
    result = subprocess.run(
        [sys.executable, "-c", FORGETFUL_WORKER],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0 and "DONE" in result.stdout, result.stderr[-1500:]
    assert asyncio.run(rest()) == [1, 1, 1, 1, 1]
