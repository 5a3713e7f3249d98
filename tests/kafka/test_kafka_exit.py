"""A Kafka worker that ends without ``aclose()``: at interpreter exit it does
what a clean close does — withdraws the delivery counts it reserved ahead
and leaves the group — so the next worker counts only real hand-outs."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

import pytest

from transport import WorkRequest, connect

pytestmark = [pytest.mark.broker, pytest.mark.asyncio]

# Takes two requests, acks the first, prints the id of the second and
# returns from main() holding it, the transport never closed.
_FORGETFUL_WORKER = """
import asyncio, sys
from transport import TransportConfig, connect

async def main() -> None:
    config = TransportConfig.model_validate_json(sys.argv[1])
    queue = (await connect(config)).request_queue(sys.argv[2])
    got = await queue.poll_many(2, 60)
    assert len(got) == 2, got
    assert await got[0].ack()
    print("HELD", got[1].request.request_id, flush=True)

asyncio.run(main())
"""


@pytest.mark.timeout(180)
async def test_a_worker_ending_without_aclose_burns_no_attempt(
    kafka_config_factory: Any, queue_name: str
) -> None:
    """Until 2026-12-04 the counts reserved ahead by such a worker stayed in
    the state topic: the next worker got 6 of the 48 requests it had never
    handed out at attempt 2 (and waited for its session timeout first)."""
    config = kafka_config_factory()
    producer = await connect(config)
    try:
        queue = producer.request_queue(queue_name)
        sent = [await queue.enqueue(WorkRequest(task="t", payload=i)) for i in range(30)]
    finally:
        await producer.aclose()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _FORGETFUL_WORKER,
        config.model_dump_json(),
        queue_name,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 120)
    assert proc.returncode == 0, err.decode()[-2000:]
    words = out.decode().split()
    assert words[:1] == ["HELD"], (out, err.decode()[-2000:])
    held = words[1]

    worker = await connect(config)
    try:
        queue = worker.request_queue(queue_name)
        attempts: dict[str, int] = {}
        while len(attempts) < len(sent) - 1:
            got = await queue.poll_many(16, 60)
            assert got, f"stalled after {len(attempts)} of {len(sent) - 1}"
            for delivery in got:
                attempts[delivery.request.request_id] = delivery.attempt
            assert all(await queue.ack_many(got))
    finally:
        await worker.aclose()
    # The acked one is gone; the held one was handed out once; no other was.
    assert attempts.pop(held) == 2
    assert attempts == {r.request_id: 1 for r in sent if r.request_id in attempts}
    assert len(attempts) == len(sent) - 2
