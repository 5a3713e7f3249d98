"""The client's callbacks (rebalance, log, statistics, errors) run inside the
consumer's ``poll()``. confluent-kafka keeps one per-thread call state for
each client while such a call runs; calling ``poll``/``consume``/``close``/
``list_topics`` on the same client from inside one of its callbacks ends
that state early, and the next callback served by the same ``poll()`` aborts
the whole process (``CallState_get: Assertion `cs != NULL' failed``).

Until 2026-12-06 a queue's assignment callback asked its own consumer for
the partition leaders (``list_topics``): a process whose consumer had log
lines or statistics queued behind the assignment died on a C assertion (seen
twice in fresh-clone runs, once in an example, once in a test worker). With
librdkafka's debug lines on, a log line follows the assignment in the same
``poll()`` every time, so the abort was certain.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest

pytestmark = [pytest.mark.broker, pytest.mark.asyncio]

_WORKER = """
import asyncio, sys
from transport import TransportConfig, WorkRequest, connect

async def main() -> None:
    config = TransportConfig.model_validate_json(sys.argv[1])
    transport = await connect(config)
    try:
        queue = transport.request_queue(sys.argv[2])
        await queue.enqueue(WorkRequest(task="t", payload="first"))
        got = await queue.poll(60)
        assert got is not None
        assert await got.ack()
        print("ACKED", got.request.payload, flush=True)
    finally:
        await transport.aclose()

asyncio.run(main())
"""


@pytest.mark.timeout(180)
async def test_a_worker_whose_client_logs_everything_survives_its_assignment(
    kafka_config_factory: Any, queue_name: str
) -> None:
    # "debug" is a passthrough librdkafka setting a user may turn on to
    # diagnose a problem: every log line is one more callback in poll().
    config = kafka_config_factory(options={"consumer": {"debug": "cgrp,topic,fetch"}})
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _WORKER,
        config.model_dump_json(),
        queue_name,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(150):
        out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]
    assert out.decode().split() == ["ACKED", "first"], err.decode()[-2000:]
