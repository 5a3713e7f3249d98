"""``nats://host:4222`` (also ``tls://``) — JetStream request queues and KV
registries through nats-py (asyncio).

Feature matrix: persistent ✓ (file-storage streams; an ``enqueue`` returns
after the PubAck, which with ``sync_interval: always`` on the server means on
disk), ordered ✓ (one consumer pulls in stream order; redeliveries — nacks,
expired leases — come back ahead of newer requests), consumer_groups ✓ (one
durable pull consumer shared by every worker of a queue), native_delay ✓
(``nack(delay)`` is a JetStream NAK with delay), lease_extension ✓
(``extend()`` is an in-progress ack, +WPI, repeated in the background for
extensions longer than the lease), restart_broker ✓ (streams, consumers and KV
buckets are file-backed; pull requests are re-issued after a reconnect),
event_bus ✓ (core NATS), event_log ✓ (JetStream streams; see ``_events``).

Name mapping (``ns`` = ``TransportConfig.namespace``, ``q`` = queue name):

============================  =========================================
queue stream (work-queue)     ``ns__q``, subject ``ns.q.q``
dead-letter stream (limits)   ``ns__q__dlq``, subject ``ns.dlq.q``
durable pull consumer         ``TransportConfig.consumer_group``
registry KV bucket            ``ns__delivery__<name>``, ``ns__capability__capabilities``
event bus subject ``s``       ``s`` (core NATS; ``<bus_prefix>.s`` with that option)
event log stream ``s``        ``ns__log__s``, subject ``ns.log.s``; cursors in ``ns__log_cursors``
============================  =========================================

Names are validated (``[A-Za-z0-9_-]``, no ``__``) before they get here, so no
``.``, ``*``, ``>``, whitespace or ``$`` can reach a subject token.

Options (``TransportConfig.options``, see :class:`NatsOptions`):
``servers``, ``duplicate_window`` (120 s), ``pull_expires`` (5 s),
``request_timeout`` (5 s), ``enqueue_retry_seconds`` (10 s),
``max_ack_pending`` (10000), ``prefetch`` (1), ``replicas`` (1), ``connect_timeout`` (5 s),
``max_reconnect_attempts`` (-1: forever), ``reconnect_time_wait`` (0.5 s),
``ping_interval`` (10 s), ``max_outstanding_pings`` (2), ``name``, ``tls_handshake_first``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient

from transport import HealthStatus, Transport, TransportCapabilities, TransportConfig
from transport.errors import (
    ConfigurationError,
    PermanentTransportError,
    TransientTransportError,
    TransportError,
)
from transport.kit import DoctorFinding, ObjectKind, ProvisionPlan, wait_within
from transport_nats._client import NatsContext, Requests, broker_name
from transport_nats._config import NatsOptions, load_options, parse_servers, without_query
from transport_nats._errors import classify_connect_error, map_nats_errors

__all__ = ["NatsTransport", "open_nats"]

log = logging.getLogger("transport.nats")

# JetStream err_code: "jetstream not enabled for account".
_JETSTREAM_NOT_ENABLED_FOR_ACCOUNT = 10039
#: Capabilities that need JetStream (queues, registries, the event log); the
#: event bus is core NATS and works on any server.
JETSTREAM_FEATURES = frozenset(TransportCapabilities.model_fields) - {"event_bus"}


def _jetstream_off(exc: nats.js.errors.APIError) -> bool:
    """True if ``exc`` says JetStream is not there at all: no responders on
    the API subjects (a server without ``-js``; nats-py turns that into a
    bare ServiceUnavailableError) or not enabled for this account."""
    if exc.err_code == _JETSTREAM_NOT_ENABLED_FOR_ACCOUNT:
        return True
    return (
        isinstance(exc, nats.js.errors.ServiceUnavailableError)
        and exc.err_code is None
        and not exc.description
    )


class _PlainTextRefused(nats.errors.SecureConnWantedError):
    def __str__(self) -> str:
        return (
            "TLS was asked for (tls:// or tls settings) and the server does not offer it;"
            " not connecting in plain text"
        )


class _Client(NatsClient):
    """nats-py's client, refusing to talk in plain text when TLS was asked
    for (a ``tls://`` URL or ``tls`` settings). nats-py upgrades to TLS only
    when the server's INFO says ``tls_required``; otherwise it sends CONNECT,
    credentials included, in the clear: to a server without TLS, or through
    anyone stripping that flag. A server that offers TLS without requiring
    it (``allow_non_tls``) is upgraded all the same."""

    require_tls = False

    async def _process_info(self, info: dict[str, Any], initial_connection: bool = False) -> None:
        if (
            initial_connection
            and self.require_tls
            and not info.get("tls_required")
            and not self.options.get("tls_handshake_first")
        ):
            if not info.get("tls_available"):
                raise _PlainTextRefused
            info["tls_required"] = True  # upgrade: the caller's dict is the server info
        await super()._process_info(info, initial_connection)


class NatsTransport(Transport):
    """One NATS connection (with JetStream) shared by every queue and registry."""

    backend = "nats"
    # A handle pulls into a buffer and keeps a subscription: handles share one.
    _shares_queues = True
    capabilities = TransportCapabilities(
        persistent=True,
        ordered=True,
        consumer_groups=True,
        native_delay=True,
        lease_extension=True,
        restart_broker=True,
        event_bus=True,
        event_log=True,
    )

    def __init__(self, config: TransportConfig) -> None:
        super().__init__(config)
        self.options: NatsOptions = load_options(config)
        self.servers, self._url_creds = parse_servers(
            without_query(config.url), self.options.servers
        )
        self.nc = _Client()
        self.requests = Requests(self.nc, self.options.request_timeout)
        # What every queue, registry, log and the doctor get instead of the
        # transport (the JetStream API is set on it once connected).
        self.ctx = NatsContext(self.nc, self.requests, self.options, config, self._check_open)
        self.ctx.operation_timeout = self.operation_timeout
        self._probe: asyncio.Task[None] | None = None
        self._last_error: BaseException | None = None
        self._fatal: asyncio.Future[BaseException] | None = None

    # -- connection ------------------------------------------------------
    def _tls_context(self) -> ssl.SSLContext | None:
        tls = self.config.tls
        wanted = (
            tls.enabled
            or tls.ca_file is not None
            or tls.cert_file is not None
            or any(s.startswith("tls://") for s in self.servers)
        )
        if not wanted:
            return None
        try:
            ctx = ssl.create_default_context(cafile=str(tls.ca_file) if tls.ca_file else None)
            if tls.cert_file is not None:
                ctx.load_cert_chain(
                    str(tls.cert_file),
                    str(tls.key_file) if tls.key_file else None,
                    tls.key_password.get_secret_value() if tls.key_password else None,
                )
        except (OSError, ssl.SSLError) as exc:
            raise ConfigurationError(f"cannot load TLS files for NATS: {exc}") from exc
        ctx.check_hostname = tls.verify_hostname
        return ctx

    def _connect_kwargs(self) -> dict[str, Any]:
        cfg, opts = self.config, self.options
        kwargs: dict[str, Any] = {
            "servers": self.servers,
            "name": opts.name,
            "connect_timeout": opts.connect_timeout,
            "reconnect_time_wait": opts.reconnect_time_wait,
            "ping_interval": opts.ping_interval,
            "max_outstanding_pings": opts.max_outstanding_pings,
            # Few attempts for the first connection, so a wrong password or an
            # unreachable server is reported quickly; unlimited afterwards.
            "max_reconnect_attempts": 1,
            "allow_reconnect": True,
            "error_cb": self._on_error,
            "disconnected_cb": self._on_disconnected,
            "reconnected_cb": self._on_reconnected,
            "tls_handshake_first": opts.tls_handshake_first,
        }
        user = cfg.username or self._url_creds.get("user")
        password = (
            cfg.password.get_secret_value() if cfg.password else self._url_creds.get("password")
        )
        token = cfg.token.get_secret_value() if cfg.token else self._url_creds.get("token")
        if user is not None:
            kwargs["user"] = user
            kwargs["password"] = password or ""
        if token is not None:
            kwargs["token"] = token
        if cfg.nkey_seed is not None:
            kwargs["nkeys_seed_str"] = cfg.nkey_seed.get_secret_value()
        if cfg.credentials_file is not None:
            if not cfg.credentials_file.is_file():
                raise ConfigurationError(
                    f"NATS credentials file {cfg.credentials_file} does not exist"
                )
            kwargs["user_credentials"] = str(cfg.credentials_file)
        tls = self._tls_context()
        if tls is not None:
            kwargs["tls"] = tls
        self.nc.require_tls = tls is not None
        return kwargs

    async def _on_error(self, exc: Exception) -> None:
        self._last_error = exc
        fatal = self._fatal
        permanent = isinstance(classify_connect_error(exc, ""), PermanentTransportError)
        if fatal is not None and not fatal.done() and permanent:
            fatal.set_result(exc)
        log.debug("nats client error: %s: %s", type(exc).__name__, exc)

    async def _on_disconnected(self) -> None:
        log.info("disconnected from NATS")
        self.ctx.disconnected(asyncio.get_running_loop().time())

    async def _on_reconnected(self) -> None:
        log.info(
            "reconnected to NATS at %s",
            self.nc.connected_url.netloc if self.nc.connected_url else "?",
        )
        # A restarted server has forgotten streams we cached as present and
        # every pending pull request: re-check and re-issue. It may also have
        # been restarted with (or without) JetStream.
        self.ctx.forget_streams()
        if self._probe is None or self._probe.done():
            self._probe = asyncio.ensure_future(self._reprobe_jetstream())
        self.ctx.reconnected()

    async def _start(self) -> None:
        kwargs = self._connect_kwargs()
        where = ", ".join(self.servers)
        loop = asyncio.get_running_loop()
        fatal: asyncio.Future[BaseException] = loop.create_future()
        self._fatal = fatal
        connecting: asyncio.Future[Any] = asyncio.ensure_future(self.nc.connect(**kwargs))
        # nats-py may keep retrying (or hang) after a refused TLS certificate
        # or credentials: stop at the first such error instead of waiting.
        budget = self.options.connect_timeout * 2 * len(self.servers) + 1.0
        try:
            await asyncio.wait(
                {connecting, fatal}, timeout=budget, return_when=asyncio.FIRST_COMPLETED
            )
            if not connecting.done():
                connecting.cancel()
                with contextlib.suppress(BaseException):
                    await connecting
                cause = fatal.result() if fatal.done() else self._last_error
                with contextlib.suppress(Exception):
                    await self.nc.close()
                raise classify_connect_error(cause, where) from cause
            connecting.result()
        except (TimeoutError, nats.errors.Error, OSError) as exc:
            cause = self._last_error or exc
            with contextlib.suppress(Exception):
                await self.nc.close()
            raise classify_connect_error(cause, where) from exc
        finally:
            self._fatal = None
        self.nc.options["max_reconnect_attempts"] = self.options.max_reconnect_attempts
        self.ctx.jetstream = self.nc.jetstream(timeout=self.options.request_timeout)
        try:
            await self._probe_jetstream()
        except TransportError:
            await self.nc.close()
            raise
        await self.requests.start()

    async def _probe_jetstream(self) -> None:
        """Ask JetStream for the account's info: set :attr:`jetstream_error`
        if JetStream is off (a server without ``-js``, or an account without
        it), clear it if JetStream answers.

        Raises: TransientTransportError (no answer), PermanentTransportError.
        """
        js = self.ctx.jetstream
        assert js is not None
        where = ", ".join(self.servers)
        try:
            with map_nats_errors("checking JetStream"):
                try:
                    await js.account_info()
                except nats.js.errors.APIError as exc:
                    if not _jetstream_off(exc):
                        raise
                    self.ctx.jetstream_error = ConfigurationError(
                        f"JetStream is not enabled on the NATS server at {where} (start "
                        "nats-server with -js, or give it a jetstream {} block): request "
                        "queues, registries and the event log need it; the event bus works "
                        'without it (connect(url, require=["event_bus"]))'
                    )
                    log.info("%s", self.ctx.jetstream_error)
                    return
        except PermanentTransportError as exc:
            if isinstance(exc, ConfigurationError):
                raise
            raise ConfigurationError(f"JetStream refused this account on {where}: {exc}") from exc
        self.ctx.jetstream_error = None

    async def _reprobe_jetstream(self) -> None:
        try:
            await self._probe_jetstream()
        except Exception as exc:  # the next reconnect or use tells again
            log.debug("JetStream check after reconnect failed: %s", exc)

    def _require_jetstream(self) -> None:
        self.ctx.require_jetstream()

    def _check_usable(self, features: frozenset[str]) -> None:
        if features & JETSTREAM_FEATURES:
            self._require_jetstream()

    async def _verify_backend(self, features: frozenset[str]) -> None:
        if not self.nc.is_connected:
            raise TransientTransportError(f"not connected to NATS at {', '.join(self.servers)}")
        if features & JETSTREAM_FEATURES:
            await self._probe_jetstream()
            self._require_jetstream()
        else:
            with map_nats_errors("NATS round trip"):
                await self.nc.flush(timeout=max(1, round(self.options.request_timeout)))

    @property
    def operation_timeout(self) -> float:
        """The connect budget (``connect_timeout`` × 2 per server + 1 s):
        ``connect`` itself fails within it on an unreachable server."""
        return self.options.connect_timeout * 2 * len(self.servers) + 1.0

    @property
    def jetstream_error(self) -> ConfigurationError | None:
        """Set when the server has no JetStream: queues, registries and the
        event log raise it; the event bus works."""
        return self.ctx.jetstream_error

    # -- Transport SPI -----------------------------------------------------
    def _open_queue(self, name: str, *, lease_seconds: float, max_attempts: int) -> Any:
        from transport_nats._queue import NatsRequestQueue

        self._require_jetstream()
        return NatsRequestQueue(
            self.ctx, name, lease_seconds=lease_seconds, max_attempts=max_attempts
        )

    def _open_keyed_log(self, kind: str, name: str) -> Any:
        from transport_nats._registries import NatsKeyedLog

        self._require_jetstream()
        return NatsKeyedLog(self.ctx, broker_name(self.config.namespace, kind, name))

    def _open_event_bus(self) -> Any:
        from transport_nats._events import NatsEventBus

        return NatsEventBus(self.ctx)

    def _open_event_log(self) -> Any:
        from transport_nats._events import NatsEventLog

        self._require_jetstream()
        return NatsEventLog(self.ctx)

    # -- provisioning and doctor (see transport_nats._doctor) ----------------
    def _broker_objects(self, kind: ObjectKind, name: str) -> list[str]:
        from transport_nats._doctor import object_streams

        return object_streams(self.ctx, kind, name)

    async def _existing(self, objects: list[str]) -> set[str]:
        from transport_nats._doctor import existing_streams

        return await existing_streams(self.ctx, objects)

    async def _create(self, kind: ObjectKind, name: str) -> None:
        from transport_nats._doctor import create_object

        await create_object(self.ctx, kind, name)

    async def _doctor(self, plan: ProvisionPlan | None) -> list[DoctorFinding]:
        from transport_nats._doctor import nats_doctor

        return await nats_doctor(self.ctx, plan)

    async def health(self) -> HealthStatus:
        start = time.perf_counter()
        js = self.ctx.jetstream
        if self._closed or js is None:
            return HealthStatus(ok=False, backend="nats", detail="transport is closed")
        if not self.nc.is_connected:
            return HealthStatus(
                ok=False, backend="nats", detail=f"not connected to {', '.join(self.servers)}"
            )
        if self.jetstream_error is not None:
            return HealthStatus(ok=False, backend="nats", detail=str(self.jetstream_error))
        try:
            with map_nats_errors("health check"):
                info = await js.account_info()
        except Exception as exc:
            return HealthStatus(ok=False, backend="nats", detail=str(exc))
        url = self.nc.connected_url
        return HealthStatus(
            ok=True,
            backend="nats",
            detail=(
                f"{url.hostname if url else '?'}:{url.port if url else '?'} "
                f"(server {self.nc.connected_server_version}, {info.streams} streams)"
            ),
            latency_ms=(time.perf_counter() - start) * 1000,
        )

    async def _close_backend(self) -> None:
        self.ctx.close()
        if self._probe is not None:
            self._probe.cancel()
        await self.requests.aclose()
        with contextlib.suppress(Exception):
            await wait_within(self.nc.flush(), self.options.request_timeout)
        with contextlib.suppress(Exception):
            await wait_within(self.nc.close(), self.options.request_timeout)


async def open_nats(config: TransportConfig) -> NatsTransport:
    """Entry point for ``nats://`` and ``tls://``.

    A server without JetStream is accepted: the event bus works on it, and
    request queues, registries and the event log raise ``ConfigurationError``
    naming ``-js`` when opened.

    Raises: ConfigurationError (bad options), PermanentTransportError
    (credentials or TLS refused), TransientTransportError (no server reachable,
    within :attr:`NatsTransport.operation_timeout`).
    """
    transport = NatsTransport(config)
    await transport._start()
    return transport
