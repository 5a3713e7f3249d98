"""pytest plugin (entry point ``pytest11``): fixtures the conformance suite
runs on. A backend's tests provide one fixture, ``transport_harness``,
returning a :class:`~transport.testing.BackendHarness`."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import pytest_asyncio

from transport import Transport
from transport.testing._util import TEARDOWN_MARGIN, Budget, timeout_of_test
from transport.testing.harness import BackendHarness


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "conformance: backend conformance scenario")
    config.addinivalue_line("markers", "crash: runs a worker subprocess and kills it with SIGKILL")


@pytest.fixture
def harness(transport_harness: BackendHarness) -> BackendHarness:
    """The backend under test (alias of the backend's ``transport_harness``)."""
    return transport_harness


@pytest.fixture
def budget(request: pytest.FixtureRequest) -> Budget:
    """The time this test may spend: its timeout less a teardown margin.
    Scenarios cut every wait to ``budget.left()`` so that they fail with
    their own message (what was missing) before pytest-timeout kills them."""
    limit = timeout_of_test(request)
    return Budget(max(1.0, limit - max(TEARDOWN_MARGIN, 0.1 * limit)))


@pytest.fixture
def queue_name() -> str:
    """A queue name no other test uses."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest_asyncio.fixture
async def make_transport(
    harness: BackendHarness,
) -> AsyncIterator[Callable[..., Awaitable[Transport]]]:
    """Factory of independent clients on the backend; all closed at teardown."""
    made: list[Transport] = []

    async def make(**overrides: Any) -> Transport:
        transport = await harness.connect(**overrides)
        made.append(transport)
        return transport

    yield make
    for transport in reversed(made):
        await transport.aclose()


@pytest_asyncio.fixture
async def transport(make_transport: Callable[..., Awaitable[Transport]]) -> Transport:
    """A connected transport, closed after the test."""
    return await make_transport()
