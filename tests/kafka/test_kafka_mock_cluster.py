"""``enqueue`` against librdkafka's built-in mock cluster (no Tansu), with
injected produce errors, a slow broker and a broker outage.

confluent-kafka's Python API does not wrap librdkafka's mock-cluster
functions (``rd_kafka_mock_*``), but the wheel ships the librdkafka they live
in: :class:`MockCluster` calls them through ``ctypes``. The cluster listens
on loopback ports and the transport connects to it like to any broker.

The mock cluster has no CreateTopics API, so the tests create the queue's
topics with ``rd_kafka_mock_topic_create`` and tell the transport's client
cache that they exist: what runs is the produce path of ``enqueue``.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import confluent_kafka
import pytest
from confluent_kafka import Consumer, KafkaError, TopicPartition

from transport import WorkRequest, connect, decode
from transport.errors import PermanentTransportError, TransientTransportError
from transport_kafka import KafkaRequestQueue, KafkaTransport

from .conftest import kafka_config

pytestmark = [pytest.mark.asyncio]

_PRODUCE = 0  # Kafka API key of Produce requests


def _librdkafka() -> ctypes.CDLL | None:
    package = Path(confluent_kafka.__file__).parent
    candidates = [
        *sorted(package.parent.glob("confluent_kafka.libs/librdkafka*")),  # Linux wheels
        *sorted(package.glob(".dylibs/librdkafka*")),  # macOS wheels
    ]
    found = ctypes.util.find_library("rdkafka")  # a build against a system librdkafka
    if found:
        candidates.append(Path(found))
    for path in candidates:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:
            continue
        if hasattr(lib, "rd_kafka_mock_cluster_new"):
            return lib
    return None


class MockCluster:
    """A librdkafka mock cluster of ``brokers`` brokers (ids 1..n), owned by a
    bare librdkafka handle made for it."""

    def __init__(self, lib: ctypes.CDLL, brokers: int = 1) -> None:
        self._lib = lib
        lib.rd_kafka_conf_new.restype = ctypes.c_void_p
        lib.rd_kafka_new.restype = ctypes.c_void_p
        lib.rd_kafka_new.argtypes = [
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_size_t,
        ]
        lib.rd_kafka_destroy.argtypes = [ctypes.c_void_p]
        lib.rd_kafka_mock_cluster_new.restype = ctypes.c_void_p
        lib.rd_kafka_mock_cluster_new.argtypes = [ctypes.c_void_p, ctypes.c_int]
        lib.rd_kafka_mock_cluster_destroy.argtypes = [ctypes.c_void_p]
        lib.rd_kafka_mock_cluster_bootstraps.restype = ctypes.c_char_p
        lib.rd_kafka_mock_cluster_bootstraps.argtypes = [ctypes.c_void_p]
        lib.rd_kafka_mock_push_request_errors_array.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int16,
            ctypes.c_size_t,
            ctypes.POINTER(ctypes.c_int),
        ]
        lib.rd_kafka_mock_broker_set_down.argtypes = [ctypes.c_void_p, ctypes.c_int32]
        lib.rd_kafka_mock_broker_set_up.argtypes = [ctypes.c_void_p, ctypes.c_int32]
        # Variadic: the fixed arguments typed, then (error, rtt_ms) int pairs.
        lib.rd_kafka_mock_broker_push_request_error_rtts.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int32,
            ctypes.c_int16,
            ctypes.c_size_t,
        ]
        lib.rd_kafka_mock_topic_create.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_int,
        ]
        lib.rd_kafka_mock_start_request_tracking.argtypes = [ctypes.c_void_p]
        lib.rd_kafka_mock_clear_requests.argtypes = [ctypes.c_void_p]
        lib.rd_kafka_mock_get_requests.restype = ctypes.POINTER(ctypes.c_void_p)
        lib.rd_kafka_mock_get_requests.argtypes = [
            ctypes.c_void_p,
            ctypes.POINTER(ctypes.c_size_t),
        ]
        lib.rd_kafka_mock_request_api_key.restype = ctypes.c_int16
        lib.rd_kafka_mock_request_api_key.argtypes = [ctypes.c_void_p]
        lib.rd_kafka_mock_request_destroy_array.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_size_t,
        ]
        errstr = ctypes.create_string_buffer(512)
        # A producer handle (type 0) that never produces: it only owns the cluster.
        self._rk = lib.rd_kafka_new(0, lib.rd_kafka_conf_new(), errstr, len(errstr))
        if not self._rk:
            raise RuntimeError(f"rd_kafka_new failed: {errstr.value.decode()}")
        self._cluster = lib.rd_kafka_mock_cluster_new(self._rk, brokers)
        if not self._cluster:
            lib.rd_kafka_destroy(self._rk)
            raise RuntimeError("rd_kafka_mock_cluster_new failed")
        self.bootstrap: str = lib.rd_kafka_mock_cluster_bootstraps(self._cluster).decode()
        lib.rd_kafka_mock_start_request_tracking(self._cluster)

    def requests(self, api_key: int) -> int:
        """Requests of ``api_key`` received since the last :meth:`clear_requests`."""
        count = ctypes.c_size_t()
        array = self._lib.rd_kafka_mock_get_requests(self._cluster, ctypes.byref(count))
        try:
            return sum(
                1
                for i in range(count.value)
                if self._lib.rd_kafka_mock_request_api_key(array[i]) == api_key
            )
        finally:
            if count.value:
                self._lib.rd_kafka_mock_request_destroy_array(array, count.value)

    def clear_requests(self) -> None:
        self._lib.rd_kafka_mock_clear_requests(self._cluster)

    def create_topic(self, name: str, partitions: int = 1) -> None:
        self._check(
            "topic_create",
            self._lib.rd_kafka_mock_topic_create(self._cluster, name.encode(), partitions, 1),
        )

    def push_request_errors(self, api_key: int, *codes: int) -> None:
        """The next ``len(codes)`` requests of ``api_key`` fail with these codes."""
        array = (ctypes.c_int * len(codes))(*codes)
        self._lib.rd_kafka_mock_push_request_errors_array(self._cluster, api_key, len(codes), array)

    def delay_next(self, broker_id: int, api_key: int, rtt_ms: int) -> None:
        """Broker ``broker_id`` answers its next ``api_key`` request after ``rtt_ms``."""
        self._check(
            "push_request_error_rtts",
            self._lib.rd_kafka_mock_broker_push_request_error_rtts(
                self._cluster, broker_id, api_key, 1, ctypes.c_int(0), ctypes.c_int(rtt_ms)
            ),
        )

    def set_down(self, broker_id: int) -> None:
        self._check("set_down", self._lib.rd_kafka_mock_broker_set_down(self._cluster, broker_id))

    def set_up(self, broker_id: int) -> None:
        self._check("set_up", self._lib.rd_kafka_mock_broker_set_up(self._cluster, broker_id))

    @staticmethod
    def _check(what: str, err: int) -> None:
        if err:
            raise RuntimeError(f"rd_kafka_mock_{what} failed: error {err}")

    def close(self) -> None:
        self._lib.rd_kafka_mock_cluster_destroy(self._cluster)
        self._lib.rd_kafka_destroy(self._rk)


@pytest.fixture
def mock_cluster() -> Iterator[MockCluster]:
    lib = _librdkafka()
    if lib is None:
        pytest.skip("no librdkafka with the mock-cluster API found next to confluent-kafka")
    cluster = MockCluster(lib)
    try:
        yield cluster
    finally:
        cluster.close()


def _read_topic(bootstrap: str, topic: str) -> list[Any]:
    """Every record of partition 0 of ``topic``, with a plain consumer."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": "raw-reader", "enable.auto.commit": False}
    )
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        _, high = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)
        records: list[Any] = []
        deadline = time.monotonic() + 10
        while len(records) < high and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                records.append(msg)
        assert len(records) == high
        return records
    finally:
        consumer.close()


async def _open_queue(
    cluster: MockCluster, **options: Any
) -> tuple[KafkaTransport, KafkaRequestQueue]:
    config = kafka_config(cluster.bootstrap, f"m{uuid.uuid4().hex[:8]}", options=options)
    transport = await connect(config)
    assert isinstance(transport, KafkaTransport)
    queue = transport.request_queue("orders")
    assert isinstance(queue, KafkaRequestQueue)
    for spec in queue._engine.topic_specs():
        cluster.create_topic(spec.name, spec.partitions)
        transport.clients._topics.add(spec.name)
    return transport, queue


async def test_enqueue_returns_after_the_delivery_report_of_a_slow_broker(
    mock_cluster: MockCluster,
) -> None:
    transport, queue = await _open_queue(mock_cluster)
    try:
        await queue.enqueue(WorkRequest(task="warm-up"))  # the producer id is held now
        mock_cluster.delay_next(1, _PRODUCE, 1500)  # the next Produce is answered in 1.5 s
        started = time.monotonic()
        sent = await queue.enqueue(WorkRequest(task="t", payload=1, ordering_key="k1"))
        assert time.monotonic() - started >= 1.4  # it waited for the broker's answer
        # Stored by the time enqueue returned (a fresh consumer reads it back).
        records = _read_topic(mock_cluster.bootstrap, queue.topics.requests)
        assert len(records) == 2
        assert decode(WorkRequest, records[1].value()).request_id == sent.request_id
        assert records[1].key() == b"k1"
    finally:
        await transport.aclose()


async def test_enqueue_waits_through_retried_produce_errors_and_stores_once(
    mock_cluster: MockCluster,
) -> None:
    transport, queue = await _open_queue(mock_cluster)
    try:
        await queue.enqueue(WorkRequest(task="warm-up"))
        mock_cluster.clear_requests()
        # The next two Produce requests fail with a retriable error.
        mock_cluster.push_request_errors(
            _PRODUCE, KafkaError.NOT_ENOUGH_REPLICAS, KafkaError.NOT_ENOUGH_REPLICAS
        )
        sent = await queue.enqueue(WorkRequest(task="t", payload=2))
        assert mock_cluster.requests(_PRODUCE) == 3  # two refused, the third stored
        records = _read_topic(mock_cluster.bootstrap, queue.topics.requests)
        assert [decode(WorkRequest, r.value()).task for r in records] == ["warm-up", "t"]
        assert decode(WorkRequest, records[1].value()).request_id == sent.request_id
    finally:
        await transport.aclose()


async def test_a_rejected_produce_fails_enqueue_permanently(mock_cluster: MockCluster) -> None:
    transport, queue = await _open_queue(mock_cluster)
    try:
        await queue.enqueue(WorkRequest(task="warm-up"))
        mock_cluster.push_request_errors(_PRODUCE, KafkaError.TOPIC_AUTHORIZATION_FAILED)
        with pytest.raises(PermanentTransportError, match="TOPIC_AUTHORIZATION_FAILED"):
            await queue.enqueue(WorkRequest(task="t"))
        assert len(_read_topic(mock_cluster.bootstrap, queue.topics.requests)) == 1
    finally:
        await transport.aclose()


async def test_a_broker_outage_fails_enqueue_transiently(
    mock_cluster: MockCluster,
) -> None:
    # Recovery after the outage (the client creates its topics again, which
    # the mock cluster cannot do) is proven on a real broker process killed
    # and restarted: test_kafka_outage.py.
    transport, queue = await _open_queue(mock_cluster, operation_timeout_s=3.0)
    try:
        await queue.enqueue(WorkRequest(task="warm-up"))
        mock_cluster.set_down(1)
        with pytest.raises(TransientTransportError):
            await queue.enqueue(WorkRequest(task="t", payload="during the outage"))
    finally:
        mock_cluster.set_up(1)
        await transport.aclose()
