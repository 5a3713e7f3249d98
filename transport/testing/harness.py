"""What a backend supplies to run the conformance suite: a harness.

A backend's test package defines a ``transport_harness`` fixture returning a
:class:`BackendHarness` (usually session-scoped, owning the broker process)
and subclasses the conformance classes; nothing else. The suite branches on
``harness.capabilities`` flags, never on the backend's name.
"""

from __future__ import annotations

import asyncio
import json
import os
from typing import Any

from transport import Transport, TransportCapabilities, TransportConfig, connect
from transport.errors import TransportError

__all__ = ["BackendHarness"]


class BackendHarness:
    """Builds transports for one running backend.

    Override :meth:`inject_raw` (required: puts undecodable bytes straight on
    a queue, as a foreign producer would) and, where the harness can stop
    and start the broker, :meth:`stop_broker` / :meth:`start_broker`.

    What the *backend* guarantees is ``capabilities`` (library data); what
    the *test broker* can do is described here, by the harness: a dev broker
    that keeps data in memory only cannot show that a real one keeps
    accepted requests across a restart.
    """

    #: Lease used by scenarios that wait for a lease to run out. Keep it as
    #: short as the backend allows.
    lease_seconds: float = 1.0
    #: Multiplier for every wait in the suite, for slow dev brokers.
    timeout_scale: float = 1.0
    #: The harness can kill the broker (SIGKILL) and start it again on the
    #: same address *with its data* (:meth:`stop_broker`, :meth:`start_broker`).
    #: False for an external broker, and for a dev broker that keeps data in
    #: memory only. The broker-restart scenarios run where this and the
    #: capability ``restart_broker`` are both true.
    can_restart_broker: bool = False
    #: The harness can make the broker unreachable and reachable again
    #: (:meth:`stop_broker` / :meth:`start_broker`), data kept or not: the
    #: outage scenarios need only this.
    can_stop_broker: bool = False
    #: The backend has no broker process: its store lives inside the client
    #: processes (a file, memory). "Every process on the store killed" is
    #: then the nearest thing to a broker restart.
    embedded: bool = False
    #: Set (to the reason) where the test broker is known to redeliver a
    #: SIGKILLed consumer's unacknowledged requests late. The crash scenarios
    #: still require every request back (within the test's own timeout);
    #: only their "within the usual time" check becomes an xfail.
    slow_crash_redelivery: str | None = None

    def __init__(self, config: TransportConfig, capabilities: TransportCapabilities) -> None:
        self.config = config
        self.capabilities = capabilities

    def broker_notes(self) -> str:
        """What the test broker recorded since this harness was made that
        may explain a lost request (added to the crash scenarios' failure
        messages). Empty if nothing or unknown."""
        return ""

    def mark_test_start(self) -> None:
        """A new test (or reliability scenario) begins: evidence that
        :meth:`known_broker_gap` reads is taken from here on. Default: no-op."""

    def known_broker_gap(self) -> str | None:
        """A documented defect of the *test broker* (not of the backend) that
        this test hit, with its evidence, or ``None``. A crash scenario that
        lost requests ends as an xfail naming it only when this returns a
        reason; every other loss fails. Default: ``None`` (no excuse)."""
        return None

    async def connect(self, **overrides: Any) -> Transport:
        """A new, independent transport on the same backend (a fresh client,
        as after a process restart)."""
        config = self.config.model_copy(update=overrides) if overrides else self.config
        return await connect(config)

    #: Fields of :attr:`config` that say *where* and *who* (kept by
    #: :meth:`default_config`); every other field and every ``options`` entry
    #: is tuning a user would not have written.
    IDENTITY_FIELDS = frozenset(
        {
            "url",
            "namespace",
            "consumer_group",
            "username",
            "password",
            "token",
            "credentials_file",
            "nkey_seed",
            "sasl_mechanism",
            "tls",
        }
    )

    def default_config(self) -> TransportConfig:
        """:attr:`config` without the test tuning: the same broker, namespace
        and credentials, every other setting (``options``, leases, timeouts)
        at the library's defaults, as a user's first configuration."""
        return TransportConfig(
            **{name: getattr(self.config, name) for name in self.IDENTITY_FIELDS}
        )

    async def connect_default(self) -> Transport:
        """A new client on :meth:`default_config`."""
        return await connect(self.default_config())

    async def inject_raw(self, transport: Transport, queue_name: str, data: bytes) -> None:
        """Write ``data`` verbatim to queue ``queue_name`` (bypassing
        validation), as a foreign or buggy producer would."""
        raise NotImplementedError

    async def restart_broker(self) -> None:
        """Stop the broker (hard) and start it again on the same address and
        data. Only called when :attr:`can_restart_broker` is true."""
        await self.stop_broker()
        await self.start_broker()

    async def stop_broker(self) -> None:
        """Kill the broker (SIGKILL) — clients see it unreachable. Only
        called when :attr:`can_stop_broker` is true."""
        raise NotImplementedError

    async def start_broker(self) -> None:
        """Start the broker stopped by :meth:`stop_broker` on the same
        address (and data, where the broker keeps any)."""
        raise NotImplementedError

    def subprocess_env(self, **overrides: Any) -> dict[str, str]:
        """Environment for a child process that should connect to this
        backend with ``transport.connect()`` (``TRANSPORT_*`` variables)."""
        env = dict(os.environ)
        data = self.config.model_dump(mode="json", exclude_none=True)
        # Dumps redact the URL's password and secret options: the real ones.
        data.update(url=self.config.url, options=self.config.options)
        data.update(overrides)
        for key, value in data.items():
            if key == "tls" or key in {"password", "token", "nkey_seed"}:
                continue
            name = f"TRANSPORT_{key.upper()}"
            env[name] = json.dumps(value) if isinstance(value, dict | list) else str(value)
        for key in ("password", "token", "nkey_seed"):
            secret = getattr(self.config, key)
            if secret is not None:
                env[f"TRANSPORT_{key.upper()}"] = secret.get_secret_value()
        return env

    async def broker_answers(self, timeout: float = 10.0) -> bool:
        """Whether a fresh client reaches the broker within ``timeout``
        (``health().ok``): how the suite checks that a stop really stopped it."""
        try:
            async with asyncio.timeout(timeout):
                probe = await self.connect()
                try:
                    return (await probe.health()).ok
                finally:
                    await probe.aclose()
        except (TransportError, TimeoutError, OSError):
            return False

    def scaled(self, seconds: float) -> float:
        """``seconds`` × :attr:`timeout_scale`."""
        return seconds * self.timeout_scale
