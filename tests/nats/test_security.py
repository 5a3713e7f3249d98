"""Credentials and TLS against real nats-server processes: a token- and a
password-protected server, and TLS with a CA made in the test (hostname
verification on, so a certificate for another host is refused)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import nkeys
import pytest

from tests.nats._certs import TestCA
from transport import TLSConfig, TransportConfig, WorkRequest, connect
from transport.errors import PermanentTransportError, TransientTransportError
from transport.testing.brokers import NatsServer

pytestmark = [pytest.mark.broker, pytest.mark.timeout(60)]

CANARY = "canary-Secr3t-do-not-log"


@pytest.fixture(autouse=True)
def _own_servers_only() -> None:
    if os.environ.get("NATS_URL"):
        pytest.skip("these tests configure their own servers (auth, TLS)")


@pytest.fixture
def token_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(tmp_path / "token", extra_config=f'authorization {{ token: "{CANARY}" }}')
    server.start()
    yield server
    server.stop()


@pytest.fixture
def password_server(tmp_path: Path) -> Iterator[NatsServer]:
    server = NatsServer(
        tmp_path / "password",
        extra_config=f'authorization {{ users = [ {{ user: "alice", password: "{CANARY}" }} ] }}',
    )
    server.start()
    yield server
    server.stop()


async def _round_trip(config: TransportConfig) -> None:
    transport = await connect(config)
    try:
        queue = transport.request_queue("secured")
        sent = await queue.enqueue(WorkRequest(task="hello", payload={"x": 1}))
        delivery = await queue.poll(5)
        assert delivery is not None and delivery.request.request_id == sent.request_id
        assert await delivery.ack()
        assert (await transport.health()).ok
    finally:
        await transport.aclose()


async def test_token_server_accepts_the_right_token(
    token_server: NatsServer, namespace: str
) -> None:
    await _round_trip(TransportConfig(url=token_server.url, namespace=namespace, token=CANARY))


async def test_token_in_url_userinfo(token_server: NatsServer, namespace: str) -> None:
    url = f"nats://{CANARY}@127.0.0.1:{token_server.port}"
    await _round_trip(TransportConfig(url=url, namespace=namespace))


async def test_wrong_token_is_a_permanent_error_with_a_clear_message(
    token_server: NatsServer,
) -> None:
    with pytest.raises(PermanentTransportError) as info:
        await connect(TransportConfig(url=token_server.url, token="wrong-token"))
    message = str(info.value)
    assert "authorization violation" in message
    assert "wrong-token" not in message and CANARY not in message


async def test_missing_credentials_are_a_permanent_error(token_server: NatsServer) -> None:
    with pytest.raises(PermanentTransportError, match="refused the credentials"):
        await connect(TransportConfig(url=token_server.url))


async def test_password_server(password_server: NatsServer, namespace: str) -> None:
    await _round_trip(
        TransportConfig(
            url=password_server.url, namespace=namespace, username="alice", password=CANARY
        )
    )
    url = f"nats://alice:{CANARY}@127.0.0.1:{password_server.port}"
    config = TransportConfig(url=url, namespace=namespace)
    assert CANARY not in repr(config)
    await _round_trip(config)


async def test_wrong_password_never_shows_the_secret(password_server: NatsServer) -> None:
    config = TransportConfig(url=password_server.url, username="alice", password="not-" + CANARY)
    with pytest.raises(PermanentTransportError) as info:
        await connect(config)
    text = f"{info.value!r} {info.value} {info.value.__cause__!r} {config!r}"
    assert CANARY not in text
    assert "authorization violation" in str(info.value)


@pytest.fixture
def ca(tmp_path: Path) -> TestCA:
    return TestCA(tmp_path / "pki")


def _tls_server(
    root: Path, cert: Path, key: Path, ca: TestCA, *, verify_clients: bool
) -> NatsServer:
    verify = "verify: true" if verify_clients else ""
    server = NatsServer(
        root,
        extra_config=f"""
tls {{
  cert_file: "{cert}"
  key_file: "{key}"
  ca_file: "{ca.ca_file}"
  {verify}
  timeout: 2
}}
""",
    )
    server.start()
    return server


async def test_tls_with_client_certificate(tmp_path: Path, ca: TestCA, namespace: str) -> None:
    cert, key = ca.issue("server", dns=["localhost"], ips=["127.0.0.1"])
    client_cert, client_key = ca.issue("client", dns=[], ips=[], client=True)
    server = _tls_server(tmp_path / "tls", cert, key, ca, verify_clients=True)
    try:
        tls = TLSConfig(
            enabled=True, ca_file=ca.ca_file, cert_file=client_cert, key_file=client_key
        )
        await _round_trip(
            TransportConfig(url=f"tls://127.0.0.1:{server.port}", namespace=namespace, tls=tls)
        )
        await _round_trip(
            TransportConfig(url=f"tls://localhost:{server.port}", namespace=namespace, tls=tls)
        )
        # The server requires a client certificate: without one, refused.
        # With TLS 1.3 the client's side of the handshake completes before
        # the server checks its certificate, so the refusal arrives either as
        # a TLS alert (permanent) or, when the client's CONNECT is written
        # after the server hung up, as a broken pipe or a reset (reported as
        # unreachable): either way the connection is refused, never used.
        with pytest.raises((PermanentTransportError, TransientTransportError)) as refused:
            await connect(
                TransportConfig(
                    url=f"tls://127.0.0.1:{server.port}", tls=TLSConfig(ca_file=ca.ca_file)
                )
            )
        text = str(refused.value).lower()
        assert any(word in text for word in ("certificate", "tls", "broken pipe", "reset")), text
    finally:
        server.stop()


async def test_certificate_for_another_host_is_refused(
    tmp_path: Path, ca: TestCA, namespace: str
) -> None:
    cert, key = ca.issue("elsewhere", dns=["wrong.example.com"], ips=[])
    server = _tls_server(tmp_path / "tls-wrong", cert, key, ca, verify_clients=False)
    try:
        config = TransportConfig(
            url=f"tls://127.0.0.1:{server.port}",
            namespace=namespace,
            tls=TLSConfig(ca_file=ca.ca_file),
        )
        with pytest.raises(PermanentTransportError, match=r"(?i)certificate"):
            await connect(config)
        # Same CA, hostname check explicitly off: the chain alone is accepted,
        # which shows it was the hostname that was refused above.
        relaxed = config.model_copy(
            update={"tls": TLSConfig(ca_file=ca.ca_file, verify_hostname=False)}
        )
        await _round_trip(relaxed)
    finally:
        server.stop()


async def test_certificate_from_an_unknown_ca_is_refused(tmp_path: Path, ca: TestCA) -> None:
    cert, key = ca.issue("server", dns=["localhost"], ips=["127.0.0.1"])
    server = _tls_server(tmp_path / "tls-ca", cert, key, ca, verify_clients=False)
    other = TestCA(tmp_path / "other-pki")
    try:
        with pytest.raises(PermanentTransportError, match=r"(?i)certificate"):
            await connect(
                TransportConfig(
                    url=f"tls://127.0.0.1:{server.port}", tls=TLSConfig(ca_file=other.ca_file)
                )
            )
    finally:
        server.stop()


def _user_seed() -> tuple[str, str]:
    seed = nkeys.encode_seed(os.urandom(32), nkeys.PREFIX_BYTE_USER)
    public = nkeys.from_seed(bytearray(seed)).public_key.decode()
    return seed.decode(), public


async def test_nkey_seed(tmp_path: Path, namespace: str) -> None:
    seed, public = _user_seed()
    server = NatsServer(
        tmp_path / "nkey", extra_config=f'authorization {{ users = [ {{ nkey: "{public}" }} ] }}'
    )
    server.start()
    try:
        await _round_trip(TransportConfig(url=server.url, namespace=namespace, nkey_seed=seed))
        other_seed, _ = _user_seed()
        with pytest.raises(PermanentTransportError) as info:
            await connect(TransportConfig(url=server.url, nkey_seed=other_seed))
        assert other_seed not in str(info.value)
    finally:
        server.stop()


async def test_the_event_bus_cannot_reach_the_queues_and_logs_of_a_namespace(
    tmp_path: Path,
) -> None:
    # The bus is core NATS on the subjects as written: publishing on
    # '<ns>.q.<queue>' put a message into that namespace's queue (dead-lettered
    # there as not a request), on '<ns>.log.<stream>' appended a forged event
    # to its durable log, and a subscription to '*.q.>' read the requests of
    # every namespace on the server.
    from transport import Event, InvalidNameError

    server = NatsServer(tmp_path / "bus")
    server.start()
    try:
        a = await connect(server.url, namespace="tenanta")
        b = await connect(server.url, namespace="tenantb")
        try:
            kitchen = b.request_queue("kitchen")
            await kitchen.enqueue(WorkRequest(task="cook", payload={"secret": "b-only"}))
            await b.event_log().append("audit", {"ok": 1})
            bus = a.event_bus()
            for pattern in ["*.q.>", ">", "*.>", "*.*.kitchen", "tenantb.q.*", "tenantb.log.>"]:
                with pytest.raises(InvalidNameError, match="queue and event-log subjects"):
                    await bus.subscribe(pattern)
            for subject in ["tenantb.q.kitchen", "tenantb.log.audit", "tenantb.dlq.kitchen"]:
                with pytest.raises(InvalidNameError, match="queue and event-log subjects"):
                    await bus.publish(subject, {"forged": True})
                with pytest.raises(InvalidNameError):
                    await bus.request(subject, {"forged": True}, timeout=1)
            # A forged reply_to does not turn a reply into a publish there.
            forged = Event(subject="agent.ask", data=None, reply_to="tenantb.q.kitchen")
            with pytest.raises(ValueError, match="not a NATS inbox"):
                await bus.reply(forged, {"forged": True})
            assert (await kitchen.stats()).depth == 1 and await kitchen.dead_letters() == []
            reader = await b.event_log().read("audit", "earliest")
            assert [(await reader.next(5)).data, await reader.next(0.3)] == [{"ok": 1}, None]  # type: ignore[union-attr]
            await reader.aclose()
            # The documented subjects and patterns still work.
            async with await bus.subscribe("agent.events.>") as events:
                await bus.publish("agent.events.kitchen.opened", {"at": "10:00"})
                got = await events.next(5)
                assert got is not None and got.subject == "agent.events.kitchen.opened"
        finally:
            await a.aclose()
            await b.aclose()
    finally:
        server.stop()


async def test_tls_asked_for_never_talks_plain_text(password_server: NatsServer) -> None:
    """A ``tls://`` URL against a server without TLS (or someone stripping
    the server's ``tls_required``): nats-py sent CONNECT, password included,
    in the clear and connected without TLS. Refused before CONNECT, as a
    permanent error; the server receives nothing."""
    import socket
    import threading

    with pytest.raises(PermanentTransportError, match="not connecting in plain text"):
        await connect(TransportConfig(url=f"tls://alice:s3cr3tpw@127.0.0.1:{password_server.port}"))
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    received: list[bytes] = []

    def fake_server() -> None:  # INFO without tls_required, then records what comes
        connection, _ = listener.accept()
        with connection:
            connection.sendall(
                b'INFO {"server_id":"X","version":"2.10.0","proto":1,'
                b'"max_payload":1048576,"headers":true,"auth_required":true}\r\n'
            )
            connection.settimeout(5)
            with contextlib.suppress(OSError):
                while chunk := connection.recv(4096):
                    received.append(chunk)

    thread = threading.Thread(target=fake_server, daemon=True)
    thread.start()
    try:
        port = listener.getsockname()[1]
        config = TransportConfig(
            url=f"nats://alice:s3cr3tpw@127.0.0.1:{port}", tls=TLSConfig(enabled=True)
        )
        with pytest.raises(PermanentTransportError, match="not connecting in plain text"):
            await connect(config)
        thread.join(10)
    finally:
        listener.close()
    assert b"s3cr3tpw" not in b"".join(received) and b"CONNECT" not in b"".join(received)
