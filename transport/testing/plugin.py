"""pytest plugin (entry point ``pytest11``): fixtures the conformance suite
runs on. A backend's tests provide one fixture, ``transport_harness``,
returning a :class:`~transport.testing.BackendHarness`.

The entry point loads in every pytest run of an environment where the
library is installed, including a base install without the ``test`` extra:
it must never break pytest. The async fixtures need pytest-asyncio; without
it they are replaced by fixtures that fail only the tests that use them,
saying what to install.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TYPE_CHECKING, Any

import pytest

from transport.testing._util import TEARDOWN_MARGIN, Budget, timeout_of_test

if TYPE_CHECKING:
    from transport import Transport
    from transport.testing.harness import BackendHarness

try:  # part of the ``test`` extra, not of a base install
    import pytest_asyncio
except ImportError:
    HAVE_PYTEST_ASYNCIO = False
else:
    HAVE_PYTEST_ASYNCIO = True

MISSING_ASYNCIO = (
    "the transport conformance fixtures need pytest-asyncio: "
    "pip install 'agentensemble-transport[test]'"
)


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


if HAVE_PYTEST_ASYNCIO:

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

else:

    @pytest.fixture(name="make_transport")
    def _make_transport_needs_pytest_asyncio() -> None:
        """Needs pytest-asyncio (fails the test that uses it, saying so)."""
        pytest.fail(MISSING_ASYNCIO, pytrace=False)

    @pytest.fixture(name="transport")
    def _transport_needs_pytest_asyncio() -> None:
        """Needs pytest-asyncio (fails the test that uses it, saying so)."""
        pytest.fail(MISSING_ASYNCIO, pytrace=False)
