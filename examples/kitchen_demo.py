"""A small kitchen network on the embedded default (``sqlite://`` in a temp
dir), or on whatever ``TRANSPORT_URL`` names.

* ``front-desk`` takes orders and sends them to the kitchen with a priority
  (0 = VIP, 1 = regular, 2 = bulk), then awaits the answers through its
  delivery registry;
* ``kitchen`` works its priority queue with two cooks and hands each cooked
  order to the courier;
* ``courier`` delivers and answers the front desk (``reply_to``).

Nothing here names a backend: switching deployment is configuration only.
Run: ``make demo`` (or ``python examples/kitchen_demo.py``).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from pathlib import Path

from transport import (
    Capability,
    PendingDelivery,
    PriorityRequestQueue,
    RequestQueue,
    Transport,
    WorkRequest,
    WorkResponse,
    connect,
)

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
T0 = time.monotonic()


def log(who: str, text: str) -> None:
    print(f"[{time.monotonic() - T0:6.2f}s] {who:<10} {text}", flush=True)


async def cook(
    name: str, kitchen: PriorityRequestQueue, courier: RequestQueue, stop: asyncio.Event
) -> None:
    while not stop.is_set():
        delivery = await kitchen.poll(0.2)
        if delivery is None:
            continue
        order = delivery.request
        log(
            "kitchen",
            f"{name} cooks {order.payload['dish']!r} ({LABEL[order.priority]}, attempt {delivery.attempt})",
        )
        await asyncio.sleep(0.05)  # the actual work
        # Hand over before acking: if we crash in between, the order is cooked
        # twice (at-least-once), never lost.
        await courier.enqueue(
            WorkRequest(
                request_id=order.request_id,
                task="deliver",
                payload={**order.payload, "cooked_by": name},
                reply_to=order.reply_to,
                priority=order.priority,
                enqueued_at=order.enqueued_at,
                headers=order.headers,
            )
        )
        await delivery.ack()


async def courier_worker(transport: Transport, courier: RequestQueue, stop: asyncio.Event) -> None:
    while not stop.is_set():
        delivery = await courier.poll(0.2)
        if delivery is None:
            continue
        request = delivery.request
        assert request.reply_to is not None
        waited_ms = (
            (time.time() - request.enqueued_at.timestamp()) * 1000 if request.enqueued_at else None
        )
        registry = transport.delivery_registry(request.reply_to)
        await registry.complete(
            request.request_id,
            WorkResponse(
                request_id=request.request_id,
                result={
                    "delivered": request.payload["dish"],
                    "cooked_by": request.payload["cooked_by"],
                },
                duration_ms=waited_ms,
            ),
        )
        await registry.aclose()
        await delivery.ack()


async def main() -> None:
    url = os.environ.get("TRANSPORT_URL")
    tmp = None
    if not url:
        tmp = tempfile.TemporaryDirectory(prefix="kitchen-demo-")
        url = f"sqlite:///{Path(tmp.name) / 'kitchen.db'}"
    transport = await connect(url)
    print(f"transport: {transport!r}  capabilities: {transport.capabilities.model_dump()}")
    try:
        capabilities = transport.capability_registry()
        await capabilities.advertise(
            Capability(name="cook", ensemble="kitchen", queue="kitchen", description="cooks dishes")
        )
        await capabilities.advertise(
            Capability(name="deliver", ensemble="courier", queue="courier", kind="tool")
        )
        [provider] = await capabilities.lookup("cook")
        log(
            "front-desk",
            f"found capability 'cook' at ensemble {provider.ensemble!r}, queue {provider.queue!r}",
        )

        kitchen = transport.priority_queue(
            provider.queue or "kitchen", levels=3, aging_interval=2.0
        )
        courier = transport.request_queue("courier")
        inbox = transport.delivery_registry("front-desk")

        # The front desk takes all orders before the kitchen opens: a backlog.
        pending = {}
        for dish, priority in ORDERS:
            request = WorkRequest(task="cook", payload={"dish": dish}, reply_to="front-desk")
            pending[request.request_id] = (dish, priority, await inbox.register(request.request_id))
            await kitchen.enqueue(request, priority=priority)
            log("front-desk", f"ordered {dish!r} as {LABEL[priority]}")
        stats = await kitchen.stats()
        log("front-desk", f"kitchen backlog: {stats.depth} orders")

        stop = asyncio.Event()
        workers = [
            asyncio.create_task(cook("cook-1", kitchen, courier, stop)),
            asyncio.create_task(cook("cook-2", kitchen, courier, stop)),
            asyncio.create_task(courier_worker(transport, courier, stop)),
        ]

        async def collect(dish: str, priority: int, handle: PendingDelivery) -> None:
            response = await handle.result(timeout=30)
            log(
                "front-desk", f"✓ {dish!r} ({LABEL[priority]}) {response.status}: {response.result}"
            )

        await asyncio.gather(*(collect(*entry) for entry in pending.values()))
        stop.set()
        await asyncio.gather(*workers)
        log(
            "front-desk",
            f"all {len(ORDERS)} orders answered; pending now: {len(await inbox.pending())}",
        )
    finally:
        await transport.aclose()
        if tmp is not None:
            tmp.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
