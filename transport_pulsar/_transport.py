"""``pulsar://host:6650`` / ``pulsar+ssl://host:6651`` — Apache Pulsar through
pulsar-client (the official C++-based client), bridged to asyncio.

Feature matrix:

============== ===== =====================================================
persistent     ✓     persistent topics; enqueue returns on the send receipt
ordered        ✗     Shared subscriptions dispatch to several consumers;
                     redeliveries and nacks are out of order
consumer_groups ✓    one Shared (or Key_Shared) subscription per queue,
                     named after ``consumer_group``
native_delay   ✗     ``nack(delay)`` republishes with ``deliverAfter`` and a
                     not-before time the client also enforces (pulsar-lite
                     ignores ``deliverAfter``)
lease_extension ✓    leases are client-side timers, renewable without limit
restart_broker ✓     accepted requests survive a broker restart (proven on
                     pulsar-lite by tests/pulsar/test_broker_restart.py)
event_log      ✓     a topic per stream, readers, cursors in a keyed topic
event_bus      ✗     use nats://, redis:// or memory://
============== ===== =====================================================

Options (``TransportConfig.options``, unknown keys rejected):
``tenant`` (``public``), ``pulsar_namespace`` (``default``),
``subscription_type`` (``shared`` | ``key_shared``), ``receiver_queue_size``
(1), ``nack_redelivery_delay_ms`` (100), ``operation_timeout_seconds`` (30),
``connection_timeout_ms`` (10000), ``send_timeout_ms`` (30000),
``close_timeout_seconds`` (10), ``subscribe_attempt_timeout_seconds`` (3:
one subscribe attempt; see the pulsar-lite consumer-id note in the docs),
``consumer_id_spread`` (128: each consumer has a client of its own whose
first consumer id is random below this; 0 suits Apache Pulsar),
``io_threads`` (1), ``client_log`` (``stderr``: the C++ client's warnings
and errors on stderr | ``python``: all its lines, debug included, to the
``transport.pulsar.client`` logger, at a cost per message), ``ack_receipts``
(True: acks are sent at once and ``ack()`` returns on the broker's ack
receipt; False: ``ack()`` returns when the client has handed the ack to its
connection, unconfirmed), ``ack_flush_wait_ms`` (150: only where this pulsar-client
build cannot send acks at once, how long ``ack()`` waits for the client's
ack-grouping flush; 0 lets a process killed right after ``ack()`` lose the
ack), ``admin_url`` (None:
admin REST endpoint for ``stats()``), ``listener_name``, and OAuth2
client credentials ``oauth2_issuer_url``, ``oauth2_audience``,
``oauth2_scope``, ``oauth2_client_id``, ``oauth2_client_secret`` (secret).

Authentication: ``token`` (JWT), ``username``/``password`` (basic),
OAuth2 (options above, or ``credentials_file`` = an OAuth2 key file), TLS
client certificates (``tls.cert_file``/``tls.key_file``). TLS hostname
verification is on unless ``tls.verify_hostname`` is false (the client's
own default is off).

Topic names: see :mod:`transport_pulsar._config`.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pulsar

from transport import HealthStatus, Transport, TransportCapabilities, TransportConfig
from transport.errors import (
    ConfigurationError,
    TransientTransportError,
    TransportError,
)
from transport.kit import DoctorFinding, ObjectKind, ProvisionPlan, internal_name
from transport_pulsar._client import AsyncConsumer, AsyncPulsarClient, PulsarContext
from transport_pulsar._config import PulsarSettings, parse_settings
from transport_pulsar._events import PulsarEventLog
from transport_pulsar._queue import PulsarRequestQueue, attempts_name
from transport_pulsar._registries import KeyedTopic, PulsarKeyedLog, checkpoint_name

__all__ = ["PulsarTransport", "open_pulsar"]

T = TypeVar("T")
log = logging.getLogger("transport.pulsar")


def _authentication(config: TransportConfig, settings: PulsarSettings) -> Any:
    options = settings.options
    if config.token is not None:
        return pulsar.AuthenticationToken(config.token.get_secret_value())
    if config.username or config.password:
        password = config.password.get_secret_value() if config.password else ""
        return pulsar.AuthenticationBasic(config.username or "", password)
    if options.oauth2_issuer_url:
        params: dict[str, str] = {
            "type": "client_credentials",
            "issuer_url": options.oauth2_issuer_url,
        }
        if options.oauth2_client_id and options.oauth2_client_secret:
            params["client_id"] = options.oauth2_client_id
            params["client_secret"] = options.oauth2_client_secret.get_secret_value()
        elif config.credentials_file is not None:
            params["private_key"] = f"file://{config.credentials_file}"
        if options.oauth2_audience:
            params["audience"] = options.oauth2_audience
        if options.oauth2_scope:
            params["scope"] = options.oauth2_scope
        return pulsar.AuthenticationOauth2(json.dumps(params))
    if config.tls.cert_file is not None and config.tls.key_file is not None:
        return pulsar.AuthenticationTLS(str(config.tls.cert_file), str(config.tls.key_file))
    return None


def key_shared_capabilities() -> TransportCapabilities:
    """The capabilities with option ``subscription_type="key_shared"``: the
    broker sends a key's messages, redeliveries included, to the consumer
    owning the key, so an expired lease can go back to a hung holder."""
    return PulsarTransport.capabilities


class PulsarTransport(Transport):
    backend = "pulsar"
    # A handle's consumer holds what it prefetched: handles share one.
    _shares_queues = True
    capabilities = TransportCapabilities(
        persistent=True,
        ordered=False,
        consumer_groups=True,
        native_delay=False,
        lease_extension=True,
        restart_broker=True,
        event_log=True,
        # An expired lease is negatively acknowledged and the broker pushes
        # the message to a consumer with permits, which may be the holder's
        # own (Shared) or must be it (Key_Shared): a holder that stays
        # connected but stops polling can keep it until its client closes.
        expired_lease_to_any_consumer=False,
    )

    def __init__(self, config: TransportConfig) -> None:
        super().__init__(config)
        self.settings = parse_settings(config)
        options = self.settings.options
        if options.subscription_type == "key_shared":
            self.capabilities = key_shared_capabilities()
        if options.admin_url is None:
            # Without the admin API a topic cannot be looked at without the
            # binary protocol creating it (see transport_pulsar._doctor), and
            # nothing reads a subscription's first unacknowledged message.
            self.capabilities = self.capabilities.model_copy(
                update={"inspect_without_create": False, "queue_head": False}
            )
        tls = config.tls
        kwargs: dict[str, Any] = {
            "authentication": _authentication(config, self.settings),
            "io_threads": options.io_threads,
            "connection_timeout_ms": options.connection_timeout_ms,
        }
        if options.listener_name:
            kwargs["listener_name"] = options.listener_name
        if self.settings.use_tls:
            kwargs.update(
                use_tls=True,
                tls_validate_hostname=tls.verify_hostname,
                tls_allow_insecure_connection=False,
            )
            if tls.ca_file is not None:
                kwargs["tls_trust_certs_file_path"] = str(tls.ca_file)
        #: What the client was built with (inspectable; secrets stay inside
        #: the authentication object, which has no revealing repr).
        self.client_settings = {k: v for k, v in kwargs.items() if k != "authentication"}
        self.client = AsyncPulsarClient(
            self.settings.service_url,
            operation_timeout=options.operation_timeout_seconds,
            close_timeout=options.close_timeout_seconds,
            # Within the operation timeout, as every operation is (README,
            # "Unreachable broker"): with operation_timeout_seconds=10 an
            # enqueue to a stopped broker raised after the 30 s send timeout.
            send_timeout_ms=min(
                options.send_timeout_ms, max(1, int(options.operation_timeout_seconds * 1000))
            ),
            client_log=options.client_log,
            **kwargs,
        )
        # What every queue, log and the doctor get instead of the transport.
        self.ctx = PulsarContext(self.client, self.settings, config, self._check_open)

    def topic(self, kind: str, name: str) -> str:
        return self.ctx.topic(kind, name)

    @property
    def operation_timeout(self) -> float:
        return self.settings.options.operation_timeout_seconds

    async def retrying(self, make: Callable[[], Awaitable[T]]) -> T:
        """See :meth:`PulsarContext.retrying`."""
        return await self.ctx.retrying(make)

    async def subscribe(
        self, topic: str, *, receiver_queue_size: int | None = None
    ) -> AsyncConsumer:
        return await self.ctx.subscribe(topic, receiver_queue_size=receiver_queue_size)

    async def ensure_subscription(self, topic: str) -> None:
        """See :meth:`PulsarContext.ensure_subscription`."""
        await self.ctx.ensure_subscription(topic)

    async def subscription_backlog(self, topic: str) -> int | None:
        """See :meth:`PulsarContext.subscription_backlog`."""
        return await self.ctx.subscription_backlog(topic)

    def _open_queue(
        self, name: str, *, lease_seconds: float, max_attempts: int
    ) -> PulsarRequestQueue:
        return PulsarRequestQueue(
            self.ctx,
            name,
            topic=self.topic("q", name),
            dlq_topic=self.topic("q", internal_name(name, "dlq")),
            attempts_topic=self.topic("q", attempts_name(name)),
            attempts_checkpoint_topic=self.topic("q", checkpoint_name(attempts_name(name))),
            lease_seconds=lease_seconds,
            max_attempts=max_attempts,
        )

    def _open_keyed_log(self, kind: str, name: str) -> PulsarKeyedLog:
        if kind not in {"delivery", "capability"}:
            raise ConfigurationError(f"unknown registry kind {kind!r}")
        options = self.settings.options
        return PulsarKeyedLog(
            KeyedTopic(
                self.client,
                self.topic(f"kv.{kind}", name),
                timeout=options.operation_timeout_seconds,
                close_timeout=options.close_timeout_seconds,
                checkpoint_topic=self.topic(f"kv.{kind}", checkpoint_name(name)),
            )
        )

    def _open_event_log(self) -> PulsarEventLog:
        return PulsarEventLog(self.ctx)

    # -- provisioning and doctor (see transport_pulsar._doctor) --------------
    def _broker_objects(self, kind: ObjectKind, name: str) -> list[str]:
        from transport_pulsar._doctor import object_topics

        return object_topics(self.ctx, kind, name)

    async def _existing(self, objects: list[str]) -> set[str]:
        from transport_pulsar._doctor import existing_topics

        return await existing_topics(self.ctx, objects)

    async def _create(self, kind: ObjectKind, name: str) -> None:
        from transport_pulsar._doctor import create_object

        await create_object(self.ctx, kind, name)

    async def _doctor(self, plan: ProvisionPlan | None) -> list[DoctorFinding]:
        from transport_pulsar._doctor import pulsar_doctor

        return await pulsar_doctor(self.ctx, plan)

    async def health(self) -> HealthStatus:
        start = time.perf_counter()
        try:
            await self.client.topic_partitions(self.topic("health", "probe"), timeout=5.0)
        except (TransportError, TimeoutError) as exc:
            return HealthStatus(
                ok=False, backend="pulsar", detail=f"{self.settings.service_url}: {exc}"
            )
        return HealthStatus(
            ok=True,
            backend="pulsar",
            detail=self.settings.service_url,
            latency_ms=(time.perf_counter() - start) * 1000,
        )

    async def _verify_backend(self, features: frozenset[str]) -> None:
        # A topic lookup: the broker must answer (and accept the credentials).
        try:
            await self.client.topic_partitions(
                self.topic("health", "probe"),
                timeout=self.settings.options.operation_timeout_seconds,
            )
        except TransientTransportError as exc:
            raise TransientTransportError(
                f"Pulsar broker at {self.settings.service_url} did not answer: {exc}"
            ) from exc

    async def _close_backend(self) -> None:
        await self.client.close()


async def open_pulsar(config: TransportConfig) -> PulsarTransport:
    """Entry point for ``pulsar://`` and ``pulsar+ssl://``.

    The client connects lazily: an unreachable broker shows up on first use,
    within ``operation_timeout_seconds`` (and in :meth:`PulsarTransport.health`,
    or at once with ``connect(..., verify=True)``).
    Raises: ConfigurationError.
    """
    return PulsarTransport(config)
