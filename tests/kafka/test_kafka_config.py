"""Configuration of the Kafka backend (no broker needed)."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError, KafkaException
from pydantic import SecretStr

from transport import TransportConfig
from transport.errors import (
    ConfigurationError,
    PermanentTransportError,
    TransientTransportError,
)
from transport_kafka import KafkaTransport, map_kafka_errors, parse_settings
from transport_kafka._errors import error_from_kafka

CANARY = "canary-pw-7f3a9"


def test_bootstrap_servers_and_defaults() -> None:
    settings = parse_settings(TransportConfig(url="kafka://k1:9092,k2:9093"))
    assert settings.bootstrap == "k1:9092,k2:9093"
    producer = settings.producer_config()
    assert producer["acks"] == "all" and producer["enable.idempotence"] is True
    consumer = settings.consumer_config("g", subscribe=True)
    assert consumer["enable.auto.commit"] is False
    assert consumer["enable.auto.offset.store"] is False
    assert consumer["partition.assignment.strategy"] == "cooperative-sticky"
    assert settings.common["security.protocol"] == "PLAINTEXT"
    names = settings.queue_topics("kitchen")
    assert (names.requests, names.dlq, names.group) == (
        "agentensemble.kitchen.requests",
        "agentensemble.kitchen.dlq",
        "agentensemble.workers.kitchen",
    )


def test_options_from_query_and_config_are_validated() -> None:
    settings = parse_settings(
        TransportConfig(url="kafka://k:9092?partitions=4", options={"fetch_wait_max_ms": 10})
    )
    assert settings.options.partitions == 4
    assert settings.options.fetch_wait_max_ms == 10
    # One line naming the option (it was pydantic's four-line dump with a link).
    with pytest.raises(ConfigurationError) as unknown:
        parse_settings(TransportConfig(url="kafka://k:9092?partitons=2"))
    assert str(unknown.value) == (
        "invalid kafka option(s): partitons: Extra inputs are not permitted"
    )
    with pytest.raises(ConfigurationError) as bad:
        parse_settings(TransportConfig(url="kafka://k:9092", options={"partitions": 0}))
    assert "\n" not in str(bad.value) and str(bad.value).startswith(
        "invalid kafka option(s): partitions: "
    )


@pytest.mark.parametrize("key", ["enable.auto.commit", "group.id"])
def test_passthrough_cannot_weaken_guarantees(key: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_settings(TransportConfig(url="kafka://k:9092", options={"consumer": {key: True}}))
    with pytest.raises(ConfigurationError):
        parse_settings(TransportConfig(url="kafka://k:9092", options={"producer": {"acks": "1"}}))


@pytest.mark.parametrize("url", ["kafka://", "kafka://hostonly", "kafka://h:port"])
def test_bad_urls_are_refused(url: str) -> None:
    with pytest.raises(ConfigurationError):
        parse_settings(TransportConfig(url=url))


def test_sasl_scram_over_tls(tmp_path: object) -> None:
    config = TransportConfig(
        url="kafka://k:9093",
        sasl_mechanism="scram-sha-512",
        username="svc",
        password=SecretStr(CANARY),
        tls={"ca_file": "/etc/ca.pem"},
    )
    settings = parse_settings(config)
    assert settings.common["security.protocol"] == "SASL_SSL"
    assert settings.common["sasl.mechanism"] == "SCRAM-SHA-512"
    assert settings.common["sasl.password"] == CANARY
    assert settings.common["ssl.endpoint.identification.algorithm"] == "https"
    assert CANARY not in repr(settings)
    transport = KafkaTransport(config, settings)
    assert CANARY not in repr(transport)
    assert CANARY not in repr(transport.config)


def test_sasl_needs_credentials_and_known_mechanism() -> None:
    with pytest.raises(ConfigurationError) as exc:
        parse_settings(
            TransportConfig(
                url="kafka://k:9092", sasl_mechanism="PLAIN", password=SecretStr(CANARY)
            )
        )
    assert CANARY not in str(exc.value)
    with pytest.raises(ConfigurationError):
        parse_settings(TransportConfig(url="kafka://k:9092", sasl_mechanism="GSSAPI-ish"))
    with pytest.raises(ConfigurationError):
        parse_settings(TransportConfig(url="kafka://k:9092", sasl_mechanism="OAUTHBEARER"))


def test_oauthbearer_token_and_plaintext_tls_off() -> None:
    settings = parse_settings(
        TransportConfig(url="kafka://k:9092", sasl_mechanism="OAUTHBEARER", token=SecretStr(CANARY))
    )
    assert settings.common["security.protocol"] == "SASL_PLAINTEXT"
    token, expiry = settings.common["oauth_cb"]("")
    assert token == CANARY and expiry > 0
    assert CANARY not in repr(settings)


def test_tls_hostname_verification_can_only_be_turned_off_explicitly() -> None:
    on = parse_settings(TransportConfig(url="kafka://k:9093", tls={"enabled": True}))
    assert on.common["security.protocol"] == "SSL"
    assert on.common["ssl.endpoint.identification.algorithm"] == "https"
    off = parse_settings(
        TransportConfig(url="kafka://k:9093", tls={"enabled": True, "verify_hostname": False})
    )
    assert off.common["ssl.endpoint.identification.algorithm"] == "none"


def test_error_mapping() -> None:
    transient = error_from_kafka(KafkaError(KafkaError._ALL_BROKERS_DOWN), "op")
    assert isinstance(transient, TransientTransportError)
    auth = error_from_kafka(KafkaError(KafkaError.SASL_AUTHENTICATION_FAILED), "op")
    assert isinstance(auth, PermanentTransportError)
    big = error_from_kafka(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE), "op")
    assert isinstance(big, PermanentTransportError)
    with pytest.raises(TransientTransportError) as exc, map_kafka_errors("enqueue"):
        raise KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT))
    assert isinstance(exc.value.__cause__, KafkaException)
    # librdkafka's "Local: Message timed out" alone did not say why.
    assert "brokers are unreachable, or its topic is gone" in str(exc.value)
    with pytest.raises(ConfigurationError), map_kafka_errors("config"):
        raise KafkaException(KafkaError(KafkaError._INVALID_ARG))
    with pytest.raises(TransientTransportError), map_kafka_errors("produce"):
        raise BufferError("queue full")


def test_capabilities_are_honest() -> None:
    caps = KafkaTransport.capabilities  # the defaults: several partitions
    assert caps.persistent and caps.consumer_groups and caps.lease_extension
    assert caps.scale_out and not caps.ordered  # order per ordering key
    fifo = KafkaTransport.capabilities_for(1)
    assert fifo.ordered and not fifo.scale_out  # one consumer works, the others stand by
    assert KafkaTransport(TransportConfig(url="kafka://h:1")).capabilities == caps
    assert caps.individual_acks  # settled markers in the state topic
    assert not caps.native_delay
    assert caps.restart_broker  # a Kafka cluster keeps data (Tansu cannot show it)
