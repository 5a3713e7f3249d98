"""Delivery and capability registries, built once on :class:`KeyedLog`.

A delivery registry holds a request's registration (``pending``, key
``p.<id>``) and its response (``completed``, key ``c.<id>``, carrying the
registration's ``created_at``). A completion counts only beside the
registration it was written for, whatever order a reader sees the two in, so
collecting a response deletes both and a late or duplicate completion written
afterwards can never resurrect it: nothing of a collected response stays in
the registry. Live records that nobody collects are deleted once they expire.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import math
import time
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Generator
from datetime import UTC, datetime, timedelta
from typing import Any, Literal, ParamSpec

from pydantic import Field
from pydantic_core import from_json

from transport._spi.codec import decode, encode
from transport._spi.keyed import (
    CAUGHT_UP,
    KeyedChange,
    KeyedLog,
    encode_checkpoint,
    read_checkpoint,
)
from transport._spi.models import (
    REQUEST_ID_SCHEMA,
    WIRE_SCHEMA_VERSION,
    Capability,
    CapabilityChange,
    WorkResponse,
    _WireModel,
    utcnow,
)
from transport._spi.naming import validate_name, validate_request_id
from transport._spi.outage import OutageLog
from transport.errors import (
    ClosedResourceError,
    DeliveryTimeoutError,
    TransientTransportError,
    TransportError,
    UndecodableMessageError,
    UnknownDeliveryError,
)

__all__ = [
    "CapabilityRegistry",
    "DeliveryRecord",
    "DeliveryRegistry",
    "PendingDelivery",
]

log = logging.getLogger("transport.registry")

_CREATED_MASK = (1 << 34) - 1  # seconds since the epoch, good until the year 2514


def _seconds(value: object, *, up: bool) -> int:
    """Whole seconds since the epoch of an ISO-8601 time as the encoder
    writes it (a naive one is UTC, as the models read it), rounded up or
    down.

    Raises: ValueError, TypeError.
    """
    if not isinstance(value, str):
        raise TypeError("not a time")
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return math.ceil(moment.timestamp()) if up else math.floor(moment.timestamp())


class DeliveryRecord(_WireModel):
    """One entry of a delivery registry's keyed log."""

    request_id: str = Field(json_schema_extra=REQUEST_ID_SCHEMA)
    state: Literal["pending", "completed", "taken"]
    response: WorkResponse | None = None
    created_at: datetime = Field(default_factory=utcnow)
    expires_at: datetime


def _decoded(raw: bytes | None) -> DeliveryRecord | None:
    """A delivery record read from a keyed log; ``None`` for none or one
    that does not decode."""
    if raw is None:
        return None
    try:
        return decode(DeliveryRecord, raw)
    except UndecodableMessageError:
        return None


_P = ParamSpec("_P")


def _weakly(method: Callable[_P, None]) -> Callable[_P, None]:
    """``method`` (a registry's applier, or its hook for the end of the
    first load) called through a weak reference: the view's task must not
    keep a registry the program dropped alive."""
    ref = weakref.WeakMethod(method)

    def call(*args: _P.args, **kwargs: _P.kwargs) -> None:
        bound = ref()
        if bound is not None:
            bound(*args, **kwargs)

    return call


async def _janitor(ref: weakref.ref[Any], interval: float) -> None:
    """A registry's expiry rounds, every ``interval`` s, as long as the
    registry is alive (held weakly between rounds, for the same reason)."""
    while True:
        await asyncio.sleep(interval)
        registry = ref()
        if registry is None:
            return
        await registry._expire()
        del registry


#: Closes of registries a program dropped without ``aclose()`` (kept until done).
_closing_dropped: set[asyncio.Task[None]] = set()


async def finish_closing_dropped(timeout: float) -> None:
    """Wait (up to ``timeout`` s) for the closes of dropped registries that
    run on this loop: a transport closing its client waits for them first,
    so that they do not close their logs against a closed client."""
    loop = asyncio.get_running_loop()
    pending = [t for t in _closing_dropped if t.get_loop() is loop and not t.done()]
    if pending:
        await asyncio.wait(pending, timeout=timeout)


def _close_when_dropped(
    registry: object, view: _LogView, log_: KeyedLog, tasks: list[asyncio.Task[None]]
) -> weakref.finalize[Any, Any]:
    """When ``registry`` is garbage-collected unclosed, stop its view and
    close its log on the running event loop (its view followed the backend
    until the transport closed: a task and a backend reader per
    ``transport.capability_registry()`` call), and cancel ``tasks`` (its
    janitor, added when it starts). Detach it in ``aclose``."""
    finalizer = weakref.finalize(registry, _close_dropped, view, log_, tasks)
    finalizer.atexit = False
    return finalizer


def _close_dropped(view: _LogView, log_: KeyedLog, tasks: list[asyncio.Task[None]]) -> None:
    # A finalizer runs wherever the registry was collected: on its loop's
    # thread, in another thread, or after the loop ended. Act on the loop
    # the registry's tasks run on (else the one running here), from its
    # own thread; with no loop running, nothing can run and nothing is done.
    started = [t for t in (*tasks, view._task) if t is not None]
    try:
        here: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        here = None
    loop = started[0].get_loop() if started else here
    if loop is None or loop.is_closed():
        return
    if loop is here:
        _start_closing(loop, view, log_, tasks)
    elif loop.is_running():
        loop.call_soon_threadsafe(_start_closing, loop, view, log_, tasks)


def _start_closing(
    loop: asyncio.AbstractEventLoop,
    view: _LogView,
    log_: KeyedLog,
    tasks: list[asyncio.Task[None]],
) -> None:
    for task in tasks:  # the janitor: it holds the registry only between rounds
        task.cancel()

    async def close() -> None:
        with contextlib.suppress(Exception):
            await view.aclose()
        with contextlib.suppress(Exception):
            await log_.aclose()

    closing = loop.create_task(close())
    _closing_dropped.add(closing)
    closing.add_done_callback(_closing_dropped.discard)


class _LogView:
    """Runs ``log.watch()`` in a background task, feeding ``apply``.

    Re-watches after a transient error: from the last position seen on a
    resumable log, else from the start (replays are harmless because the
    appliers are idempotent).

    ``ready_timeout`` bounds the wait for the first load while the backend
    is failing: past it, the next transient failure (or the one already
    seen) is raised to the caller, and the view goes on retrying in the
    background. A load that makes progress without failing is waited for.

    **Bounded replays.** On a resumable log (one that keeps its history)
    the view also holds the raw live records with their positions, in log
    order, and every :data:`_CHECKPOINT_EVERY` changes saves a checkpoint:
    the oldest live records (up to :data:`_CARRY_BYTES`) and the position
    of the next one. A new view loads the checkpoint, applies the records
    it carries and replays from that position, so a restart reads what is
    live and what changed recently, not the log's whole history. The
    checkpoint is consistent by construction: the records before the resume
    position that are still live are exactly the ones it carries.

    On a log whose deletes leave markers (:meth:`KeyedLog.forget`), the
    tombstones it sees are forgotten :data:`_FORGET_AFTER` seconds later
    (watchers that follow the log live have seen them by then).
    """

    def __init__(
        self,
        log_: KeyedLog,
        apply: Callable[[str, bytes | None], None],
        what: str,
        *,
        ready_timeout: float | None = None,
        track: Callable[[str], bool] | None = None,
        on_loaded: Callable[[], None] | None = None,
    ):
        self._log = log_
        self._apply = apply
        #: Called once, when the first replay has been applied (caught up).
        self._on_loaded = on_loaded
        self._what = what
        self._ready_timeout = ready_timeout
        #: Keys for which the position of their live value is kept
        #: (:meth:`position_of`), chosen by ``track``.
        self._track = track
        self._positions: dict[str, bytes] = {}
        self._task: asyncio.Task[None] | None = None
        self._caught_up = asyncio.Event()
        self._failing = asyncio.Event()
        self._outage = OutageLog(log, f"{what}: watch")
        self._failure: TransientTransportError | None = None
        self._closed = False
        self._resumable = bool(getattr(log_, "resumable", False))
        self._forgets = type(log_).forget is not KeyedLog.forget
        #: Resumable logs: the live records (position, value) in log order.
        self._live: dict[str, tuple[bytes, bytes]] = {}
        self._position: bytes | None = None  # of the last change seen
        self._since_checkpoint = 0
        self._saving: asyncio.Task[None] | None = None
        self._tombstones: collections.deque[tuple[float, str, bytes]] = collections.deque()
        self._forgetting: asyncio.Task[None] | None = None
        #: Changes applied from the log so far (and an event for waiting on it).
        self.changes = 0
        self._changed: asyncio.Event | None = None

    @property
    def loaded(self) -> bool:
        """The first replay has been applied."""
        return self._caught_up.is_set()

    async def ready(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"{self._what} is closed")
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"view:{self._what}")
        if self._caught_up.is_set():
            return
        task, timeout = self._task, self._ready_timeout
        caught_up = asyncio.ensure_future(self._caught_up.wait())
        failing = asyncio.ensure_future(self._failing.wait())
        try:
            await asyncio.wait(
                {caught_up, task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
            if not caught_up.done() and not task.done():
                # Out of time: give up at a failure (now, if the last attempt
                # failed); a load that is progressing is waited for.
                await asyncio.wait({caught_up, task, failing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            caught_up.cancel()
            failing.cancel()
        if self._caught_up.is_set():
            return
        if task.done():
            # The watch task ended before catching up: surface its error.
            task.result()
            raise TransientTransportError(f"{self._what}: watch ended before catching up")
        raise TransientTransportError(
            f"{self._what}: not loaded within {timeout:g} s: {self._failure}"
        ) from self._failure

    async def _changes(self) -> AsyncIterator[KeyedChange | object]:
        """The watch to follow: from the last position seen (a re-watch of a
        resumable log), from the checkpoint (a first watch of one that has
        a checkpoint), else from the start."""
        if not self._resumable:
            return self._log.watch()
        if self._position is not None:
            return self._log.watch_from(self._position)
        checkpoint = await self._log.load_checkpoint()
        resume = self._load_checkpoint(checkpoint) if checkpoint is not None else None
        if resume is None:
            return self._log.watch()
        return self._log.watch_from(resume)

    def _load_checkpoint(self, data: bytes) -> bytes | None:
        """Apply the records a checkpoint carries; its resume position, or
        ``None`` (replay from the start) for one that cannot be read."""
        try:
            resume, carried = read_checkpoint(data)
        except ValueError as exc:
            log.warning("%s: ignoring an unreadable checkpoint (%s)", self._what, exc)
            return None
        for key, position, value in carried:
            self._live[key] = (position, value)
            self._apply(key, value)
        return resume

    def _checkpoint(self) -> bytes | None:
        """A checkpoint of the live records held now (``None`` if nothing
        was seen yet): the oldest up to :data:`_CARRY_BYTES`, and the
        position of the first one not carried (or of the last change seen,
        replayed again harmlessly, if all are carried)."""
        if self._position is None:
            return None
        carried: list[tuple[str, bytes, bytes]] = []
        size = 0
        resume = self._position
        for key, (position, value) in self._live.items():
            size += len(key) + len(position) + len(value)
            if size > _CARRY_BYTES:
                resume = position
                break
            carried.append((key, position, value))
        return encode_checkpoint(resume, carried, written_at=utcnow().isoformat())

    def position_of(self, key: str) -> bytes | None:
        """The position of the live value of a tracked ``key`` as this view
        applied it (``None`` if unknown)."""
        return self._positions.get(key)

    def _seen(self, change: KeyedChange) -> None:
        """Position bookkeeping of a change applied from the log."""
        position = change.position
        if self._track is not None and self._track(change.key):
            if change.value is None or position is None:
                self._positions.pop(change.key, None)
            else:
                self._positions[change.key] = position
        if position is None:
            return
        self._position = position
        if self._resumable:
            self._live.pop(change.key, None)
            if change.value is not None:
                self._live[change.key] = (position, change.value)
            self._since_checkpoint += 1
            if (
                self._since_checkpoint >= _CHECKPOINT_EVERY
                and self._caught_up.is_set()
                and (self._saving is None or self._saving.done())
            ):
                self._since_checkpoint = 0
                data = self._checkpoint()
                if data is not None:
                    self._saving = asyncio.create_task(self._save(data))
        if self._forgets and change.value is None:
            self._tombstones.append((time.monotonic() + _FORGET_AFTER, change.key, position))
            if self._forgetting is None or self._forgetting.done():
                self._forgetting = asyncio.create_task(self._forget())

    async def settled(self, changes: int) -> None:
        """Wait until ``changes`` changes were applied from the log and the
        upkeep they started (a checkpoint, tombstone removal) is done."""
        while self.changes < changes:
            self._changed = asyncio.Event()
            await self._changed.wait()
        while True:
            busy = [t for t in (self._saving, self._forgetting) if t is not None and not t.done()]
            if not busy:
                return
            await asyncio.wait(busy)

    async def _save(self, data: bytes) -> None:
        try:
            await self._log.save_checkpoint(data)
        except TransportError as exc:
            log.warning("%s: checkpoint not saved (%s); the next one is tried", self._what, exc)

    async def _forget(self) -> None:
        """Remove the tombstones that are due, up to :data:`_FORGET_BATCH`
        at a time (a busy caller deletes two keys per collected response)."""
        while self._tombstones and not self._closed:
            wait = self._tombstones[0][0] - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            now = time.monotonic()
            batch: list[tuple[float, str, bytes]] = []
            while self._tombstones and len(batch) < _FORGET_BATCH:
                if self._tombstones[0][0] > now:
                    break
                batch.append(self._tombstones.popleft())
            results = await asyncio.gather(
                *(self._log.forget(key, position) for _, key, position in batch),
                return_exceptions=True,
            )
            failed = [item for item, r in zip(batch, results, strict=True) if r is not None]
            errors = [r for r in results if isinstance(r, BaseException)]
            if errors:
                if not all(isinstance(e, TransportError) for e in errors):
                    raise next(e for e in errors if not isinstance(e, TransportError))
                log.warning(
                    "%s: %d tombstones not removed (%s); retrying",
                    self._what,
                    len(failed),
                    errors[0],
                )
                self._tombstones.extendleft(reversed(failed))
                await asyncio.sleep(5.0)

    async def _run(self) -> None:
        backoff = 0.05
        # ``_closed`` is checked, not only cancellation relied on: a client
        # library that turns a cancellation into an error of its own (a
        # timeout racing the cancel) must not leave this loop re-watching a
        # closed log forever, and a loop that outlives its event loop's
        # shutdown would hang it.
        while not self._closed:
            try:
                async for item in await self._changes():
                    if self._closed:
                        return
                    if item is CAUGHT_UP:
                        first = not self._caught_up.is_set()
                        self._caught_up.set()
                        if first and self._on_loaded is not None:
                            self._on_loaded()
                        if (
                            first
                            and self._resumable
                            and self._since_checkpoint >= _CHECKPOINT_EVERY
                        ):
                            # A long replay: save, so the next start is short.
                            self._since_checkpoint = 0
                            data = self._checkpoint()
                            if data is not None:
                                self._saving = asyncio.create_task(self._save(data))
                    elif isinstance(item, KeyedChange):
                        self._apply(item.key, item.value)
                        self._seen(item)
                        self.changes += 1
                        if self._changed is not None:
                            self._changed.set()
                    backoff = 0.05
                    self._failing.clear()
                    self._outage.recovered()
                raise TransientTransportError("watch ended")
            except ClosedResourceError:
                if self._closed or self._caught_up.is_set():
                    return  # the log (or its transport) was closed under us
                raise
            except TransientTransportError as exc:
                if self._closed:
                    return
                self._failure = exc
                self._failing.set()
                self._outage.failed(exc, "re-watching")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
            except TransportError as exc:
                if self._closed:
                    return
                # Before the first catch-up a permanent error (auth, config)
                # is the caller's to see; once the watch has worked, the
                # backend is usable, so keep the view alive and retry.
                if not self._caught_up.is_set():
                    raise
                log.error("%s: watch failed (%s); re-watching", self._what, exc)
                await asyncio.sleep(2.0)

    async def aclose(self) -> None:
        """Stop watching: the watch task is cancelled and waited for, at most
        ``_CLOSE_WAIT`` seconds (a client library that does not give up a
        blocking read on cancellation must not hang the close; the task then
        ends on its own, its result ignored). A checkpoint being saved is
        waited for within the same bound."""
        self._closed = True
        tasks = [t for t in (self._task, self._forgetting) if t is not None]
        for task in tasks:
            task.cancel()
        if self._saving is not None and not self._saving.done():
            tasks.append(self._saving)
        if tasks:
            done, not_done = await asyncio.wait(tasks, timeout=_CLOSE_WAIT)
            if not_done:
                log.warning("%s: the watch did not stop within %gs", self._what, _CLOSE_WAIT)
                for task in not_done:
                    task.cancel()
                    task.add_done_callback(_ignore_result)
            for task in done:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    task.result()


#: Changes between two checkpoints of a resumable log's view.
_CHECKPOINT_EVERY = 2_000
#: Live records a checkpoint carries at most (bytes of keys, positions and
#: values): what is older than its resume position and still live.
_CARRY_BYTES = 256 * 1024
#: Seconds after which a seen tombstone is removed from a log that keeps them.
_FORGET_AFTER = 60.0
#: Tombstones removed concurrently.
_FORGET_BATCH = 32
_CLOSE_WAIT = 5.0


def _is_completion_key(key: str) -> bool:
    return key.startswith("c.")


def _ignore_result(task: asyncio.Task[None]) -> None:
    if not task.cancelled():
        task.exception()


class PendingDelivery:
    """A caller's handle on a response that may not have arrived yet.

    ``await pending`` waits without limit; :meth:`result` takes a timeout.
    """

    def __init__(
        self, registry: DeliveryRegistry, request_id: str, *, registration_deferred: bool = False
    ) -> None:
        self._registry = registry
        self.request_id = request_id
        self._response: WorkResponse | None = None
        #: The record is written later (by an outbox's drainer): until it
        #: appears, "no record" means "not yet", not "unknown".
        self._deferred = registration_deferred

    def __await__(self) -> Generator[Any, None, WorkResponse]:
        return self.result().__await__()

    def __repr__(self) -> str:
        return f"PendingDelivery({self.request_id!r}, done={self.done()})"

    def done(self) -> bool:
        """True once the response is available without waiting (as seen by
        this process's view of the registry). Never raises."""
        return self._response is not None or self._registry._completed(self.request_id)

    async def result(self, timeout: float | None = None) -> WorkResponse:
        """Wait for the response, then tombstone the record.

        Guarantees: the same response on every call; on timeout the record
        stays (until the registry TTL) and a later call can still collect it.
        Raises: DeliveryTimeoutError; UnknownDeliveryError if the record
        expired or was taken by another caller (also one collecting it at
        the same moment, on backends whose log claims atomically: not
        Kafka, Pulsar); ClosedResourceError.
        """
        if self._response is None:
            self._response = await self._registry._take(
                self.request_id, timeout, missing_ok=self._deferred
            )
        return self._response


class DeliveryRegistry:
    """Routes responses back to callers, across caller restarts.

    Callers ``register`` before sending a request and await the returned
    :class:`PendingDelivery`; any process ``complete``s it. State lives in the
    backend's keyed log, so a restarted caller re-attaches with
    :meth:`pending` / :meth:`wait` and receives responses that arrived while
    it was down.

    **Keys.** A request's registration is the ``pending`` record under
    ``p.<id>``, its response the ``completed`` record under ``c.<id>``
    (carrying the registration's ``created_at``). A completion counts only
    beside the registration it was written for, so collecting a response
    deletes both keys and leaves nothing behind: a late or duplicate
    completion written after that finds no registration and is ignored by
    every reader (and ``complete`` returns ``False`` for it). What a registry
    holds, replays and keeps in memory is what is live — pending and
    uncollected requests — not its history. Records written by earlier
    releases (one key per request, ``taken`` markers) are still read.
    """

    def __init__(
        self,
        name: str,
        log_: KeyedLog,
        *,
        ttl_seconds: float = 7 * 24 * 3600.0,
        max_payload_bytes: int | None = None,
        janitor_interval: float | None = None,
        ready_timeout: float | None = None,
    ) -> None:
        self.name = validate_name(name, "delivery registry name")
        self._log = log_
        self._ttl = ttl_seconds
        self._limit = max_payload_bytes
        #: Registrations (``p.<id>``, or an earlier release's record).
        self._pending: dict[str, DeliveryRecord] = {}
        #: Completions (``c.<id>``), also those without their registration
        #: (late ones, kept until they expire and the janitor deletes them).
        self._done: dict[str, DeliveryRecord] = {}
        #: Ids held under an earlier release's key (the bare request id).
        self._legacy: set[str] = set()
        #: An earlier release's ``taken`` markers (expiry and creation second
        #: packed in one int), held only to delete them once they expire.
        self._taken: dict[str, int] = {}
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._view = _LogView(
            log_,
            _weakly(self._apply_raw),
            f"delivery registry {name!r}",
            ready_timeout=ready_timeout,
            track=_is_completion_key,
        )
        self._janitor_interval = janitor_interval or min(max(ttl_seconds / 4, 1.0), 60.0)
        self._janitor: asyncio.Task[None] | None = None
        self._closed = False
        self._background: list[asyncio.Task[None]] = []
        self._dropped = _close_when_dropped(self, self._view, log_, self._background)

    # -- view maintenance -------------------------------------------------
    def _apply_raw(self, key: str, value: bytes | None) -> None:
        kind, dot, request_id = key.partition(".")
        if not dot:
            self._apply_legacy(key, value)
            return
        if kind not in ("p", "c"):
            return  # not a key of this release: left alone
        if value is None:
            (self._pending if kind == "p" else self._done).pop(request_id, None)
            self._wake(request_id)
            return
        try:
            record = decode(DeliveryRecord, value)
        except UndecodableMessageError as exc:
            log.warning("delivery registry %r: skipping bad record %r: %s", self.name, key, exc)
            return
        expected = "pending" if kind == "p" else "completed"
        if record.request_id != request_id or record.state != expected:
            log.warning("delivery registry %r: skipping misfiled record %r", self.name, key)
            return
        (self._pending if kind == "p" else self._done)[request_id] = record
        self._wake(request_id)

    def _apply_legacy(self, request_id: str, value: bytes | None) -> None:
        """A record of an earlier release, under the bare request id."""
        if value is None:
            self._taken.pop(request_id, None)
            self._drop_legacy(request_id)
            return
        if self._apply_taken_raw(value):
            return
        try:
            record = decode(DeliveryRecord, value)
        except UndecodableMessageError as exc:
            log.warning(
                "delivery registry %r: skipping bad record %r: %s", self.name, request_id, exc
            )
            return
        if record.request_id != request_id:
            return
        if record.state == "taken":
            self._mark_taken(
                request_id,
                math.floor(record.created_at.timestamp()),
                math.ceil(record.expires_at.timestamp()),
            )
            return
        if request_id in self._taken:
            return  # taken is final: a late completion never resurrects it
        current = self._pending.get(request_id)
        if current is not None and request_id in self._legacy and record.state == "pending":
            return  # never backwards from completed
        self._legacy.add(request_id)
        self._pending[request_id] = record
        if record.state == "completed":
            self._done[request_id] = record
        self._wake(request_id)

    def _drop_legacy(self, request_id: str) -> None:
        if request_id in self._legacy:
            self._legacy.discard(request_id)
            self._pending.pop(request_id, None)
            self._done.pop(request_id, None)
            self._wake(request_id)

    def _apply_taken_raw(self, value: bytes) -> bool:
        """An earlier release's ``taken`` marker, read without building a
        model. False for anything else (decoded the normal way)."""
        try:
            fields = from_json(value)
            if not isinstance(fields, dict) or fields.get("state") != "taken":
                return False
            if fields.get("schema_version", 1) != WIRE_SCHEMA_VERSION:
                return False
            request_id = validate_request_id(fields["request_id"])
            created = _seconds(fields["created_at"], up=False)
            expires = _seconds(fields["expires_at"], up=True)
        except (ValueError, TypeError, KeyError, TransportError):
            return False
        self._mark_taken(request_id, created, expires)
        return True

    def _mark_taken(self, request_id: str, created: int, expires: int) -> None:
        self._taken[request_id] = (expires << 34) | (created & _CREATED_MASK)
        self._drop_legacy(request_id)

    def _taken_record(self, request_id: str) -> DeliveryRecord | None:
        packed = self._taken.get(request_id)
        if packed is None:
            return None
        return DeliveryRecord(
            request_id=request_id,
            state="taken",
            created_at=datetime.fromtimestamp(packed & _CREATED_MASK, UTC),
            expires_at=datetime.fromtimestamp(packed >> 34, UTC),
        )

    def _wake(self, request_id: str) -> None:
        """Wake a collector waiting on ``request_id`` (it looks again)."""
        waiter = self._waiters.get(request_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @staticmethod
    def _matches(registration: DeliveryRecord, completion: DeliveryRecord | None) -> bool:
        return completion is not None and completion.created_at == registration.created_at

    def _completed(self, request_id: str) -> bool:
        registration = self._pending.get(request_id)
        return registration is not None and self._matches(registration, self._done.get(request_id))

    def _current(self, request_id: str) -> DeliveryRecord | None:
        """The live record of ``request_id`` in this view: its completion if
        it has one, else its registration."""
        registration = self._pending.get(request_id)
        if registration is None:
            return None
        completion = self._done.get(request_id)
        return completion if self._matches(registration, completion) else registration

    async def _ready(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"delivery registry {self.name!r} is closed")
        await self._view.ready()
        if self._janitor is None:
            self._janitor = asyncio.create_task(_janitor(weakref.ref(self), self._janitor_interval))
            self._background.append(self._janitor)

    def _keys(self, request_id: str) -> list[str]:
        """The log keys that hold ``request_id``'s live entry."""
        if request_id in self._legacy:
            return [request_id, f"c.{request_id}"]
        return [f"p.{request_id}", f"c.{request_id}"]

    async def _expire(self) -> None:
        """One round of the janitor: delete what expired."""
        now = utcnow()
        cutoff = int(now.timestamp())
        expired = [
            (rid, self._keys(rid)) for rid, r in self._pending.items() if r.expires_at <= now
        ]
        expired += [
            (rid, [f"c.{rid}"])
            for rid, r in self._done.items()
            if rid not in self._pending and r.expires_at <= now
        ]
        expired += [(rid, [rid]) for rid, packed in self._taken.items() if packed >> 34 <= cutoff]
        for request_id, keys in expired:
            try:
                for key in keys:
                    await self._log.delete(key)
            except TransientTransportError as exc:
                log.warning("delivery registry %r: expiry failed: %s", self.name, exc)
                break
            if request_id in self._legacy or keys == [request_id]:
                self._taken.pop(request_id, None)
                self._drop_legacy(request_id)
            if keys != [request_id]:
                self._pending.pop(request_id, None)
                self._done.pop(request_id, None)
                self._wake(request_id)

    async def _lookup(self, request_id: str) -> tuple[DeliveryRecord | None, DeliveryRecord | None]:
        """(registration, completion) of ``request_id`` as committed: read
        from the log (a view that may lag is not trusted for a decision)."""

        raw_pending, raw_done = await self._log.get_many((f"p.{request_id}", f"c.{request_id}"))
        registration, completion = _decoded(raw_pending), _decoded(raw_done)
        if registration is None:
            legacy = _decoded(await self._log.get(request_id))
            if legacy is not None and legacy.state == "pending":
                registration = legacy
            elif legacy is not None and legacy.state == "completed":
                registration = completion = legacy
        if registration is not None and registration.state != "pending" and completion is None:
            registration = None
        return registration, completion

    # -- public API -------------------------------------------------------
    async def register(
        self, request_id: str, *, ttl: float | timedelta | None = None
    ) -> PendingDelivery:
        """Record that a response to ``request_id`` is awaited. Call before
        sending the request.

        Guarantees: durable on return; registering an id that is live again
        returns a handle on the existing record (an id whose response was
        collected is registered anew).
        Raises: InvalidNameError, TransientTransportError, ClosedResourceError.
        """
        validate_request_id(request_id)
        await self._ready()
        if request_id not in self._pending:
            ttl_s = ttl.total_seconds() if isinstance(ttl, timedelta) else (ttl or self._ttl)
            now = utcnow()
            record = DeliveryRecord(
                request_id=request_id,
                state="pending",
                created_at=now,
                expires_at=now + timedelta(seconds=ttl_s),
            )
            await self._log.put(f"p.{request_id}", encode(record, self._limit))
            self._pending.setdefault(request_id, record)
        return PendingDelivery(self, request_id)

    async def complete(self, request_id: str, response: WorkResponse) -> bool:
        """Record the response to ``request_id``; callable from any process.

        Guarantees: durable on return. Returns ``False`` (and changes nothing)
        if the request was already completed, its response already collected,
        or it was never registered (or expired): duplicate and late
        completions are harmless.
        Raises: ValueError if ``response.request_id`` differs; PayloadTooLargeError;
        TransientTransportError.
        """
        return await self._complete(request_id, response, None)

    async def _complete(
        self, request_id: str, response: WorkResponse, known: DeliveryRecord | None
    ) -> bool:
        """:meth:`complete`, given the registration read earlier (``known``,
        or ``None``): then only the completion is read again. A registration
        that went since (expired) makes the completion one no reader counts."""
        validate_request_id(request_id)
        if response.request_id != request_id:
            raise ValueError(f"response is for {response.request_id!r}, not {request_id!r}")
        if self._closed:
            raise ClosedResourceError(f"delivery registry {self.name!r} is closed")
        if request_id in self._taken:
            return False
        registration = self._pending.get(request_id)
        completion = self._done.get(request_id)
        if registration is None and known is not None and known.state == "pending":
            registration = known
            completion = _decoded(await self._log.get(f"c.{request_id}"))
        elif registration is None:
            registration, completion = await self._lookup(request_id)
        if registration is None:
            return False
        if self._matches(registration, completion):
            return False
        record = DeliveryRecord(
            request_id=request_id,
            state="completed",
            response=response,
            created_at=registration.created_at,
            expires_at=registration.expires_at,
        )
        await self._log.put(f"c.{request_id}", encode(record, self._limit))
        if request_id in self._pending:
            self._done[request_id] = record
            self._wake(request_id)
        return True

    async def _is_registered(self, request_id: str) -> bool:
        """Whether :meth:`register` would return the existing record for
        ``request_id`` (a live registration in this registry's view)."""
        await self._ready()
        return request_id in self._pending

    async def record(self, request_id: str) -> DeliveryRecord | None:
        """The committed record for ``request_id``: its ``completed`` record
        once answered, its ``pending`` one before, ``None`` if there is
        neither (never registered, expired, or its response collected), read
        from the backend without loading the whole registry — what the
        runtime uses to detect a request that was already answered.

        Raises: InvalidNameError, TransientTransportError.
        """
        validate_request_id(request_id)
        taken = self._taken_record(request_id)
        if taken is not None:
            return taken
        if self._completed(request_id):
            return self._current(request_id)
        registration, completion = await self._lookup(request_id)
        if registration is None:
            return None
        return completion if self._matches(registration, completion) else registration

    async def discard(self, request_id: str) -> bool:
        """Withdraw the registration of ``request_id`` (and a response
        recorded for it): for a request that was not sent after all. A
        response completed later finds no registration and is ignored, and
        an ``Ensemble`` acks a delivered copy without running its handler.
        Callers waiting on it get ``UnknownDeliveryError``.

        Returns whether there was a live registration.
        Raises: InvalidNameError, TransientTransportError, ClosedResourceError.
        """
        validate_request_id(request_id)
        await self._ready()
        live = request_id in self._pending
        await self._log.delete_many(self._keys(request_id))
        self._pending.pop(request_id, None)
        self._done.pop(request_id, None)
        self._legacy.discard(request_id)
        self._wake(request_id)
        return live

    async def pending(self) -> list[PendingDelivery]:
        """Handles on every request of this registry still awaiting collection
        (pending or completed, not yet taken), oldest first. Use after a
        restart to re-attach.

        Raises: TransientTransportError, ClosedResourceError.
        """
        await self._ready()
        live = sorted(self._pending.values(), key=lambda r: r.created_at)
        return [PendingDelivery(self, r.request_id) for r in live]

    async def wait(self, request_id: str) -> PendingDelivery:
        """Re-attach to one request registered earlier (possibly by a previous
        run of this process).

        Raises: UnknownDeliveryError if no live record exists.
        """
        validate_request_id(request_id)
        await self._ready()
        if request_id not in self._pending:
            raise UnknownDeliveryError(request_id)
        return PendingDelivery(self, request_id)

    async def records(self) -> list[DeliveryRecord]:
        """Every live record held, oldest first (for operators and the CLI):
        pending and completed ones (and ``taken`` markers an earlier release
        left, until they expire).

        Raises: ClosedResourceError; PermanentTransportError if the registry
        cannot be read at all. A transient outage before the first load makes
        the call wait (it retries) rather than raise.
        """
        await self._ready()
        live = [self._current(rid) for rid in list(self._pending)]
        taken = [self._taken_record(rid) for rid in list(self._taken)]
        every = [r for r in (*live, *taken) if r is not None]
        return sorted(every, key=lambda r: r.created_at)

    async def _take(
        self, request_id: str, timeout: float | None, *, missing_ok: bool = False
    ) -> WorkResponse:
        await self._ready()
        if request_id in self._taken:
            raise UnknownDeliveryError(request_id)
        if request_id not in self._pending and not missing_ok:
            raise UnknownDeliveryError(request_id)
        if not self._completed(request_id):
            # Woken at every change of this id: registered (a deferred
            # registration appearing), completed, or gone (collected by
            # another caller, expired).
            seen = request_id in self._pending
            try:
                async with asyncio.timeout(timeout):
                    while not self._completed(request_id):
                        if request_id in self._pending:
                            seen = True
                        elif seen or not missing_ok:
                            raise UnknownDeliveryError(request_id)
                        waiter = self._waiters.get(request_id)
                        if waiter is None or waiter.done():
                            waiter = asyncio.get_running_loop().create_future()
                            self._waiters[request_id] = waiter
                        await asyncio.shield(waiter)
            except TimeoutError:
                raise DeliveryTimeoutError(request_id, timeout or 0.0) from None
        self._waiters.pop(request_id, None)
        completion = self._done[request_id]
        response = completion.response
        assert response is not None
        # Collect: delete the registration and the completion. A completion
        # written after this finds no registration: it is ignored.
        if request_id in self._legacy:
            await self._log.delete_many(self._keys(request_id))
        elif not await self._log.claim(
            f"c.{request_id}",
            also=(f"p.{request_id}",),
            position=self._view.position_of(f"c.{request_id}"),
        ):
            # Collected by another caller at the same time (two processes
            # attached to one registry): where the log claims atomically,
            # one of them gets the response (not on Kafka, Pulsar).
            raise UnknownDeliveryError(request_id)
        self._pending.pop(request_id, None)
        self._done.pop(request_id, None)
        self._legacy.discard(request_id)
        return response

    async def aclose(self) -> None:
        """Stop watching. Records stay in the backend. Idempotent.

        Callers still waiting in :meth:`PendingDelivery.result` get
        ClosedResourceError. Does not raise for an unreachable backend.
        """
        if self._closed:
            return
        self._closed = True
        self._dropped.detach()
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor
        await self._view.aclose()
        for waiter in self._waiters.values():
            if not waiter.done():
                waiter.set_exception(ClosedResourceError(f"delivery registry {self.name!r} closed"))
                waiter.exception()  # mark retrieved
        await self._log.aclose()

    async def __aenter__(self) -> DeliveryRegistry:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


class CapabilityRegistry:
    """Shared tasks and tools, discoverable across restarts.

    Eventually consistent: every process materialises the backend's keyed log.
    Each advertisement carries a lease (``expires_at``); a provider that stops
    refreshing disappears from lookups once it expires.
    """

    def __init__(
        self, log_: KeyedLog, *, lease_seconds: float = 30.0, ready_timeout: float | None = None
    ) -> None:
        self._log = log_
        self._lease = lease_seconds
        self._entries: dict[str, Capability] = {}
        self._watchers: set[asyncio.Queue[tuple[str, Capability | None]]] = set()
        self._view = _LogView(
            log_,
            _weakly(self._apply_raw),
            "capability registry",
            ready_timeout=ready_timeout,
            on_loaded=_weakly(self._loaded),
        )
        self._janitor: asyncio.Task[None] | None = None
        self._closed = False
        self._background: list[asyncio.Task[None]] = []
        self._dropped = _close_when_dropped(self, self._view, log_, self._background)

    def _apply_raw(self, key: str, value: bytes | None) -> None:
        if value is None:
            self._set(key, None)
            return
        try:
            capability = decode(Capability, value)
        except UndecodableMessageError as exc:
            log.warning("capability registry: skipping bad record %r: %s", key, exc)
            return
        self._set(key, capability)

    def _set(self, key: str, capability: Capability | None) -> None:
        if capability is None:
            if self._entries.pop(key, None) is None:
                return
        else:
            self._entries[key] = capability
        if not self._view.loaded:
            # The first load replays the log -- on Kafka and Pulsar its
            # history, earlier runs' advertisements and withdrawals
            # included. Watchers get the state it ends in (_loaded), not
            # those old changes: a new replica took an earlier run's
            # withdrawal for one made while it ran.
            return
        for queue in self._watchers:
            queue.put_nowait((key, capability))

    def _loaded(self) -> None:
        """The first load is applied: the live advertisements it found are
        reported to the watchers registered before it ended."""
        if not self._watchers:
            return
        now = utcnow()
        for key, capability in self._entries.items():
            if not capability.expired(now):
                for queue in self._watchers:
                    queue.put_nowait((key, capability))

    async def _ready(self) -> None:
        if self._closed:
            raise ClosedResourceError("capability registry is closed")
        await self._view.ready()
        if self._janitor is None:
            self._janitor = asyncio.create_task(_janitor(weakref.ref(self), max(self._lease, 1.0)))
            self._background.append(self._janitor)

    async def _expire(self) -> None:
        # Long-dead providers are removed from the log so it does not grow
        # without bound; a grace of one lease avoids racing a late refresh.
        cutoff = utcnow() - timedelta(seconds=self._lease)
        for key, cap in list(self._entries.items()):
            if cap.expires_at is not None and cap.expires_at <= cutoff:
                try:
                    await self._log.delete(key)
                except TransientTransportError as exc:
                    log.warning("capability registry: expiry failed: %s", exc)
                    break

    async def advertise(
        self, capability: Capability, *, lease: float | timedelta | None = None
    ) -> Capability:
        """Publish or refresh ``capability``; returns it with ``expires_at``.

        Call again before the lease runs out to stay discoverable.
        Guarantees: durable on return; visible to other processes eventually.
        Raises: TransientTransportError, ClosedResourceError.
        """
        lease_s = lease.total_seconds() if isinstance(lease, timedelta) else (lease or self._lease)
        # Load the view first: the lease starts when the write is made, not
        # before a (possibly slow) first catch-up.
        await self._ready()
        stamped = capability.model_copy(
            update={"expires_at": utcnow() + timedelta(seconds=lease_s)}
        )
        await self._log.put(stamped.key, encode(stamped))
        self._set(stamped.key, stamped)
        return stamped

    async def withdraw(self, ensemble: str, name: str) -> None:
        """Remove an advertisement. Withdrawing an unknown one is not an error.

        Raises: InvalidNameError, TransientTransportError.
        """
        key = f"{validate_name(ensemble, 'ensemble name')}.{validate_name(name, 'capability name')}"
        await self._ready()
        await self._log.delete(key)
        self._set(key, None)

    async def lookup(self, name: str) -> list[Capability]:
        """Live (unexpired) providers of capability ``name``, by ensemble name.

        Raises: InvalidNameError, TransientTransportError.
        """
        validate_name(name, "capability name")
        return [c for c in await self.all() if c.name == name]

    async def all(self) -> list[Capability]:
        """Every live (unexpired) advertisement, sorted by (name, ensemble).

        Guarantees: eventually consistent; advertisements made through this
        object are included at once.
        Raises: ClosedResourceError; PermanentTransportError if the registry
        cannot be read at all (auth, configuration); TransientTransportError
        if the first load keeps failing past ``ready_timeout`` (registries
        made by a transport: its operation timeout; the load goes on
        retrying in the background).
        """
        await self._ready()
        now = utcnow()
        live = [c for c in self._entries.values() if not c.expired(now)]
        return sorted(live, key=lambda c: (c.name, c.ensemble))

    def watch(self) -> AsyncGenerator[CapabilityChange, None]:
        """Changes from this call on: advertised (new or refreshed), withdrawn,
        expired, as an async iterator; close it (``aclose``) when done.

        If this registry object had not loaded its state yet, the live
        advertisements its load finds are reported as ``advertised`` first;
        the changes the load replays (on Kafka and Pulsar the log's history:
        earlier runs' advertisements and withdrawals) are not reported.

        Guarantees: no change made after this call is missed (the watcher is
        registered before it returns); an expiry is reported when the lease
        runs out even if nobody writes.
        Raises: ClosedResourceError (at the call); while iterating, as
        :meth:`all`.
        """
        if self._closed:
            raise ClosedResourceError("capability registry is closed")
        queue: asyncio.Queue[tuple[str, Capability | None]] = asyncio.Queue()
        self._watchers.add(queue)  # registered now: nothing after this call is missed
        # Before the load has ended the entries are a partial replay: the
        # watcher learns the state the load ends in instead (_loaded).
        known = (
            {k: c for k, c in self._entries.items() if not c.expired()} if self._view.loaded else {}
        )
        return self._watch(queue, known)

    async def _watch(
        self, queue: asyncio.Queue[tuple[str, Capability | None]], known: dict[str, Capability]
    ) -> AsyncGenerator[CapabilityChange, None]:
        try:
            await self._ready()
            while True:
                expiries = [c.expires_at for c in known.values() if c.expires_at is not None]
                wait = None
                if expiries:
                    wait = max((min(expiries) - utcnow()).total_seconds(), 0.0)
                try:
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for
                    # drops a cancellation that arrives together with an
                    # item, and this loop would then never end.
                    async with asyncio.timeout(wait):
                        key, cap = await queue.get()
                except TimeoutError:
                    now = utcnow()
                    for k, c in list(known.items()):
                        if c.expired(now):
                            del known[k]
                            yield CapabilityChange(
                                kind="expired", ensemble=c.ensemble, name=c.name, capability=c
                            )
                    continue
                if cap is None:
                    gone = known.pop(key, None)
                    if gone is not None:
                        yield CapabilityChange(
                            kind="withdrawn", ensemble=gone.ensemble, name=gone.name
                        )
                else:
                    # Reported even if its lease ran out while this watcher was
                    # catching up: "expired" follows at once.
                    known[key] = cap
                    yield CapabilityChange(
                        kind="advertised", ensemble=cap.ensemble, name=cap.name, capability=cap
                    )
        finally:
            self._watchers.discard(queue)

    async def aclose(self) -> None:
        """Stop watching; advertisements stay until they expire. Idempotent.
        Does not raise for an unreachable backend."""
        if self._closed:
            return
        self._closed = True
        self._dropped.detach()
        if self._janitor is not None:
            self._janitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._janitor
        await self._view.aclose()
        await self._log.aclose()

    async def __aenter__(self) -> CapabilityRegistry:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
