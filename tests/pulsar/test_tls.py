"""TLS hostname verification, proven with a TLS-terminating proxy in front of
pulsar-lite (which has no TLS listener of its own)."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytest_asyncio

from tests._tls import make_certificate, tls_proxy
from transport import TransportConfig, connect

from .conftest import PulsarLiteBroker

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("tls")
    return {
        "right": make_certificate(directory, "right", "IP:127.0.0.1"),
        "wrong": make_certificate(directory, "wrong", "DNS:wrong.example"),
    }


@pytest_asyncio.fixture
async def broker(pulsar_broker: PulsarLiteBroker | None) -> PulsarLiteBroker:
    if pulsar_broker is None:
        pytest.skip("the TLS proxy fronts pulsar-lite only")
    return pulsar_broker


def _config(port: int, ca: Path, verify: bool = True) -> TransportConfig:
    return TransportConfig(
        url=f"pulsar+ssl://127.0.0.1:{port}",
        tls={"ca_file": ca, "verify_hostname": verify},
        options={"operation_timeout_seconds": 3, "connection_timeout_ms": 2000},
    )


async def test_a_certificate_for_another_host_is_refused(
    broker: PulsarLiteBroker, certificates: dict[str, tuple[Path, Path]]
) -> None:
    cert, key = certificates["wrong"]
    async with tls_proxy(broker.port, cert, key) as port:
        transport = await connect(_config(port, cert))
        try:
            health = await transport.health()
        finally:
            await transport.aclose()
    assert health.ok is False


async def test_a_certificate_for_this_host_is_accepted(
    broker: PulsarLiteBroker, certificates: dict[str, tuple[Path, Path]]
) -> None:
    cert, key = certificates["right"]
    async with tls_proxy(broker.port, cert, key) as port:
        transport = await connect(_config(port, cert))
        try:
            health = await transport.health()
        finally:
            await transport.aclose()
    assert health.ok is True, health.detail


async def test_the_refusal_is_the_hostname_check(
    broker: PulsarLiteBroker, certificates: dict[str, tuple[Path, Path]]
) -> None:
    """Same wrong certificate, verification explicitly off: accepted."""
    cert, key = certificates["wrong"]
    async with tls_proxy(broker.port, cert, key) as port:
        transport = await connect(_config(port, cert, verify=False))
        try:
            health = await transport.health()
        finally:
            await transport.aclose()
    assert health.ok is True, health.detail
