"""A backend option in the URL's query string (here ``close_timeout_seconds``, moved out of
the fixture's options), on a real broker: the transport takes it, and the
client connects to the URL without its query."""

from __future__ import annotations

import pytest

from tests._url_options import check_query_option
from tests.pulsar.conftest import make_config

pytestmark = [pytest.mark.broker, pytest.mark.asyncio]


async def test_an_option_in_the_url_query_reaches_the_transport(pulsar_url: str) -> None:
    await check_query_option(
        make_config(pulsar_url),
        "close_timeout_seconds",
        5,
        lambda t: t.settings.options.close_timeout_seconds,
    )
