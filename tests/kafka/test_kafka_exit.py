"""A Kafka worker that ends without ``aclose()``: at interpreter exit it does
what a clean close does — withdraws the delivery counts it reserved ahead
and leaves the group — so the next worker counts only real hand-outs."""

from __future__ import annotations

import asyncio
import sys
from datetime import timedelta
from typing import Any

import pytest

from transport import WorkRequest, connect

pytestmark = [pytest.mark.broker, pytest.mark.asyncio]

# Takes two requests, acks the first, prints the id of the second and
# returns from main() holding it, the transport never closed. With
# "priority": from a two-level priority queue, which also holds the head of
# the level it did not serve (no handler saw that one).
_FORGETFUL_WORKER = """
import asyncio, sys
from datetime import timedelta
from transport import TransportConfig, connect

async def main() -> None:
    config = TransportConfig.model_validate_json(sys.argv[1])
    transport = await connect(config)
    if sys.argv[3] == "priority":
        queue = transport.priority_queue(sys.argv[2], levels=2, aging_interval=timedelta(hours=1))
        got = [await queue.poll(60), await queue.poll(60)]
    else:
        got = await transport.request_queue(sys.argv[2]).poll_many(2, 60)
    assert len(got) == 2 and None not in got, got
    assert await got[0].ack()
    print("HELD", got[1].request.request_id, flush=True)

asyncio.run(main())
"""


@pytest.mark.timeout(180)
@pytest.mark.parametrize("kind", ["plain", "priority"])
async def test_a_worker_ending_without_aclose_burns_no_attempt(
    kafka_config_factory: Any, queue_name: str, kind: str
) -> None:
    """Until 2026-12-04 the counts reserved ahead by such a worker stayed in
    the state topic: the next worker got 6 of the 48 requests it had never
    handed out at attempt 2 (and waited for its session timeout first); a
    priority queue's held head of the other level came back at attempt 2."""
    config = kafka_config_factory()
    producer = await connect(config)
    try:
        if kind == "priority":
            pq = producer.priority_queue(queue_name, levels=2, aging_interval=timedelta(hours=1))
            sent = [
                await pq.enqueue(WorkRequest(task="t", payload=i), priority=i % 2)
                for i in range(30)
            ]
        else:
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
        kind,
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
        attempts: dict[str, int] = {}
        if kind == "priority":
            levels = worker.priority_queue(queue_name, levels=2, aging_interval=timedelta(hours=1))
            while len(attempts) < len(sent) - 1:
                one = await levels.poll(60)
                assert one is not None, f"stalled after {len(attempts)} of {len(sent) - 1}"
                attempts[one.request.request_id] = one.attempt
                assert await one.ack()
            await levels.aclose()
        else:
            queue = worker.request_queue(queue_name)
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


# Gives up on an enqueue to a broker that is not there, closes, returns.
_GIVES_UP = """
import asyncio, sys
from transport import WorkRequest, connect

async def main() -> None:
    transport = await connect(f"kafka://127.0.0.1:{sys.argv[1]}")
    queue = transport.request_queue("kitchen")
    try:
        async with asyncio.timeout(2):
            await queue.enqueue(WorkRequest(task="t"))
    except TimeoutError:
        print("GAVE UP", flush=True)
    await transport.aclose()

asyncio.run(main())
"""


@pytest.mark.timeout(120)
async def test_a_script_that_gives_up_on_a_broker_that_is_down_exits_at_once() -> None:
    """The topic creation it started waits out the operation timeout (30 s)
    on a client thread; the script has given up and closed, and its
    process used to stay until that call returned: a Ctrl-C'd CLI command
    or script took about 30 s to end."""
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    loop = asyncio.get_running_loop()
    started = loop.time()
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _GIVES_UP, str(port), stdout=asyncio.subprocess.PIPE
    )
    out, _ = await child.communicate()
    took = loop.time() - started
    assert child.returncode == 0 and b"GAVE UP" in out, out
    # 2 s given up after, the interpreter's start and exit; not the 30 s.
    assert took < 15, f"the process ended {took:.1f} s after it started"
