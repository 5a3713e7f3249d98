"""``connect``: configuration in, a :class:`Transport` out.

Backends are found through the ``transport.backends`` entry-point group,
keyed by URL scheme, so third-party backends plug in without changes here.
"""

from __future__ import annotations

import importlib
import logging
from collections.abc import Coroutine, Generator, Iterable
from importlib.metadata import entry_points
from types import TracebackType
from typing import Any, cast

from transport._spi.config import TransportConfig, load_config
from transport._spi.transport import Transport, TransportCapabilities, TransportFactory
from transport.errors import BackendNotAvailableError, UnsupportedFeatureError

__all__ = ["Connecting", "available_backends", "connect"]

log = logging.getLogger("transport")

# Used when the distribution's entry points are not installed (running from a
# source checkout); installed entry points always win.
_BUILTIN = {
    "memory": ("transport_inprocess:open_memory", None),
    "sqlite": ("transport_inprocess:open_sqlite", None),
    "kafka": ("transport_kafka:open_kafka", "kafka"),
    "nats": ("transport_nats:open_nats", "nats"),
    "tls": ("transport_nats:open_nats", "nats"),
    "pulsar": ("transport_pulsar:open_pulsar", "pulsar"),
    "pulsar+ssl": ("transport_pulsar:open_pulsar", "pulsar"),
}

GROUP = "transport.backends"


def available_backends() -> dict[str, str]:
    """URL scheme → ``module:factory`` for every known backend."""
    found = {scheme: target for scheme, (target, _) in _BUILTIN.items()}
    for ep in entry_points(group=GROUP):
        found[ep.name] = ep.value
    return found


def _load(scheme: str) -> TransportFactory:
    target = available_backends().get(scheme)
    if target is None:
        known = ", ".join(sorted(available_backends()))
        raise BackendNotAvailableError(
            scheme, f"no transport backend for URL scheme {scheme!r} (known: {known})"
        )
    module_name, _, attr = target.partition(":")
    extra = _BUILTIN.get(scheme, (None, None))[1]
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        hint = (
            f"pip install 'agentensemble-transport[{extra}]'"
            if extra
            else f"install the package providing {module_name!r}"
        )
        raise BackendNotAvailableError(
            scheme, f"backend for {scheme}:// is not installed ({exc.name or exc}); {hint}"
        ) from exc
    return cast(TransportFactory, getattr(module, attr))


class Connecting(Coroutine[Any, Any, Transport]):
    """What :func:`connect` returns: awaited, the open :class:`Transport`;
    as ``async with connect(...) as transport:``, the transport, closed on
    leaving the block (the same as ``async with await connect(...)``). It is
    a coroutine, so ``asyncio.run``, ``create_task`` and ``wait_for`` take
    it as they take any."""

    __slots__ = ("_coro", "_transport")

    def __init__(self, coro: Coroutine[Any, Any, Transport]) -> None:
        self._coro = coro
        self._transport: Transport | None = None

    def send(self, value: Any) -> Any:
        return self._coro.send(value)

    def throw(self, *args: Any) -> Any:
        return self._coro.throw(*args)

    def close(self) -> None:
        self._coro.close()

    def __await__(self) -> Generator[Any, None, Transport]:
        return self._coro.__await__()

    async def __aenter__(self) -> Transport:
        self._transport = await self._coro
        return self._transport

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._transport is not None:
            await self._transport.aclose()


def connect(
    url_or_config: str | TransportConfig | None = None,
    *,
    require: Iterable[str] = (),
    verify: bool = False,
    **overrides: Any,
) -> Connecting:
    """Open a transport for a URL (``sqlite:///app.db``, ``kafka://host:9092`` …)
    or a :class:`TransportConfig`; ``None`` reads ``TRANSPORT_URL`` and friends
    from the environment (and ``TRANSPORT_CONFIG_FILE`` if set).

    ``require`` names capability flags the caller needs (``"event_bus"``,
    ``"persistent"`` …, the fields of :class:`TransportCapabilities`); a
    backend lacking one is refused up front, and so is a server that is not
    set up for one (NATS without JetStream: ``ConfigurationError`` naming
    ``-js``). ``require=["event_bus"]`` accepts a NATS server without
    JetStream.

    Without ``verify`` most backends connect lazily: an unreachable broker
    fails the first operation, within the backend's operation timeout.
    ``verify=True`` checks the broker now (a metadata round trip) and the
    capabilities in ``require`` — all the backend offers if ``require`` is
    empty — for services that should refuse to start without their broker.

    Raises:
        BackendNotAvailableError: unknown scheme or missing extra (the message
            says what to install).
        UnsupportedFeatureError: a ``require``d capability is missing.
        ConfigurationError: invalid settings, or a server not set up for a
            required capability.
        PermanentTransportError: (``verify``) credentials or TLS refused.
        TransientTransportError: the backend is unreachable (NATS always
            checks; the others with ``verify``), within the operation timeout.

    Await it (``transport = await connect(...)``, then ``aclose()``), or use
    it as an async context manager: ``async with connect(...) as
    transport:`` closes the transport when the block ends.
    """
    return Connecting(_connect(url_or_config, require, verify, overrides))


async def _connect(
    url_or_config: str | TransportConfig | None,
    require: Iterable[str],
    verify: bool,
    overrides: dict[str, Any],
) -> Transport:
    config = load_config(url_or_config, **overrides)
    factory = _load(config.scheme)
    config.check_files()
    if isinstance(require, str):  # a single name: its letters were taken as names
        require = [require]
    wanted = frozenset(require)
    unknown = wanted - set(TransportCapabilities.model_fields)
    if unknown:
        raise ValueError(f"unknown capability name(s): {', '.join(sorted(unknown))}")
    transport = await factory(config)
    try:
        missing = sorted(f for f in wanted if not getattr(transport.capabilities, f))
        if missing:
            raise UnsupportedFeatureError(
                f"the {config.scheme}:// backend lacks required capabilities: {', '.join(missing)}"
            )
        transport._check_usable(wanted)
        if verify:
            await transport.verify(wanted or None)
    except BaseException:
        await transport.aclose()
        raise
    log.debug("connected %r", transport)
    return transport
