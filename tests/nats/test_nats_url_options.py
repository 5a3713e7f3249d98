"""A backend option in the URL's query string (here ``pull_expires``, moved out of
the fixture's options), on a real broker: the transport takes it, and the
client connects to the URL without its query."""

from __future__ import annotations

import pytest

from tests._url_options import check_query_option
from transport import TransportConfig

pytestmark = [pytest.mark.broker, pytest.mark.asyncio]


async def test_an_option_in_the_url_query_reaches_the_transport(
    nats_config: TransportConfig,
) -> None:
    await check_query_option(nats_config, "pull_expires", 2.0, lambda t: t.options.pull_expires)
