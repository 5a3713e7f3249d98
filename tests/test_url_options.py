"""Backend options in the URL's query string, on every backend that has
options: ``kafka://h:9092?partitions=3``, ``nats://h:4222?prefetch=8``, ...
(a deployment that configures the transport with one URL, e.g. from an
environment variable). Until 2026-12-06 only ``kafka://`` and ``sqlite://``
took them (``nats://``, ``redis://`` and ``pulsar://`` refused any query),
and an option given both in the query and in ``options`` was silently taken
from the one place on ``kafka://`` and from the other on ``sqlite://``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

from transport import TransportConfig
from transport.errors import ConfigurationError


def _kafka(config: TransportConfig) -> Any:
    from transport_kafka._config import parse_settings

    return parse_settings(config).options


def _sqlite(config: TransportConfig) -> Any:
    from transport_inprocess.sqlite._config import SqliteSettings

    return SqliteSettings.from_config(config)


def _nats(config: TransportConfig) -> Any:
    from transport_nats._config import load_options, parse_servers, without_query

    options = load_options(config)
    servers, _ = parse_servers(without_query(config.url), options.servers)
    assert servers == ["nats://h1:4222", "nats://h2:4222"]  # the query is no server's
    return options


def _redis(config: TransportConfig) -> Any:
    from transport_redis._config import load_options, parse_url

    options = load_options(config)
    endpoint = parse_url(config.url, options)
    assert (endpoint.host, endpoint.port, endpoint.db) == ("h", 6379, 2)
    return options


def _pulsar(config: TransportConfig) -> Any:
    from transport_pulsar._config import parse_settings

    settings = parse_settings(config)
    assert settings.service_url == "pulsar://h:6650"  # the client gets no query
    return settings.options


# (backend, url without query, option, value in the query, parsed value, parse)
CASES: list[tuple[str, str, str, str, Any, Callable[[TransportConfig], Any]]] = [
    ("kafka", "kafka://h:9092", "partitions", "3", 3, _kafka),
    ("sqlite", "sqlite:///q.db", "poll_interval", "0.02", 0.02, _sqlite),
    ("nats", "nats://h1:4222,h2:4222", "prefetch", "8", 8, _nats),
    ("redis", "redis://h:6379/2", "claim_interval", "1.5", 1.5, _redis),
    ("pulsar", "pulsar://h:6650", "receiver_queue_size", "16", 16, _pulsar),
]
IDS = [case[0] for case in CASES]


@pytest.mark.parametrize(("backend", "url", "name", "raw", "value", "parse"), CASES, ids=IDS)
def test_an_option_in_the_query_is_taken_beside_the_options(
    backend: str, url: str, name: str, raw: str, value: Any, parse: Any
) -> None:
    other = {"kafka": "fetch_wait_max_ms", "sqlite": "busy_timeout_ms"}.get(
        backend, "request_timeout" if backend in ("nats", "redis") else "ack_flush_wait_ms"
    )
    parsed = parse(TransportConfig(url=f"{url}?{name}={raw}", options={other: 7}))
    assert getattr(parsed, name) == value
    assert getattr(parsed, other) == 7


@pytest.mark.parametrize(("backend", "url", "name", "raw", "value", "parse"), CASES, ids=IDS)
def test_an_option_given_in_both_places_is_refused(
    backend: str, url: str, name: str, raw: str, value: Any, parse: Any
) -> None:
    config = TransportConfig(url=f"{url}?{name}={raw}", options={name: value})
    with pytest.raises(ConfigurationError, match=f"option '{name}' is given both in the URL"):
        parse(config)
    twice = TransportConfig(url=f"{url}?{name}={raw}&{name}={raw}")
    with pytest.raises(ConfigurationError, match=f"option '{name}' is given twice in the URL"):
        parse(twice)


@pytest.mark.parametrize(("backend", "url", "name", "raw", "value", "parse"), CASES, ids=IDS)
def test_an_unknown_query_option_is_named_without_its_value(
    backend: str, url: str, name: str, raw: str, value: Any, parse: Any
) -> None:
    with pytest.raises(ConfigurationError) as unknown:
        parse(TransportConfig(url=f"{url}?nope=s3cr3t-value"))
    assert "nope" in str(unknown.value) and "s3cr3t-value" not in str(unknown.value)
    # (A bad value of a known option is named as for ``options``: ``sqlite://``
    # shows its non-secret numbers, the others never show a value.)
    with pytest.raises(ConfigurationError, match=name):
        parse(TransportConfig(url=f"{url}?{name}=not-a-number"))
    with pytest.raises(ConfigurationError, match="not name=value"):
        parse(TransportConfig(url=f"{url}?{name}"))
