"""What a backend supplies to run the conformance suite: a harness.

A backend's test package defines a ``transport_harness`` fixture returning a
:class:`BackendHarness` (usually session-scoped, owning the broker process)
and subclasses the conformance classes; nothing else. The suite branches on
``harness.capabilities`` flags, never on the backend's name.
"""

from __future__ import annotations

import json
import os
from typing import Any

from transport import Transport, TransportCapabilities, TransportConfig, connect

__all__ = ["BackendHarness"]


class BackendHarness:
    """Builds transports for one running backend.

    Override :meth:`inject_raw` (required: puts undecodable bytes straight on
    a queue, as a foreign producer would) and, where the capability
    ``restart_broker`` is set, :meth:`restart_broker`.
    """

    #: Lease used by scenarios that wait for a lease to run out. Keep it as
    #: short as the backend allows.
    lease_seconds: float = 1.0
    #: Multiplier for every wait in the suite, for slow dev brokers.
    timeout_scale: float = 1.0

    def __init__(self, config: TransportConfig, capabilities: TransportCapabilities) -> None:
        self.config = config
        self.capabilities = capabilities

    async def connect(self, **overrides: Any) -> Transport:
        """A new, independent transport on the same backend (a fresh client,
        as after a process restart)."""
        config = self.config.model_copy(update=overrides) if overrides else self.config
        return await connect(config)

    async def inject_raw(self, transport: Transport, queue_name: str, data: bytes) -> None:
        """Write ``data`` verbatim to queue ``queue_name`` (bypassing
        validation), as a foreign or buggy producer would."""
        raise NotImplementedError

    async def restart_broker(self) -> None:
        """Stop the broker (hard) and start it again on the same address and
        data. Only called when ``capabilities.restart_broker`` is true."""
        await self.stop_broker()
        await self.start_broker()

    async def stop_broker(self) -> None:
        """Kill the broker (SIGKILL) — clients see it unreachable. Used by the
        reliability suite's outage scenario."""
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

    def scaled(self, seconds: float) -> float:
        """``seconds`` × :attr:`timeout_scale`."""
        return seconds * self.timeout_scale
