"""Delivery and capability registries, built once on :class:`KeyedLog`.

Delivery records move ``pending`` → ``completed`` (carrying the response) →
``taken`` (a small tombstone marker written once the caller has the
response). A reader applies a record only if its state ranks at least as high
as the one it holds, so a late or duplicate completion can never resurrect a
taken entry, whatever order replicas see the writes in. Records are deleted
for real (a log tombstone) only after they expire.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncGenerator, Callable, Generator
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from pydantic import Field
from pydantic_core import from_json

from transport._spi.codec import decode, encode
from transport._spi.keyed import CAUGHT_UP, KeyedChange, KeyedLog
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

_RANK = {"pending": 0, "completed": 1, "taken": 2}
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


class _LogView:
    """Runs ``log.watch()`` in a background task, feeding ``apply``.

    Re-watches from the start after a transient error: replays are harmless
    because the appliers are idempotent.

    ``ready_timeout`` bounds the wait for the first load while the backend
    is failing: past it, the next transient failure (or the one already
    seen) is raised to the caller, and the view goes on retrying in the
    background. A load that makes progress without failing is waited for.
    """

    def __init__(
        self,
        log_: KeyedLog,
        apply: Callable[[str, bytes | None], None],
        what: str,
        *,
        ready_timeout: float | None = None,
    ):
        self._log = log_
        self._apply = apply
        self._what = what
        self._ready_timeout = ready_timeout
        self._task: asyncio.Task[None] | None = None
        self._caught_up = asyncio.Event()
        self._failing = asyncio.Event()
        self._failure: TransientTransportError | None = None
        self._closed = False

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

    async def _run(self) -> None:
        backoff = 0.05
        # ``_closed`` is checked, not only cancellation relied on: a client
        # library that turns a cancellation into an error of its own (a
        # timeout racing the cancel) must not leave this loop re-watching a
        # closed log forever, and a loop that outlives its event loop's
        # shutdown would hang it.
        while not self._closed:
            try:
                async for item in self._log.watch():
                    if self._closed:
                        return
                    if item is CAUGHT_UP:
                        self._caught_up.set()
                    elif isinstance(item, KeyedChange):
                        self._apply(item.key, item.value)
                    backoff = 0.05
                    self._failing.clear()
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
                log.warning("%s: watch interrupted (%s); re-watching", self._what, exc)
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
        ends on its own, its result ignored)."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
            done, _ = await asyncio.wait({self._task}, timeout=_CLOSE_WAIT)
            if not done:
                log.warning("%s: the watch did not stop within %gs", self._what, _CLOSE_WAIT)
                self._task.add_done_callback(_ignore_result)
            else:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    self._task.result()


_CLOSE_WAIT = 5.0


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
        expired or was taken by another caller; ClosedResourceError.
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
        # Pending and completed records; collected ("taken") ones are kept
        # apart, as one int each (expiry and creation second): a caller
        # collecting 100 requests/s holds a week of them, and they are only
        # needed to refuse a late completion and to expire them.
        self._records: dict[str, DeliveryRecord] = {}
        self._taken: dict[str, int] = {}
        self._waiters: dict[str, asyncio.Future[None]] = {}
        self._view = _LogView(
            log_, self._apply_raw, f"delivery registry {name!r}", ready_timeout=ready_timeout
        )
        self._janitor_interval = janitor_interval or min(max(ttl_seconds / 4, 1.0), 60.0)
        self._janitor: asyncio.Task[None] | None = None
        self._closed = False

    # -- view maintenance -------------------------------------------------
    def _apply_raw(self, key: str, value: bytes | None) -> None:
        if value is None:
            self._records.pop(key, None)
            self._taken.pop(key, None)
            return
        if self._apply_taken_raw(value):
            return
        try:
            record = decode(DeliveryRecord, value)
        except UndecodableMessageError as exc:
            log.warning("delivery registry %r: skipping bad record %r: %s", self.name, key, exc)
            return
        self._apply(record)

    def _apply_taken_raw(self, value: bytes) -> bool:
        """The replay's fast path: most records of a busy caller's registry
        are taken markers; read them without building a model. False for
        anything else (decoded the normal way, errors included)."""
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
        self._records.pop(request_id, None)
        self._taken[request_id] = (expires << 34) | (created & _CREATED_MASK)
        waiter = self._waiters.get(request_id)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

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

    def _apply(self, record: DeliveryRecord) -> None:
        if record.request_id in self._taken:
            return  # taken is final: a late completion never resurrects it
        if record.state == "taken":
            self._mark_taken(
                record.request_id,
                math.floor(record.created_at.timestamp()),
                math.ceil(record.expires_at.timestamp()),
            )
            return
        current = self._records.get(record.request_id)
        if current is not None and _RANK[record.state] <= _RANK[current.state]:
            return  # stale, duplicate or late: never move backwards
        self._records[record.request_id] = record
        if record.state != "pending":
            waiter = self._waiters.get(record.request_id)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def _completed(self, request_id: str) -> bool:
        record = self._records.get(request_id)
        return record is not None and record.state == "completed"

    async def _ready(self) -> None:
        if self._closed:
            raise ClosedResourceError(f"delivery registry {self.name!r} is closed")
        await self._view.ready()
        if self._janitor is None:
            self._janitor = asyncio.create_task(self._run_janitor())

    async def _run_janitor(self) -> None:
        while True:
            await asyncio.sleep(self._janitor_interval)
            now = utcnow()
            cutoff = int(now.timestamp())
            expired = [rid for rid, r in self._records.items() if r.expires_at <= now]
            expired += [rid for rid, packed in self._taken.items() if packed >> 34 <= cutoff]
            for request_id in expired:
                try:
                    await self._log.delete(request_id)
                except TransientTransportError as exc:
                    log.warning("delivery registry %r: expiry failed: %s", self.name, exc)
                    break
                self._records.pop(request_id, None)
                self._taken.pop(request_id, None)

    async def _put(self, record: DeliveryRecord) -> None:
        await self._log.put(record.request_id, encode(record, self._limit))
        self._apply(record)

    # -- public API -------------------------------------------------------
    async def register(
        self, request_id: str, *, ttl: float | timedelta | None = None
    ) -> PendingDelivery:
        """Record that a response to ``request_id`` is awaited. Call before
        sending the request.

        Guarantees: durable on return; registering an id again returns a
        handle on the existing record.
        Raises: InvalidNameError, TransientTransportError, ClosedResourceError.
        """
        validate_request_id(request_id)
        await self._ready()
        if request_id not in self._records and request_id not in self._taken:
            ttl_s = ttl.total_seconds() if isinstance(ttl, timedelta) else (ttl or self._ttl)
            now = utcnow()
            await self._put(
                DeliveryRecord(
                    request_id=request_id,
                    state="pending",
                    created_at=now,
                    expires_at=now + timedelta(seconds=ttl_s),
                )
            )
        return PendingDelivery(self, request_id)

    async def complete(self, request_id: str, response: WorkResponse) -> bool:
        """Record the response to ``request_id``; callable from any process.

        Guarantees: durable on return. Returns ``False`` (and changes nothing)
        if the request was already completed or its response already taken:
        duplicate and late completions are harmless.
        Raises: ValueError if ``response.request_id`` differs; PayloadTooLargeError;
        TransientTransportError.
        """
        validate_request_id(request_id)
        if response.request_id != request_id:
            raise ValueError(f"response is for {response.request_id!r}, not {request_id!r}")
        if self._closed:
            raise ClosedResourceError(f"delivery registry {self.name!r} is closed")
        if request_id in self._taken:
            return False
        current = self._records.get(request_id)
        if current is None:
            raw = await self._log.get(request_id)
            if raw is not None:
                with contextlib.suppress(UndecodableMessageError):
                    current = decode(DeliveryRecord, raw)
        if current is not None and current.state != "pending":
            return False
        now = utcnow()
        expires = current.expires_at if current else now + timedelta(seconds=self._ttl)
        await self._put(
            DeliveryRecord(
                request_id=request_id,
                state="completed",
                response=response,
                created_at=current.created_at if current else now,
                expires_at=expires,
            )
        )
        return True

    async def record(self, request_id: str) -> DeliveryRecord | None:
        """The committed record for ``request_id`` (``None`` if absent or
        expired), read from the backend without loading the whole registry —
        what the runtime uses to detect a request that was already answered.

        Raises: InvalidNameError, TransientTransportError.
        """
        validate_request_id(request_id)
        taken = self._taken_record(request_id)
        if taken is not None:
            return taken
        current = self._records.get(request_id)
        if current is not None and current.state != "pending":
            return current
        raw = await self._log.get(request_id)
        if raw is None:
            return current
        try:
            return decode(DeliveryRecord, raw)
        except UndecodableMessageError:
            return current

    async def pending(self) -> list[PendingDelivery]:
        """Handles on every request of this registry still awaiting collection
        (pending or completed, not yet taken), oldest first. Use after a
        restart to re-attach.

        Raises: TransientTransportError, ClosedResourceError.
        """
        await self._ready()
        live = [r for r in self._records.values() if r.state != "taken"]
        live.sort(key=lambda r: r.created_at)
        return [PendingDelivery(self, r.request_id) for r in live]

    async def wait(self, request_id: str) -> PendingDelivery:
        """Re-attach to one request registered earlier (possibly by a previous
        run of this process).

        Raises: UnknownDeliveryError if no live record exists.
        """
        validate_request_id(request_id)
        await self._ready()
        record = self._records.get(request_id)
        if record is None or request_id in self._taken:
            raise UnknownDeliveryError(request_id)
        return PendingDelivery(self, request_id)

    async def records(self) -> list[DeliveryRecord]:
        """Every record currently held, oldest first (for operators and the
        CLI): pending, completed and taken ones not yet removed by expiry.

        Raises: ClosedResourceError; PermanentTransportError if the registry
        cannot be read at all. A transient outage before the first load makes
        the call wait (it retries) rather than raise.
        """
        await self._ready()
        taken = [self._taken_record(rid) for rid in list(self._taken)]
        every = [*self._records.values(), *(r for r in taken if r is not None)]
        return sorted(every, key=lambda r: r.created_at)

    async def _take(
        self, request_id: str, timeout: float | None, *, missing_ok: bool = False
    ) -> WorkResponse:
        await self._ready()
        if request_id in self._taken:
            raise UnknownDeliveryError(request_id)
        record = self._records.get(request_id)
        if record is None and not missing_ok:
            raise UnknownDeliveryError(request_id)
        if record is None or record.state == "pending":
            waiter = self._waiters.get(request_id)
            if waiter is None or waiter.done():
                waiter = asyncio.get_running_loop().create_future()
                self._waiters[request_id] = waiter
            try:
                async with asyncio.timeout(timeout):
                    await asyncio.shield(waiter)
            except TimeoutError:
                raise DeliveryTimeoutError(request_id, timeout or 0.0) from None
            record = self._records.get(request_id)
            if request_id in self._taken or record is None or record.response is None:
                raise UnknownDeliveryError(request_id)
        self._waiters.pop(request_id, None)
        response = record.response
        assert response is not None
        now = utcnow()
        await self._put(
            DeliveryRecord(
                request_id=request_id,
                state="taken",
                created_at=record.created_at,
                expires_at=now + timedelta(seconds=self._ttl),
            )
        )
        return response

    async def aclose(self) -> None:
        """Stop watching. Records stay in the backend. Idempotent.

        Callers still waiting in :meth:`PendingDelivery.result` get
        ClosedResourceError. Does not raise for an unreachable backend.
        """
        if self._closed:
            return
        self._closed = True
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
            log_, self._apply_raw, "capability registry", ready_timeout=ready_timeout
        )
        self._janitor: asyncio.Task[None] | None = None
        self._closed = False

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
        for queue in self._watchers:
            queue.put_nowait((key, capability))

    async def _ready(self) -> None:
        if self._closed:
            raise ClosedResourceError("capability registry is closed")
        await self._view.ready()
        if self._janitor is None:
            self._janitor = asyncio.create_task(self._run_janitor())

    async def _run_janitor(self) -> None:
        # Long-dead providers are removed from the log so it does not grow
        # without bound; a grace of one lease avoids racing a late refresh.
        while True:
            await asyncio.sleep(max(self._lease, 1.0))
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

        If this registry object had not loaded its state yet, advertisements
        that already existed are reported as ``advertised`` first.

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
        known = {k: c for k, c in self._entries.items() if not c.expired()}
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
