"""TLS hostname verification, proven with a TLS-terminating proxy in front of
pulsar-lite (which has no TLS listener of its own)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from transport import TransportConfig, connect

from .conftest import PulsarLiteBroker

pytestmark = pytest.mark.broker


def _certificate(directory: Path, name: str, san: str) -> tuple[Path, Path]:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            f"/CN={name}",
            "-addext",
            f"subjectAltName={san}",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    directory = tmp_path_factory.mktemp("tls")
    return {
        "right": _certificate(directory, "right", "IP:127.0.0.1"),
        "wrong": _certificate(directory, "wrong", "DNS:wrong.example"),
    }


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(Exception):
        writer.close()


@contextlib.asynccontextmanager
async def tls_proxy(broker: PulsarLiteBroker, cert: Path, key: Path) -> AsyncIterator[int]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", broker.port)
        await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


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
    async with tls_proxy(broker, cert, key) as port:
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
    async with tls_proxy(broker, cert, key) as port:
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
    async with tls_proxy(broker, cert, key) as port:
        transport = await connect(_config(port, cert, verify=False))
        try:
            health = await transport.health()
        finally:
            await transport.aclose()
    assert health.ok is True, health.detail
