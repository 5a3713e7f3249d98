"""``redis://host:6379`` (also ``rediss://`` for TLS) — request queues on
Redis Streams with consumer groups, registries on hashes with a change
stream, the event log on streams and the event bus on pub/sub, through
redis-py's asyncio client. Redis 6.2 or later (7.x recommended).

Feature matrix: persistent ✓ (an ``enqueue`` returns after ``XADD`` was
accepted; on disk before the reply with ``appendonly yes`` +
``appendfsync always``, see :mod:`transport_redis._queue`), ordered ✓ (one
consumer reads in stream order; requests given back or whose lease expired
come back ahead of newer ones, nacked ones go to the end), consumer_groups ✓
(one consumer group per queue, one consumer per handle), native_delay ✓
(``nack(delay)`` parks the request in a sorted set on the server),
lease_extension ✓ (``extend()`` resets the pending entry's idle time),
restart_broker ✓ (with the append-only file; pollers and writers reconnect
by themselves), event_bus ✓ (pub/sub, at most once), event_log ✓ (streams,
positions are entry ids).

Names: see :mod:`transport_redis._client` for every key. Names are
validated (``[A-Za-z0-9_-]``, no ``__``) before they get here.

Options (``TransportConfig.options``, see :class:`RedisOptions`):
``connect_timeout`` (5 s), ``request_timeout`` (5 s), ``claim_interval``
(0.5 s), ``max_connections`` (64), ``idle_consumer_seconds`` (3600 s), ``registry_change_retention`` (3600 s),
``event_max_len`` (0: keep every event), ``db`` (0), ``name``.
Credentials: ``TransportConfig.username`` (ACL user) and ``password``
(``SecretStr``), or ``redis://user:password@host``; TLS:
``TransportConfig.tls`` (``ca_file``, client ``cert_file``/``key_file``,
``verify_hostname`` on by default) with ``rediss://`` or ``tls.enabled``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import ssl
import time
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from transport import HealthStatus, Transport, TransportCapabilities, TransportConfig
from transport.errors import ConfigurationError, TransientTransportError
from transport.kit import DoctorFinding, ObjectKind, ProvisionPlan, wait_within
from transport_redis._client import RedisClient, RedisContext, keys
from transport_redis._config import RedisEndpoint, RedisOptions, load_options, parse_url
from transport_redis._doctor import create_object, existing_keys, object_keys, redis_doctor
from transport_redis._errors import classify_connect_error, map_redis_errors
from transport_redis._events import RedisEventBus, RedisEventLog
from transport_redis._queue import RedisRequestQueue
from transport_redis._registries import RedisKeyedLog

__all__ = ["RedisTransport", "open_redis"]

log = logging.getLogger("transport.redis")

#: Commands this backend needs: XPENDING ... IDLE and exclusive XRANGE
#: bounds came with Redis 6.2.
_MIN_VERSION = (6, 2)


def _version(text: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in text.split(".")[:3]:
        digits = "".join(c for c in piece if c.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


class FairConnectionPool(aioredis.BlockingConnectionPool):
    """redis-py's blocking pool, handing connections out in the order they
    were asked for.

    With more concurrent commands than connections, redis-py's pool can
    starve a waiter: a task that releases a connection and at once asks for
    one again takes it back before the waiter it woke runs, so with 64
    writers looping on a pool of 64 one of them failed with "No connection
    available" after ``request_timeout`` while connections were released
    every millisecond. A FIFO semaphore of ``max_connections`` permits,
    taken before the pool and given back after it, queues the askers fairly;
    the pool's own wait and timeout still apply.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._turns = asyncio.Semaphore(self.max_connections)

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        try:
            await wait_within(self._turns.acquire(), self.timeout)
        except TimeoutError as exc:
            raise rex.ConnectionError("No connection available.") from exc
        try:
            return await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        except BaseException:
            self._turns.release()
            raise

    async def release(self, connection: Any) -> None:
        try:
            await super().release(connection)
        finally:
            self._turns.release()


class RedisTransport(Transport):
    """One redis-py connection pool shared by every queue, registry and log."""

    backend = "redis"
    # Each handle is a consumer of the group (deleted at its close): handles share one.
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
        unused = [
            name
            for name in ("token", "nkey_seed", "credentials_file", "sasl_mechanism")
            if getattr(config, name) is not None
        ]
        if unused:
            raise ConfigurationError(
                f"redis:// does not use {', '.join(unused)}: set username (ACL user) "
                "and password instead"
            )
        self.options: RedisOptions = load_options(config)
        self.endpoint: RedisEndpoint = parse_url(config.url, self.options)
        self.client = RedisClient(
            self._make_redis(), self.endpoint.where, self.options.request_timeout
        )
        self.ctx = RedisContext(
            self.client, config, self.options, self.endpoint, check_open=self._check_open
        )

    @property
    def server_version(self) -> str:
        """``redis_version`` of the server (empty before connecting)."""
        return self.ctx.server_version

    # -- connection ------------------------------------------------------
    def _tls_kwargs(self) -> dict[str, Any]:
        tls = self.config.tls
        if not (self.endpoint.tls or tls.enabled):
            return {}
        if tls.cert_file is not None and tls.key_password is not None:
            raise ConfigurationError(
                "an encrypted TLS client key (tls.key_password) is not supported by the "
                "Redis backend; use an unencrypted key file"
            )
        for path in (tls.ca_file, tls.cert_file, tls.key_file):
            if path is not None and not path.is_file():
                raise ConfigurationError(f"TLS file {path} does not exist")
        return {
            "ssl_cert_reqs": "required",
            "ssl_ca_certs": str(tls.ca_file) if tls.ca_file else None,
            "ssl_certfile": str(tls.cert_file) if tls.cert_file else None,
            "ssl_keyfile": str(tls.key_file) if tls.key_file else None,
            "ssl_check_hostname": tls.verify_hostname,
            "ssl_min_version": ssl.TLSVersion.TLSv1_2,
        }

    def _make_redis(self) -> aioredis.Redis:
        cfg, opts, ep = self.config, self.options, self.endpoint
        username = cfg.username or ep.username
        password = cfg.password.get_secret_value() if cfg.password else ep.password
        tls = self._tls_kwargs()
        # A blocking pool: a burst of concurrent operations waits for a free
        # connection (up to request_timeout, in the order they asked)
        # instead of failing.
        pool = FairConnectionPool(
            max_connections=opts.max_connections,
            timeout=opts.request_timeout,
            connection_class=aioredis.SSLConnection if tls else aioredis.Connection,
            host=ep.host,
            port=ep.port,
            db=ep.db,
            username=username,
            password=password,
            socket_connect_timeout=opts.connect_timeout,
            socket_timeout=opts.request_timeout,
            # One retry, on a fresh connection, of a command whose
            # connection broke: pooled connections of a restarted server are
            # found dead only when used. No back-off, so an unreachable
            # server still fails within the operation timeout. The price: a
            # command that ran but lost its reply runs again (an enqueue is
            # stored twice; a settle answers False, having taken effect).
            retry=Retry(NoBackoff(), 1),
            retry_on_error=[rex.ConnectionError],
            client_name=opts.name,
            health_check_interval=0,
            **tls,
        )
        return aioredis.Redis.from_pool(pool)

    async def _start(self) -> None:
        where = self.endpoint.where
        try:
            async with asyncio.timeout(self.operation_timeout):
                info = await self.client.redis.info("server")
        except (rex.RedisError, OSError, TimeoutError) as exc:
            await self._close_pool()
            raise classify_connect_error(exc, where) from exc
        self.ctx.server_version = str(info.get("redis_version", ""))
        if self.server_version and _version(self.server_version) < _MIN_VERSION:
            await self._close_pool()
            raise ConfigurationError(
                f"Redis server at {where} is version {self.server_version}; the Redis backend "
                "needs 6.2 or later (XPENDING IDLE, exclusive XRANGE)"
            )

    @property
    def operation_timeout(self) -> float:
        """``connect_timeout`` × 2 + 1 s: a first operation against an
        unreachable server fails within it (one connect, one retry)."""
        return self.options.connect_timeout * 2 + 1.0

    async def _verify_backend(self, features: frozenset[str]) -> None:
        with map_redis_errors("Redis round trip", self.endpoint.where):
            await self.client.redis.ping()

    # -- Transport SPI -----------------------------------------------------
    def _open_queue(self, name: str, *, lease_seconds: float, max_attempts: int) -> Any:
        return RedisRequestQueue(
            self.ctx, name, lease_seconds=lease_seconds, max_attempts=max_attempts
        )

    def _open_keyed_log(self, kind: str, name: str) -> Any:
        ns = self.config.namespace
        return RedisKeyedLog(
            self.client,
            keys.registry(ns, kind, name),
            keys.registry_changes(ns, kind, name),
            retention_seconds=self.options.registry_change_retention,
        )

    def _open_event_bus(self) -> Any:
        return RedisEventBus(self.ctx)

    def _open_event_log(self) -> Any:
        return RedisEventLog(self.ctx)

    # -- provisioning and doctor (see transport_redis._doctor) --------------
    def _broker_objects(self, kind: ObjectKind, name: str) -> list[str]:
        return object_keys(self.ctx, kind, name)

    async def _existing(self, objects: list[str]) -> set[str]:
        return await existing_keys(self.ctx, objects)

    async def _create(self, kind: ObjectKind, name: str) -> None:
        await create_object(self.ctx, kind, name)

    async def _doctor(self, plan: ProvisionPlan | None) -> list[DoctorFinding]:
        return await redis_doctor(self.ctx, plan)

    async def health(self) -> HealthStatus:
        start = time.perf_counter()
        if self._closed:
            return HealthStatus(ok=False, backend="redis", detail="transport is closed")
        try:
            async with asyncio.timeout(self.operation_timeout):
                with map_redis_errors("health check", self.endpoint.where):
                    await self.client.redis.ping()
        except (TransientTransportError, TimeoutError, Exception) as exc:
            return HealthStatus(ok=False, backend="redis", detail=str(exc) or type(exc).__name__)
        return HealthStatus(
            ok=True,
            backend="redis",
            detail=f"{self.endpoint.where} (server {self.server_version or '?'})",
            latency_ms=(time.perf_counter() - start) * 1000,
        )

    async def _close_pool(self) -> None:
        self.client.closed = True
        with contextlib.suppress(Exception):
            await wait_within(self.client.redis.aclose(), self.options.request_timeout)

    async def _close_backend(self) -> None:
        await self._close_pool()


async def open_redis(config: TransportConfig) -> RedisTransport:
    """Entry point for ``redis://`` and ``rediss://``.

    Raises: ConfigurationError (bad URL or options, server older than 6.2),
    PermanentTransportError (credentials or TLS refused),
    TransientTransportError (no server reachable, within
    :attr:`RedisTransport.operation_timeout`).
    """
    transport = RedisTransport(config)
    await transport._start()
    return transport
