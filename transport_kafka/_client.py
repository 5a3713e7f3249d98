"""The bridge between the synchronous confluent-kafka clients and asyncio.

This module is the only place that touches threads:

* delivery reports: the producer's ``on_delivery`` callback runs on the
  producer's poll thread and resolves an asyncio future through
  ``loop.call_soon_threadsafe``;
* blocking calls (admin, metadata, watermarks, reading a topic to its end)
  run on a dedicated executor thread and are awaited with a timeout;
* consumers (``ConsumerThread``) are owned by one thread each, which is the
  only thread calling them; other code submits closures to it. A queue's
  consumer and its thread are started, stepped and closed by one owner,
  :mod:`transport_kafka._member`.

Flush and close are bounded by ``close_timeout_s``.

:class:`KafkaContext` is what the transport hands every queue, registry,
log and doctor it creates: they never see the transport itself.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from confluent_kafka import (
    OFFSET_END,
    TIMESTAMP_NOT_AVAILABLE,
    Consumer,
    KafkaError,
    KafkaException,
    Message,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from tenacity import (
    AsyncRetrying,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from transport.errors import (
    ClosedResourceError,
    ConfigurationError,
    PermanentTransportError,
    TransientTransportError,
    TransportError,
)
from transport.kit import ClientLog, InFlight, RequestCodec, SharedRun, wait_within
from transport_kafka._config import KafkaSettings
from transport_kafka._errors import error_from_kafka, map_kafka_errors
from transport_kafka._topics import TopicSpec, TopicState, check_topic, describe_topics

if TYPE_CHECKING:
    from transport_kafka._engine import Engines

__all__ = [
    "ConsumerThread",
    "KafkaClients",
    "KafkaContext",
    "RawRecord",
    "TopicSpec",
    "decode_headers",
    "msg_position",
    "raw_record",
    "read_last",
    "read_to_end",
]

log = logging.getLogger("transport.kafka")
T = TypeVar("T")

# librdkafka's lines go to the ``transport.kafka.client`` logger (never to
# stderr by themselves), at most at INFO, repeats collapsed: an unreachable
# broker is reported by the failing operation, not by hundreds of lines.
_CLIENT_LOG = ClientLog("kafka")

#: librdkafka's log lines of a failed authentication or TLS handshake:
#: retrying does not help (credentials, mechanism, certificates).
_AUTH_FAILURE = re.compile(
    r"SASL|[Aa]uthenticat|SSL handshake failed|certificate verify failed", re.ASCII
)


def _refused_login(error: TransientTransportError, bound: float, bootstrap: str) -> TransportError:
    """``error`` (an operation that failed or timed out), or a
    PermanentTransportError naming the cause if the clients' last problem
    within ``bound`` seconds was a failed login or TLS handshake with one of
    the ``bootstrap`` brokers: librdkafka reports it only in its log, and
    the operation only as "Broker transport failure" or a timeout, as if
    the broker were down."""
    problem = _CLIENT_LOG.last_problem(within=bound)
    if problem is None or not _AUTH_FAILURE.search(problem):
        return error
    if not any(host in problem for host in bootstrap.split(",")):
        return error  # another transport's brokers (the log is the process's)
    if problem in str(error):
        return PermanentTransportError(f"authentication or TLS failed: {error}")
    return PermanentTransportError(f"authentication or TLS failed: {error}; the client: {problem}")


def _client_logger() -> logging.Logger:
    return _CLIENT_LOG


@dataclass(frozen=True, slots=True)
class RawRecord:
    """A consumed record, detached from the client's ``Message``."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: dict[str, bytes]
    #: The record's timestamp (ms since the epoch; CreateTime unless the
    #: topic says LogAppendTime), ``None`` where the client has none.
    timestamp_ms: int | None = None


def _bytes(value: str | bytes | None) -> bytes | None:
    return value.encode() if isinstance(value, str) else value


def msg_position(msg: Message) -> tuple[int, int]:
    """(partition, offset) of a message; -1 where the client has none."""
    partition, offset = msg.partition(), msg.offset()
    return (-1 if partition is None else partition), (-1 if offset is None else offset)


def consume_available(consumer: Consumer, limit: int, timeout: float) -> list[Message]:
    """Wait up to ``timeout`` for one message, then take what else is already
    fetched (up to ``limit`` in all) without waiting.

    ``Consumer.consume(n, timeout)`` waits for ``n`` messages or the whole
    timeout, which would hold a lone record back for up to ``timeout``.
    """
    first = consumer.poll(timeout)
    if first is None:
        return []
    return [first, *consumer.consume(limit - 1, 0)] if limit > 1 else [first]


def decode_headers(
    headers: Sequence[tuple[str, str | bytes | None]] | Mapping[str, str | bytes | None] | None,
) -> dict[str, bytes]:
    """A message's headers (``msg.headers()``) as ``{name: bytes}``; the
    last of a repeated name wins, a null value reads as ``b""``."""
    found: dict[str, bytes] = {}
    items = headers.items() if isinstance(headers, Mapping) else headers or ()
    for item in items:
        value = item[1]
        found[str(item[0])] = (value.encode() if isinstance(value, str) else value) or b""
    return found


def raw_record(msg: Message) -> RawRecord:
    headers = decode_headers(msg.headers())
    partition, offset = msg_position(msg)
    kind, stamp = msg.timestamp()
    return RawRecord(
        msg.topic() or "",
        partition,
        offset,
        _bytes(msg.key()),
        _bytes(msg.value()),
        headers,
        None if kind == TIMESTAMP_NOT_AVAILABLE else stamp,
    )


def read_to_end(
    conf: dict[str, Any], topic: str, timeout: float, partitions: Sequence[int] | None = None
) -> list[RawRecord]:
    """Read ``topic`` from the beginning up to the high watermark taken at
    the start (blocking; call it on a worker thread).

    Raises: KafkaException, TimeoutError.
    """
    consumer = Consumer({**conf, "logger": _client_logger()})
    try:
        if partitions is None:
            meta = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
            if meta is None or meta.error is not None:
                raise KafkaException(
                    meta.error if meta else KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)
                )
            partitions = sorted(meta.partitions)
        targets: dict[int, int] = {}
        for p in partitions:
            low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, p), timeout=timeout, cached=False
            )
            if high > low:
                targets[p] = high
        if not targets:
            return []
        consumer.assign([TopicPartition(topic, p, -2) for p in targets])
        wanted = set(targets)
        out: list[RawRecord] = []
        deadline = time.monotonic() + timeout
        wait = 0.1
        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading {topic} to its end")
            for msg in consume_available(consumer, 500, wait):
                err = msg.error()
                p, offset = msg_position(msg)
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        if p in targets and offset >= targets[p]:
                            del targets[p]
                        continue
                    raise KafkaException(err)
                if p not in wanted:
                    continue
                # Records past the target that came in the same fetch are
                # kept: some brokers (Tansu) report the high watermark of a
                # multi-record batch as its base offset + 1, so the target
                # can fall inside the last batch.
                out.append(raw_record(msg))
                if p in targets and offset + 1 >= targets[p]:
                    del targets[p]
            if not targets:
                if wait == 0:
                    return out
                wait = 0  # one more sweep of what is already fetched
    finally:
        consumer.close()


def _consume_until(
    consumer: Consumer, waiting: set[int], timeout: float, what: str
) -> Iterator[tuple[int, int, Any]]:
    """(partition, offset, message) of every record the assigned consumer
    reads while ``waiting`` (which the caller may shrink) holds partitions;
    a partition's end-of-partition event removes it.

    Raises: KafkaException, TimeoutError (``timeout`` seconds passed first).
    """
    deadline = time.monotonic() + timeout
    while waiting:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"reading {what}")
        for msg in consume_available(consumer, 500, min(left, 0.1)):
            err = msg.error()
            p, offset = msg_position(msg)
            if err is not None:
                if err.code() == KafkaError._PARTITION_EOF:
                    waiting.discard(p)
                    continue
                raise KafkaException(err)
            yield p, offset, msg


def read_heads(
    conf: dict[str, Any],
    topic: str,
    positions: Mapping[int, int],
    timeout: float,
    limit: int = 16,
) -> dict[int, list[RawRecord]]:
    """The first records (up to ``limit`` per partition) at or after
    ``positions`` (partition → offset) of ``topic``, from one fetch per
    partition (blocking; call it on a worker thread). The consumer is only
    ``assign()``-ed: it joins no group and commits nothing. A partition with
    nothing at or after its position maps to an empty list.

    Raises: KafkaException, TimeoutError (not every partition answered
    within ``timeout``).
    """
    out: dict[int, list[RawRecord]] = {p: [] for p in positions}
    if not positions:
        return out
    # Small fetches (a record larger than this still comes whole): the
    # consumer prefetches in the background until it is closed. Lowering
    # queued.min.messages instead made librdkafka fetch the partitions one
    # after another, about a second apart (measured on Tansu).
    small = {"max.partition.fetch.bytes": 64 * 1024}
    consumer = Consumer({**conf, **small, "logger": _client_logger()})
    try:
        consumer.assign([TopicPartition(topic, p, offset) for p, offset in positions.items()])
        waiting = set(positions)
        for p, offset, msg in _consume_until(consumer, waiting, timeout, f"the head of {topic}"):
            if p not in out or offset < positions[p]:
                continue
            if len(out[p]) < limit:
                out[p].append(raw_record(msg))
            waiting.discard(p)
        return out
    finally:
        consumer.close()


def read_last(
    conf: dict[str, Any], topic: str, starts: Mapping[int, int], timeout: float
) -> dict[int, RawRecord]:
    """The last record of each partition of ``topic`` at or after
    ``starts`` (partition → offset), read to the partition's end (blocking;
    call it on a worker thread). For a topic of which only the newest record
    matters: start one record before the high watermark. Reading to the end
    rather than taking the record at ``high - 1`` copes with brokers that
    report the high watermark of a batch of several records as its base
    offset + 1 (Tansu). A partition with nothing at or after its start is
    left out. The consumer is only ``assign()``-ed.

    Raises: KafkaException, TimeoutError.
    """
    out: dict[int, RawRecord] = {}
    if not starts:
        return out
    consumer = Consumer({**conf, "logger": _client_logger()})
    try:
        consumer.assign([TopicPartition(topic, p, offset) for p, offset in starts.items()])
        waiting = set(starts)
        for p, _, msg in _consume_until(consumer, waiting, timeout, f"the last record of {topic}"):
            if p in starts:
                out[p] = raw_record(msg)
        return out
    finally:
        consumer.close()


class _Reports:
    """Delivery reports handed from the producer's poll thread to one event
    loop in batches: one loop wake-up per batch instead of one per record.

    It also bounds every wait: librdkafka reports each record within
    ``message.timeout.ms``, but a report that never comes must not hang its
    caller. Waits are kept in creation order (their bound is the same, so
    their deadlines are too) under one timer, which is cheaper than a timer
    per record.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, bound: float) -> None:
        self.loop = loop
        self.bound = bound
        self._items: deque[tuple[asyncio.Future[tuple[int, int]], Any, Any, str]] = deque()
        self._scheduled = False
        self._lock = threading.Lock()
        self._waits: deque[tuple[float, asyncio.Future[tuple[int, int]], str]] = deque()
        self._timer: asyncio.TimerHandle | None = None

    def add(self, future: asyncio.Future[tuple[int, int]], err: Any, msg: Any, what: str) -> None:
        """Producer thread: queue one report, schedule a drain if none is."""
        self._items.append((future, err, msg, what))
        with self._lock:
            if self._scheduled:
                return
            self._scheduled = True
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
            self.loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        # Reset first: a report queued from here on schedules another drain.
        with self._lock:
            self._scheduled = False
        items = self._items
        while items:
            future, err, msg, what = items.popleft()
            if future.done():
                continue
            if err is not None:
                future.set_exception(error_from_kafka(err, what))
            else:
                future.set_result(msg_position(msg))

    def watch(self, future: asyncio.Future[tuple[int, int]], what: str) -> None:
        """Loop: fail ``future`` if no report resolved it within the bound."""
        waits = self._waits
        while waits and waits[0][1].done():
            waits.popleft()
        waits.append((self.loop.time() + self.bound, future, what))
        if self._timer is None:
            self._timer = self.loop.call_at(waits[0][0], self._expire)

    def _expire(self) -> None:
        self._timer = None
        waits = self._waits
        now = self.loop.time()
        while waits and (waits[0][1].done() or waits[0][0] <= now):
            _, future, what = waits.popleft()
            if not future.done():
                future.set_exception(
                    TransientTransportError(f"{what}: no delivery report in {self.bound:.0f} s")
                )
        if waits:
            self._timer = self.loop.call_at(waits[0][0], self._expire)


#: The flush of a lone record runs in steps until the record is reported,
#: the first this long, each next one twice as long up to the maximum: a
#: flush returns only when the producer holds nothing, so under load a step
#: keeps records produced meanwhile from lingering until it ends. Short
#: first steps end it soon after a prompt report; growing ones keep a slow
#: report (a new connection, a broker that is down) from waking the thread
#: a thousand times a second (see _send_lone_records).
_LONE_FLUSH_STEP_S = 0.001
_LONE_FLUSH_MAX_STEP_S = 0.05
#: Wakes the flush thread to look at its stop conditions (set: nothing to flush).
_WAKE = threading.Event()
_WAKE.set()


class _Pace:
    """Which records to send without lingering (event loop only).

    A record is *lone* when the producer holds no other and records have
    been coming further apart than ``linger.ms``: a moving average of the
    gaps between records, each gap counted as at most ten lingers, so that
    after a pause the next lone record is sent at once and a few records
    close together make the producer linger again. With ``linger.ms`` 0
    nothing lingers, so nothing is lone.
    """

    #: Weight of the newest gap in the moving average.
    WEIGHT = 0.125

    def __init__(self, linger_s: float) -> None:
        self.linger_s = linger_s
        self._cap = max(10 * linger_s, 0.01)
        self.gap = self._cap
        self._last = float("-inf")

    def lone(self, now: float, held: int) -> bool:
        """Count a record produced at ``now`` (monotonic seconds) while the
        producer held ``held`` others; whether it is lone."""
        self.gap += (min(now - self._last, self._cap) - self.gap) * self.WEIGHT
        self._last = now
        return self.linger_s > 0 and held == 0 and self.gap > self.linger_s


def _is_fatal(exc: BaseException) -> bool:
    """Whether a client exception means the producer is unusable for good."""
    err = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
    return isinstance(err, KafkaError) and (err.fatal() or err.code() == KafkaError._FATAL)


class _DaemonExecutor(concurrent.futures.Executor):
    """An executor on daemon threads for the client's blocking calls. The
    standard one's threads are joined at interpreter exit: a topic creation
    or metadata call waiting out the operation timeout on a broker that is
    down held the exit of a script that had given up and closed (Ctrl-C
    included) for up to 30 s. The client's other threads are daemons too."""

    def __init__(self, workers: int, prefix: str) -> None:
        self._work: queue.SimpleQueue[
            tuple[concurrent.futures.Future[Any], Callable[..., Any], tuple[Any, ...]] | None
        ] = queue.SimpleQueue()
        self._workers = workers
        self._prefix = prefix
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        self._shut = False

    def submit(  # type: ignore[override]
        self, fn: Callable[..., T], /, *args: Any
    ) -> concurrent.futures.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        with self._lock:
            if self._shut:
                raise RuntimeError("cannot schedule new futures after shutdown")
            if not self._threads:  # started on first use: connect() stays cheap
                for i in range(self._workers):
                    thread = threading.Thread(
                        target=self._run, name=f"{self._prefix}_{i}", daemon=True
                    )
                    thread.start()
                    self._threads.append(thread)
            self._work.put((future, fn, args))
        return future

    def _run(self) -> None:
        while True:
            item = self._work.get()
            if item is None:
                return
            future, fn, args = item
            if not future.set_running_or_notify_cancel():
                continue
            try:
                result = fn(*args)
            except BaseException as exc:
                future.set_exception(exc)
            else:
                future.set_result(result)

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            self._shut = True
            if cancel_futures:
                pending: list[Any] = []
                while True:
                    try:
                        pending.append(self._work.get_nowait())
                    except queue.Empty:
                        break
                for item in pending:
                    if item is not None:
                        item[0].cancel()
            for _ in self._threads:
                self._work.put(None)
        if wait:
            for thread in self._threads:
                thread.join()


class KafkaClients:
    """The clients one transport shares: an idempotent producer (with its poll
    thread), an admin client, a metadata consumer and the executor thread
    for blocking calls. Created lazily, so ``connect`` never blocks."""

    def __init__(self, settings: KafkaSettings) -> None:
        self.settings = settings
        self._producer: Producer | None = None
        self._admin: AdminClient | None = None
        self._meta: Consumer | None = None
        self._executor = _DaemonExecutor(2, "kafka-io")
        self._poll_thread: threading.Thread | None = None
        self._flush_thread: threading.Thread | None = None
        # Lone records for the flush thread: an event set by each one's report.
        self._lone: queue.SimpleQueue[threading.Event] = queue.SimpleQueue()
        conf = settings.producer_config()  # the alias, set after linger.ms, wins
        linger = conf.get("queue.buffering.max.ms", conf.get("linger.ms", 0))
        try:
            self._pace = _Pace(float(linger) / 1000)
        except (TypeError, ValueError):
            self._pace = _Pace(0.0)
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._topics: set[str] = set()  # created or checked (see ensure_topics)
        # In-flight creations and checks, shared by concurrent callers.
        self._ensuring: InFlight[frozenset[str]] = InFlight()
        self._warned: set[str] = set()  # warnings about existing topics, once each
        self._closed = False
        self._reports: _Reports | None = None
        # Offset queries shared by concurrent callers (see _shared_query),
        # by (query, topic, partitions).
        self._queries: dict[tuple[str, str, tuple[int, ...]], SharedRun[Any]] = {}

    @property
    def timeout(self) -> float:
        return self.settings.options.operation_timeout_s

    # -- lazily built clients --------------------------------------------------
    def producer(self) -> Producer:
        with self._lock:
            if self._closed:
                raise ClosedResourceError("kafka transport is closed")
            if self._producer is None:
                with map_kafka_errors("creating producer"):
                    producer = Producer(
                        {**self.settings.producer_config(), "logger": _client_logger()}
                    )
                self._producer = producer
                self._poll_thread = threading.Thread(
                    target=self._poll_producer,
                    args=(producer,),
                    name="kafka-producer-poll",
                    daemon=True,
                )
                self._poll_thread.start()
                self._lone = queue.SimpleQueue()
                self._flush_thread = threading.Thread(
                    target=self._send_lone_records,
                    args=(producer, self._lone),
                    name="kafka-producer-flush",
                    daemon=True,
                )
                self._flush_thread.start()
            return self._producer

    def existing_producer(self) -> Producer | None:
        """The producer if one was made (and not retired), else ``None``."""
        return self._producer

    def _poll_producer(self, producer: Producer) -> None:
        while not self._stop.is_set() and self._producer is producer:
            try:
                producer.poll(0.05)
            except KafkaException as exc:
                if not _is_fatal(exc):
                    log.warning("producer poll: %s", exc)
                self._retire_producer(producer, exc)
        if self._producer is not producer:
            # Retired: let it report its queued records (they fail now) so
            # no enqueue waits on a report that never comes.
            deadline = time.monotonic() + self.settings.options.close_timeout_s
            while len(producer) and time.monotonic() < deadline:
                with contextlib.suppress(KafkaException):
                    producer.poll(0.05)

    def _send_lone_records(
        self, producer: Producer, lone: queue.SimpleQueue[threading.Event]
    ) -> None:
        """Send a lone record at once: one produced while the producer held
        no other and records have been coming further apart than
        ``linger.ms`` (a moving average of the gaps).

        ``linger.ms`` (1 by default) lets records produced close together
        share a request, which enqueue throughput needs. When records come
        further apart than that, lingering batches nothing and only delays
        each one, and a request's round trip awaits several such writes one
        after the other (registration, enqueue, delivery count, response,
        collection). A flush makes librdkafka send what it holds without
        lingering: it runs, in growing steps (``_LONE_FLUSH_STEP_S``), until
        the record is reported (its report reaches its caller through the
        poll thread or this one) or its ``message.timeout.ms`` has passed.
        Under load (records closer together) nothing is flushed: a flush
        would keep the records produced meanwhile from sharing requests.
        """
        bound = self.settings.options.operation_timeout_s
        while not self._stop.is_set() and self._producer is producer:
            try:
                reported = lone.get(timeout=0.5)
            except queue.Empty:
                continue
            deadline = time.monotonic() + bound
            step = _LONE_FLUSH_STEP_S
            while (
                not reported.is_set()
                and not self._stop.is_set()
                and self._producer is producer
                and time.monotonic() < deadline
            ):
                try:
                    producer.flush(step)
                except KafkaException as exc:  # the poll thread reports and retires
                    log.debug("producer flush: %s", exc)
                    break
                step = min(step * 2, _LONE_FLUSH_MAX_STEP_S)

    def _retire_producer(self, producer: Producer, cause: BaseException | KafkaError) -> None:
        """Drop ``producer`` if it failed fatally (an idempotent producer
        whose id a broker no longer knows, e.g. one that lost its data):
        it can never produce again, so the next enqueue makes a new one."""
        if isinstance(cause, BaseException) and not _is_fatal(cause):
            return
        if isinstance(cause, KafkaError) and not cause.fatal():
            return
        with self._lock:
            if self._producer is producer:
                log.warning(
                    "the producer failed fatally (%s); the next enqueue makes a new one", cause
                )
                self._producer = None
                self._poll_thread = self._flush_thread = None
                self._lone.put(_WAKE)  # its flush thread ends

    def admin(self) -> AdminClient:
        with self._lock:
            if self._admin is None:
                with map_kafka_errors("creating admin client"):
                    conf: dict[str, Any] = {**self.settings.admin_config()}
                    conf["logger"] = _client_logger()
                    self._admin = AdminClient(conf)
            return self._admin

    def _meta_consumer(self) -> Consumer:
        with self._lock:
            if self._meta is None:
                with map_kafka_errors("creating metadata client"):
                    self._meta = Consumer(
                        {
                            **self.settings.consumer_config(
                                f"{self.settings.namespace}.metadata", subscribe=False
                            ),
                            "logger": _client_logger(),
                        }
                    )
            return self._meta

    def reader_config(self) -> dict[str, Any]:
        return self.settings.consumer_config(f"{self.settings.namespace}.reader", subscribe=False)

    # -- asyncio bridge ----------------------------------------------------------
    async def blocking(
        self, what: str, fn: Callable[..., T], *args: Any, limit: float | None = None
    ) -> T:
        """Run a blocking client call on the executor thread, bounded in time.

        Raises: TransientTransportError on timeout; mapped client errors.
        """
        if self._closed:
            raise ClosedResourceError("kafka transport is closed")
        loop = asyncio.get_running_loop()
        bound = (limit or self.timeout) + 5.0
        try:
            with map_kafka_errors(what):
                return await wait_within(loop.run_in_executor(self._executor, fn, *args), bound)
        except TransientTransportError as exc:
            raise _refused_login(exc, bound, self.settings.bootstrap) from exc

    async def produce(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: dict[str, bytes] | None = None,
        *,
        what: str = "produce",
        timestamp_ms: int | None = None,
    ) -> tuple[int, int]:
        """Produce one record and wait for its delivery report (acks=all).

        ``timestamp_ms`` sets the record's CreateTime (default: the client's
        clock when the record is produced).
        Returns (partition, offset). Raises: TransientTransportError (the
        record may or may not be stored), PermanentTransportError.
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[tuple[int, int]] = loop.create_future()
        reports = self._reports
        if reports is None or reports.loop is not loop:
            # librdkafka reports every record within message.timeout.ms;
            # this bound only guards against a report that never comes.
            reports = self._reports = _Reports(loop, self.timeout + 5.0)
        add = reports.add

        producer = self.producer()
        # A record the producer will hold alone, while records come further
        # apart than linger.ms, is flushed (see _send_lone_records); its
        # report ends that flush.
        lone = self._pace.lone(time.monotonic(), len(producer))
        reported = threading.Event() if lone else None

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            if reported is not None:
                reported.set()
            if err is not None and err.fatal():
                self._retire_producer(producer, err)
            add(future, err, msg, what)

        try:
            try:
                producer.produce(
                    topic,
                    value=value,
                    key=key,
                    headers=list(headers.items()) if headers else None,
                    on_delivery=on_delivery,
                    # 0 = librdkafka stamps the current time.
                    timestamp=timestamp_ms or 0,
                )
            except Exception as exc:
                self._retire_producer(producer, exc)
                with map_kafka_errors(what):  # re-raised as a transport error
                    raise
            reports.watch(future, what)
            if reported is not None:
                self._lone.put(reported)
            return await future
        except TransientTransportError:
            # The topic may have gone (deleted, or a broker that lost its
            # data): check it again, and create it if needed, next time.
            self._topics.discard(topic)
            raise

    def produce_nowait(self, topic: str, key: bytes | None, value: bytes | None) -> None:
        """Best-effort produce (housekeeping tombstones); errors are logged."""
        try:
            self.producer().produce(topic, value=value, key=key)
        except Exception as exc:
            log.debug("housekeeping produce to %s failed: %s", topic, exc)

    # -- admin -------------------------------------------------------------------
    def known(self, names: frozenset[str]) -> bool:
        """Whether every topic in ``names`` is known to exist."""
        return names <= self._topics

    async def ensure_topics(self, specs: Sequence[TopicSpec]) -> None:
        """Create the topics that do not exist yet (never relying on
        auto-create) and check the ones that already existed against their
        spec, once per transport (:func:`~transport_kafka._topics.check_topic`).
        Retries transient failures.

        Concurrent callers that find the same topics missing share one
        creation and check (a burst of 20,000 first enqueues on a new queue
        made 20,000 of them, and most timed out behind each other on the
        client's thread pool); a caller cancelled does not cancel it for
        the others.

        Raises: ConfigurationError naming an existing topic that would break a
        guarantee (checked again at the next call, so a fixed topic is used);
        TransientTransportError.
        """
        missing = [s for s in specs if s.name not in self._topics]
        if not missing:
            return
        names = frozenset(s.name for s in missing)
        await self._ensuring.run(names, lambda: self._create_or_check(missing))

    async def _create_or_check(self, missing: Sequence[TopicSpec]) -> None:
        found: dict[str, TopicState] = {}
        # All attempts together take at most the operation timeout: this is
        # the first broker call of most operations, and an unreachable
        # broker must fail them within that bound, not once per attempt.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        try:
            async with asyncio.timeout_at(deadline):
                async for attempt in AsyncRetrying(
                    retry=retry_if_exception_type(TransientTransportError),
                    stop=stop_after_attempt(4),
                    wait=wait_exponential(multiplier=0.2, max=2.0),
                    reraise=True,
                ):
                    with attempt:
                        # librdkafka looks for timed-out requests once a
                        # second: ask for one second less than what is left.
                        left = max(deadline - loop.time() - 1.0, 0.5)
                        found = await self.blocking(
                            "creating or checking topics",
                            self._create_topics,
                            missing,
                            left,
                            limit=left,
                        )
        except (TimeoutError, TransientTransportError) as exc:
            detail = f": {exc}" if isinstance(exc, TransientTransportError) else ""
            problem = _CLIENT_LOG.last_problem(within=self.timeout)
            if problem and not detail:
                detail = f"; the client last reported: {problem}"
            raise _refused_login(
                TransientTransportError(
                    f"Kafka at {self.settings.bootstrap} did not create or confirm the topics "
                    f"within {self.timeout:g} s{detail}"
                ),
                self.timeout,
                self.settings.bootstrap,
            ) from exc
        errors: list[str] = []
        for spec in missing:
            state = found.get(spec.name)
            if state is None:
                continue
            problems, notes = check_topic(spec, state)
            errors += problems
            for note in notes:
                if note not in self._warned:
                    self._warned.add(note)
                    log.warning("%s", note)
        if errors:
            raise ConfigurationError("; ".join(errors))
        self._topics.update(s.name for s in missing)

    def _create_topics(self, specs: Sequence[TopicSpec], limit: float) -> dict[str, TopicState]:
        """Create those of ``specs`` that do not exist; describe the others.
        Topics that exist are never sent to CreateTopics, so a principal
        without the right to create topics can use provisioned ones."""
        rf = self.settings.options.replication_factor
        admin = self.admin()
        present = set(admin.list_topics(timeout=limit).topics)
        existing = [s.name for s in specs if s.name in present]
        if existing and len(existing) < len(specs):
            # Check what exists before creating the rest: a topic that voids
            # a guarantee refuses the whole call, which must not leave the
            # others created (a queue half provisioned, then refused).
            described = describe_topics(admin, existing, limit)
            errors = [
                problem
                for spec in specs
                if spec.name in described
                for problem in check_topic(spec, described[spec.name])[0]
            ]
            if errors:
                raise ConfigurationError("; ".join(errors))
        specs = [s for s in specs if s.name not in present]
        if not specs:
            return describe_topics(admin, existing, limit)
        futures = admin.create_topics(
            [NewTopic(s.name, s.partitions, rf, config=s.config) for s in specs],
            operation_timeout=limit,
            request_timeout=limit,
        )
        for name, future in futures.items():
            try:
                future.result(limit)
            except KafkaException as exc:
                err = exc.args[0]
                if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    existing.append(name)
                    continue
                raise
        return describe_topics(admin, existing, limit) if existing else {}

    async def partitions(self, topic: str) -> list[int]:
        def run() -> list[int]:
            meta = self.admin().list_topics(topic, timeout=self.timeout).topics.get(topic)
            if meta is None or meta.error is not None:
                raise KafkaException(
                    meta.error if meta else KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)
                )
            return sorted(meta.partitions)

        return await self.blocking(f"metadata of {topic}", run)

    async def _shared_query(
        self, name: str, topic: str, partitions: Sequence[int], run: Callable[[list[int]], T]
    ) -> T:
        """``run(partitions)`` on the executor thread, started after this
        call began and shared by the callers that come while it runs
        (:class:`~transport.kit.SharedRun`): a burst of ``get`` calls on a
        keyed log costs one query, not one each in a queue on the executor
        (with 32 concurrent callers on Tansu that wait had grown to ~370 ms
        per call)."""
        key = (name, topic, tuple(partitions))
        shared = self._queries.get(key)
        if shared is None:
            wanted = list(key[2])

            async def query() -> T:
                return await self.blocking(f"{name} of {topic}", run, wanted)

            shared = self._queries[key] = SharedRun(query)
        result: T = await shared()
        return result

    async def watermarks(self, topic: str, partitions: Sequence[int]) -> dict[int, tuple[int, int]]:
        """Low and high watermarks, queried after this call began (shared
        among concurrent callers: :meth:`_shared_query`)."""

        def run(wanted: list[int]) -> dict[int, tuple[int, int]]:
            meta = self._meta_consumer()
            return {
                p: meta.get_watermark_offsets(
                    TopicPartition(topic, p), timeout=self.timeout, cached=False
                )
                for p in wanted
            }

        return await self._shared_query("watermarks", topic, partitions, run)

    async def high_watermarks(self, topic: str, partitions: Sequence[int]) -> dict[int, int]:
        """High watermarks only, queried after this call began: one
        ListOffsets request (``latest``), where :meth:`watermarks` sends
        two (the low watermark too). Shared among concurrent callers as
        :meth:`watermarks` is."""

        def run(wanted: list[int]) -> dict[int, int]:
            found = self._meta_consumer().offsets_for_times(
                [TopicPartition(topic, p, OFFSET_END) for p in wanted], timeout=self.timeout
            )
            marks: dict[int, int] = {}
            for tp in found:
                if tp.error is not None:
                    raise KafkaException(tp.error)
                marks[tp.partition] = max(tp.offset, 0)
            return marks

        return await self._shared_query("high watermarks", topic, partitions, run)

    async def committed(self, group: str, topic: str, partitions: Sequence[int]) -> dict[int, int]:
        """Committed offsets of ``group`` (``-1`` where none)."""

        def run() -> dict[int, int]:
            consumer = Consumer(
                {
                    **self.settings.consumer_config(group, subscribe=False),
                    "logger": _client_logger(),
                }
            )
            try:
                got = consumer.committed(
                    [TopicPartition(topic, p) for p in partitions], timeout=self.timeout
                )
                return {tp.partition: tp.offset for tp in got}
            finally:
                consumer.close()

        return await self.blocking(f"committed offsets of {group}", run)

    async def read_to_end(self, topic: str) -> list[RawRecord]:
        return await self.blocking(
            f"reading {topic}", read_to_end, self.reader_config(), topic, self.timeout
        )

    async def read_heads(
        self, topic: str, positions: Mapping[int, int], limit: int = 16
    ) -> dict[int, list[RawRecord]]:
        """:func:`read_heads` on the executor, bounded by the operation timeout.

        Raises: TransientTransportError on timeout; mapped client errors.
        """
        return await self.blocking(
            f"reading the head of {topic}",
            read_heads,
            self.reader_config(),
            topic,
            dict(positions),
            self.timeout,
            limit,
        )

    async def read_last(self, topic: str, starts: Mapping[int, int]) -> dict[int, RawRecord]:
        """:func:`read_last` on the executor, bounded by the operation timeout.

        Raises: TransientTransportError on timeout; mapped client errors.
        """
        return await self.blocking(
            f"reading the last record of {topic}",
            read_last,
            self.reader_config(),
            topic,
            dict(starts),
            self.timeout,
        )

    async def describe(self, topic: str) -> TopicState:
        """What the broker says about existing ``topic`` (its id, partitions,
        configuration): :func:`~transport_kafka._topics.describe_topics`.

        Raises: TransientTransportError, mapped client errors.
        """
        admin = self.admin()
        return (
            await self.blocking(
                f"describing {topic}", describe_topics, admin, [topic], self.timeout
            )
        )[topic]

    async def list_topics(self, limit: float) -> int:
        def run() -> int:
            return len(self.admin().list_topics(timeout=limit).topics)

        return await self.blocking(f"listing topics on {self.settings.bootstrap}", run, limit=limit)

    # -- shutdown ------------------------------------------------------------------
    async def aclose(self) -> None:
        if self._closed:
            return
        self._closed = True
        for shared in self._queries.values():
            await shared.aclose()
        close_timeout = self.settings.options.close_timeout_s
        loop = asyncio.get_running_loop()

        def shutdown() -> None:
            if self._producer is not None:
                left = self._producer.flush(close_timeout)
                if left:
                    log.warning("%d records not delivered at close", left)
            self._stop.set()
            self._lone.put(_WAKE)  # the flush thread sees the stop at once
            if self._poll_thread is not None:
                self._poll_thread.join(close_timeout)
            if self._flush_thread is not None:
                self._flush_thread.join(close_timeout)
            if self._meta is not None:
                self._meta.close()

        try:
            await wait_within(loop.run_in_executor(self._executor, shutdown), close_timeout + 5)
        except Exception as exc:  # shutdown is best effort and bounded
            log.warning("kafka client shutdown: %s", exc)
        self._executor.shutdown(wait=False, cancel_futures=True)


class ConsumerThread:
    """A thread that owns one consumer: it alone calls the client.

    ``step`` is called by the thread in a loop (it polls); ``submit`` runs a
    closure on the thread between steps and returns an awaitable result.
    """

    def __init__(self, name: str, step: Callable[[], None], finish: Callable[[], None]) -> None:
        self._step = step
        self._finish = finish
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], concurrent.futures.Future[Any]]] = (
            queue.SimpleQueue()
        )
        self._posted: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.done = concurrent.futures.Future[None]()
        #: Why the thread ended, if a step raised (read without a lock).
        self.failed: BaseException | None = None

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def submit(self, fn: Callable[[], T]) -> asyncio.Future[T]:
        future: concurrent.futures.Future[T] = concurrent.futures.Future()
        self._calls.put((fn, future))
        return asyncio.wrap_future(future)

    def post(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the thread as soon as it can: between steps, or
        inside one by :meth:`run_posted`; its outcome is its own business
        (it must not raise)."""
        self._posted.put(fn)

    def run_posted(self) -> None:
        """Run the calls :meth:`post` queued (on the thread; a step calls
        it as soon as its blocking wait returns, so a posted call waits for
        no work the step does afterwards)."""
        while True:
            try:
                fn = self._posted.get_nowait()
            except queue.Empty:
                return
            try:
                fn()
            except BaseException:
                log.exception("consumer thread %s: posted call failed", self._thread.name)

    def run_calls(self) -> None:
        self.run_posted()
        while True:
            try:
                fn, future = self._calls.get_nowait()
            except queue.Empty:
                return
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                self.run_calls()
                self._step()
        except BaseException as exc:
            self.failed = exc
            log.exception("consumer thread %s failed", self._thread.name)
            with contextlib.suppress(BaseException):
                self._finish()
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                self.done.set_exception(exc)
            return
        try:
            self._finish()
        finally:
            self.run_calls()
            with contextlib.suppress(concurrent.futures.InvalidStateError):
                self.done.set_result(None)

    def stop(self) -> None:
        self._stop.set()

    async def join(self, limit: float) -> None:
        self.stop()
        # Shielded: a join cancelled (a close cancelled at the loop's end)
        # must not cancel ``done``, which the thread completes when it ends
        # (it raised InvalidStateError in the thread, collected by pytest).
        with contextlib.suppress(Exception):
            await wait_within(asyncio.shield(asyncio.wrap_future(self.done)), limit)

    def join_now(self, limit: float) -> None:
        """Stop and wait up to ``limit`` seconds, blocking (no event loop)."""
        self.stop()
        self._thread.join(max(0.0, limit))


class KafkaContext:
    """What the children of one transport (queue handles and their engines,
    group members, registries, event logs, the doctor) share: the settings,
    the clients, the payload limit, whether queues are ordered, and the
    engine registry. Built once by the transport; children keep it and never
    see the transport.

    ``engines`` is the class of the engine registry (it is defined with the
    engines, which are built from this context)."""

    __slots__ = ("clients", "engines", "max_payload_bytes", "ordered", "request_codec", "settings")

    def __init__(
        self,
        settings: KafkaSettings,
        clients: KafkaClients,
        *,
        max_payload_bytes: int,
        ordered: bool,
        engines: Callable[[KafkaContext], Engines],
        request_codec: RequestCodec | None = None,
    ) -> None:
        self.settings = settings
        self.clients = clients
        self.max_payload_bytes = max_payload_bytes
        #: The request dialect of this transport's queues
        #: (``TransportConfig.request_codec``; None: the library's own).
        self.request_codec = request_codec
        #: One partition per request topic: FIFO is promised (a capability flag).
        self.ordered = ordered
        self.engines: Engines = engines(self)
