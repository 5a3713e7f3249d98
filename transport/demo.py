"""The kitchen network: the library's main job in one small program.

* ``front-desk`` (a :class:`~transport.Network` caller) takes orders and sends
  them to the kitchen with a priority (0 = VIP, 1 = regular, 2 = bulk);
* ``kitchen`` (an :class:`~transport.Ensemble` with a 3-level priority queue
  and two workers) cooks, then asks the courier to deliver — a request from
  one ensemble to another, carrying the same trace id;
* ``courier`` (another ensemble) delivers and answers.

Responses return to the front desk through its delivery registry. Nothing
here names a backend: ``TRANSPORT_URL`` (default: ``sqlite://`` in a temp dir)
decides. Run it with ``make demo``, ``transport demo`` or
``python -m transport.demo``.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from transport import (
    Ensemble,
    Network,
    PendingDelivery,
    TaskContext,
    connect,
    current_traceparent,
)

__all__ = ["ORDERS", "build_network", "main", "run_demo"]

ORDERS = [
    ("soup", 1),
    ("bulk lasagne x40", 2),
    ("steak (VIP)", 0),
    ("salad", 1),
    ("bulk bread x100", 2),
    ("lobster (VIP)", 0),
    ("pasta", 1),
    ("bulk rice x60", 2),
    ("risotto (VIP)", 0),
]
LABEL = {0: "VIP", 1: "regular", 2: "bulk"}


class _Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def log(self, who: str, text: str) -> None:
        print(f"[{time.monotonic() - self.start:6.2f}s] {who:<10} {text}", flush=True)


def _trace(ctx: TaskContext) -> str:
    # The handler runs in the request's trace (W3C traceparent
    # "00-<trace id>-<span id>-<flags>"): show the trace id's first 8 digits.
    traceparent = current_traceparent()
    return traceparent.split("-")[1][:8] if traceparent else "-"


def build_network(
    transport: Any, clock: _Clock, cook_seconds: float = 0.05
) -> tuple[Ensemble, Ensemble]:
    """The two ensembles of the kitchen network, on any transport."""
    kitchen = Ensemble(
        "kitchen", transport=transport, concurrency=2, priority_levels=3, aging_interval=2.0
    )
    courier = Ensemble("courier", transport=transport, concurrency=2)
    to_courier = Network(transport, caller="kitchen")

    @kitchen.task("cook", description="cooks a dish")
    async def cook(ctx: TaskContext) -> dict[str, Any]:
        dish = ctx.payload["dish"]
        clock.log(
            "kitchen",
            f"cooks {dish!r} ({LABEL[ctx.request.priority]}, attempt {ctx.attempt}, trace {_trace(ctx)})",
        )
        await asyncio.sleep(cook_seconds)
        delivered = await to_courier.request("courier", "deliver", {"dish": dish}, timeout=30)
        return {"dish": dish, "delivery": delivered.result}

    @courier.task("deliver", kind="tool", description="delivers a cooked dish")
    async def deliver(ctx: TaskContext) -> dict[str, Any]:
        clock.log("courier", f"delivers {ctx.payload['dish']!r} (trace {_trace(ctx)})")
        return {"delivered": True}

    return kitchen, courier


#: Flags that describe what the test harness can do with the broker, not
#: what the backend offers a user: not printed.
HARNESS_FLAGS = frozenset({"restart_broker"})


async def run_demo(url: str | None = None) -> int:
    """Run the network until every order is answered; returns how many."""
    clock = _Clock()
    tmp = None
    if url is None:
        url = os.environ.get("TRANSPORT_URL")
    if not url:
        tmp = tempfile.TemporaryDirectory(prefix="kitchen-demo-")
        url = f"sqlite:///{Path(tmp.name) / 'kitchen.db'}"
    transport = await connect(url)
    print(f"transport: {transport!r}")
    flags = transport.capabilities.model_dump()
    shown = [name for name, on in flags.items() if on and name not in HARNESS_FLAGS]
    print(f"capabilities: {', '.join(shown)}")
    try:
        kitchen, courier = build_network(transport, clock)
        front_desk = Network(transport, caller="front-desk", default_levels=3)
        # Orders arrive before the kitchen opens: a backlog, served by priority.
        await kitchen.queue.stats()  # create the queue before the first order
        pending: list[tuple[str, int, PendingDelivery]] = []
        for dish, priority in ORDERS:
            handle = await front_desk.send("kitchen", "cook", {"dish": dish}, priority=priority)
            pending.append((dish, priority, handle))
            clock.log("front-desk", f"ordered {dish!r} as {LABEL[priority]}")
        clock.log("front-desk", f"kitchen backlog: {(await kitchen.queue.stats()).depth} orders")
        async with courier, kitchen:

            async def collect(dish: str, priority: int, handle: PendingDelivery) -> None:
                response = await handle.result(timeout=60)
                clock.log(
                    "front-desk",
                    f"✓ {dish!r} ({LABEL[priority]}) {response.status}: {response.result}",
                )

            await asyncio.gather(*(collect(*entry) for entry in pending))
            found = await front_desk.discover("cook")
            clock.log("front-desk", f"'cook' is advertised by {[c.ensemble for c in found]}")
        left = len(await front_desk.pending())
        clock.log("front-desk", f"all {len(ORDERS)} orders answered; pending now: {left}")
        return len(ORDERS)
    finally:
        await transport.aclose()
        if tmp is not None:
            tmp.cleanup()


def main() -> None:
    asyncio.run(run_demo())


if __name__ == "__main__":
    main()
