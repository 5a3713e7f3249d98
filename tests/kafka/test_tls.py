"""TLS hostname verification against the Kafka wire protocol, proven with a
TLS-terminating proxy in front of Tansu (whose listener is plain TCP here):
Tansu advertises the proxy's address, so every connection of the client —
bootstrap and broker — goes through TLS."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests._tls import make_certificate, tls_proxy
from transport import TransportConfig, connect
from transport.testing.brokers import TansuBroker, free_port

from .conftest import TEST_OPTIONS

pytestmark = pytest.mark.broker


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("kafka-tls")
    return {
        "right": make_certificate(directory, "right", "IP:127.0.0.1"),
        "wrong": make_certificate(directory, "wrong", "DNS:wrong.example"),
    }


@pytest.fixture(scope="module")
def plain_and_tls_ports() -> Iterator[tuple[int, int]]:
    if os.environ.get("KAFKA_BOOTSTRAP_SERVERS"):
        pytest.skip("the TLS proxy fronts the dev broker only")
    broker = TansuBroker(advertised_port=free_port())
    broker.start()
    try:
        yield broker.port, broker.advertised_port
    finally:
        broker.kill()
        broker.close()  # its directory


@pytest_asyncio.fixture
async def proxied(
    plain_and_tls_ports: tuple[int, int],
    certificates: dict[str, tuple[Path, Path]],
    request: pytest.FixtureRequest,
) -> AsyncIterator[tuple[int, Path]]:
    plain, tls = plain_and_tls_ports
    cert, key = certificates[request.param]
    async with tls_proxy(plain, cert, key, port=tls) as port:
        yield port, cert


def _config(port: int, ca: Path, verify: bool = True) -> TransportConfig:
    options = {**TEST_OPTIONS, "operation_timeout_s": 5}
    return TransportConfig(
        url=f"kafka://127.0.0.1:{port}",
        namespace="tls",
        tls={"ca_file": ca, "verify_hostname": verify},
        options=options,
    )


async def _health(config: TransportConfig) -> tuple[bool, str]:
    """(ok, detail) of a fresh client's health check; a refused connect is
    (False, the error)."""
    try:
        transport = await connect(config)
    except Exception as exc:
        return False, f"{type(exc).__name__}: {exc}"
    try:
        status = await transport.health()
        return status.ok, status.detail
    finally:
        await transport.aclose()


async def _healthy(config: TransportConfig) -> bool:
    return (await _health(config))[0]


@pytest.mark.parametrize("proxied", ["wrong"], indirect=True)
async def test_a_certificate_for_another_host_is_refused(proxied: tuple[int, Path]) -> None:
    port, cert = proxied
    # The same proxy, certificate and CA with hostname verification off are
    # accepted: the refusal below can only come from the hostname check, not
    # from a proxy or broker that is down or an untrusted chain.
    ok, detail = await _health(_config(port, cert, verify=False))
    assert ok, f"control (verification off) failed, so the refusal would prove nothing: {detail}"
    ok, detail = await _health(_config(port, cert))
    assert not ok, "a certificate for wrong.example was accepted for 127.0.0.1"


@pytest.mark.parametrize("proxied", ["right"], indirect=True)
async def test_a_certificate_for_this_host_is_accepted(proxied: tuple[int, Path]) -> None:
    port, cert = proxied
    assert await _healthy(_config(port, cert)) is True
