"""Deployment configuration: one object, from code, environment or TOML.

Switching a deployment from ``sqlite://`` to Kafka, NATS or Pulsar is a change
of ``TRANSPORT_URL`` (or of the TOML file), never of ensemble code.
Secrets are ``SecretStr``: they never appear in ``repr``, logs or errors.
"""

from __future__ import annotations

import difflib
import functools
import logging
import os
import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_serializer,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict, SettingsError

from transport._spi.naming import validate_name
from transport.errors import ConfigurationError, TransportError

__all__ = ["DEFAULT_URL", "TLSConfig", "TransportConfig", "load_config"]

#: The embedded default: durable, no server, one file in the working directory.
DEFAULT_URL = "sqlite:///transport.db"


class TLSConfig(BaseModel):
    """TLS settings shared by every backend that speaks TLS.

    ``verify_hostname`` is on by default and should stay on: a certificate for
    another host is refused (pulsar-client's own default is off; we turn it on).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    def __init__(self, /, **data: Any) -> None:
        # One line in the library's error tree, as for TransportConfig (it
        # raised pydantic's multi-line ValidationError).
        try:
            super().__init__(**data)
        except ValidationError as exc:
            raise config_error(exc, prefix="tls.") from None

    enabled: bool = False
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    key_password: SecretStr | None = None
    verify_hostname: bool = True


_SECRET_FIELDS = frozenset({"password", "token", "nkey_seed", "key_password"})
_ENV_FIELD = re.compile(r'field "([^"]+)"')


#: Settings that hold other settings (secrets among them): a value that is
#: not a mapping, which could not be read key by key, is never shown.
_SECTIONS = frozenset({"options", "tls"})


def _shown(field: str, value: Any) -> str:
    """``value`` as it may appear in an error: never a secret, URLs redacted."""
    if field.rpartition(".")[2] in _SECRET_FIELDS:
        return "'***'"
    if (field in _SECTIONS and not isinstance(value, dict)) or (
        field.startswith("options.") and isinstance(value, str)
    ):
        # Text that was meant as a mapping (invalid JSON, a TOML string, a
        # list) may hold a password; its type is what is wrong with it.
        return f"<{type(value).__name__}, not shown>"
    if looks_secret(field.rpartition(".")[2]):
        return "'***'"
    if isinstance(value, str) and ("@" in value or "?" in value):
        value = redact_url(value)  # a URL's user part or query may hold a password
    shown = repr(redact_options(value))
    return shown if len(shown) <= 80 else shown[:77] + "..."


#: Option names (any part, case-insensitive) whose values are secrets:
#: librdkafka's ``sasl.password``, ``ssl.key.password``, ``ssl.key.pem``,
#: ``sasl.oauthbearer.client.secret``, Pulsar's ``auth_params``, tokens …
_SECRET_OPTION = re.compile(
    r"pass(word|wd|phrase)?|secret|token|credential|auth_?params|private|\.pem$|api_?key|seed",
    re.IGNORECASE,
)
#: A misspelt secret name (``pasword``, ``tokn``, ``secert``) escapes the
#: pattern above: a name part this close to one of these words is secret too.
_SECRET_WORDS = ("password", "passwd", "passphrase", "secret", "token", "credential", "private")
_NAME_PARTS = re.compile(r"[^A-Za-z0-9]+")
_CAMEL = re.compile(r"([a-z0-9])([A-Z])")
#: Whole name parts that are secrets too short or too unlike the words above.
_SECRET_PARTS = frozenset({"pwd", "bearer", "authorization", "privkey", "apikey", "sig"})


@functools.lru_cache(maxsize=1024)
def looks_secret(name: str) -> bool:
    """Whether the value of a setting, option or URL query parameter called
    ``name`` must never be shown: a secret-looking name, or a misspelling of
    one (a non-secret value may be hidden by mistake; a secret never shown)."""
    if _SECRET_OPTION.search(name):
        return True
    words = _CAMEL.sub(r"\1_\2", name)  # clientSecert: client, secert
    for part in _NAME_PARTS.split(words.lower()):
        if part in _SECRET_PARTS:
            return True
        if len(part) < 4:
            continue
        for word in _SECRET_WORDS:
            if difflib.SequenceMatcher(None, part, word).ratio() >= 0.8:
                return True
    return False


def _authority_end(rest: str) -> int:
    """Where the authority of ``rest`` (a URL after ``scheme://``) ends: at
    the first '/', '?' or '#' after its last '@' (a password may hold
    them), else at the end."""
    at = rest.rfind("@")
    ends = [i for i in (rest.find(ch, at + 1) for ch in "/?#") if i != -1]
    return min(ends, default=len(rest))


def redact_url(url: str) -> str:
    """``url`` with every password (and a user part without one: a token,
    by NATS convention) replaced by ``***``, the user names kept. Robust to
    what a validated URL may still hold: a password with an unencoded ``/``,
    ``?`` or ``#`` (the user part is everything up to the last ``@`` of the
    authority), and one user part per host (``nats://u:p@h1,u:p@h2``).
    Query parameters whose names look secret (``?password=…``) are masked
    too. Never raises."""
    scheme, sep, rest = url.partition("://")
    if not sep:  # not a URL; what looks like a user part is hidden all the same
        return f"***@{url.rpartition('@')[2]}" if "@" in url else url
    at = rest.rfind("@")
    query = rest.find("?")
    if 0 <= query < at and "=" in rest[query:at]:
        # The last '@' lies in a query parameter (``?password=p@ss``), not
        # in a user part: mask the query first, then look again.
        rest = rest[:query] + _redact_query(rest[query:])
        at = rest.rfind("@")
    if at < 0:
        return f"{scheme}://{_redact_query(rest)}"
    end = _authority_end(rest)
    authority, tail = rest[:end], rest[end:]

    def masked(part: str) -> str:
        userinfo, _, host = part.rpartition("@")
        user, colon, _ = userinfo.partition(":")
        return f"{user}:***@{host}" if colon else f"***@{host}"

    segments = authority.split(",")
    tail = _redact_query(tail)
    if all("@" in segment for segment in segments):
        return f"{scheme}://{','.join(masked(segment) for segment in segments)}{tail}"
    return f"{scheme}://{masked(authority)}{tail}"


def _redact_query(tail: str) -> str:
    """A URL's path, query and fragment with the values of secret-looking
    query parameters (``?password=…``) replaced by ``***``."""
    path, sep, query = tail.partition("?")
    if not sep:
        return tail
    query, hash_, fragment = query.partition("#")
    params = []
    for param in query.split("&"):
        name, eq, _ = param.partition("=")
        params.append(f"{name}=***" if eq and looks_secret(name) else param)
    return f"{path}?{'&'.join(params)}{hash_}{fragment}"


def redact_options(value: Any, key: str = "") -> Any:
    """``options`` as they may be shown (``repr``, logs): the values of
    secret-looking keys and the user part of URLs replaced by ``***``,
    recursively."""
    if key and looks_secret(key):
        return "***"
    if isinstance(value, dict):
        return {k: redact_options(v, str(k)) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(redact_options(v) for v in value)
    if isinstance(value, SecretStr):
        return value
    if isinstance(value, str) and "://" in value and ("@" in value or "?" in value):
        return redact_url(value)
    return value


def url_options(backend: str, url: str, options: Mapping[str, Any]) -> dict[str, Any]:
    """A backend's options: those of ``url``'s query string (``?a=1&b=x``,
    from its first ``?``: percent-encode one in a password; values as
    strings, which the backend's option model converts) together
    with ``TransportConfig.options``. An option given twice in the query, or
    both in the query and in ``options``, is refused rather than one of the
    two silently winning (the error names the option, never a value).

    Raises: ConfigurationError.
    """
    query = url.partition("?")[2].partition("#")[0]
    merged: dict[str, Any] = {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=bool(query))
    except ValueError:
        raise ConfigurationError(f"{backend}: the URL's query is not name=value&...") from None
    for name, value in pairs:
        if name in merged:
            raise ConfigurationError(f"{backend}: option {name!r} is given twice in the URL")
        merged[name] = value
    for name, value in options.items():
        if name in merged:
            raise ConfigurationError(
                f"{backend}: option {name!r} is given both in the URL and in options; give it once"
            )
        merged[name] = value
    return merged


def options_error(backend: str, exc: ValidationError) -> ConfigurationError:
    """One line naming each bad backend option and what is wrong with it:
    option names and messages only, never the (possibly secret) values."""
    problems = "; ".join(
        f"{'.'.join(str(p) for p in err['loc']) or 'options'}: {err['msg']}" for err in exc.errors()
    )
    return ConfigurationError(f"invalid {backend} option(s): {problems}")


def config_error(exc: ValidationError | SettingsError, prefix: str = "") -> TransportError:
    """One readable line naming the setting and its value, in the library's
    error tree (``ConfigurationError``, or the ``InvalidNameError`` a name
    validator raised); ``prefix`` goes before the setting's name (``tls.``)."""
    if isinstance(exc, SettingsError):
        # pydantic-settings could not parse an environment variable (a
        # complex field such as ``options`` is read as JSON).
        match = _ENV_FIELD.search(str(exc))
        field = match.group(1) if match else "?"
        env = f"TRANSPORT_{field.upper()}"
        value = os.environ.get(env)
        if value is None:
            return ConfigurationError(f"invalid transport setting {field}: {exc}")
        if field in _SECTIONS:
            return ConfigurationError(
                f"invalid transport setting {field}: {env} is not valid JSON"
                " (its value is not shown: it may hold secrets)"
            )
        return ConfigurationError(
            f"invalid transport setting {field}: {env}={_shown(field, value)} is not valid JSON"
        )
    errors = exc.errors()
    for error in errors:
        cause = error.get("ctx", {}).get("error")
        if isinstance(cause, TransportError):
            return cause
    if not errors:
        return ConfigurationError(f"invalid transport settings: {exc}")
    first = errors[0]
    field = prefix + ".".join(str(part) for part in first["loc"])
    message = first["msg"].removeprefix("Value error, ")
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    if first["type"] == "extra_forbidden":
        # A misspelt name is what a secret's name check cannot recognise
        # (``pasword``): the value of an unknown setting is never shown.
        known = TLSConfig.model_fields if prefix == "tls." else TransportConfig.model_fields
        close = difflib.get_close_matches(str(first["loc"][-1]), list(known), n=1)
        hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
        return ConfigurationError(
            f"invalid transport setting {field}: no such setting (its value is not shown){hint}"
            f"{more}"
        )
    return ConfigurationError(
        f"invalid transport setting {field}={_shown(field, first.get('input'))}: {message}{more}"
    )


#: Schemes whose URL names a file or an in-process name, not servers.
_LOCAL_SCHEMES = frozenset({"sqlite", "memory"})


def _check_servers(url: str) -> None:
    """The URL's servers (``host``, ``host:port``, ``[v6]:port``,
    comma-separated) are well formed: a malformed one raised a bare
    ``ValueError`` from deep inside a client, or was accepted and failed
    only at the first call as "unreachable" (port 99999, an empty entry).
    The message never shows the URL (it may hold a password)."""
    scheme = url.split("://", 1)[0].lower()
    if scheme in _LOCAL_SCHEMES:
        return
    # Read from the redacted URL, whose user parts are masked: a password
    # may hold '/', ':' or ',' and must never reach a message.
    rest = redact_url(url).split("://", 1)[1]
    authority = rest[: _authority_end(rest)]
    if not authority.rpartition("@")[2]:
        return  # the backend's default server, or a setting that names them
    for segment in authority.split(","):
        entry = segment.rpartition("@")[2]
        if not entry:
            raise ValueError("an empty server in the URL's server list (a stray comma)")
        host, port = entry, ""
        if entry.startswith("["):
            end = entry.find("]")
            if end < 0:
                raise ValueError(f"IPv6 address without its closing ']' in the URL: {entry!r}")
            host, rest = entry[: end + 1], entry[end + 1 :]
            if rest and not rest.startswith(":"):
                raise ValueError(f"a server in the URL is not host:port: {entry!r}")
            port = rest[1:]
        elif ":" in entry:
            host, _, port = entry.rpartition(":")
        if not host or host == "[]":
            raise ValueError(f"a server in the URL has no host: {entry!r}")
        has_port = port or (":" in entry and not entry.startswith("["))
        if has_port and not (port.isdigit() and 0 < int(port) < 65536):
            raise ValueError(f"port {port!r} of a server in the URL is not 1-65535")


class TransportConfig(BaseSettings):
    """Everything a backend needs to connect.

    Environment variables use the ``TRANSPORT_`` prefix (``TRANSPORT_URL``,
    ``TRANSPORT_NAMESPACE``, nested ``TRANSPORT_TLS__CA_FILE`` …).
    """

    model_config = SettingsConfigDict(
        env_prefix="TRANSPORT_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )

    url: str = DEFAULT_URL
    namespace: str = Field(
        default="agentensemble",
        description="prefix of every topic, stream, subject and table the library creates",
    )
    consumer_group: str = Field(default="workers", description="group shared by a queue's workers")
    lease_seconds: float = Field(
        default=30.0, gt=0, description="how long a delivery is held before redelivery"
    )
    max_attempts: int = Field(default=5, ge=1, description="deliveries before dead-lettering")
    max_payload_bytes: int = Field(default=1_048_576, gt=0, le=64 * 1_048_576)
    registry_ttl_seconds: float = Field(
        default=7 * 24 * 3600.0, gt=0, description="how long delivery records are kept"
    )
    capability_lease_seconds: float = Field(default=30.0, gt=0)
    username: str | None = None
    password: SecretStr | None = None
    token: SecretStr | None = None
    credentials_file: Path | None = Field(default=None, description="NATS .creds file")
    nkey_seed: SecretStr | None = None
    sasl_mechanism: str | None = None
    tls: TLSConfig = Field(default_factory=TLSConfig)
    options: dict[str, Any] = Field(
        default_factory=dict, description="backend-specific options (see each backend)"
    )
    request_codec: Literal["native", "agentensemble"] = Field(
        default="native",
        description="request dialect of the request queues: native, or agentensemble (the "
        "Java project's Jackson records: written on enqueue, recognised by shape on "
        "delivery; kafka:// and memory:// only; docs/interop-java.md)",
    )

    def __init__(self, *args: Any, **values: Any) -> None:
        # pydantic's ValidationError (a multi-line dump with a web link) and
        # pydantic-settings' SettingsError become one line of the error tree.
        try:
            super().__init__(*args, **values)
        except (ValidationError, SettingsError) as exc:
            raise config_error(exc) from exc

    @field_validator("namespace", "consumer_group")
    @classmethod
    def _check_names(cls, value: str, info: ValidationInfo) -> str:
        return validate_name(value, (info.field_name or "namespace").replace("_", " "))

    @field_validator("url")
    @classmethod
    def _check_url(cls, value: str) -> str:
        if "://" not in value:
            raise ValueError(
                "a transport URL looks like 'scheme://…' (sqlite:///transport.db, "
                "memory://, kafka://host:9092, nats://host:4222, pulsar://host:6650)"
            )
        _check_servers(value)
        return value

    def check_files(self) -> None:
        """Every file the settings name exists and is readable.

        Raises: ConfigurationError naming the setting and the path.
        """
        files = {
            "credentials_file": self.credentials_file,
            "tls.ca_file": self.tls.ca_file,
            "tls.cert_file": self.tls.cert_file,
            "tls.key_file": self.tls.key_file,
        }
        for setting, path in files.items():
            if path is None:
                continue
            if not path.is_file():
                problem = "is a directory" if path.is_dir() else "does not exist"
                raise ConfigurationError(f"invalid transport setting {setting}: {path} {problem}")
            if not os.access(path, os.R_OK):
                raise ConfigurationError(
                    f"invalid transport setting {setting}: {path} is not readable"
                )

    @property
    def scheme(self) -> str:
        """The URL scheme that selects the backend (``kafka``, ``nats`` …)."""
        return urlsplit(self.url).scheme.lower()

    def redacted_url(self) -> str:
        """The URL with any password replaced, safe for logs.

        A user part without a password (``nats://TOKEN@host``) is a token by
        NATS convention, so it is replaced too. Never raises (the URL was
        validated with the config).
        """
        return redact_url(self.url)

    @field_serializer("url")
    def _dump_url(self, url: str) -> str:
        # model_dump()/model_dump_json() are what gets logged or stored:
        # the URL's password goes the way of the SecretStr fields.
        return redact_url(url)

    @field_serializer("options")
    def _dump_options(self, options: dict[str, Any]) -> Any:
        return redact_options(options)

    def __repr_args__(self) -> Any:
        for key, value in super().__repr_args__():
            if key == "url":
                yield key, self.redacted_url()
            elif key == "options":
                yield key, redact_options(value)
            else:
                yield key, value

    @classmethod
    def from_toml(cls, path: str | os.PathLike[str], **overrides: Any) -> TransportConfig:
        """Read a TOML file: keys at the top level or under ``[transport]``.

        Environment variables still override what the file says, and keyword
        ``overrides`` override both.

        Raises:
            ConfigurationError: the file is missing or not valid TOML.
        """
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigurationError(f"cannot read transport config {path}: {exc}") from exc
        section = data.get("transport", data)
        if not isinstance(section, dict):
            raise ConfigurationError(f"{path}: [transport] must be a table")
        _warn_unknown_variables()  # the environment is read here too
        env = cls()  # what the environment sets
        merged = {**section}
        for key in env.model_fields_set:
            merged[key] = _over(merged.get(key), getattr(env, key))
        merged.update(overrides)
        try:
            return cls.model_validate(merged)
        except ValidationError as exc:
            raise config_error(exc) from exc


def _over(file_value: Any, env_value: Any) -> Any:
    """The environment's value of a setting over the file's, key by key for
    the sections (``tls``, ``options``): ``TRANSPORT_TLS__CA_FILE`` alone
    used to replace the file's whole ``[tls]`` table, so the file's
    ``enabled = true`` and client certificate were dropped and a
    ``nats://`` connection went out in plain text."""
    if isinstance(env_value, BaseModel):
        if not isinstance(file_value, dict):
            return env_value
        return {**file_value, **{k: getattr(env_value, k) for k in env_value.model_fields_set}}
    if isinstance(env_value, dict) and isinstance(file_value, dict):
        merged = dict(file_value)
        for key, value in env_value.items():
            merged[key] = _over(file_value.get(key), value)
        return merged
    return env_value


_warned: set[str] = set()


def _warn_unknown_variables() -> None:
    """Warn (once each) about ``TRANSPORT_*`` environment variables that
    name no setting: a typo such as ``TRANSPORT_MAX_ATTEMPT=3`` was ignored
    without a word, while a misspelt TOML key is refused."""
    known = {"TRANSPORT_CONFIG_FILE"}
    for name in TransportConfig.model_fields:
        known.add(f"TRANSPORT_{name.upper()}")
    known.update(f"TRANSPORT_TLS__{name.upper()}" for name in TLSConfig.model_fields)
    for variable in os.environ:
        upper = variable.upper()
        if not upper.startswith("TRANSPORT_") or upper in known or variable in _warned:
            continue
        _warned.add(variable)
        close = difflib.get_close_matches(upper, sorted(known), n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        logging.getLogger("transport.config").warning(
            "environment variable %s names no transport setting and is ignored%s", variable, hint
        )


def load_config(
    url_or_config: str | TransportConfig | None = None, **overrides: Any
) -> TransportConfig:
    """Resolve the configuration ``connect`` uses.

    A ``TransportConfig`` is taken as is (``overrides`` validated on top of
    it, as for a URL); a string is a URL; ``None`` reads the environment
    and, if ``TRANSPORT_CONFIG_FILE`` is set, that TOML file.

    Raises: ConfigurationError (or InvalidNameError) for a bad or unknown
    setting.
    """
    if isinstance(url_or_config, TransportConfig):
        if not overrides:
            return url_or_config
        given = {name: getattr(url_or_config, name) for name in TransportConfig.model_fields}
        return TransportConfig(**{**given, **overrides})
    if isinstance(url_or_config, str):
        overrides = {"url": url_or_config, **overrides}
    _warn_unknown_variables()
    path = os.environ.get("TRANSPORT_CONFIG_FILE")
    if path:
        return TransportConfig.from_toml(path, **overrides)
    return TransportConfig(**overrides)
