"""A script that forgets ``aclose()``: ``python -m transport.testing.forgotten_close``.

Connects with ``transport.connect()`` (configuration from ``TRANSPORT_*``
environment variables), starts ``Ensemble.run()`` (two tasks) as a task, makes one
``Network.request`` to it, prints ``RESPONSE <status>`` and returns from
``main()`` without closing anything. The interpreter must still exit:
``asyncio.run`` cancels the tasks left behind, and every task of the library
must end on that cancellation. With ``--priority-once QUEUE`` it takes one
request of a priority queue instead (see :func:`priority_once`).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from transport import Ensemble, Network, TaskContext, connect


async def priority_once(queue_name: str, timeout: float) -> None:
    """Take one request from priority queue ``queue_name`` (3 levels), ack
    it, print ``HANDLED <payload> <attempt> acked=<ack's result>`` and return without closing:
    the heads the queue held on the other levels to compare them must go
    back uncounted."""
    transport = await connect()
    queue = transport.priority_queue(queue_name, levels=3)
    delivery = await queue.poll(timeout)
    if delivery is None:
        sys.stdout.write("NOTHING\n")
        return
    acked = await delivery.ack()
    sys.stdout.write(f"HANDLED {delivery.request.payload} {delivery.attempt} acked={acked}\n")
    sys.stdout.flush()


async def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m transport.testing.forgotten_close",
        usage="%(prog)s (--ensemble NAME --caller NAME | --priority-once QUEUE) [--timeout S]",
        description="A script that forgets aclose(): the interpreter must still exit.",
    )
    parser.add_argument("--ensemble", metavar="NAME", help="the ensemble to run (with --caller)")
    parser.add_argument("--caller", metavar="NAME", help="the caller that requests it")
    parser.add_argument(
        "--priority-once", metavar="QUEUE", help="take one request of a priority queue instead"
    )
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    if args.priority_once:
        await priority_once(args.priority_once, args.timeout)
        return
    if not args.ensemble or not args.caller:
        parser.error("--ensemble and --caller are required")
    transport = await connect()
    ensemble = Ensemble(args.ensemble, transport=transport, concurrency=2)

    @ensemble.task("echo")
    async def echo(ctx: TaskContext) -> dict[str, object]:
        return {"echo": ctx.payload}

    @ensemble.task("reverse")  # several tasks: several advertisements to withdraw
    async def reverse(ctx: TaskContext) -> dict[str, object]:
        return {"reversed": str(ctx.payload)[::-1]}

    ensemble_run = asyncio.create_task(ensemble.run())
    network = Network(transport, caller=args.caller)
    response = await network.request(args.ensemble, "echo", {"n": 1}, timeout=args.timeout)
    sys.stdout.write(f"RESPONSE {response.status}\n")
    sys.stdout.flush()
    del ensemble_run  # deliberately neither stopped nor awaited, nor the transport closed


if __name__ == "__main__":
    asyncio.run(main())
    sys.stdout.write("EXITING\n")
    sys.stdout.flush()
