"""The NATS client bridge: request/reply on one reply subscription for the
hot paths, PubAck checks, broker object names, and :class:`NatsContext`, what
the transport hands every queue, registry, log and the doctor it creates (they
import it from here and never see the transport)."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import StreamConfig

from transport import TransportConfig
from transport.errors import ConfigurationError, TransientTransportError
from transport.kit import InFlight
from transport_nats._config import NatsOptions
from transport_nats._errors import map_nats_errors

__all__ = ["NatsContext", "Requests", "broker_name", "check_puback"]

log = logging.getLogger("transport.nats")

# JetStream err_code: "stream name already in use with a different configuration".
_STREAM_NAME_IN_USE = 10058
_LAST_ERRORS_KEPT = 10_000


class Requests:
    """Request/reply on one wildcard reply subscription, for the hot paths
    (PubAcks, acknowledgements): a counter for the reply token and one sweep
    for timeouts instead of a timer per request (what ``nc.request`` does).
    Timeouts raise ``nats.errors.TimeoutError`` like ``nc.request``; a reply
    lost with a reconnect times out the same way."""

    def __init__(self, nc: NatsClient, timeout: float) -> None:
        self._nc = nc
        self._timeout = timeout
        self._prefix = ""
        self._tokens = itertools.count()
        self._waiting: dict[str, tuple[asyncio.Future[Msg], float]] = {}
        self._sub: Any = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._prefix = self._nc.new_inbox() + "."
        self._sub = await self._nc.subscribe(self._prefix + "*", cb=self._on_reply)
        self._sweeper = asyncio.create_task(self._sweep())

    async def _on_reply(self, msg: Msg) -> None:
        entry = self._waiting.pop(msg.subject, None)
        if entry is None or entry[0].done():
            return
        if not msg.data and msg.headers and msg.headers.get("Status") == "503":
            entry[0].set_exception(nats.errors.NoRespondersError())
        else:
            entry[0].set_result(msg)

    async def _sweep(self) -> None:
        loop = asyncio.get_running_loop()
        period = min(max(self._timeout / 10, 0.01), 0.25)
        while True:
            await asyncio.sleep(period)
            now = loop.time()
            late = [t for t, (_, deadline) in self._waiting.items() if deadline <= now]
            for token in late:
                future, _ = self._waiting.pop(token)
                if not future.done():
                    future.set_exception(nats.errors.TimeoutError())

    async def request(
        self, subject: str, payload: bytes, headers: dict[str, str] | None = None
    ) -> Msg:
        if self._sub is None:
            raise nats.errors.ConnectionClosedError
        loop = asyncio.get_running_loop()
        token = f"{self._prefix}{next(self._tokens)}"
        future: asyncio.Future[Msg] = loop.create_future()
        self._waiting[token] = (future, loop.time() + self._timeout)
        try:
            await self._nc.publish(subject, payload, reply=token, headers=headers)
            return await future
        finally:
            self._waiting.pop(token, None)

    async def aclose(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._sub = None
        waiting, self._waiting = self._waiting, {}
        for future, _ in waiting.values():
            if not future.done():
                future.set_exception(nats.errors.ConnectionClosedError())


def check_puback(reply: Msg) -> None:
    """Raise the JetStream error carried by a PubAck, if any (what
    ``js.publish`` does, without building a PubAck object nobody reads)."""
    if b'"error"' in reply.data:
        answer = json.loads(reply.data)
        if "error" in answer:
            raise nats.js.errors.APIError.from_error(answer["error"])


def broker_name(namespace: str, *parts: str) -> str:
    """Stream/bucket name from validated parts, joined by the reserved ``__``."""
    return "__".join((namespace, *parts))


#: Bytes kept below the server's ``max_payload`` for what is not the body:
#: the headers of a publish (``Nats-Msg-Id`` with a request id and suffix,
#: ``Nats-Expected-Stream``, trace and event headers) and a dead letter's
#: fields around the request (its error is at most 4 KiB).
HEADER_ALLOWANCE = 8192


class NatsContext:
    """What the children of one transport (queues, keyed logs, the event bus
    and log, the doctor) share: the connection, its request/reply helper, the
    validated options, the configuration, and the few operations they call.
    Built once by the transport; children keep it and never see the
    transport.

    The transport sets :attr:`jetstream` when it has connected and
    :attr:`jetstream_error` whenever it probes JetStream; ``check_open``
    raises ``ClosedResourceError`` once the transport is closed."""

    __slots__ = (
        "_connected",
        "_ensured_streams",
        "_ensuring",
        "_reconnect_listeners",
        "check_open",
        "config",
        "down_since",
        "jetstream",
        "jetstream_error",
        "last_errors",
        "nc",
        "operation_timeout",
        "options",
        "requests",
    )

    def __init__(
        self,
        nc: NatsClient,
        requests: Requests,
        options: NatsOptions,
        config: TransportConfig,
        check_open: Callable[[], None],
    ) -> None:
        self.nc = nc
        self.requests = requests
        self.options = options
        self.config = config
        self.check_open = check_open
        #: The transport's operation timeout (set by the transport): how long
        #: an operation waits out an outage before it raises.
        self.operation_timeout = 11.0
        #: When the connection went down (event-loop time; None: up).
        self.down_since: float | None = None
        #: Set while the connection is up (cleared by :meth:`disconnected`).
        self._connected = asyncio.Event()
        self._connected.set()
        #: The JetStream API of the connection (None before connecting).
        self.jetstream: JetStreamContext | None = None
        #: Set when the server has no JetStream: queues, registries and the
        #: event log raise it; the event bus works.
        self.jetstream_error: ConfigurationError | None = None
        self._reconnect_listeners: set[Callable[[], None]] = set()
        self._ensured_streams: set[str] = set()
        # Stream creations in flight, shared by concurrent callers.
        self._ensuring: InFlight[str] = InFlight()
        # Last nack error per (stream, sequence), so a request whose final
        # lease expires in this process is dead-lettered with it.
        self.last_errors: OrderedDict[tuple[str, int], str] = OrderedDict()

    async def round_trip(self, timeout: float) -> None:
        """Return once the server has processed everything this connection
        sent before the call (a SUB included).

        One ``flush()`` is not enough: nats-py writes a flush's PING to the
        socket at once, ahead of commands still waiting in its write buffer,
        so its PONG can come back before the server has a SUB sent just
        before it (measured: 13 of 300 events missed by a subscriber that
        trusted one flush). By the time that PONG arrives the buffer has been
        written (the flusher task runs before the reply is read), so a second
        PING follows the buffered commands and its PONG proves them
        processed.

        Raises: nats.errors.TimeoutError (as flush).
        """
        wait = max(1, round(timeout))
        await self.nc.flush(wait)
        await self.nc.flush(wait)

    @property
    def body_limit(self) -> int:
        """The largest body a publish with the library's headers may carry:
        ``max_payload_bytes``, and never more than the server's
        ``max_payload`` less :data:`HEADER_ALLOWANCE` (the server counts the
        headers in it; one message over it closes the connection)."""
        limit = self.config.max_payload_bytes
        server = getattr(self.nc, "max_payload", 0) or 0
        if server > 0:
            limit = min(limit, server - HEADER_ALLOWANCE)
        return limit

    def require_jetstream(self) -> None:
        """Raises: ConfigurationError if the server has no JetStream."""
        if self.jetstream_error is not None:
            raise self.jetstream_error

    @property
    def js(self) -> JetStreamContext:
        """The JetStream API. Raises: ClosedResourceError, ConfigurationError."""
        self.check_open()
        self.require_jetstream()
        assert self.jetstream is not None
        return self.jetstream

    async def ensure_stream(self, config: StreamConfig) -> None:
        """Create the stream, or update it if it exists with other settings.

        Concurrent callers share one creation of a stream (a burst of 20,000
        first enqueues on a new queue made 20,000 requests to the server,
        and most timed out behind each other); a caller cancelled does not
        cancel it for the others.
        Raises: TransientTransportError, PermanentTransportError.
        """
        assert config.name is not None
        if config.name in self._ensured_streams:
            return
        await self._ensuring.run(config.name, lambda: self._create_stream(config))

    async def _create_stream(self, config: StreamConfig) -> None:
        assert config.name is not None
        with map_nats_errors(f"creating stream {config.name}"):
            try:
                await self.js.add_stream(config)
            except nats.js.errors.BadRequestError as exc:
                if exc.err_code != _STREAM_NAME_IN_USE:
                    raise
                await self.js.update_stream(config)
        self._ensured_streams.add(config.name)

    def has_streams(self, *names: str) -> bool:
        return all(name in self._ensured_streams for name in names)

    def forget_stream(self, name: str) -> None:
        self._ensured_streams.discard(name)

    def forget_streams(self) -> None:
        """Every stream is checked again at its next use (after a reconnect:
        a restarted server may have lost them)."""
        self._ensured_streams.clear()

    def remember_error(self, stream: str, seq: int, error: str) -> None:
        self.last_errors[(stream, seq)] = error
        self.last_errors.move_to_end((stream, seq))
        while len(self.last_errors) > _LAST_ERRORS_KEPT:
            self.last_errors.popitem(last=False)

    def check_connected(self, what: str) -> None:
        """Raise TransientTransportError while the connection is down
        (reconnecting). Called before a publish that must not wait in the
        client's reconnect buffer: nats-py keeps what is published while
        disconnected and sends it after reconnecting, so an ``enqueue`` that
        had already raised would be stored minutes later, and a pull request
        would take messages for a poll that had long given up."""
        if not self.nc.is_connected:
            state = "reconnecting" if self.nc.is_reconnecting else "not connected"
            raise TransientTransportError(f"{what}: NATS unavailable ({state})")

    async def wait_connected(self, what: str) -> None:
        """Wait for a connection that is down to come back, up to
        ``request_timeout`` (what a write sent into the reconnect buffer used
        to wait for its reply), then :meth:`check_connected`: a short
        reconnect does not fail a registry write or an append."""
        if not self.nc.is_connected:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.options.request_timeout):
                    await self._connected.wait()
        self.check_connected(what)

    def disconnected(self, now: float) -> None:
        """The connection went down at ``now`` (event-loop time)."""
        if self.down_since is None:
            self.down_since = now
        self._connected.clear()

    def add_reconnect_listener(self, listener: Callable[[], None]) -> None:
        self._reconnect_listeners.add(listener)

    def remove_reconnect_listener(self, listener: Callable[[], None]) -> None:
        self._reconnect_listeners.discard(listener)

    def reconnected(self) -> None:
        """The connection is back: call every reconnect listener (a failing
        one is logged, never raised: this runs on the client's task)."""
        self.down_since = None
        self._connected.set()
        for listener in list(self._reconnect_listeners):
            try:
                listener()
            except Exception:  # a listener must never break the client's task
                log.exception("reconnect listener failed")

    def close(self) -> None:
        """The transport is closing: no listener is called any more."""
        self._reconnect_listeners.clear()
