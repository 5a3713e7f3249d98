"""Events beside work requests: an ephemeral :class:`EventBus` and a durable
:class:`EventLog`.

Rule of thumb: real-time sync and "ask another agent" go on the bus
(at-most-once, sub-millisecond on NATS core and in-process); audit, event
sourcing and replay go on the log (durable, ordered per stream, replayable
from any position or time); work that must be done exactly by someone goes on
a request queue.

Subjects are dot-separated tokens of ``[A-Za-z0-9_-]``. Subscriptions may use
``*`` (exactly one token) and ``>`` (one or more tokens, last only); publish
subjects may not. Streams of the log are plain names.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from datetime import datetime
from types import TracebackType
from typing import Any, Literal, Self

from pydantic import Field, ValidationInfo, field_validator

from transport._spi.models import HEADERS_SCHEMA, NAME_SCHEMA, _WireModel, check_json_value, utcnow
from transport._spi.naming import validate_header, validate_name
from transport.errors import InvalidNameError

__all__ = [
    "Event",
    "EventBus",
    "EventLog",
    "EventReader",
    "LogEvent",
    "Start",
    "Subscription",
    "subject_matches",
    "subjects",
    "validate_subject",
]

MAX_SUBJECT_LENGTH = 255
MAX_TOKENS = 16
#: Events one subscription holds unread before it drops the oldest.
SUBSCRIPTION_BUFFER = 10_000

log = logging.getLogger("transport.events")


class EventInbox:
    """What one subscription received and its reader has not taken yet, at
    most ``limit`` events. The bus is at most once, and a reader that does
    not keep up must not grow the process without bound (measured: 150,000
    unread 1 KB events took 390 MB on NATS, 180 MB on ``memory://``): past
    the limit the oldest event is dropped, with a warning at the first drop
    and at every 10,000th after. For backends, not applications."""

    def __init__(self, what: str, limit: int | None = None) -> None:
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._what = what
        self._limit = SUBSCRIPTION_BUFFER if limit is None else limit
        #: Events dropped because the reader fell behind.
        self.dropped = 0

    def put_nowait(self, item: Any) -> None:
        queue = self._queue
        if queue.qsize() >= self._limit:
            with contextlib.suppress(asyncio.QueueEmpty):
                queue.get_nowait()
            self.dropped += 1
            if self.dropped % 10_000 == 1:
                log.warning(
                    "event bus: the reader of %s is %d events behind; dropped the oldest"
                    " (%d so far)",
                    self._what,
                    self._limit,
                    self.dropped,
                )
        queue.put_nowait(item)

    async def get(self) -> Any:
        return await self._queue.get()

    def qsize(self) -> int:
        return self._queue.qsize()


def validate_subject(subject: object, *, pattern: bool = False) -> str:
    """Return ``subject`` if valid, else raise.

    ``pattern=True`` allows ``*`` tokens and a final ``>``.
    Raises: InvalidNameError.
    """
    what = "subscription pattern" if pattern else "subject"
    if not isinstance(subject, str) or not subject:
        raise InvalidNameError(what, subject, "must be a non-empty string")
    if len(subject) > MAX_SUBJECT_LENGTH:
        raise InvalidNameError(what, subject, f"longer than {MAX_SUBJECT_LENGTH} characters")
    tokens = subject.split(".")
    if len(tokens) > MAX_TOKENS:
        raise InvalidNameError(what, subject, f"more than {MAX_TOKENS} tokens")
    for i, token in enumerate(tokens):
        if pattern and token == "*":
            continue
        if pattern and token == ">":
            if i != len(tokens) - 1:
                raise InvalidNameError(what, subject, "'>' may only be the last token")
            continue
        if token in ("*", ">"):
            raise InvalidNameError(what, subject, "wildcards are only allowed in subscriptions")
        try:
            validate_name(token, "subject token")
        except InvalidNameError as exc:
            raise InvalidNameError(what, subject, f"token {token!r}: {exc.reason}") from None
    return subject


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS semantics: ``*`` matches one token, a final ``>`` one or more."""
    p_tokens = pattern.split(".")
    s_tokens = subject.split(".")
    for i, p in enumerate(p_tokens):
        if p == ">":
            return len(s_tokens) > i
        if i >= len(s_tokens) or (p != "*" and p != s_tokens[i]):
            return False
    return len(p_tokens) == len(s_tokens)


class subjects:
    """The documented subject namespace for ensembles; every builder
    validates its argument, so user-given names cannot inject tokens."""

    @staticmethod
    def events(ensemble: str, kind: str | None = None) -> str:
        """``agent.events.<ensemble>[.<kind>]`` — what an ensemble announces.

        Raises: InvalidNameError if ``ensemble`` or ``kind`` is not a valid
        name (wildcards, ``.``, spaces, empty, ``__``...).
        """
        base = f"agent.events.{validate_name(ensemble, 'ensemble name')}"
        return base if kind is None else f"{base}.{validate_name(kind, 'event kind')}"

    @staticmethod
    def route(agent_id: str) -> str:
        """``agent.route.<id>`` — direct messages to one agent.

        Raises: InvalidNameError if ``agent_id`` is not a valid name.
        """
        return f"agent.route.{validate_name(agent_id, 'agent id')}"

    @staticmethod
    def plugin_inbound(plugin: str) -> str:
        """``plugin.inbound.<plugin>`` — input for a plugin.

        Raises: InvalidNameError if ``plugin`` is not a valid name.
        """
        return f"plugin.inbound.{validate_name(plugin, 'plugin name')}"

    @staticmethod
    def plugin_outbound(channel: str, instance: str | None = None) -> str:
        """``plugin.outbound.<channel>[.<instance>]`` — what plugins send out
        on a channel (``slack``, ``email``...), optionally for one instance of
        it. Subscribe to ``plugin.outbound.<channel>.>`` for every instance,
        or :attr:`ALL_PLUGIN_OUTBOUND` for every channel.

        Raises: InvalidNameError if ``channel`` or ``instance`` is not a
        valid name.
        """
        base = f"plugin.outbound.{validate_name(channel, 'channel name')}"
        return base if instance is None else f"{base}.{validate_name(instance, 'instance name')}"

    @staticmethod
    def plugin_health(plugin: str) -> str:
        """``plugin.health.<plugin>`` — a plugin's heartbeats.

        Raises: InvalidNameError if ``plugin`` is not a valid name.
        """
        return f"plugin.health.{validate_name(plugin, 'plugin name')}"

    ALL_EVENTS = "agent.events.>"
    ALL_PLUGIN_HEALTH = "plugin.health.*"
    ALL_PLUGIN_OUTBOUND = "plugin.outbound.>"


class Event(_WireModel):
    """One message on the bus. ``reply_to`` is set on requests."""

    id: str = Field(default_factory=lambda: uuid.uuid4().hex)
    subject: str
    data: Any = None
    headers: dict[str, str] = Field(default_factory=dict, json_schema_extra=HEADERS_SCHEMA)
    published_at: datetime = Field(default_factory=utcnow)
    reply_to: str | None = None

    @field_validator("data")
    @classmethod
    def _check_data(cls, value: Any, info: ValidationInfo) -> Any:
        return check_json_value(value, info)


class LogEvent(_WireModel):
    """One record of the event log. ``position`` is opaque, backend-specific,
    and can be given back to :meth:`EventLog.read` or :meth:`EventReader.seek`."""

    stream: str = Field(json_schema_extra=NAME_SCHEMA)
    position: str
    data: Any = None
    key: str | None = None
    headers: dict[str, str] = Field(default_factory=dict, json_schema_extra=HEADERS_SCHEMA)
    appended_at: datetime

    @field_validator("data")
    @classmethod
    def _check_data(cls, value: Any, info: ValidationInfo) -> Any:
        return check_json_value(value, info)


def check_headers(headers: dict[str, str] | None) -> dict[str, str]:
    for k, v in (headers or {}).items():
        validate_header(k, v)
    return dict(headers or {})


class Subscription(ABC):
    """An async iterator of events matching a pattern; close it when done."""

    pattern: str
    queue_group: str | None

    def __aiter__(self) -> Self:
        return self

    @abstractmethod
    async def __anext__(self) -> Event: ...

    async def next(self, timeout: float | None = None) -> Event | None:
        """The next event, or ``None`` after ``timeout`` seconds.

        Raises: StopAsyncIteration once the subscription is closed.
        """
        try:
            async with asyncio.timeout(timeout):
                return await self.__anext__()
        except TimeoutError:
            return None

    @abstractmethod
    async def aclose(self) -> None:
        """Stop receiving; a pending :meth:`next` ends. Idempotent. Does not
        raise for an unreachable backend."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class EventBus(ABC):
    """Ephemeral subject pub/sub with wildcards, queue groups and request/reply.

    Guarantees: at-most-once; per-publisher order for one subscriber; no
    persistence (a subscriber sees only what is published while it is
    subscribed).
    """

    @abstractmethod
    async def publish(
        self, subject: str, data: Any = None, *, headers: dict[str, str] | None = None
    ) -> None:
        """Publish to ``subject`` (no wildcards).

        Raises: InvalidNameError, PayloadTooLargeError, TransientTransportError.
        """

    @abstractmethod
    async def subscribe(self, pattern: str, queue_group: str | None = None) -> Subscription:
        """Receive events matching ``pattern`` from now on. Subscribers in
        the same ``queue_group`` share the events: each goes to one of them.

        Raises: InvalidNameError, TransientTransportError.
        """

    @abstractmethod
    async def request(
        self,
        subject: str,
        data: Any = None,
        *,
        timeout: float = 5.0,
        headers: dict[str, str] | None = None,
    ) -> Event:
        """Publish a request and wait for the first reply.

        Raises: TimeoutError (no reply in time — also when nobody listens),
        InvalidNameError, TransientTransportError.
        """

    @abstractmethod
    async def reply(
        self, request: Event, data: Any = None, *, headers: dict[str, str] | None = None
    ) -> None:
        """Answer a request received from a subscription.

        Raises: ValueError if ``request`` has no ``reply_to``.
        """

    async def serve(
        self,
        pattern: str,
        handler: Callable[[Event], Awaitable[Any]],
        queue_group: str | None = None,
    ) -> asyncio.Task[None]:
        """Answer every request matching ``pattern`` with ``handler``'s
        return value, in a background task (cancel it to stop).

        Guarantees: subscribed before this returns, so a request published
        afterwards is answered. Events without ``reply_to`` are ignored.
        Raises: as :meth:`subscribe` (at the call). The task ends with the
        handler's exception if the handler raises (the requester then times
        out), or with the bus's error if a reply cannot be sent.
        """
        subscription = await self.subscribe(pattern, queue_group)

        async def loop() -> None:
            async with subscription:
                async for event in subscription:
                    if event.reply_to is not None:
                        await self.reply(event, await handler(event))

        return asyncio.create_task(loop(), name=f"serve:{pattern}")

    @abstractmethod
    async def aclose(self) -> None:
        """Close every subscription. Idempotent. Does not raise for an
        unreachable backend."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()


#: Where a reader starts: a position, a time, or one of the two ends.
Start = str | datetime | Literal["earliest", "latest"]


class EventReader(ABC):
    """Reads one stream in order, then continues live, until closed.

    With a ``cursor`` name, the position is stored durably: each event is
    committed when the next one is requested (or by :meth:`commit`), so a
    reader restarted with the same cursor resumes after the last committed
    event (at-least-once: the last uncommitted event is read again). A
    reader that returned no event since it was placed (its start, a
    :meth:`seek`) commits that placement: a cursor opened at ``latest`` and
    closed before any event came resumes there, so events appended while it
    was down are read (``pulsar://`` stores a placement at ``latest`` or
    ``earliest`` only, not at a position or a time).
    """

    stream: str
    cursor: str | None
    #: An event was returned that no commit, seek or request for the next
    #: one has followed yet (backends keep this up to date).
    _holding = False
    #: The close commits nothing past the event being held: set by
    #: ``__aexit__`` when the block ends with an exception, and by a
    #: transport that an exception closes.
    _keep_last = False

    def _final_commit_due(self) -> bool:
        """Whether the close commits: not past an event being handled when
        an exception (an error, a cancellation, Ctrl-C) ended the reading."""
        return not (self._keep_last and self._holding)

    def __aiter__(self) -> Self:
        return self

    @abstractmethod
    async def __anext__(self) -> LogEvent: ...

    async def next(self, timeout: float | None = None) -> LogEvent | None:
        """The next event, or ``None`` if none arrives within ``timeout``.

        Guarantees: events of the stream in append order, without gaps;
        with a named cursor, the previous event is committed first.
        Raises: StopAsyncIteration once the reader is closed;
        TransientTransportError if the backend fails while reading or
        committing.
        """
        try:
            async with asyncio.timeout(timeout):
                return await self.__anext__()
        except TimeoutError:
            return None

    @abstractmethod
    async def seek(self, to: Start) -> None:
        """Continue from a position (inclusive), the first event appended at
        or after a time, or an end (``latest``: only events appended after
        the seek).

        Raises: ValueError for a start that is not a position of this log,
        a datetime, ``earliest`` or ``latest``; ClosedResourceError;
        TransientTransportError.
        """

    @abstractmethod
    async def commit(self) -> None:
        """Store the position after the last event returned, or where the
        reader was placed if it returned none since (named cursors only; a
        no-op otherwise).

        Guarantees: durable on return: a reader restarted with this cursor
        resumes after that event.
        Raises: TransientTransportError.
        """

    @abstractmethod
    async def aclose(self) -> None:
        """Stop reading (commits a named cursor). Idempotent.

        Leaving ``async with`` on an exception (a handler's error, a
        cancellation, Ctrl-C) closes without committing the last event
        returned: the handling it was in did not finish, and a reader
        restarted with the cursor reads it again. A transport closed by
        ``async with`` on an exception closes its open readers the same way.

        Raises: TransientTransportError from the final commit on some
        backends (the reader is closed either way; the cursor then resumes
        at the last committed event).
        """

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self._keep_last = True
        await self.aclose()


class EventLog(ABC):
    """Durable, replayable streams of events."""

    def _keep_last_events(self) -> None:
        """Its open readers close without committing the event each is
        handling (a transport closed by an exception; see
        :meth:`EventReader.aclose`). The backends' logs keep their open
        readers in ``_readers``."""
        for reader in list(getattr(self, "_readers", ())):
            reader._keep_last = True

    @abstractmethod
    async def append(
        self,
        stream: str,
        data: Any = None,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        """Append an event; returns its position once durably stored.

        Guarantees: order within a stream is append order (per appender).
        ``appended_at`` is the time a read or seek by time compares with.
        Raises: InvalidNameError, PayloadTooLargeError, TransientTransportError,
        ClosedResourceError.
        """

    @abstractmethod
    async def read(
        self, stream: str, start: Start = "earliest", *, cursor: str | None = None
    ) -> EventReader:
        """A reader of ``stream`` from ``start`` (ignored for a named
        ``cursor`` that has a stored position): a position (inclusive), a
        time (the first event whose ``appended_at`` is at or after it),
        ``earliest``, or ``latest`` (only events appended after the read
        started).

        A well-formed position after the end of the log is accepted where
        the backend's positions allow it (``memory://``, ``sqlite://``,
        ``nats://``, ``kafka://``): the reader waits for the log to reach it.

        Raises: InvalidNameError; ValueError for a start that is not a
        position of this log, a datetime, ``earliest`` or ``latest``;
        TransientTransportError; ClosedResourceError.
        """

    @abstractmethod
    async def aclose(self) -> None:
        """Close every reader (committing named cursors where it can).
        Idempotent. Does not raise for an unreachable backend (a failed final
        commit is swallowed: the cursor resumes at its last committed event)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def to_millisecond(moment: datetime) -> datetime:
    """``moment`` cut to the millisecond: the time a read from a time is
    compared at on backends that stamp ``appended_at`` in milliseconds
    (Kafka, Pulsar, Redis), so that an event appended in the same
    millisecond as ``moment`` counts as at or after it (``opened =
    datetime.now(UTC)``, then an append, then ``read(stream, opened)``
    missed that event there)."""
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def position_number(start: str) -> int:
    """A numbered log position (``memory://``, ``sqlite://``, ``nats://``)
    from its text: decimal digits only. ``"-1"`` read from the earliest
    event and ``" 5"`` or ``"+5"`` were taken as numbers.

    Raises: ValueError (not a position of this log; also a number past
    the signed 64-bit range, which no backend's positions reach and which
    their clients could not send)."""
    if not (start.isascii() and start.isdigit()) or len(start) > 19 or int(start) > _MAX_POSITION:
        raise ValueError(f"not a position of this log: {start!r}")
    return int(start)


_MAX_POSITION = 2**63 - 1


def check_start(start: Start) -> Start:
    if isinstance(start, datetime):
        return start if start.tzinfo else start.replace(tzinfo=utcnow().tzinfo)
    if not isinstance(start, str) or not start:
        raise ValueError(
            f"start must be a position, a datetime, 'earliest' or 'latest', not {start!r}"
        )
    return start


def make_event(
    subject: str, data: Any, headers: dict[str, str] | None, reply_to: str | None = None
) -> Event:
    return Event(subject=subject, data=data, headers=check_headers(headers), reply_to=reply_to)
