"""Processes for the runtime's process-level tests (documented API only).

python -m tests.runtime._procs ensemble WORK_SECONDS
python -m tests.runtime._procs send N
python -m tests.runtime._procs collect
"""

from __future__ import annotations

import asyncio
import sys

from transport import Ensemble, Network, TaskContext, connect


def say(*parts: object) -> None:
    print(*parts, flush=True)


async def ensemble(work: float) -> None:
    transport = await connect()
    kitchen = Ensemble("proc-kitchen", transport=transport, concurrency=2, shutdown_grace=10)

    @kitchen.task("cook")
    async def cook(ctx: TaskContext) -> int:
        say("STARTED", ctx.request_id)
        await asyncio.sleep(work)
        say("DONE", ctx.request_id)
        return int(ctx.payload) * 2

    await kitchen.start()
    say("SERVING")
    await kitchen.run()  # until SIGTERM
    await transport.aclose()
    say("EXITED")


async def send(n: int) -> None:
    transport = await connect()
    caller = Network(transport, caller="proc-caller")
    for i in range(n):
        pending = await caller.send("proc-kitchen", "cook", i)
        say("SENT", pending.request_id, i)
    say("READY")
    await asyncio.Event().wait()  # killed here, with every request pending


async def collect() -> None:
    transport = await connect()
    caller = Network(transport, caller="proc-caller")
    for pending in await caller.pending():
        response = await pending.result(timeout=60)
        say("GOT", pending.request_id, response.result)
    say("COLLECTED")
    await transport.aclose()


if __name__ == "__main__":
    from transport.testing.worker import _die_with_parent

    _die_with_parent()
    mode = sys.argv[1]
    if mode == "ensemble":
        asyncio.run(ensemble(float(sys.argv[2])))
    elif mode == "send":
        asyncio.run(send(int(sys.argv[2])))
    else:
        asyncio.run(collect())
