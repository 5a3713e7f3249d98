"""Credentials and TLS on ``redis://`` / ``rediss://`` against a real
redis-server: an ACL user's password (a canary) never appears in logs,
reprs or errors; refused credentials and ACL permissions are permanent
errors; TLS checks the certificate and the hostname."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import SecretStr

from tests._tls import make_certificate
from transport import TLSConfig, TransportConfig, WorkRequest, connect
from transport.errors import (
    ConfigurationError,
    PermanentTransportError,
    TransientTransportError,
)
from transport.testing.brokers import RedisServer, free_port

pytestmark = [pytest.mark.asyncio, pytest.mark.broker, pytest.mark.timeout(90)]

CANARY = "canary-Secr3t-do-not-log"
# The default user may only PING (so the launcher can tell the server is
# up); the application's user has everything.
ACL = f"""user default on nopass -@all +ping
user app on >{CANARY} ~* &* +@all
"""


@pytest.fixture(scope="module")
def acl_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path_factory.mktemp("redis-acl"), extra_config=ACL)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _config(url: str, **fields: object) -> TransportConfig:
    return TransportConfig(url=url, namespace="sec", options={"connect_timeout": 2.0}, **fields)


async def test_acl_user_and_password_work_and_are_never_shown(
    acl_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    config = _config(acl_server.url, username="app", password=SecretStr(CANARY))
    async with await connect(config) as transport:
        queue = transport.request_queue("secure")
        sent = await queue.enqueue(WorkRequest(task="t"))
        delivery = await queue.poll(10)
        assert delivery is not None and delivery.request.request_id == sent.request_id
        await delivery.ack()
        shown = [repr(transport), repr(config), str(await transport.health())]
        shown.append(repr(getattr(transport, "endpoint", "")))
    assert all(CANARY not in text for text in shown), shown
    assert CANARY not in caplog.text


async def test_password_in_the_url_works_and_is_redacted(acl_server: RedisServer) -> None:
    url = acl_server.url.replace("redis://", f"redis://app:{CANARY}@")
    config = _config(url)
    assert CANARY not in config.redacted_url() and CANARY not in repr(config)
    async with await connect(config) as transport:
        assert (await transport.health()).ok
        assert CANARY not in repr(transport)


async def test_wrong_password_is_a_permanent_error_without_the_secret(
    acl_server: RedisServer,
) -> None:
    wrong = f"{CANARY}-wrong"
    with pytest.raises(PermanentTransportError) as info:
        await connect(_config(acl_server.url, username="app", password=SecretStr(wrong)))
    text = f"{info.value} {info.value.__cause__!r}"
    assert "credentials" in str(info.value)
    assert CANARY not in str(info.value), text


async def test_a_user_without_permissions_is_told_so(acl_server: RedisServer) -> None:
    # No credentials: the default user, which may only PING.
    with pytest.raises(PermanentTransportError, match="ACL"):
        await connect(_config(acl_server.url))


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RedisServer, int, Path]]:
    root = tmp_path_factory.mktemp("redis-tls")
    cert, key = make_certificate(root, "redis", "IP:127.0.0.1")
    tls_port = free_port()
    server = RedisServer(
        root,
        extra_config=(
            f"tls-port {tls_port}\n"
            f'tls-cert-file "{cert}"\n'
            f'tls-key-file "{key}"\n'
            f'tls-ca-cert-file "{cert}"\n'
            "tls-auth-clients no\n"
        ),
    )
    server.start()
    try:
        yield server, tls_port, cert
    finally:
        server.stop()


async def test_rediss_with_the_ca_works(tls_server: tuple[RedisServer, int, Path]) -> None:
    _, port, cert = tls_server
    config = _config(f"rediss://127.0.0.1:{port}", tls=TLSConfig(ca_file=cert))
    async with await connect(config) as transport:
        log = transport.event_log()
        position = await log.append("tls", {"over": "tls"})
        reader = await log.read("tls", position)
        event = await reader.next(10)
        assert event is not None and event.data == {"over": "tls"}
        await reader.aclose()


async def test_rediss_refuses_an_unknown_certificate(
    tls_server: tuple[RedisServer, int, Path],
) -> None:
    _, port, _ = tls_server
    with pytest.raises(PermanentTransportError, match="TLS"):
        await connect(_config(f"rediss://127.0.0.1:{port}"))


async def test_rediss_refuses_a_certificate_for_another_host(
    tmp_path: Path, tls_server: tuple[RedisServer, int, Path]
) -> None:
    server, _, _ = tls_server
    # A second TLS listener whose certificate names another host, trusted
    # as a CA: only the hostname check can refuse it.
    cert, key = make_certificate(tmp_path, "elsewhere", "DNS:elsewhere.example")
    other_port = free_port()
    other = RedisServer(
        tmp_path / "other",
        extra_config=(
            f"tls-port {other_port}\n"
            f'tls-cert-file "{cert}"\n'
            f'tls-key-file "{key}"\n'
            f'tls-ca-cert-file "{cert}"\n'
            "tls-auth-clients no\n"
        ),
    )
    other.start()
    try:
        with pytest.raises(PermanentTransportError, match="TLS"):
            await connect(_config(f"rediss://127.0.0.1:{other_port}", tls=TLSConfig(ca_file=cert)))
        # The same certificate is accepted with the hostname check off,
        # which shows the refusal above was the hostname's.
        relaxed = TLSConfig(ca_file=cert, verify_hostname=False)
        async with await connect(_config(f"rediss://127.0.0.1:{other_port}", tls=relaxed)) as t:
            assert (await t.health()).ok
    finally:
        other.stop()
    assert server.url


async def test_settings_of_other_backends_are_refused_not_ignored() -> None:
    # A token meant as the password must not be silently dropped.
    from transport.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match="token") as info:
        await connect(_config("redis://127.0.0.1:1", token=SecretStr(CANARY)))
    assert CANARY not in str(info.value)


async def test_mutual_tls_with_a_client_certificate(tmp_path: Path) -> None:
    from tests.nats._certs import TestCA

    ca = TestCA(tmp_path / "ca")
    server_cert, server_key = ca.issue("server", dns=["localhost"], ips=["127.0.0.1"])
    client_cert, client_key = ca.issue("client", dns=[], ips=[], client=True)
    tls_port = free_port()
    server = RedisServer(
        tmp_path / "mtls",
        extra_config=(
            f"tls-port {tls_port}\n"
            f'tls-cert-file "{server_cert}"\n'
            f'tls-key-file "{server_key}"\n'
            f'tls-ca-cert-file "{ca.ca_file}"\n'
            "tls-auth-clients yes\n"
        ),
    )
    server.start()
    try:
        url = f"rediss://127.0.0.1:{tls_port}"
        with_cert = TLSConfig(ca_file=ca.ca_file, cert_file=client_cert, key_file=client_key)
        async with await connect(_config(url, tls=with_cert)) as transport:
            assert (await transport.health()).ok
        # Without a client certificate the server refuses the client. With
        # TLS 1.3 the client's side of the handshake completes before the
        # server checks its certificate, so the refusal arrives either as a
        # TLS alert (permanent) or as a reset on the first read (reported as
        # unreachable): either way the connection is refused, never used.
        with pytest.raises((PermanentTransportError, TransientTransportError)) as refused:
            await connect(_config(url, tls=TLSConfig(ca_file=ca.ca_file)))
        assert "TLS" in str(refused.value) or "reset" in str(refused.value).lower()
    finally:
        server.stop()


async def test_a_port_of_another_protocol_is_named_as_such() -> None:
    """``redis://`` pointed at another service (here one that greets as a
    NATS server does): a permanent error that says the server does not
    speak Redis, with a short excerpt of what it sent, not a kilobyte of it."""
    greeting = b'INFO {"server_id":"' + b"N" * 900 + b'","version":"2.15.1"}\r\n'

    async def greet(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(greeting)
        await writer.drain()
        await reader.read(1024)
        writer.close()

    server = await asyncio.start_server(greet, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(
            PermanentTransportError, match="does not speak the Redis protocol"
        ) as caught:
            await connect(f"redis://127.0.0.1:{port}")
        message = str(caught.value)
        assert "INFO {" in message and len(message) < 300, message
    finally:
        server.close()
        await server.wait_closed()


async def test_a_database_number_the_server_does_not_have_is_a_configuration_error(
    redis_url: str,
) -> None:
    """The server answers "DB index is out of range": it is reachable, and
    retrying cannot help. It was reported as "no Redis server reachable"
    (a transient error, retried by workers forever)."""
    base = redis_url.split("?", 1)[0].rstrip("/")
    if base.count("/") > 2:  # the URL names a database already
        base = base.rsplit("/", 1)[0]
    with pytest.raises(ConfigurationError, match="no database of the number") as caught:
        await connect(f"{base}/99")
    assert "reachable" not in str(caught.value)
