"""``python -m benchmarks.outbox URL [--n N] [--rounds R] [--options JSON]``

How fast an :class:`~transport.Outbox` forwards what it held during an
outage: ``N`` requests stored while the destination was unreachable, then a
new outbox on the file, timed until ``flush()`` returns; against one
``enqueue`` after the other on the same backend (the outbox sends that way:
each request once the one before it was accepted, so that the line stays in
order through failures). Alternating, median of ``R`` rounds. ``make bench``
runs the same measurement on NATS, Kafka and Pulsar (row "outbox drain").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid

from benchmarks import _library as library
from benchmarks._common import config


async def _main() -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.outbox")
    parser.add_argument("url")
    parser.add_argument("--n", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--options", default="{}", help="transport options, as JSON")
    args = parser.parse_args()
    target = config(args.url, json.loads(args.options), f"ob{uuid.uuid4().hex[:6]}")
    row = await library.outbox_row(args.url.split(":", 1)[0], target, args.n, args.rounds)
    print(
        f"{row.backend:<8} outbox drain {row.ours:>9,.1f} req/s   one enqueue after the "
        f"other {row.baseline:>9,.1f} req/s   ratio {row.ratio:.2f}   ({args.n:,} requests, "
        f"median of {args.rounds})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(_main()))
