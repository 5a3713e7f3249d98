"""The real-broker scenario of a backend option given in the URL's query
string, shared by the backends' test packages."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from transport import Transport, TransportConfig, WorkRequest, connect


async def check_query_option(
    base: TransportConfig, name: str, value: float, read: Callable[[Transport], Any]
) -> None:
    """Connect with ``name=value`` moved from ``base.options`` into the URL's
    query: the transport takes it (``read`` returns the parsed option), the
    client connects to the URL without the query, and a request is carried."""
    options = {k: v for k, v in base.options.items() if k != name}
    config = base.model_copy(update={"url": f"{base.url}?{name}={value}", "options": options})
    transport = await connect(config)
    try:
        assert float(read(transport)) == value
        queue = transport.request_queue("urloptions")
        sent = await queue.enqueue(WorkRequest(task="t", payload=1))
        got = await queue.poll(30)
        assert got is not None and got.request.request_id == sent.request_id
        assert await got.ack()
    finally:
        await transport.aclose()
