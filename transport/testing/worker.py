"""A worker process for crash tests: ``python -m transport.testing.worker``.

Connects with ``transport.connect()`` (configuration from ``TRANSPORT_*``
environment variables), uses only the public API, and reports each step on
stdout as one line (``LEASED <request_id> <attempt>``, ``ACKED <request_id>``,
``READY``) so the test can SIGKILL it at a known point.

Modes:
* ``hold N``: lease N requests, ack none, print READY, wait to be killed.
* ``ack-all-but-oldest N``: lease N, ack all but the first leased (in a
  shuffled order), print READY, wait to be killed.
* ``process``: lease, print, ack, forever (killed at random points).
* ``produce N``: enqueue N requests one by one, printing ``ENQUEUED <id>``
  after each enqueue returned (killed at random points).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import sys

from transport import Delivery, RequestQueue, TransportError, WorkRequest, connect


def _die_with_parent() -> None:
    # A test runner killed hard must not leave workers consuming behind it.
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def say(*parts: object) -> None:
    sys.stdout.write(" ".join(str(p) for p in parts) + "\n")
    sys.stdout.flush()


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--queue", required=True)
    parser.add_argument(
        "--mode", choices=["hold", "ack-all-but-oldest", "process", "produce"], required=True
    )
    parser.add_argument("--count", type=int, default=1)
    parser.add_argument(
        "--concurrency", type=int, default=1, help="concurrent handlers (process mode)"
    )
    parser.add_argument("--lease", type=float, default=None)
    parser.add_argument(
        "--work-ms",
        type=float,
        default=5.0,
        help="each handler works a random 0..work-ms before acking (process mode)",
    )
    parser.add_argument("--priority-levels", type=int, default=0)
    parser.add_argument("--max-attempts", type=int, default=None)
    args = parser.parse_args()
    _die_with_parent()
    transport = await connect()
    queue: RequestQueue
    if args.priority_levels:
        queue = transport.priority_queue(
            args.queue,
            levels=args.priority_levels,
            lease_seconds=args.lease,
            max_attempts=args.max_attempts,
        )
    else:
        queue = transport.request_queue(
            args.queue, lease_seconds=args.lease, max_attempts=args.max_attempts
        )
    say("STARTED")
    if args.mode == "produce":
        # ATTEMPT before, ENQUEUED after a successful return, INDETERMINATE if
        # the outcome is unknown (a timed-out or failed enqueue may still have
        # been stored): the checker counts only ENQUEUED as acknowledged.
        for i in range(args.count):
            request = WorkRequest(task="produced", payload={"i": i})
            say("ATTEMPT", request.request_id)
            try:
                await queue.enqueue(request)
            except TransportError as exc:
                say("INDETERMINATE", request.request_id, type(exc).__name__)
                await asyncio.sleep(0.05)
                continue
            say("ENQUEUED", request.request_id)
        say("READY")
        await asyncio.Event().wait()
    if args.mode == "process":

        async def process() -> None:
            while True:
                try:
                    delivery = await queue.poll(1.0)
                except TransportError as exc:  # broker restarting: keep trying
                    say("POLL-ERROR", type(exc).__name__)
                    await asyncio.sleep(0.2)
                    continue
                if delivery is None:
                    continue
                say("LEASED", delivery.request.request_id, delivery.attempt)
                await asyncio.sleep(random.uniform(0, args.work_ms / 1000))
                say("ACKING", delivery.request.request_id)  # killed after this: outcome unknown
                try:
                    acked = await delivery.ack()
                except TransportError:
                    acked = False  # outcome unknown: the request may come back
                say("ACKED" if acked else "STALE", delivery.request.request_id)

        await asyncio.gather(*(process() for _ in range(args.concurrency)))
    held: list[Delivery] = []
    while len(held) < args.count:
        delivery = await queue.poll(1.0)
        if delivery is None:
            continue
        held.append(delivery)
        say("LEASED", delivery.request.request_id, delivery.attempt)
    if args.mode == "ack-all-but-oldest":
        rest = held[1:]
        random.shuffle(rest)
        for delivery in rest:
            say("ACKED" if await delivery.ack() else "STALE", delivery.request.request_id)
    say("READY")
    await asyncio.Event().wait()  # until SIGKILL


if __name__ == "__main__":
    asyncio.run(main())
