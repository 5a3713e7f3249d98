"""The asyncio bridge over pulsar-client's C++ core — the only module that
touches client threads.

Every client operation is started with its ``*_async`` variant; the callback
runs on a C++ I/O thread and hands the outcome to the event loop through
a per-loop inbox (one ``call_soon_threadsafe`` per burst of callbacks; a
callback the client runs inside the call, as it does for an ack or for a
receive served from the prefetch queue, completes at once). The few
calls that may block (building and shutting down the client) run on one
dedicated thread.
Every wait has a timeout, flush and close included.

Receiving is a pump, not a per-call future: a message handed over by the
client goes to the first waiting caller or, if none waits any more, to a
local buffer, so a cancelled ``poll`` can never drop a message the client
already gave us.

:class:`PulsarContext` is what the transport hands every queue, log and the
doctor it creates: they never see the transport itself.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import ctypes
import functools
import glob
import itertools
import logging
import os
import random
import re
import ssl
import threading
import time
import weakref
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any, TypeAlias, TypeVar

import _pulsar
import pulsar
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_delay,
    wait_exponential,
)

from transport import TransportConfig
from transport.errors import ClosedResourceError, PermanentTransportError, TransientTransportError
from transport.kit import AtExit, ClientLog, hand_to_waiter, retrieve, wait_within
from transport_pulsar._config import PulsarSettings
from transport_pulsar._errors import PulsarResultError, is_transient, map_pulsar_errors
from transport_pulsar._wire import subscription_backlog

__all__ = [
    "AsyncConsumer",
    "AsyncProducer",
    "AsyncPulsarClient",
    "AsyncReader",
    "PulsarContext",
]

T = TypeVar("T")

log = logging.getLogger("transport.pulsar")
#: The ``transport.pulsar.client`` logger: capped at INFO, repeats collapsed.
_client_log = ClientLog("pulsar")
_OK = _pulsar.Result.Ok
#: Pause between attempts of an ack the client refused while reconnecting.
_ACK_RETRY_SECONDS = 0.1
#: Message ids acked across a reconnect, remembered to drop redispatched copies.
_REACKED_KEPT = 4096
#: Reads served from a reader's prefetch queue before the event loop gets a turn.
_READS_PER_TURN = 64

# pulsar-client ships no type information: its objects are opaque here.
Message: TypeAlias = Any
MessageId: TypeAlias = Any


class _LoopInbox:
    """Hands client-thread callbacks to one event loop.

    A callback the client runs on the loop's own thread (an operation that
    completes or fails inside the call) runs at once.
    Callbacks from the client's I/O threads are queued, and one
    ``call_soon_threadsafe`` drains whatever arrived meanwhile: a burst of
    send receipts wakes the loop once, not once per receipt.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._thread = threading.get_ident()  # created on the loop's thread
        self._items: collections.deque[tuple[Callable[..., None], tuple[Any, ...]]] = (
            collections.deque()
        )
        self._lock = threading.Lock()
        self._armed = False

    def post(self, fn: Callable[..., None], *args: Any) -> None:
        if threading.get_ident() == self._thread:
            fn(*args)
            return
        with self._lock:
            self._items.append((fn, args))
            if self._armed:
                return
            self._armed = True
        try:
            self._loop.call_soon_threadsafe(self._drain)
        except RuntimeError:  # loop already closed: nobody waits
            with self._lock:
                self._armed = False

    def _drain(self) -> None:
        with self._lock:
            self._armed = False
            items, self._items = self._items, collections.deque()
        for fn, args in items:
            try:
                fn(*args)
            except Exception:  # pragma: no cover - the settle helpers do not raise
                log.exception("pulsar callback failed")


_inboxes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _LoopInbox] = (
    weakref.WeakKeyDictionary()
)


def _inbox(loop: asyncio.AbstractEventLoop) -> _LoopInbox:
    """The inbox of ``loop`` (call on the loop's thread)."""
    inbox = _inboxes.get(loop)
    if inbox is None:
        inbox = _inboxes[loop] = _LoopInbox(loop)
    return inbox


class _AckSettings:
    """The two ack settings the Python binding of pulsar-client does not
    expose (``ConsumerConfiguration`` keeps them in C++): the ack-grouping
    time and ack receipts. Set through the exported C++ setters of the
    wheel's own ``libpulsar``, on the configuration object the binding
    wraps (pybind11 keeps a plain object's C++ pointer right after the
    Python object header). Before anything is set, that pointer is proven:
    the C++ getters must read back the redelivery delay just set from
    Python and the documented grouping default. Anything unexpected (another
    build, a renamed symbol) leaves the configuration untouched and
    :meth:`configure` returns ``False``."""

    _GET_NACK = "_ZNK6pulsar21ConsumerConfiguration31getNegativeAckRedeliveryDelayMsEv"
    _GET_GROUPING = "_ZNK6pulsar21ConsumerConfiguration20getAckGroupingTimeMsEv"
    _SET_GROUPING = "_ZN6pulsar21ConsumerConfiguration20setAckGroupingTimeMsEl"
    _GET_RECEIPT = "_ZNK6pulsar21ConsumerConfiguration19isAckReceiptEnabledEv"
    _SET_RECEIPT = "_ZN6pulsar21ConsumerConfiguration20setAckReceiptEnabledEb"
    _DEFAULT_GROUPING_MS = 100

    def __init__(self, lib: ctypes.CDLL) -> None:
        ptr = ctypes.c_void_p
        self.get_nack = getattr(lib, self._GET_NACK)
        self.get_nack.argtypes, self.get_nack.restype = [ptr], ctypes.c_long
        self.get_grouping = getattr(lib, self._GET_GROUPING)
        self.get_grouping.argtypes, self.get_grouping.restype = [ptr], ctypes.c_long
        self.set_grouping = getattr(lib, self._SET_GROUPING)
        self.set_grouping.argtypes, self.set_grouping.restype = [ptr, ctypes.c_long], ptr
        self.get_receipt = getattr(lib, self._GET_RECEIPT)
        self.get_receipt.argtypes, self.get_receipt.restype = [ptr], ctypes.c_bool
        self.set_receipt = getattr(lib, self._SET_RECEIPT)
        self.set_receipt.argtypes, self.set_receipt.restype = [ptr, ctypes.c_bool], ptr

    @staticmethod
    @functools.cache
    def load() -> _AckSettings | None:
        libs = os.path.join(os.path.dirname(os.path.dirname(pulsar.__file__)), "pulsar_client.libs")
        found = sorted(glob.glob(os.path.join(libs, "libpulsar-*.so*")))
        try:
            if len(found) == 1:
                return _AckSettings(ctypes.CDLL(found[0]))
            problem = f"{len(found)} libpulsar files in {libs}"
        except (OSError, AttributeError) as exc:
            problem = str(exc)
        log.warning(
            "acks cannot be sent at once with this pulsar-client build (%s): "
            "ack() waits ack_flush_wait_ms for the client's ack flush instead",
            problem,
        )
        return None

    def configure(
        self, conf: _pulsar.ConsumerConfiguration, nack_delay_ms: int, *, receipts: bool
    ) -> bool:
        """Acks sent at once (no grouping); with ``receipts`` each one is
        completed by the broker's receipt. ``conf`` must be fresh and have
        ``nack_delay_ms`` set."""
        if type(conf) is not _pulsar.ConsumerConfiguration:
            return False
        address = ctypes.c_void_p.from_address(id(conf) + object.__basicsize__).value
        if not address:
            return False
        if (
            self.get_nack(address) != nack_delay_ms
            or self.get_grouping(address) != self._DEFAULT_GROUPING_MS
        ):
            log.warning(
                "acks cannot be sent at once: this pulsar-client build's consumer "
                "configuration is laid out differently; ack() waits ack_flush_wait_ms instead"
            )
            return False
        self.set_grouping(address, 0)
        if receipts:
            self.set_receipt(address, True)
        return self.get_grouping(address) == 0 and bool(self.get_receipt(address)) == receipts


def send_acks_at_once(
    conf: _pulsar.ConsumerConfiguration, nack_delay_ms: int, *, receipts: bool = False
) -> bool:
    """Make consumers built from ``conf`` write each ack to their connection
    at once instead of grouping acks on a 100 ms tick; with ``receipts``
    each ack also completes on the broker's receipt. ``False`` (``conf``
    unchanged) where this client build does not allow it."""
    settings = _AckSettings.load()
    return settings is not None and settings.configure(conf, nack_delay_ms, receipts=receipts)


def enable_ack_receipts(conf: _pulsar.ConsumerConfiguration, nack_delay_ms: int) -> bool:
    """Make every ack of consumers built from ``conf`` be sent at once and
    complete on the broker's receipt; ``False`` (``conf`` unchanged) where
    this client build does not allow it."""
    return send_acks_at_once(conf, nack_delay_ms, receipts=True)


def _settle(future: asyncio.Future[Any], result: Any, value: Any) -> None:
    if future.done():
        return
    if result == _OK:
        future.set_result(value)
    else:
        future.set_exception(PulsarResultError(result))


def _result_callback(future: asyncio.Future[Any]) -> Callable[..., None]:
    """Callback for ``fn(..., callback(result[, value]))`` style calls."""
    post = _inbox(future.get_loop()).post

    def callback(result: Any, value: Any = None) -> None:
        post(_settle, future, result, value)

    return callback


def _settle_v2(future: asyncio.Future[Any], value: Any) -> None:
    if future.done():
        return
    if isinstance(value, _pulsar.Error):
        future.set_exception(PulsarResultError(value.error, value.message))
    else:
        future.set_result(value)


def _value_callback(future: asyncio.Future[Any]) -> Callable[[Any], None]:
    """Callback for ``*_async_v2`` calls (one argument: value or Error)."""
    post = _inbox(future.get_loop()).post

    def callback(value: Any) -> None:
        post(_settle_v2, future, value)

    return callback


def _ignore_result(result: Any) -> None:
    """Callback of a fire-and-forget client call."""


def _resolve_none(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_result(None)


def _time_out(future: asyncio.Future[Any]) -> None:
    if not future.done():
        future.set_exception(TimeoutError())


async def _wait(future: asyncio.Future[Any], timeout: float, what: str) -> Any:
    """``future``'s result, failed with a timeout after ``timeout`` seconds
    (cancelling the wait cancels ``future``, as ``wait_for`` does)."""
    with map_pulsar_errors(what):
        if future.done():
            return future.result()
        backstop = future.get_loop().call_later(timeout, _time_out, future)
        try:
            return await future
        finally:
            backstop.cancel()


class AsyncProducer:
    """A non-batching producer: every send has its own broker receipt."""

    def __init__(self, producer: _pulsar.Producer, topic: str, timeout: float) -> None:
        self._producer = producer
        self.topic = topic
        self._timeout = timeout
        self._what = f"send to {topic}"
        # The client fails a send itself after send_timeout; ours is a
        # backstop: one sweep a second over the sends in flight (in deadline
        # order), not a timer per send.
        self._backstop = timeout + 5.0
        self._inflight: dict[asyncio.Future[Any], float] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    async def send(
        self,
        data: bytes,
        *,
        key: str | None = None,
        properties: dict[str, str] | None = None,
        deliver_after: float | None = None,
        null_value: bool = False,
        event_time_ms: int | None = None,
    ) -> MessageId:
        """Publish and wait for the broker's send receipt (the message is
        durably stored once this returns). ``event_time_ms`` sets the
        message's event time; its publish time is always stamped by the
        client at send."""
        builder = _pulsar.MessageBuilder()
        builder.content(data)
        if event_time_ms is not None:
            builder.event_timestamp(event_time_ms)
        if key is not None:
            builder.partition_key(key)
        if properties:
            for name, value in properties.items():
                builder.property(name, value)
        if deliver_after:
            builder.deliver_after(timedelta(seconds=deliver_after))
        if null_value:
            builder.set_null_value()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[MessageId] = loop.create_future()
        with map_pulsar_errors(self._what):
            self._producer.send_async(builder.build(), _result_callback(future))
            if future.done():  # failed inside the call
                return future.result()
            self._inflight[future] = loop.time() + self._backstop
            if self._sweeper is None:
                self._sweeper = loop.call_later(1.0, self._sweep)
            try:
                return await future
            finally:
                del self._inflight[future]

    def send_before(
        self,
        data: bytes,
        *,
        key: str,
        deadline: float,
        properties: dict[str, str] | None = None,
        null_value: bool = False,
    ) -> None:
        """Publish from any thread without an event loop (at interpreter
        exit), waiting for the receipt until ``deadline`` (``time.monotonic``)
        at most; the outcome is not reported."""
        builder = _pulsar.MessageBuilder()
        builder.content(data)
        builder.partition_key(key)
        for name, value in (properties or {}).items():
            builder.property(name, value)
        if null_value:
            builder.set_null_value()
        done = threading.Event()
        self._producer.send_async(builder.build(), lambda *_: done.set())
        done.wait(max(deadline - time.monotonic(), 0.0))

    def _sweep(self) -> None:
        self._sweeper = None
        if not self._inflight:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        expired = []
        for future, deadline in self._inflight.items():
            if deadline > now:
                break
            expired.append(future)
        for future in expired:
            _time_out(future)
        self._sweeper = loop.call_later(1.0, self._sweep)

    async def close(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        flushed: asyncio.Future[None] = loop.create_future()
        closed: asyncio.Future[None] = loop.create_future()
        with contextlib.suppress(Exception):
            self._producer.flush_async(_result_callback(flushed))
            await _wait(flushed, timeout, f"flush {self.topic}")
        with contextlib.suppress(Exception):
            self._producer.close_async(_result_callback(closed))
            await _wait(closed, timeout, f"close producer {self.topic}")


class AsyncConsumer:
    """A subscription member with a cancellation-safe receive pump.

    At most one ``receive_async`` is outstanding, and only while someone
    waits for a message. Waiters queue up in FIFO order and each message
    goes to exactly one of them (no wake-up of every waiter per message);
    a message nobody waits for any more lands in ``_ready``, the front of
    the line for the next call. A message the client already holds
    (prefetched) completes ``receive_async`` inside the call: those are
    handed over on the spot, without a round trip through the loop.
    """

    def __init__(
        self,
        consumer: _pulsar.Consumer,
        topic: str,
        loop: asyncio.AbstractEventLoop,
        ack_flush_wait: float,
        owner: AsyncPulsarClient | None = None,
        *,
        acks_at_once: bool = False,
        ack_receipts: bool = False,
    ) -> None:
        self._consumer = consumer
        self._owner = owner  # the client this consumer has to itself, closed with it
        self._ack_flush_wait = ack_flush_wait
        #: The client writes each ack to the connection at once (no ack
        #: grouping; else: grouped on a 100 ms tick, and ack() waits
        #: ``ack_flush_wait`` past it).
        self.acks_at_once = acks_at_once or ack_receipts
        #: Acks also complete on the broker's receipt.
        self.ack_receipts = ack_receipts
        self.topic = topic
        self._loop = loop
        self._thread = threading.get_ident()  # created on the loop's thread
        self._ready: collections.deque[Message] = collections.deque()
        self._waiters: collections.deque[asyncio.Future[Message | None]] = collections.deque()
        self._receiving = False
        self._requesting = False
        self._inline: list[tuple[Any, Any]] | None = None
        self._closed = False
        self._retry: asyncio.TimerHandle | None = None
        self._on_message_cb = self._make_callback()
        # Ids of messages acked only after a reconnect: the broker may have
        # dispatched them again meanwhile; such a copy is acked again, not handed out.
        self._reacked: collections.OrderedDict[str, None] = collections.OrderedDict()
        #: Called with a message taken out of the line without being
        #: handed out (a copy of one acked already).
        self.on_drop: Callable[[Message], None] | None = None

    def connected(self) -> bool:
        """Whether the client's connection for this consumer is up (it
        reconnects by itself; a receive meanwhile just waits)."""
        try:
            return bool(self._consumer.is_connected())
        except Exception:  # a closed consumer: not connected
            return False

    def _make_callback(self) -> Callable[..., None]:
        loop = self._loop
        thread = self._thread

        def on_message(result: Any, message: Any = None) -> None:
            inline = self._inline
            if inline is not None and threading.get_ident() == thread:
                inline.append((result, message))  # completed inside receive_async
                return
            with contextlib.suppress(RuntimeError):  # loop already closed: nobody waits
                loop.call_soon_threadsafe(self._arrive, result, message)

        return on_message

    def _waiting(self) -> bool:
        waiters = self._waiters
        while waiters and waiters[0].done():
            waiters.popleft()
        return bool(waiters)

    def waiting(self) -> bool:
        """Whether a :meth:`next` call is waiting for a message."""
        return self._waiting()

    def is_stale(self, message: Message) -> bool:
        """Whether ``message`` is a copy of one acked already (dropped, not
        handed out, when it comes up)."""
        return self._stale(message)

    def _request(self) -> None:
        """Keep one receive outstanding while someone waits; serve waiters
        from messages the client already holds without leaving the call."""
        if self._requesting:
            return  # re-entered from a hand-over: the running loop continues
        self._requesting = True
        try:
            while (
                not self._receiving and not self._closed and self._retry is None and self._waiting()
            ):
                try:
                    got = self._receive_now()
                except Exception as exc:
                    log.warning("receive on %s failed to start: %s", self.topic, exc)
                    self._schedule_retry()
                    return
                if got is None:
                    return  # outstanding: the client calls back from its thread
                self._on_message(*got)
        finally:
            self._requesting = False

    def _receive_now(self) -> tuple[Any, Any] | None:
        """Start one ``receive_async``: its ``(result, message)`` if the
        client completed it inside the call (a message it held), else
        ``None`` (outstanding: the callback comes from the client's thread).
        Raises what ``receive_async`` raised, with nothing outstanding."""
        self._receiving = True
        inline: list[tuple[Any, Any]] = []
        self._inline = inline
        try:
            self._consumer.receive_async(self._on_message_cb)
        except Exception:
            self._receiving = False
            raise
        finally:
            self._inline = None
        return inline[0] if inline else None

    def _schedule_retry(self) -> None:
        def again() -> None:
            self._retry = None
            self._request()

        self._retry = self._loop.call_later(0.5, again)

    def _arrive(self, result: Any, message: Any) -> None:
        self._on_message(result, message)
        self._request()

    def _on_message(self, result: Any, message: Any) -> None:
        self._receiving = False
        if result == _OK:
            if self._closed:
                return  # closing the consumer returns it to the broker
            if self._stale(message):
                self._ack_again(message)
                return
            if not hand_to_waiter(self._waiters, message):
                self._ready.append(message)
        elif not self._closed and result != _pulsar.Result.AlreadyClosed:
            log.warning(
                "receive on %s failed: %s; retrying", self.topic, getattr(result, "name", result)
            )
            self._schedule_retry()

    async def next(self, timeout: float) -> Message | None:
        """The next message, or ``None`` after ``timeout`` seconds."""
        while self._ready:
            message = self._ready.popleft()
            if not self._stale(message):
                return message
            self._drop(message)
        if self._closed:
            return None
        loop = self._loop
        waiter: asyncio.Future[Message | None] = loop.create_future()
        self._waiters.append(waiter)
        self._request()
        if waiter.done():  # served from the prefetch queue inside the call
            return waiter.result()
        timer = loop.call_later(max(timeout, 0.0), _resolve_none, waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            # Handed a message in the same loop turn as the cancellation:
            # keep it for the next caller instead of dropping it.
            if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                self._ready.appendleft(waiter.result())
            raise
        finally:
            timer.cancel()
            if not waiter.done():
                waiter.cancel()

    async def wait_ready(self, timeout: float) -> bool:
        """Whether a message is in line within ``timeout`` seconds; it stays
        in line (the front, for the next :meth:`next`)."""
        if self._ready:
            return True
        message = await self.next(timeout)
        if message is None:
            return False
        self.push_back(message)
        return True

    def _stale(self, message: Message) -> bool:
        return bool(self._reacked) and str(message.message_id()) in self._reacked

    def _drop(self, message: Message) -> None:
        """Take a copy of a message acked already out of the line: acked
        again (see :meth:`_ack_again`) and reported to ``on_drop``."""
        self._ack_again(message)
        if self.on_drop is not None:
            self.on_drop(message)

    def _ack_again(self, message: Message) -> None:
        """Acknowledge a copy of a message acked across a reconnect once
        more instead of only dropping it: the broker dispatched it again,
        so it may not have applied that ack (one written to a connection
        that then dropped is lost), and a copy dropped unacked would stay
        with this consumer until it closes. A second ack is harmless."""
        with contextlib.suppress(Exception):
            self._consumer.acknowledge_async(message, _ignore_result)

    def ahead(self, count: int) -> list[Message]:
        """Up to ``count`` messages next in line, left there: those received
        already, then ones the client holds prefetched, moved into the line
        without a round trip (the client then asks the broker for more, as
        a ``receive`` would). Nothing is waited for."""
        ready = self._ready
        while ready and self._stale(ready[0]):
            self._drop(ready.popleft())
        while (
            len(ready) < count
            and not self._receiving
            and not self._requesting
            and not self._closed
            and self._retry is None
            and not self._waiting()
        ):
            try:
                got = self._receive_now()
            except Exception:
                break
            if got is None:
                break  # outstanding: it lands in the line when it arrives
            self._on_message(*got)  # nobody waits: into the line
        return list(itertools.islice(ready, count))

    def take_now(self, count: int) -> list[Message]:
        """Up to ``count`` messages available now, taken out of the line:
        those received already, then ones the client holds prefetched (as
        :meth:`ahead`). Nothing is waited for; a copy of a message acked
        already is dropped (acked again), not returned."""
        self.ahead(count)
        ready = self._ready
        taken: list[Message] = []
        while ready and len(taken) < count:
            message = ready.popleft()
            if self._stale(message):
                self._drop(message)
            else:
                taken.append(message)
        return taken

    def push_back(self, message: Message) -> None:
        """Return a message taken by :meth:`next` but not used (front of the line)."""
        self._ready.appendleft(message)

    async def acknowledge(self, message: Message, timeout: float) -> None:
        loop = self._loop
        what = f"ack on {self.topic}"
        deadline = loop.time() + timeout
        retried = False
        while True:
            future: asyncio.Future[None] = loop.create_future()
            try:
                with map_pulsar_errors(what):
                    self._consumer.acknowledge_async(message, _result_callback(future))
                await _wait(future, max(deadline - loop.time(), 0.0), what)
                if retried:
                    self._reacked[str(message.message_id())] = None
                    while len(self._reacked) > _REACKED_KEPT:
                        self._reacked.popitem(last=False)
                break
            except (ClosedResourceError, TransientTransportError) as exc:
                # Sent at once, an ack fails while the consumer is not
                # connected (at once, as "AlreadyClosed"; with receipts also
                # when the connection drops with the receipt outstanding); a
                # consumer we did not close reconnects by itself, and an ack
                # may be sent again: until the deadline, it is.
                if self._closed or not self.acks_at_once:
                    raise
                if loop.time() >= deadline:
                    if isinstance(exc, TransientTransportError):
                        raise
                    raise TransientTransportError(f"{what}: not connected to the broker") from exc
                retried = True
                await asyncio.sleep(_ACK_RETRY_SECONDS)
        # Sent at once (see send_acks_at_once), the ack is done: the client
        # completed it once it was handed to the connection's writer (or,
        # with receipts, on the broker's answer). Grouped (a client build
        # where grouping cannot be turned off), the client completes an ack
        # as soon as it is queued in its ack-grouping tracker, which reaches
        # the socket on the next 100 ms tick: waiting past that tick means a
        # process killed after ack() returned has still sent its ack.
        if self._ack_flush_wait and not self.acks_at_once:
            await asyncio.sleep(self._ack_flush_wait)

    def negative_acknowledge(self, message: Message) -> None:
        """Ask the broker to redeliver ``message`` (after the consumer's
        nack delay). Non-blocking: the client only records it."""
        if self._closed:
            return
        with map_pulsar_errors(f"nack on {self.topic}"):
            self._consumer.negative_acknowledge(message)

    async def close(self, timeout: float) -> None:
        """Leave the subscription: every unacknowledged message of this
        consumer (leased, buffered or prefetched) goes back to the broker."""
        if self._closed:
            return
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        self._ready.clear()
        waiters, self._waiters = self._waiters, collections.deque()
        for waiter in waiters:
            _resolve_none(waiter)
        future: asyncio.Future[None] = self._loop.create_future()
        try:
            with contextlib.suppress(Exception):
                self._consumer.close_async(_result_callback(future))
                await _wait(future, timeout, f"close consumer {self.topic}")
        finally:
            if self._owner is not None:
                await self._owner.close()


class AsyncReader:
    """A non-durable cursor over a topic. Reads are shielded: a cancelled
    ``read_next`` leaves its message for the next call."""

    def __init__(self, reader: _pulsar.Reader, topic: str, timeout: float) -> None:
        self._reader = reader
        self.topic = topic
        self._timeout = timeout
        self._pending: asyncio.Future[Message] | None = None
        self._last: MessageId | None = None
        self._served = 0  # reads in a row served without waiting

    def fresh(self, message: Message) -> bool:
        """Whether ``message`` comes after every message this reader called
        fresh before (it is then remembered as the last one). A reader reads
        a topic in order, so one that does not is a copy: pulsar-lite sends
        a reader messages that were published concurrently more than once —
        the one just read again, and now and then earlier ones (up to a few
        hundred back) followed by the rest again."""
        message_id = message.message_id()
        last = self._last
        if last is not None and message_id.partition() == last.partition() and message_id <= last:
            return False
        self._last = message_id
        return True

    async def has_message_available(self) -> bool:
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        with map_pulsar_errors(f"read {self.topic}"):
            self._reader.has_message_available_async(_result_callback(future))
        return bool(await _wait(future, self._timeout, f"read {self.topic}"))

    async def poll(self) -> Message | None:
        """A message the client has received already, without waiting for
        the broker; ``None`` if it holds none. Unlike ``read_next(0)`` it
        leaves no read pending behind: a pending read can take the next
        message while ``has_message_available`` is being asked, which then
        answers as if that message had been read (a catch-up would stop one
        message short)."""
        self._served += 1
        if self._served >= _READS_PER_TURN:
            # A turn for the loop's other tasks now and then (nothing is
            # taken yet if this is cancelled).
            self._served = 0
            await asyncio.sleep(0)
        pending = self._pending
        if pending is not None:
            if not pending.done():
                return None
            self._pending = None
            with map_pulsar_errors(f"read {self.topic}"):
                return pending.result()
        with map_pulsar_errors(f"read {self.topic}"):
            try:
                return self._reader.read_next(0)  # the receive queue only: no wait
            except _pulsar.Timeout:
                return None

    async def read_next(self, timeout: float | None = None) -> Message | None:
        """The next message; ``None`` if none arrived within ``timeout``."""
        if self._pending is None:
            future: asyncio.Future[Message] = asyncio.get_running_loop().create_future()
            with map_pulsar_errors(f"read {self.topic}"):
                self._reader.read_next_async(_result_callback(future))
            # A read abandoned by a seek or close may still fail later: retrieve it.
            future.add_done_callback(retrieve)
            self._pending = future
        pending = self._pending
        if pending.done():
            # Served from the prefetch queue inside the call: no trip
            # through the event loop per message (a catch-up reads
            # thousands), but a turn for the loop's other tasks now and then.
            self._served += 1
            if self._served >= _READS_PER_TURN:
                self._served = 0
                await asyncio.sleep(0)  # cancelled here: the message stays pending
            self._pending = None
            with map_pulsar_errors(f"read {self.topic}"):
                return pending.result()
        self._served = 0
        try:
            message = await wait_within(asyncio.shield(pending), timeout)
        except TimeoutError:
            if not pending.done():
                return None  # waited out: the read stays pending for the next call
            self._pending = None  # it completed as the wait ran out
            with map_pulsar_errors(f"read {self.topic}"):
                return pending.result()
        except BaseException:
            # A read that failed is dropped (the next call reads anew); a
            # message that arrived as this call was cancelled stays pending
            # for the next call.
            if pending.done() and (pending.cancelled() or pending.exception() is not None):
                self._pending = None
            with map_pulsar_errors(f"read {self.topic}"):
                raise
        self._pending = None
        return message

    async def close(self, timeout: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        with contextlib.suppress(Exception):
            self._reader.close_async(_result_callback(future))
            await _wait(future, timeout, f"close reader {self.topic}")
        if self._pending is not None and not self._pending.done():
            self._pending.cancel()


# "2026-12-02 11:53:21.755 ERROR [139738500556480] ClientConnection:485 | text"
_LINE = re.compile(rb"^\S+ \S+ (DEBUG|INFO|WARN|ERROR)\s+\[\d+\] (.*?)\s*$")
_LEVELS = {b"DEBUG": logging.DEBUG, b"INFO": logging.INFO, b"WARN": logging.WARNING}


class _LogPipe:
    """The C++ client's warnings and errors, routed to Python logging.

    pulsar-client cannot filter lines for a Python logger (every line, debug
    included, would take the GIL from a client thread), but it filters a
    ``FileLogger`` in C++. So each client writes its warnings and errors to
    one pipe per process, and a daemon thread reads the pipe and hands each
    line to :data:`_client_log`. The pipe only carries what a client
    reports as going wrong: a handful of lines per reconnect attempt.
    """

    _current: _LogPipe | None = None
    _lock = threading.Lock()

    def __init__(self) -> None:
        read_fd, self.write_fd = os.pipe()
        self.path = f"/dev/fd/{self.write_fd}"
        self._thread = threading.Thread(
            target=self._read, args=(read_fd,), name="pulsar-client-log", daemon=True
        )
        self._thread.start()

    @classmethod
    def path_for_client(cls) -> str | None:
        """The pipe's path for a new client's ``FileLogger`` (None where
        ``/dev/fd`` does not exist)."""
        if not os.path.isdir("/dev/fd"):
            return None
        with cls._lock:
            if cls._current is None:
                cls._current = cls()
            return cls._current.path

    @classmethod
    def forget(cls) -> None:
        """In a forked child: the reader thread did not come along."""
        cls._current = None

    @staticmethod
    def _read(read_fd: int) -> None:
        with os.fdopen(read_fd, "rb") as lines:
            for line in lines:
                match = _LINE.match(line)
                if match is None:
                    text, level = line.decode(errors="replace").rstrip(), logging.WARNING
                else:
                    text = match.group(2).decode(errors="replace")
                    level = _LEVELS.get(match.group(1), logging.ERROR)
                with contextlib.suppress(Exception):  # never let logging kill the reader
                    _client_log.log(level, "%s", text)


os.register_at_fork(after_in_child=_LogPipe.forget)


#: pulsar-client objects not closed yet. A program that returns without
#: ``aclose()`` would otherwise destroy them during interpreter shutdown with
#: their C++ threads still running, and the process aborts ("terminate called
#: without an active exception", exit -6): they are closed at exit instead.
_unclosed: weakref.WeakSet[pulsar.Client] = weakref.WeakSet()


def _close_unclosed_clients() -> None:
    for client in list(_unclosed):
        with contextlib.suppress(Exception):
            client.close()


#: Handles with something to undo before their clients close at exit
#: (counts written ahead of a hand-out that did not happen): each has a
#: ``_undo_at_exit(deadline)`` method, and leaves the set when it closes.
#: At exit they run (within 2 s for all), then every client still open closes.
_undo_at_exit: AtExit[Any] = AtExit(
    2.0, lambda handle, deadline: handle._undo_at_exit(deadline), then=_close_unclosed_clients
)


def client_problem(within: float) -> str | None:
    """The client's last warning or error line of the past ``within`` seconds."""
    return _client_log.last_problem(within)


def _client_logger(kind: str) -> Any:
    """The logger handed to pulsar-client (see the ``client_log`` option)."""
    if kind == "stderr" and os.path.exists("/dev/stderr"):
        return pulsar.FileLogger(pulsar.LoggerLevel.Warn, "/dev/stderr")
    if kind == "logging":
        path = _LogPipe.path_for_client()
        if path is not None:
            return pulsar.FileLogger(pulsar.LoggerLevel.Warn, path)
    return _client_log


def _refusal(error: BaseException) -> bool:
    """Whether a failed reader create is the broker's refusal (the topic
    does not exist and is not created, no permission, not a topic name)
    rather than a failure that goes away by itself."""
    if isinstance(error, PulsarResultError) and error.result_name == "TopicNotFound":
        return True
    return not is_transient(error)


class AsyncPulsarClient:
    """One ``pulsar.Client`` (one connection pool) per transport."""

    def __init__(
        self,
        service_url: str,
        *,
        operation_timeout: float,
        close_timeout: float,
        send_timeout_ms: int,
        client_log: str = "logging",
        **client_kwargs: Any,
    ) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="pulsar-bridge"
        )
        self._build = dict(
            service_url=service_url,
            close_timeout=close_timeout,
            send_timeout_ms=send_timeout_ms,
            client_log=client_log,
            **client_kwargs,
        )
        self._siblings: set[AsyncPulsarClient] = set()
        self._operation_timeout = operation_timeout
        self._close_timeout = close_timeout
        self._send_timeout_ms = send_timeout_ms
        with map_pulsar_errors("pulsar client"):
            self._client = pulsar.Client(
                service_url,
                operation_timeout_seconds=max(1, round(operation_timeout)),
                logger=_client_logger(client_log),
                **client_kwargs,
            )
        self._core: _pulsar.Client = self._client._client
        self._closed = False
        self._parent: AsyncPulsarClient | None = None
        #: The readers that spread consumer ids were refused (see subscribe).
        self._ids_refused = False
        _unclosed.add(self._client)

    async def create_producer(self, topic: str) -> AsyncProducer:
        conf = _pulsar.ProducerConfiguration()
        conf.batching_enabled(False)  # one receipt per message: enqueue returns on *its* receipt
        conf.send_timeout_millis(self._send_timeout_ms)
        conf.block_if_queue_full(True)
        future: asyncio.Future[_pulsar.Producer] = asyncio.get_running_loop().create_future()
        with map_pulsar_errors(f"create producer on {topic}"):
            self._core.create_producer_async_v2(topic, conf, _value_callback(future))
        producer = await _wait(future, self._operation_timeout + 5.0, f"create producer on {topic}")
        return AsyncProducer(producer, topic, self._send_timeout_ms / 1000)

    async def subscribe(
        self,
        topic: str,
        subscription: str,
        *,
        key_shared: bool,
        receiver_queue_size: int,
        nack_delay_ms: int,
        ack_flush_wait: float,
        attempt_timeout: float,
        budget: float,
        id_spread: int = 0,
        id_topic: str | None = None,
        ack_receipts: bool = False,
    ) -> AsyncConsumer:
        """Join ``subscription`` on a client of the consumer's own.

        pulsar-lite tells a subscription's consumers apart by consumer id
        alone, and every client numbers its consumers from 0, so a second
        process's consumer is refused ("Consumer 0 already exists") and the
        broker closes that whole connection. The client keeps retrying the
        refused subscribe, reconnecting, until its operation timeout: every
        other consumer on that connection is disconnected again and again,
        and the broker hands the messages it holds to other consumers while
        they are still being processed (duplicates at live workers). On a
        client of its own a refusal disconnects nothing else, and each
        attempt runs to its end (that client's operation timeout is
        ``attempt_timeout``) before the next consumer id is tried, for at
        most ``budget`` seconds. A client of its own would number every
        process's consumer 0, so the first id is a random one below
        ``id_spread`` (ids are skipped with short-lived readers, about 0.4 ms
        each): two processes then meet on an id only by chance. Apache Pulsar
        scopes consumer ids to the connection: there ``id_spread`` can be 0.

        The skipping readers are created on ``id_topic`` (a topic nothing is
        written to), never on ``topic``: pulsar-lite keeps the cursor of a
        closed reader, and every later send to a topic then costs more for
        each one (sends to a topic with 60 closed readers ran at about a
        third of the rate). Without ``id_topic`` they go to ``topic``.
        """
        conf = _pulsar.ConsumerConfiguration()
        conf.consumer_type(
            pulsar.ConsumerType.KeyShared if key_shared else pulsar.ConsumerType.Shared
        )
        conf.receiver_queue_size(receiver_queue_size)
        conf.negative_ack_redelivery_delay_ms(nack_delay_ms)
        at_once = send_acks_at_once(conf, nack_delay_ms, receipts=ack_receipts)
        # Earliest: a subscription created after requests were enqueued still gets them.
        conf.subscription_initial_position(_pulsar.InitialPosition.Earliest)
        # No ackTimeout: leases are enforced by the queue (the client's 10 s
        # minimum and its lack of a per-message reset rule it out).
        loop = asyncio.get_running_loop()
        owner = self._sibling(attempt_timeout)
        deadline = loop.time() + budget
        try:
            if id_spread > 1 and not self._ids_refused:
                where = id_topic or topic
                if not await owner._skip_consumer_ids(
                    where, random.randrange(id_spread), attempt_timeout
                ):
                    # Not tried again by this client: every try would cost a
                    # refused lookup per reader.
                    self._ids_refused = True
                    log.warning(
                        "consumer ids are not spread: no reader could be created on %s;"
                        " on pulsar-lite, processes sharing a subscription may now be"
                        " refused each other's consumer ids (consumer_id_spread=0"
                        " turns the spreading off)",
                        where,
                    )
            while True:
                future: asyncio.Future[_pulsar.Consumer] = loop.create_future()
                with map_pulsar_errors(f"subscribe to {topic}"):
                    owner._core.subscribe_async_v2(
                        topic, subscription, conf, _value_callback(future)
                    )
                try:
                    # The client ends the attempt itself; ours is a backstop.
                    consumer = await _wait(future, attempt_timeout + 5.0, f"subscribe to {topic}")
                except TransientTransportError as exc:
                    ended_by_client = isinstance(exc.__cause__, PulsarResultError)
                    if not ended_by_client or loop.time() >= deadline:
                        raise  # the backstop fired, or out of time: owner.close() ends it
                    log.debug("subscribe to %s refused or timed out; trying again", topic)
                    continue
                return AsyncConsumer(
                    consumer,
                    topic,
                    loop,
                    ack_flush_wait,
                    owner=owner,
                    acks_at_once=at_once,
                    ack_receipts=at_once and ack_receipts,
                )
        except BaseException:
            await owner.close()
            raise

    async def _skip_consumer_ids(self, topic: str, count: int, timeout: float) -> bool:
        """Use up ``count`` consumer ids of this client: non-durable readers
        at the end of ``topic``, created together and closed at once.
        ``False`` if the broker refused them (none created, and one refused
        for good: no such topic, no permission, not a topic name); a broker
        that did not answer in time is not a refusal."""
        if count <= 0:
            return True
        loop = asyncio.get_running_loop()
        conf = _pulsar.ReaderConfiguration()
        conf.receiver_queue_size(1)
        futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in range(count)]
        with map_pulsar_errors(f"create reader on {topic}"):
            for future in futures:
                self._core.create_reader_async_v2(
                    topic, _pulsar.MessageId.latest, conf, _value_callback(future)
                )
        try:
            done, _ = await asyncio.wait(futures, timeout=timeout + 5.0)
        except BaseException:
            # Cancelled (the operation ran out of time): nobody will look at
            # these any more; a reader created later goes with the client.
            for future in futures:
                if future.done():
                    retrieve(future)
                else:
                    future.cancel()
            raise
        closed: list[asyncio.Future[None]] = []
        refused = False
        for future in futures:
            if future in done and (error := future.exception()) is not None:
                refused = refused or _refusal(error)
            elif future in done:
                close: asyncio.Future[None] = loop.create_future()
                future.result().close_async(_result_callback(close))
                closed.append(close)
            else:
                future.cancel()
        if closed:
            await asyncio.wait(closed, timeout=timeout + 5.0)
        for future in closed:
            if future.done() and not future.cancelled():
                future.exception()  # a reader that did not close goes with the client
        return bool(closed) or not refused

    def _sibling(self, operation_timeout: float) -> AsyncPulsarClient:
        """A client built like this one, closed with it at the latest."""
        build = dict(self._build)
        sibling = AsyncPulsarClient(
            build.pop("service_url"), operation_timeout=operation_timeout, **build
        )
        sibling._parent = self
        self._siblings.add(sibling)
        return sibling

    async def create_reader(
        self, topic: str, start: MessageId | None = None, *, inclusive: bool = False
    ) -> AsyncReader:
        """A reader from ``start`` (default: the earliest message);
        ``inclusive`` also applies to later seeks to a message id."""
        conf = _pulsar.ReaderConfiguration()
        conf.receiver_queue_size(200)
        conf.start_message_id_inclusive(inclusive)
        begin = _pulsar.MessageId.earliest if start is None else start
        future: asyncio.Future[_pulsar.Reader] = asyncio.get_running_loop().create_future()
        with map_pulsar_errors(f"create reader on {topic}"):
            self._core.create_reader_async_v2(topic, begin, conf, _value_callback(future))
        reader = await _wait(future, self._operation_timeout + 5.0, f"create reader on {topic}")
        return AsyncReader(reader, topic, self._operation_timeout + 5.0)

    async def last_message_id(self, topic: str) -> MessageId | None:
        """The id of the last message of ``topic``; ``None`` if it holds none.

        The binding's readers cannot ask (a reader at ``MessageId.latest``
        with ``inclusive`` would be placed on the last message by a seek,
        which pulsar-lite confirms and then ignores), so a consumer asks:
        on a subscription of its own (a random ``ae-last-`` name, at the
        latest position, no permits: nothing is dispatched to it), removed
        again at once. A process killed in between leaves that subscription
        behind (its backlog grows with the topic; delete it by name).
        pulsar-lite answers an empty topic with an error ("Topic has no
        messages"), Apache Pulsar with an entry id of -1: both are ``None``.

        Raises: TransientTransportError, PermanentTransportError.
        """
        conf = _pulsar.ConsumerConfiguration()
        conf.consumer_type(pulsar.ConsumerType.Exclusive)
        conf.receiver_queue_size(0)
        conf.subscription_initial_position(_pulsar.InitialPosition.Latest)
        subscription = f"ae-last-{os.urandom(8).hex()}"
        loop = asyncio.get_running_loop()
        timeout = self._operation_timeout + 5.0
        future: asyncio.Future[_pulsar.Consumer] = loop.create_future()
        with map_pulsar_errors(f"subscribe to {topic}"):
            self._core.subscribe_async_v2(topic, subscription, conf, _value_callback(future))
        try:
            consumer = await _wait(future, timeout, f"subscribe to {topic}")
        except TransientTransportError as exc:
            # Usually the first call of a process that meets a broker that
            # is down (a registry's view starts here): say so, as enqueue does.
            problem = client_problem(within=timeout)
            hint = f"; the client last reported: {problem}" if problem else ""
            raise TransientTransportError(
                f"no answer from the Pulsar broker at {self._build['service_url']} ({exc}){hint}"
            ) from exc
        try:
            asked: asyncio.Future[MessageId] = loop.create_future()
            with map_pulsar_errors(f"last message id of {topic}"):
                consumer.get_last_message_id_async(_result_callback(asked))
            try:
                last = await _wait(asked, timeout, f"last message id of {topic}")
            except TransientTransportError as exc:
                cause = exc.__cause__
                if isinstance(cause, PulsarResultError) and cause.result_name == "UnknownError":
                    return None  # pulsar-lite: "Topic has no messages"
                raise
            return None if last.entry_id() < 0 else last
        finally:
            gone: asyncio.Future[None] = loop.create_future()
            try:
                with map_pulsar_errors(f"unsubscribe {subscription} from {topic}"):
                    consumer.unsubscribe_async(_result_callback(gone))
                await _wait(gone, self._close_timeout, f"unsubscribe from {topic}")
            except Exception as exc:
                log.warning(
                    "subscription %s on %s not removed (%s); delete it by name",
                    subscription,
                    topic,
                    exc,
                )
                closed: asyncio.Future[None] = loop.create_future()
                with contextlib.suppress(Exception):
                    consumer.close_async(_result_callback(closed))
                    await _wait(closed, self._close_timeout, f"close consumer on {topic}")

    async def topic_partitions(self, topic: str, timeout: float) -> list[str]:
        """A metadata round trip to the broker (used as a health probe)."""
        future: asyncio.Future[list[str]] = asyncio.get_running_loop().create_future()
        with map_pulsar_errors(f"lookup {topic}"):
            self._core.get_topic_partitions_async(topic, _result_callback(future))
        result: list[str] = await _wait(future, timeout, f"lookup {topic}")
        return result

    async def run_blocking(self, fn: Callable[[], Any], timeout: float) -> Any:
        """Run a blocking call on the bridge's dedicated thread."""
        loop = asyncio.get_running_loop()
        return await wait_within(loop.run_in_executor(self._executor, fn), timeout)

    async def close(self) -> None:
        """Close every producer, consumer and reader; bounded by the close timeout."""
        if self._closed:
            return
        self._closed = True
        if self._parent is not None:
            self._parent._siblings.discard(self)
        for sibling in list(self._siblings):
            await sibling.close()
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        callback = _result_callback(future)
        # The C++ client finishes a close on a detached thread of its own,
        # which calls this callback and only then drops it, taking the GIL
        # again. Were the interpreter finalizing by then, that thread would be
        # torn down inside a C++ destructor and the process would abort
        # ("terminate called without an active exception"). So close() also
        # waits for the callback's release. The weakref callback is a C
        # builtin: it runs no bytecode, so the releasing thread never gives
        # up the GIL in between, and once the flag is seen here that thread
        # has left Python for good.
        released: list[object] = []
        tracker = weakref.ref(callback, released.append)
        try:
            self._core.close_async(callback)
            del callback
            await wait_within(future, self._close_timeout)
            deadline = loop.time() + self._close_timeout
            # Polled, not an Event: setting one from that thread would run
            # bytecode there, which is exactly what must not happen.
            while not released and loop.time() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.005)
        except Exception as exc:
            log.warning("pulsar client did not close cleanly (%s); shutting it down", exc)
            with contextlib.suppress(Exception):
                await self.run_blocking(self._core.shutdown, self._close_timeout)
        del tracker
        self._executor.shutdown(wait=False)


class PulsarContext:
    """What the children of one transport (queues, event logs, the doctor)
    share: the client, the validated settings, the configuration, topic
    names, and the operations they call (retries within the operation
    timeout, subscribing, the queue subscription and its backlog). Built
    once by the transport; children keep it and never see the transport.
    ``check_open`` raises ``ClosedResourceError`` once the transport is
    closed."""

    __slots__ = (
        "_backlog_query",
        "_subscribe_lock",
        "_subscribed",
        "check_open",
        "client",
        "config",
        "settings",
    )

    def __init__(
        self,
        client: AsyncPulsarClient,
        settings: PulsarSettings,
        config: TransportConfig,
        check_open: Callable[[], None],
    ) -> None:
        self.client = client
        self.settings = settings
        self.config = config
        self.check_open = check_open
        self._subscribed: set[str] = set()
        self._subscribe_lock = asyncio.Lock()
        self._backlog_query: bool | None = None  # does the broker answer CommandConsumerStats?

    def topic(self, kind: str, name: str) -> str:
        return self.settings.topic(self.config.namespace, kind, name)

    async def retrying(self, make: Callable[[], Awaitable[T]]) -> T:
        """Run ``make`` with retries on the transient branch only; all
        attempts together take at most the operation timeout (an attempt
        still running then is cancelled), so an unreachable broker fails the
        operation within it.

        Raises: TransientTransportError (the last failure, or no answer in
        time), PermanentTransportError.
        """
        budget = self.settings.options.operation_timeout_seconds
        last: list[BaseException] = []
        try:
            async with asyncio.timeout(budget):
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception_type(TransientTransportError),
                    stop=stop_after_delay(budget),
                    wait=wait_exponential(multiplier=0.05, max=1.0),
                    reraise=True,
                ):
                    with attempt:
                        try:
                            return await make()
                        except TransientTransportError as exc:
                            last[:] = [exc]
                            raise
        except TimeoutError as exc:
            detail = f": {last[0]}" if last else ""
            problem = client_problem(within=budget)
            if problem and not detail:
                detail = f"; the client last reported: {problem}"
            raise TransientTransportError(
                f"no answer from the Pulsar broker at {self.settings.service_url} within "
                f"{budget:g} s{detail}"
            ) from (last[0] if last else exc)
        raise AssertionError("unreachable")  # pragma: no cover

    async def subscribe(
        self, topic: str, *, receiver_queue_size: int | None = None
    ) -> AsyncConsumer:
        options = self.settings.options
        return await self.client.subscribe(
            topic,
            self.config.consumer_group,
            key_shared=options.subscription_type == "key_shared",
            receiver_queue_size=options.receiver_queue_size
            if receiver_queue_size is None
            else receiver_queue_size,
            nack_delay_ms=options.nack_redelivery_delay_ms,
            ack_flush_wait=options.ack_flush_wait_ms / 1000,
            ack_receipts=options.ack_receipts,
            attempt_timeout=options.subscribe_attempt_timeout_seconds,
            budget=options.operation_timeout_seconds,
            id_spread=options.consumer_id_spread,
            id_topic=self.topic("ids", "skipped"),
        )

    async def ensure_subscription(self, topic: str) -> None:
        """Create the queue's durable subscription before the first enqueue:
        Pulsar keeps a topic's messages for its subscriptions, so one must
        exist before any request is accepted. A zero-permit consumer joins
        and leaves without being dispatched anything."""
        async with self._subscribe_lock:
            if topic in self._subscribed:
                return
            consumer = await self.retrying(lambda: self.subscribe(topic, receiver_queue_size=0))
            await consumer.close(self.settings.options.close_timeout_seconds)
            self._subscribed.add(topic)

    async def subscription_backlog(self, topic: str) -> int | None:
        """The backlog of the queue subscription on ``topic`` over the binary
        protocol, or ``None`` if the broker does not answer that command."""
        if self._backlog_query is False:
            return None
        host, _, port = self.settings.service_url.split("://", 1)[1].split(",")[0].rpartition(":")
        tls: ssl.SSLContext | None = None
        if self.settings.use_tls:
            tls = ssl.create_default_context(
                cafile=str(self.config.tls.ca_file) if self.config.tls.ca_file else None
            )
            tls.check_hostname = self.config.tls.verify_hostname
            if self.config.tls.cert_file and self.config.tls.key_file:
                tls.load_cert_chain(self.config.tls.cert_file, self.config.tls.key_file)
        # An unsupported command is silently ignored by some brokers: the
        # first query waits briefly and the answer is remembered.
        first = self._backlog_query is None
        try:
            result = await subscription_backlog(
                host.strip("[]"),
                int(port or (6651 if self.settings.use_tls else 6650)),
                topic=topic,
                subscription=self.config.consumer_group,
                subscription_type=self.settings.options.subscription_type,
                token=self.config.token.get_secret_value() if self.config.token else None,
                tls=tls,
                timeout=2.0 if first else self.settings.options.operation_timeout_seconds,
            )
        except (TransientTransportError, PermanentTransportError) as exc:
            if not first:
                raise
            unanswered = isinstance(exc.__cause__, TimeoutError)
            if unanswered or isinstance(exc, PermanentTransportError):
                # No answer at all, or a refusal: the broker lacks the command.
                log.warning(
                    "broker does not report subscription backlogs (%s); depth is unknown", exc
                )
                self._backlog_query = False
            return None
        self._backlog_query = True
        return result.backlog
