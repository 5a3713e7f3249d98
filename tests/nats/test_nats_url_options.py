"""A backend option in the URL's query string (here ``pull_expires``, moved out of
the fixture's options), on a real broker: the transport takes it, and the
client connects to the URL without its query."""

from __future__ import annotations

import pytest

from transport import TransportConfig, WorkRequest, connect

pytestmark = [pytest.mark.broker, pytest.mark.asyncio]


async def test_an_option_in_the_url_query_reaches_the_transport(
    nats_config: TransportConfig,
) -> None:
    base = nats_config
    options = {k: v for k, v in base.options.items() if k != "pull_expires"}
    config = base.model_copy(update={"url": f"{base.url}?pull_expires=2.0", "options": options})
    transport = await connect(config)
    try:
        assert float(transport.options.pull_expires) == 2.0  # type: ignore[attr-defined]
        queue = transport.request_queue("urloptions")
        sent = await queue.enqueue(WorkRequest(task="t", payload=1))
        got = await queue.poll(30)
        assert got is not None and got.request.request_id == sent.request_id
        assert await got.ack()
    finally:
        await transport.aclose()
