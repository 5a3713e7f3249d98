"""A backend option in the URL's query string (here ``claim_interval``, moved out of
the fixture's options), on a real broker: the transport takes it, and the
client connects to the URL without its query."""

from __future__ import annotations

import pytest

from transport import TransportConfig, WorkRequest, connect

pytestmark = [pytest.mark.broker, pytest.mark.asyncio]


async def test_an_option_in_the_url_query_reaches_the_transport(
    redis_config: TransportConfig,
) -> None:
    base = redis_config
    options = {k: v for k, v in base.options.items() if k != "claim_interval"}
    config = base.model_copy(update={"url": f"{base.url}?claim_interval=0.1", "options": options})
    transport = await connect(config)
    try:
        assert float(transport.options.claim_interval) == 0.1  # type: ignore[attr-defined]
        queue = transport.request_queue("urloptions")
        sent = await queue.enqueue(WorkRequest(task="t", payload=1))
        got = await queue.poll(30)
        assert got is not None and got.request.request_id == sent.request_id
        assert await got.ack()
    finally:
        await transport.aclose()
