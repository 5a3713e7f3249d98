"""Configuration sources, secret redaction and backend discovery."""

from __future__ import annotations

import asyncio
import logging
import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from transport import (
    BackendNotAvailableError,
    ClosedResourceError,
    ConfigurationError,
    InvalidNameError,
    TransportConfig,
    available_backends,
    connect,
    load_config,
)
from transport._spi.config import looks_secret

CANARY = "canary-S3cr3t-7f3a"


def test_environment_configures_everything(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRANSPORT_URL", "memory://from-env")
    monkeypatch.setenv("TRANSPORT_NAMESPACE", "prod")
    monkeypatch.setenv("TRANSPORT_MAX_ATTEMPTS", "7")
    monkeypatch.setenv("TRANSPORT_TLS__VERIFY_HOSTNAME", "true")
    monkeypatch.setenv("TRANSPORT_OPTIONS", '{"partitions": 3}')
    config = load_config()
    assert (config.url, config.namespace, config.max_attempts) == ("memory://from-env", "prod", 7)
    assert config.options == {"partitions": 3}
    assert config.tls.verify_hostname


def test_toml_file_with_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "transport.toml"
    path.write_text(
        '[transport]\nurl = "memory://toml"\nnamespace = "staging"\nlease_seconds = 12.5\n'
    )
    monkeypatch.setenv("TRANSPORT_CONFIG_FILE", str(path))
    monkeypatch.setenv("TRANSPORT_NAMESPACE", "override")
    config = load_config()
    assert config.url == "memory://toml"
    assert config.lease_seconds == 12.5
    assert config.namespace == "override"  # the environment wins over the file
    assert load_config("memory://explicit").url == "memory://explicit"


def test_bad_toml_is_a_configuration_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text("url = [unclosed")
    with pytest.raises(ConfigurationError):
        TransportConfig.from_toml(path)


def test_secrets_never_appear_in_reprs_or_logs(caplog: pytest.LogCaptureFixture) -> None:
    config = TransportConfig(
        url=f"kafka://user:{CANARY}@broker:9092",
        password=CANARY,
        token=CANARY,
        nkey_seed=CANARY,
        tls={"key_password": CANARY},
    )
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("transport").info("config %r %s", config, config)
    for text in (repr(config), str(config), caplog.text, config.redacted_url()):
        assert CANARY not in text
    assert config.password is not None and config.password.get_secret_value() == CANARY


def test_secrets_in_backend_options_never_appear_in_reprs_or_logs(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # Options hold secrets too: librdkafka passthrough, Pulsar auth
    # parameters, admin and monitoring URLs with credentials.
    options = {
        "producer": {"sasl.password": CANARY, "ssl.key.pem": CANARY, "linger.ms": 5},
        "consumer": {"sasl.oauthbearer.client.secret": CANARY},
        "auth_params": f"token:{CANARY}",
        "admin_url": f"http://admin:{CANARY}@127.0.0.1:8080",
        "monitor_url": f"http://{CANARY}@127.0.0.1:8222",
        "prefetch": 64,
    }
    config = TransportConfig(url="kafka://broker:9092", options=options)
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("transport").info("config %r %s", config, config)
    for text in (repr(config), str(config), caplog.text):
        assert CANARY not in text
        # What is not secret stays readable.
        assert "'linger.ms': 5" in text and "'prefetch': 64" in text
        assert "http://admin:***@127.0.0.1:8080" in text
    assert config.options["producer"]["sasl.password"] == CANARY  # the value itself is kept


@pytest.mark.parametrize(
    ("settings", "error"),
    [
        (
            {"pasword": CANARY},
            "pasword: no such setting (its value is not shown); did you mean 'password'?",
        ),
        (
            {"tls": {"key_pasword": CANARY}},
            "tls.key_pasword: no such setting (its value is not "
            "shown); did you mean 'tls.key_password'?",
        ),
    ],
)
def test_a_misspelt_setting_is_named_without_its_value(
    settings: dict[str, object], error: str
) -> None:
    # The secret-name check cannot recognise a typo: the value of an unknown
    # setting was echoed ("pasword='...': no such setting").
    with pytest.raises(ConfigurationError) as info:
        TransportConfig(url="memory://", **settings)  # type: ignore[arg-type]
    assert CANARY not in str(info.value)
    assert str(info.value) == f"invalid transport setting {error}"


def test_a_password_in_the_url_query_is_redacted() -> None:
    for url in (f"redis://u:{CANARY}@h/0?password={CANARY}&db=1", f"redis://h/0?password={CANARY}"):
        config = TransportConfig(url=url)
        for text in (repr(config), config.model_dump_json(), config.redacted_url()):
            assert CANARY not in text, text
        assert "password=***" in config.redacted_url()
    assert TransportConfig(url="redis://h/0?db=1").redacted_url() == "redis://h/0?db=1"
    # An '@' inside the query's secret is not the end of a user part.
    for url, shown in [
        (f"redis://host/0?password=p@{CANARY}", "redis://host/0?password=***"),
        (f"redis://h:6379?password=p@{CANARY}&db=1", "redis://h:6379?password=***&db=1"),
        (f"redis://u:{CANARY}@h/0?password=p@{CANARY}", "redis://u:***@h/0?password=***"),
    ]:
        assert TransportConfig(url=url).redacted_url() == shown


@pytest.mark.parametrize(
    "name",
    ["tokn", "passwrod", "secert", "sasl.pasword", "api-tolken", "clientSecert", "db_pwd", "sig"],
)
def test_a_misspelt_secret_name_is_redacted_in_the_url_query_and_options(
    name: str, caplog: pytest.LogCaptureFixture
) -> None:
    # The secret-name pattern cannot recognise a typo: ``?tokn=...`` and an
    # option ``sasl.pasword`` were shown in the config's repr and logs.
    config = TransportConfig(
        url=f"kafka://broker:9092?{name}={CANARY}&linger.ms=5",
        options={"producer": {name: CANARY, "linger.ms": 5}},
    )
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("transport").info("config %r", config)
    for text in (repr(config), config.redacted_url(), caplog.text):
        assert CANARY not in text, text
        assert "linger.ms" in text and "5" in text  # what is not secret stays readable
    assert config.redacted_url() == f"kafka://broker:9092?{name}=***&linger.ms=5"


@pytest.mark.parametrize(
    "name", ["topic", "socket", "session", "retries", "timeout", "synchronous", "db", "key"]
)
def test_ordinary_option_names_are_not_taken_for_secrets(name: str) -> None:
    assert not looks_secret(name)
    assert (
        TransportConfig(url=f"sqlite:///x.db?{name}=7").redacted_url() == f"sqlite:///x.db?{name}=7"
    )


def test_token_as_url_user_part_is_redacted() -> None:
    config = TransportConfig(url=f"nats://{CANARY}@h1:4222,h2:4222")
    assert CANARY not in repr(config) and CANARY not in config.redacted_url()
    assert config.redacted_url() == "nats://***@h1:4222,h2:4222"
    assert TransportConfig(url="kafka://u:p@h:1").redacted_url() == "kafka://u:***@h:1"


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"url": "no-scheme"}, ConfigurationError, "setting url='no-scheme': a transport URL"),
        ({"namespace": "bad.namespace"}, InvalidNameError, "invalid namespace 'bad.namespace'"),
        ({"consumer_group": "a b"}, InvalidNameError, "invalid consumer group 'a b'"),
        ({"max_attempts": 0}, ConfigurationError, "setting max_attempts=0: Input should be"),
        ({"lease_seconds": 0}, ConfigurationError, "setting lease_seconds=0: Input should be"),
        (
            {"unknown": 1},
            ConfigurationError,
            r"setting unknown: no such setting \(its value is not",
        ),
        ({"password": 5}, ConfigurationError, "setting password='\\*\\*\\*'"),
    ],
)
def test_invalid_settings_raise_one_readable_line_of_the_error_tree(
    kwargs: dict[str, object], error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message) as info:
        TransportConfig(**kwargs)  # type: ignore[arg-type]
    text = str(info.value)
    assert "\n" not in text and "pydantic" not in text and "http" not in text
    assert not isinstance(info.value, ValidationError)


async def test_connect_with_a_bad_url_names_the_setting_and_the_value() -> None:
    with pytest.raises(ConfigurationError) as info:
        await connect("not a url")
    assert str(info.value).startswith("invalid transport setting url='not a url': ")
    assert "\n" not in str(info.value)


async def test_connect_used_as_an_async_context_manager_closes_the_transport() -> None:
    """``async with connect(url) as transport:`` (what users write first)
    opens the transport and closes it when the block ends, also when the
    block raises; ``await connect(...)`` and ``create_task(connect(...))``
    still work, as for any coroutine."""
    async with connect("memory://") as transport:
        queue = transport.request_queue("jobs")
        assert await queue.poll(0) is None
    with pytest.raises(ClosedResourceError):
        transport.request_queue("jobs")
    with pytest.raises(RuntimeError, match="inside the block"):
        async with connect("memory://") as raising:
            raise RuntimeError("inside the block")
    with pytest.raises(ClosedResourceError):
        raising.request_queue("jobs")
    awaited = await connect("memory://")
    tasked = await asyncio.create_task(connect("memory://"))
    try:
        assert await awaited.request_queue("jobs").poll(0) is None
        assert await tasked.request_queue("jobs").poll(0) is None
    finally:
        await awaited.aclose()
        await tasked.aclose()
    with pytest.raises(ConfigurationError):
        async with connect("not a url"):
            pass


def test_a_password_in_a_refused_url_is_not_shown() -> None:
    with pytest.raises(ConfigurationError) as info:
        TransportConfig(url=f"user:{CANARY}@host")
    assert CANARY not in str(info.value)


def test_options_that_are_not_json_name_the_variable_but_not_the_value(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The value was echoed: '{"producer": {"sasl.password": <secret>}}'
    # with one quote missing put the password in the error.
    monkeypatch.setenv("TRANSPORT_OPTIONS", '{"producer": {"sasl.password": ' + CANARY + "}}")
    with pytest.raises(ConfigurationError) as info:
        load_config()
    assert str(info.value) == (
        "invalid transport setting options: TRANSPORT_OPTIONS is not valid JSON"
        " (its value is not shown: it may hold secrets)"
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("TRANSPORT_TLS", '{"key_password": ' + CANARY + "}"),  # not JSON
        ("TRANSPORT_OPTIONS", f'["sasl.password={CANARY}"]'),  # JSON, not an object
    ],
)
def test_a_section_that_is_not_a_mapping_is_not_shown(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigurationError) as info:
        load_config()
    assert CANARY not in str(info.value)
    assert variable.removeprefix("TRANSPORT_").lower() in str(info.value)


def test_toml_options_that_are_not_a_table_are_not_shown(tmp_path: Path) -> None:
    path = tmp_path / "t.toml"
    path.write_text(f'[transport]\nurl = "memory://"\noptions = "sasl.password={CANARY}"\n')
    with pytest.raises(ConfigurationError) as info:
        TransportConfig.from_toml(path)
    assert CANARY not in str(info.value)
    assert "options=<str, not shown>" in str(info.value)


def test_an_unparsed_kafka_user_part_is_not_shown() -> None:
    pytest.importorskip("confluent_kafka")
    from transport_kafka._config import parse_settings

    # An unencoded '/' in the password ends the user part early: the rest
    # of the password looked like a host and was echoed.
    config = TransportConfig(url=f"kafka://alice:{CANARY}/x@127.0.0.1:9092")
    with pytest.raises(ConfigurationError) as info:
        parse_settings(config)
    assert CANARY not in str(info.value)
    assert "percent-encode" in str(info.value)


def test_the_environment_overrides_the_files_tls_and_options_key_by_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # TRANSPORT_TLS__CA_FILE alone replaced the file's whole [tls] table:
    # `enabled` and the client certificate were dropped, and nats:// then
    # connected in plain text. TRANSPORT_OPTIONS replaced the file's
    # options whole, dropping its SASL settings alike.
    path = tmp_path / "transport.toml"
    path.write_text(
        '[transport]\nurl = "memory://"\n'
        '[transport.tls]\nenabled = true\ncert_file = "/etc/c.pem"\nkey_file = "/etc/k.pem"\n'
        "[transport.options]\npartitions = 8\n"
        '[transport.options.producer]\n"security.protocol" = "SASL_SSL"\n"linger.ms" = 5\n'
    )
    monkeypatch.setenv("TRANSPORT_CONFIG_FILE", str(path))
    monkeypatch.setenv("TRANSPORT_TLS__CA_FILE", "/etc/ca.pem")
    monkeypatch.setenv("TRANSPORT_OPTIONS", '{"producer": {"linger.ms": 1}}')
    config = load_config()
    assert config.tls.enabled
    assert (config.tls.ca_file, config.tls.cert_file, config.tls.key_file) == (
        Path("/etc/ca.pem"),
        Path("/etc/c.pem"),
        Path("/etc/k.pem"),
    )
    assert config.options == {
        "partitions": 8,
        "producer": {"security.protocol": "SASL_SSL", "linger.ms": 1},
    }
    monkeypatch.setenv("TRANSPORT_TLS__ENABLED", "false")  # an explicit setting still wins
    assert not load_config().tls.enabled


@pytest.mark.parametrize("setting", ["ca_file", "cert_file", "key_file"])
async def test_a_missing_tls_file_names_the_setting_and_the_path(
    tmp_path: Path, setting: str
) -> None:
    missing = tmp_path / "nowhere" / "file.pem"
    with pytest.raises(ConfigurationError) as info:
        await connect(f"sqlite:///{tmp_path / 'x.db'}", tls={"enabled": True, setting: missing})
    assert str(info.value) == f"invalid transport setting tls.{setting}: {missing} does not exist"


async def test_a_tls_file_that_exists_is_accepted(tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    ca.write_text("not checked by sqlite")
    transport = await connect(f"sqlite:///{tmp_path / 'x.db'}", tls={"ca_file": ca})
    await transport.aclose()


async def test_unknown_scheme_says_what_is_known() -> None:
    with pytest.raises(BackendNotAvailableError) as info:
        await connect("carrier-pigeon://coop")
    assert "carrier-pigeon" in str(info.value) and "sqlite" in str(info.value)


def test_entry_points_register_the_inprocess_backends() -> None:
    backends = available_backends()
    assert backends["memory"].startswith("transport_inprocess")
    assert backends["sqlite"].startswith("transport_inprocess")


async def test_sqlite_url_conventions(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    transport = await connect("sqlite:///relative.db?synchronous=NORMAL")
    try:
        assert (tmp_path / "relative.db").exists()
        assert "synchronous=NORMAL" in (await transport.health()).detail
    finally:
        await transport.aclose()
    absolute = await connect(f"sqlite:///{tmp_path / 'abs.db'}")
    await absolute.aclose()
    assert (tmp_path / "abs.db").exists()
    with pytest.raises(ConfigurationError):
        await connect("sqlite://host/file.db")
    with pytest.raises(ConfigurationError):
        await connect(f"sqlite:///{tmp_path / 'missing-dir' / 'x.db'}")
    with pytest.raises(ConfigurationError, match="is a directory"):
        await connect(f"sqlite:///{tmp_path}")  # was "unable to open", transient
    with pytest.raises(ConfigurationError):
        await connect(f"sqlite:///{tmp_path / 'x.db'}", options={"no_such_option": 1})
    # "~" is the home directory (it was checked expanded, then opened as
    # written: "unable to open database file", a transient error).
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    home = await connect("sqlite:///~/in-home.db")
    await home.aclose()
    assert (tmp_path / "home" / "in-home.db").exists()


async def test_missing_capabilities_are_refused_clearly(tmp_path: Path) -> None:
    from transport import UnsupportedFeatureError

    url = f"sqlite:///{tmp_path / 'x.db'}"
    with pytest.raises(UnsupportedFeatureError, match="event_bus"):
        await connect(url, require=["event_bus"])
    transport = await connect(url, require=["event_log", "persistent"])
    try:
        with pytest.raises(UnsupportedFeatureError, match="no event bus"):
            transport.event_bus()
    finally:
        await transport.aclose()
    with pytest.raises(ValueError, match="unknown capability"):
        await connect(url, require=["teleportation"])
    # One name as a string is that name (its letters were taken as names).
    with pytest.raises(UnsupportedFeatureError, match="event_bus"):
        await connect(url, require="event_bus")
    with pytest.raises(ValueError, match=r"unknown capability name\(s\): teleportation$"):
        await connect(url, require="teleportation")


def test_precedence_is_argument_then_environment_then_file_then_default(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As the README's "Switching deployments by configuration" states it.
    toml = tmp_path / "transport.toml"
    toml.write_text('[transport]\nurl = "memory://from-file"\nmax_attempts = 9\n')
    monkeypatch.delenv("TRANSPORT_URL", raising=False)
    monkeypatch.delenv("TRANSPORT_MAX_ATTEMPTS", raising=False)
    assert load_config().url == "sqlite:///transport.db"
    monkeypatch.setenv("TRANSPORT_CONFIG_FILE", str(toml))
    assert (load_config().url, load_config().max_attempts) == ("memory://from-file", 9)
    monkeypatch.setenv("TRANSPORT_URL", "memory://from-env")
    assert (load_config().url, load_config().max_attempts) == ("memory://from-env", 9)
    assert load_config("memory://from-argument").url == "memory://from-argument"


@pytest.mark.parametrize(
    ("overrides", "error", "message"),
    [
        ({"namespace": "a.b"}, InvalidNameError, "invalid namespace 'a.b'"),
        ({"lease_seconds": -5}, ConfigurationError, "lease_seconds=-5"),
        ({"nonexistent_setting": 1}, ConfigurationError, "no such setting"),
    ],
)
def test_overrides_of_a_config_object_are_validated_as_for_a_url(
    overrides: dict[str, object], error: type[Exception], message: str
) -> None:
    # They were copied in unchecked: a namespace "a.b" reached the broker,
    # a typo was ignored.
    base = TransportConfig(url="memory://checked", max_attempts=7)
    with pytest.raises(error, match=re.escape(message)):
        load_config(base, **overrides)
    with pytest.raises(error, match=re.escape(message)):
        load_config("memory://checked", **overrides)
    kept = load_config(base, lease_seconds=5)
    assert (kept.url, kept.max_attempts, kept.lease_seconds) == ("memory://checked", 7, 5)


@pytest.mark.parametrize(
    ("url", "options"), [("memory://x?synchronous=FULL", {}), ("memory://", {"nope": 1})]
)
async def test_memory_takes_no_options(url: str, options: dict[str, object]) -> None:
    with pytest.raises(ConfigurationError, match="memory:// takes no options"):
        await connect(url, options=options)


def test_an_unsafe_name_in_a_provision_plan_is_the_librarys_error() -> None:
    from transport import ProvisionPlan

    with pytest.raises(InvalidNameError, match=re.escape("invalid queue name 'bad.name'")):
        ProvisionPlan(queues={"bad.name": 1})


def test_a_misspelt_environment_variable_is_warned_about(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # TRANSPORT_MAX_ATTEMPT=3 was ignored without a word (a misspelt TOML
    # key is refused).
    monkeypatch.setenv("TRANSPORT_MAX_ATTEMPT", "3")
    monkeypatch.setenv("TRANSPORT_TLS__CA_FILE", "/etc/ca.pem")  # known: no warning
    with caplog.at_level(logging.WARNING, logger="transport.config"):
        config = load_config("memory://")
    assert config.max_attempts != 3
    assert [r.getMessage() for r in caplog.records] == [
        "environment variable TRANSPORT_MAX_ATTEMPT names no transport setting and is"
        " ignored (did you mean TRANSPORT_MAX_ATTEMPTS?)"
    ]


def test_a_misspelt_environment_variable_is_warned_about_with_a_config_file(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    # The environment is read under a TOML file too (it wins over the file),
    # but only connect()'s own path warned about a misspelt variable.
    from transport._spi import config as config_module

    monkeypatch.setattr(config_module, "_warned", set())
    monkeypatch.setenv("TRANSPORT_NAMESPCE", "prod")
    path = tmp_path / "transport.toml"
    path.write_text('[transport]\nurl = "memory://"\n', encoding="utf-8")
    with caplog.at_level(logging.WARNING, logger="transport.config"):
        config = TransportConfig.from_toml(path)
    assert config.namespace != "prod"
    assert [r.getMessage() for r in caplog.records] == [
        "environment variable TRANSPORT_NAMESPCE names no transport setting and is"
        " ignored (did you mean TRANSPORT_NAMESPACE?)"
    ]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        # An unencoded '/' (or '?', '#') in the password ended the parsed user
        # part early: the password was shown.
        (f"nats://u:{CANARY[:6]}/{CANARY[7:]}@h:4222", "nats://u:***@h:4222"),
        (f"redis://:{CANARY[:6]}?{CANARY[7:]}@h:6379/0", "redis://:***@h:6379/0"),
        # One user part per host: every host is kept (only the last was).
        (
            f"nats://u:{CANARY}@h1:4222,u:{CANARY}@h2:4222",
            "nats://u:***@h1:4222,u:***@h2:4222",
        ),
        (f"nats://{CANARY}@h:4222", "nats://***@h:4222"),
    ],
)
def test_urls_are_redacted_in_reprs_dumps_and_errors(url: str, shown: str) -> None:
    config = TransportConfig(url=url, options={"producer": {"sasl.password": CANARY}})
    assert config.redacted_url() == shown
    for text in (repr(config), str(config.model_dump()), config.model_dump_json()):
        assert CANARY[:6] not in text and CANARY[7:] not in text, text
    assert shown in repr(config)


async def test_an_sqlite_url_with_a_user_part_is_refused_without_its_password() -> None:
    with pytest.raises(ConfigurationError) as info:
        await connect(f"sqlite://u:{CANARY}@/x.db")
    assert CANARY not in str(info.value) and "has a host part" in str(info.value)


def test_a_bad_tls_setting_is_one_configuration_error() -> None:
    # TLSConfig(...) raised pydantic's multi-line ValidationError.
    from transport import TLSConfig

    with pytest.raises(ConfigurationError) as info:
        TLSConfig(bogus=1)  # type: ignore[call-arg]
    assert str(info.value) == (
        "invalid transport setting tls.bogus: no such setting (its value is not shown)"
    )
    with pytest.raises(ConfigurationError, match=r"tls\.key_password='\*\*\*'"):
        TLSConfig(key_password=[CANARY])  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("kafka://127.0.0.1:99999", "not 1-65535"),
        ("pulsar://127.0.0.1:notaport", "not 1-65535"),
        ("nats://u:S3cr3t@h1:4222,h2:0", "not 1-65535"),
        ("kafka://h:9092,", "stray comma"),
        ("kafka://h:9092,,h2:9092", "stray comma"),
        ("nats://u:S3cr3t@[::1", "closing ']'"),
        ("kafka://:9092", "no host"),
        ("redis://h:", "not 1-65535"),
    ],
)
def test_a_malformed_server_in_the_url_is_a_configuration_error(url: str, says: str) -> None:
    # A bare ValueError from a client's parser ("Invalid IPv6 URL", "invalid
    # hostname"), or accepted and failing only at the first call as
    # "unreachable" (port 99999, an empty entry of a server list).
    with pytest.raises(ConfigurationError, match=re.escape(says)) as caught:
        TransportConfig(url=url)
    assert "S3cr3t" not in str(caught.value)


@pytest.mark.parametrize(
    "url",
    [
        "kafka://a:9092,b:9092",
        "nats://[::1]:4222",
        "nats://u:p@h1:4222,u:p@h2:4222",
        "nats://TOKEN@h",
        "kafka://alice:pass/with@127.0.0.1:9092",  # an unencoded '/' in a password
        "redis://:pw@h:6379/3?password=a@b",
        "pulsar+ssl://h:6651",
        "redis://",
        "sqlite:///x.db",
        "memory://anything",
    ],
)
def test_well_formed_urls_are_accepted(url: str) -> None:
    assert TransportConfig(url=url).url == url
