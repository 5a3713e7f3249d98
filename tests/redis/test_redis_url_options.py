"""A backend option in the URL's query string (here ``claim_interval``, moved out of
the fixture's options), on a real broker: the transport takes it, and the
client connects to the URL without its query."""

from __future__ import annotations

import pytest

from tests._url_options import check_query_option
from transport import TransportConfig

pytestmark = [pytest.mark.broker, pytest.mark.asyncio]


async def test_an_option_in_the_url_query_reaches_the_transport(
    redis_config: TransportConfig,
) -> None:
    await check_query_option(
        redis_config, "claim_interval", 0.1, lambda t: t.options.claim_interval
    )
