"""Configuration, names and secrets of the Pulsar backend (no broker needed,
except for the unreachable-broker health check, which needs none either)."""

from __future__ import annotations

import ctypes
import logging

import pytest

from transport import TransportConfig, connect
from transport.errors import ConfigurationError, InvalidNameError
from transport_pulsar import PulsarTransport

CANARY = "canary-Secret-7f3a9"


def make(url: str = "pulsar://127.0.0.1:6650", **fields: object) -> PulsarTransport:
    return PulsarTransport(TransportConfig(url=url, namespace="app", **fields))  # type: ignore[arg-type]


async def test_topic_names_follow_the_documented_mapping() -> None:
    transport = make(options={"tenant": "acme", "pulsar_namespace": "agents"})
    try:
        queue = transport.request_queue("orders")
        assert queue.topic == "persistent://acme/agents/app.q.orders"  # type: ignore[attr-defined]
        assert queue._dlq.topic == "persistent://acme/agents/app.q.orders__dlq"  # type: ignore[attr-defined]
        assert (
            transport.topic("kv.delivery", "inbox")
            == "persistent://acme/agents/app.kv.delivery.inbox"
        )
        assert transport.config.consumer_group == "workers"
    finally:
        await transport.aclose()


async def test_defaults_are_public_default_and_shared() -> None:
    transport = make()
    try:
        assert transport.topic("q", "x") == "persistent://public/default/app.q.x"
        assert transport.settings.options.subscription_type == "shared"
    finally:
        await transport.aclose()


@pytest.mark.parametrize(
    "bad", ["a/b", "a:b", "", "a b", "../x", "a-partition-1", "x" * 200, "ünï", "a\nb"]
)
def test_unsafe_tenant_or_namespace_is_rejected(bad: str) -> None:
    with pytest.raises(ConfigurationError):
        make(options={"tenant": bad})
    with pytest.raises(ConfigurationError):
        make(options={"pulsar_namespace": bad})


async def test_longest_valid_names_fit_with_library_suffixes() -> None:
    transport = make()
    try:
        name = "q" * 100
        queue = transport.priority_queue(name, levels=3)
        assert queue.levels == 3
        assert transport.topic("q", f"{name}__p2__dlq").endswith(f"{name}__p2__dlq")
    finally:
        await transport.aclose()


async def test_reserved_partition_suffix_in_a_queue_name_is_rejected() -> None:
    transport = make()
    try:
        with pytest.raises(InvalidNameError):
            transport.request_queue("orders-partition-0")
    finally:
        await transport.aclose()


@pytest.mark.parametrize(
    "url",
    [
        "pulsar://user:pw@host:6650",
        "pulsar://host:6650/path",
        "pulsar://host:6650?x=1",
        "pulsar://",
    ],
)
def test_bad_urls_are_rejected(url: str) -> None:
    with pytest.raises(ConfigurationError):
        make(url)


def test_unknown_options_are_rejected() -> None:
    with pytest.raises(ConfigurationError, match="no_such_option"):
        make(options={"no_such_option": 1})


def test_tls_verifies_hostnames_by_default() -> None:
    transport = make("pulsar+ssl://broker.example:6651", tls={"ca_file": "/etc/ssl/ca.pem"})
    assert transport.settings.use_tls
    assert transport.client_settings["use_tls"] is True
    assert transport.client_settings["tls_validate_hostname"] is True
    assert transport.client_settings["tls_allow_insecure_connection"] is False
    assert transport.client_settings["tls_trust_certs_file_path"] == "/etc/ssl/ca.pem"


def test_tls_needs_the_ssl_scheme_and_plain_keys() -> None:
    with pytest.raises(ConfigurationError):
        make("pulsar://host:6650", tls={"enabled": True})
    with pytest.raises(ConfigurationError):
        make("pulsar+ssl://host:6651", tls={"key_password": "x", "cert_file": "c", "key_file": "k"})


def test_only_one_authentication_method() -> None:
    with pytest.raises(ConfigurationError):
        make(token="t", username="u", password="p")


async def test_secrets_never_appear_in_reprs_errors_or_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(ConfigurationError) as info:
        make(token=CANARY, options={"oauth2_client_secret": CANARY, "bogus": CANARY})
    assert CANARY not in str(info.value)
    transport = make(
        "pulsar://127.0.0.1:1",
        token=CANARY,
        # client_log=python: the C++ client's debug lines reach caplog too.
        options={
            "connection_timeout_ms": 500,
            "operation_timeout_seconds": 2,
            "client_log": "python",
        },
    )
    try:
        assert CANARY not in repr(transport)
        assert CANARY not in repr(transport.config)
        assert CANARY not in repr(transport.client_settings)
        health = await transport.health()
        assert health.ok is False
        assert CANARY not in health.detail
    finally:
        await transport.aclose()
    assert CANARY not in caplog.text


async def test_connect_selects_the_backend_by_scheme() -> None:
    transport = await connect("pulsar://127.0.0.1:1", options={"connection_timeout_ms": 500})
    try:
        assert isinstance(transport, PulsarTransport)
        assert transport.backend == "pulsar"
    finally:
        await transport.aclose()
    transport = await connect("pulsar+ssl://127.0.0.1:1")
    try:
        assert isinstance(transport, PulsarTransport) and transport.settings.use_tls
    finally:
        await transport.aclose()


def test_public_names_import() -> None:
    import transport_pulsar

    for name in transport_pulsar.__all__:
        assert getattr(transport_pulsar, name) is not None


def test_ack_receipts_are_set_only_on_a_proven_consumer_configuration() -> None:
    """The C++ setters run only once the C++ getters read back what Python
    set (the redelivery delay) and the grouping default: a configuration
    that does not match is left alone, so a mismatched pointer never writes."""
    import _pulsar

    from transport_pulsar._client import enable_ack_receipts

    conf = _pulsar.ConsumerConfiguration()
    conf.negative_ack_redelivery_delay_ms(250)
    assert not enable_ack_receipts(conf, 100), "a delay that does not read back must refuse"
    assert enable_ack_receipts(conf, 250), "this pulsar-client build should allow ack receipts"
    # Grouping is 0 now, not the default: a second call refuses rather than
    # trusting a configuration it cannot prove.
    assert not enable_ack_receipts(conf, 250)


@pytest.mark.parametrize("receipts", [False, True])
def test_acks_sent_at_once_turn_off_grouping_and_set_receipts_as_asked(receipts: bool) -> None:
    """The default consumer configuration writes each ack at once (grouping
    time 0) without asking for receipts; ``ack_receipts`` adds them."""
    import _pulsar

    from transport_pulsar._client import _AckSettings, send_acks_at_once

    settings = _AckSettings.load()
    assert settings is not None, "this pulsar-client build should allow acks sent at once"
    conf = _pulsar.ConsumerConfiguration()
    conf.negative_ack_redelivery_delay_ms(100)
    assert send_acks_at_once(conf, 100, receipts=receipts)
    address = ctypes.c_void_p.from_address(id(conf) + object.__basicsize__).value
    assert settings.get_grouping(address) == 0
    assert bool(settings.get_receipt(address)) is receipts


async def test_a_redispatched_copy_of_a_message_acked_across_a_reconnect_is_acked_again() -> None:
    """A copy the broker dispatches again after an ack had to be given again
    across a reconnect is not handed out, and it is acknowledged once more:
    dropped unacked, it would stay with the consumer until it closes (the
    first ack may have been lost with the old connection)."""
    import asyncio

    import _pulsar

    from transport_pulsar._client import AsyncConsumer

    class Message:
        def __init__(self, message_id: str) -> None:
            self._id = message_id

        def message_id(self) -> str:
            return self._id

    class Client:
        def __init__(self) -> None:
            self.acked: list[Message] = []

        def acknowledge_async(self, message: Message, callback: object) -> None:
            self.acked.append(message)

    client = Client()
    consumer = AsyncConsumer(client, "t", asyncio.get_running_loop(), 0.0, acks_at_once=True)
    consumer._reacked["7:1:-1"] = None
    copy, fresh = Message("7:1:-1"), Message("7:2:-1")
    consumer._on_message(_pulsar.Result.Ok, copy)
    consumer._on_message(_pulsar.Result.Ok, fresh)
    assert client.acked == [copy]
    assert await consumer.next(0) is fresh


def test_only_a_lasting_refusal_turns_consumer_id_spreading_off() -> None:
    """The readers that spread consumer ids stop being tried for a refusal
    that lasts (no such topic on a broker without auto-creation, no
    permission, not a topic name), not for a broker that did not answer."""
    from transport_pulsar._client import _refusal
    from transport_pulsar._errors import PulsarResultError

    for lasting in ("TopicNotFound", "AuthorizationError", "InvalidTopicName", "NotAllowedError"):
        assert _refusal(PulsarResultError(lasting)), lasting
    for passing in ("Timeout", "ConnectError", "Disconnected", "ServiceUnitNotReady"):
        assert not _refusal(PulsarResultError(passing)), passing
    assert not _refusal(TimeoutError())


@pytest.mark.parametrize(
    ("options", "expected_ms"),
    [
        ({}, 30_000),
        ({"operation_timeout_seconds": 10}, 10_000),
        ({"operation_timeout_seconds": 10, "send_timeout_ms": 4_000}, 4_000),
    ],
)
async def test_a_send_fails_within_the_operation_timeout(
    options: dict[str, object], expected_ms: int
) -> None:
    """A send to a broker that does not answer fails within the operation
    timeout, as every operation does: with ``operation_timeout_seconds=10``
    an enqueue to a stopped pulsar-lite raised after the 30 s send timeout
    (checked with a stopped broker: 30.0 s before, 10.0 s after)."""
    transport = make(options=options)
    try:
        assert transport.client._send_timeout_ms == expected_ms
    finally:
        await transport.aclose()
