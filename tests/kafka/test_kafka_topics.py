"""Topics the library did not create, and collision-free topic names.

Topics are pre-created with a raw AdminClient (as an operator or broker
auto-creation would) before the library first uses them; the library must
refuse those that would break a guarantee and warn about harmless
differences. Names: Kafka refuses a topic whose name equals an existing one
once ``.`` and ``_`` are read as one character; distinct queues, registries
and streams must never map to such a pair.
"""

from __future__ import annotations

import logging
import re
import uuid
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient
from confluent_kafka.cimpl import NewTopic
from hypothesis import given, settings
from hypothesis import strategies as st

from transport import WorkRequest, connect
from transport.errors import ConfigurationError, InvalidNameError, TransientTransportError
from transport_kafka import KafkaTransport
from transport_kafka._config import KafkaOptions, KafkaSettings
from transport_kafka._topics import MAX_TOPIC_LENGTH, TopicSpec, TopicState, check_topic, topic_name

# -- naming (no broker) ---------------------------------------------------------


def _settings(namespace: str) -> KafkaSettings:
    return KafkaSettings("127.0.0.1:9092", namespace, "workers", KafkaOptions())


def _collision_key(topic: str) -> str:
    """What Kafka compares when it checks a new topic name for collisions."""
    return topic.replace(".", "_")


def _topics_of(target: tuple[str, str, str]) -> list[str]:
    """Every topic of one (namespace, kind, name)."""
    namespace, kind, name = target
    s = _settings(namespace)
    if kind == "queue":
        t = s.queue_topics(name)
        return [t.requests, t.state, t.dlq]
    if kind == "stream":
        return [s.stream_topic(name)]
    return [s.registry_topic(kind, name), s.registry_checkpoint_topic(kind, name)]


def _read_back(topic: str) -> tuple[str, str, str, str]:
    """(namespace, kind, name, suffix) recovered from a topic's collision key
    alone, i.e. knowing neither which ``_`` was a ``.`` nor the target: a run
    of ``_`` of odd length ends a part (its last ``_`` was the separator),
    one of even length holds half as many ``_`` of the part. If every topic
    reads back to its own target, distinct targets cannot share a key."""
    parts, current = [], ""
    for piece in re.split(r"(_+)", _collision_key(topic)):
        if not piece.startswith("_"):
            current += piece
            continue
        current += "_" * (len(piece) // 2)
        if len(piece) % 2:
            parts.append(current)
            current = ""
    parts.append(current)
    if len(parts) == 3:
        return parts[0], "queue", parts[1], parts[2]
    if len(parts) == 5:
        assert parts[1] == "registry" and parts[4] == "checkpoint", parts
        return parts[0], parts[2], parts[3], "checkpoint"
    assert len(parts) == 4, parts
    if parts[1] == "registry":
        return parts[0], parts[2], parts[3], ""
    assert parts[1] == "stream" and parts[3] == "events", parts
    return parts[0], "stream", parts[2], "events"


_name = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_-]{0,20}", fullmatch=True).filter(
    lambda n: "__" not in n
)
_queue_name = st.one_of(
    _name, st.builds(lambda n, level: f"{n}__p{level}", _name, st.integers(0, 9))
)


@settings(max_examples=300, deadline=None)
@given(
    namespace=_name,
    queue=_queue_name,
    name=_name,
    kind=st.sampled_from(["delivery", "capability"]),
)
def test_every_topic_reads_back_to_its_target_when_dots_and_underscores_are_alike(
    namespace: str, queue: str, name: str, kind: str
) -> None:
    s = _settings(namespace)
    topics = s.queue_topics(queue)
    assert _read_back(topics.requests) == (namespace, "queue", queue, "requests")
    assert _read_back(topics.state) == (namespace, "queue", queue, "state")
    assert _read_back(topics.dlq) == (namespace, "queue", queue, "dlq")
    assert _read_back(s.registry_topic(kind, name)) == (namespace, kind, name, "")
    assert _read_back(s.registry_checkpoint_topic(kind, name)) == (
        namespace,
        kind,
        name,
        "checkpoint",
    )
    assert _read_back(s.stream_topic(name)) == (namespace, "stream", name, "events")


@pytest.mark.parametrize(
    ("first", "second"),
    [
        # a namespace with '_' against a queue name with '_'
        (("acme", "queue", "eu_orders"), ("acme_eu", "queue", "orders")),
        # a queue named like a registry topic against a registry named like a suffix
        (("acme", "queue", "registry_delivery_inbox"), ("acme", "delivery", "inbox_requests")),
        # a queue in a namespace ending in a registry word against a registry
        (("acme_registry", "queue", "delivery"), ("acme", "delivery", "requests")),
        # a registry named like another registry's checkpoint topic
        (("acme", "delivery", "inbox_checkpoint"), ("acme", "delivery", "inbox")),
        # a queue named like a checkpoint topic's parts
        (("acme", "queue", "registry_delivery_inbox_checkpoint"), ("acme", "delivery", "inbox")),
    ],
)
def test_formerly_colliding_names_map_to_distinct_topics(
    first: tuple[str, str, str], second: tuple[str, str, str]
) -> None:
    keys = {_collision_key(t) for t in _topics_of(first)}
    assert not keys & {_collision_key(t) for t in _topics_of(second)}


def test_topic_names_double_underscores_and_keep_other_names() -> None:
    s = _settings("prod")
    assert s.queue_topics("orders").requests == "prod.orders.requests"
    assert s.registry_topic("delivery", "inbox-1") == "prod.registry.delivery.inbox-1"
    assert (
        s.registry_checkpoint_topic("delivery", "in_box")
        == "prod.registry.delivery.in__box.checkpoint"
    )
    assert s.stream_topic("audit") == "prod.stream.audit.events"
    assert s.queue_topics("eu_orders").requests == "prod.eu__orders.requests"
    assert s.queue_topics("orders__p0").state == "prod.orders____p0.state"
    assert s.queue_topics("eu_orders").group == "prod.workers.eu_orders"


def test_a_topic_name_longer_than_kafka_allows_is_refused() -> None:
    long_name = "_".join(["ab"] * 33)  # 98 characters, 32 of them '_'
    assert len(topic_name("ns", long_name, "requests")) <= MAX_TOPIC_LENGTH
    with pytest.raises(InvalidNameError, match="longer than 249"):
        _settings("n_" * 40 + "n").queue_topics(long_name)


# -- existing topics on the broker ----------------------------------------------


def _uid() -> str:
    return f"k{uuid.uuid4().hex[:10]}"


def _precreate(
    bootstrap: str, topic: str, partitions: int, config: dict[str, str] | None = None
) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(topic, partitions, 1, config=config or {})])
    for future in futures.values():
        future.result(10)


async def _kafka(kafka_config_factory: Any, **options: Any) -> KafkaTransport:
    transport = await connect(kafka_config_factory(options=options))
    assert isinstance(transport, KafkaTransport)
    return transport


async def test_a_multi_partition_request_topic_is_refused_where_the_queue_is_ordered(
    kafka_bootstrap: str, kafka_config_factory: Any
) -> None:
    transport = await _kafka(kafka_config_factory)
    try:
        name = _uid()
        topic = transport.settings.queue_topics(name).requests
        _precreate(kafka_bootstrap, topic, 4)
        queue = transport.request_queue(name)
        assert transport.capabilities.ordered
        with pytest.raises(ConfigurationError) as caught:
            await queue.enqueue(WorkRequest(task="t"))
        message = str(caught.value)
        assert repr(topic) in message and "4 partitions" in message, message
        assert "ordered=True" in message and "delete the topic" in message, message
        # Refused again, not cached as checked.
        with pytest.raises(ConfigurationError):
            await queue.stats()
    finally:
        await transport.aclose()
    # Accepted by a transport that does not promise order (partitions=4).
    transport = await _kafka(kafka_config_factory, partitions=4)
    try:
        queue = transport.request_queue(name)
        assert not transport.capabilities.ordered
        await queue.enqueue(WorkRequest(task="t"))
        assert (await queue.stats()).depth == 1
    finally:
        await transport.aclose()


async def test_a_compacted_request_topic_is_refused(
    kafka_bootstrap: str, kafka_config_factory: Any
) -> None:
    transport = await _kafka(kafka_config_factory)
    try:
        name = _uid()
        topic = transport.settings.queue_topics(name).requests
        _precreate(kafka_bootstrap, topic, 1, {"cleanup.policy": "compact"})
        with pytest.raises(ConfigurationError) as caught:
            await transport.request_queue(name).enqueue(WorkRequest(task="t"))
        message = str(caught.value)
        assert repr(topic) in message and "cleanup.policy=compact" in message, message
        assert "cleanup.policy=delete" in message, message
    finally:
        await transport.aclose()


async def test_a_registry_topic_without_compaction_is_refused(
    kafka_bootstrap: str, kafka_config_factory: Any
) -> None:
    transport = await _kafka(kafka_config_factory)
    try:
        name = _uid()
        topic = transport.settings.registry_topic("delivery", name)
        _precreate(kafka_bootstrap, topic, 1)  # the broker's default policy: delete
        registry = transport.delivery_registry(name)
        with pytest.raises(ConfigurationError) as caught:
            await registry.register("r-1")
        message = str(caught.value)
        assert repr(topic) in message and "cleanup.policy=delete" in message, message
        assert "set cleanup.policy=compact" in message, message
    finally:
        await transport.aclose()


async def test_a_multi_partition_stream_topic_is_refused(
    kafka_bootstrap: str, kafka_config_factory: Any
) -> None:
    transport = await _kafka(kafka_config_factory)
    try:
        stream = _uid()
        topic = transport.settings.stream_topic(stream)
        _precreate(kafka_bootstrap, topic, 2)
        with pytest.raises(ConfigurationError) as caught:
            await transport.event_log().append(stream, {"n": 1})
        message = str(caught.value)
        assert repr(topic) in message and "2 partitions" in message, message
    finally:
        await transport.aclose()


async def test_extra_partitions_of_a_state_topic_only_warn_once(
    kafka_bootstrap: str, kafka_config_factory: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="transport.kafka")
    transport = await _kafka(kafka_config_factory)
    try:
        name = _uid()
        topic = transport.settings.queue_topics(name).state
        _precreate(kafka_bootstrap, topic, 3, {"cleanup.policy": "compact"})
        queue = transport.request_queue(name)
        await queue.enqueue(WorkRequest(task="t"))
        delivery = await queue.poll(timeout=30)
        assert delivery is not None, "no delivery within 30 s from the queue"
        await delivery.ack()
        second = transport.request_queue(name)  # another handle: no new check
        assert (await second.stats()).depth == 0
        warnings = [r.getMessage() for r in caplog.records if topic in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert "3 partitions" in warnings[0] and "used as is" in warnings[0]
    finally:
        await transport.aclose()


async def test_names_that_collided_before_are_two_working_queues(
    kafka_config_factory: Any,
) -> None:
    base = _uid()
    a = await connect(kafka_config_factory(namespace=base))
    b = await connect(kafka_config_factory(namespace=f"{base}_eu"))
    assert isinstance(a, KafkaTransport) and isinstance(b, KafkaTransport)
    try:
        first, second = a.request_queue("eu_orders"), b.request_queue("orders")
        topics = a.settings.queue_topics("eu_orders"), b.settings.queue_topics("orders")
        assert _collision_key(topics[0].requests) != _collision_key(topics[1].requests)
        await first.enqueue(WorkRequest(task="first"))
        await second.enqueue(WorkRequest(task="second"))
        await second.enqueue(WorkRequest(task="second"))
        assert (await first.stats()).depth == 1
        assert (await second.stats()).depth == 2
        # A queue named like a registry topic and a registry named like a suffix.
        queue = a.request_queue(f"registry_delivery_{base}")
        registry = a.delivery_registry(f"{base}_requests")
        assert _collision_key(a.settings.queue_topics(queue.name).requests) != _collision_key(
            a.settings.registry_topic("delivery", f"{base}_requests")
        )
        await queue.enqueue(WorkRequest(task="queued"))
        await registry.register("r-1")
        assert [p.request_id for p in await registry.pending()] == ["r-1"]
        assert (await queue.stats()).depth == 1
    finally:
        await a.aclose()
        await b.aclose()


def test_a_request_topic_with_fewer_partitions_than_the_default_is_used_and_says_how_to_grow() -> (
    None
):
    # A queue created with one partition (the default of earlier releases)
    # keeps working after an upgrade; the warning names the command that
    # lets more processes share it, and what it costs.
    spec = TopicSpec("ns.q.requests", 4, {"cleanup.policy": "delete"}, what="requests of 'q'")
    errors, warnings = check_topic(spec, TopicState(1, frozenset({"delete"}), retention_ms=-1))
    assert errors == []
    [warning] = warnings
    assert "has 1 partitions where the library would create 4; it is used as is" in warning
    assert "kafka-topics --alter --topic ns.q.requests --partitions 4" in warning
    assert "ordering key" in warning


async def test_the_producer_never_creates_a_topic_with_the_broker_defaults(
    kafka_bootstrap: str, kafka_config_factory: Any
) -> None:
    """A record produced to a topic that does not exist (deleted under a
    running client, or a broker that lost its data) must not make the broker
    create it with its own defaults (partitions, ``retention.ms`` of 7 days on
    a request topic): the library creates its topics itself, with their
    settings. With librdkafka's default ``allow.auto.create.topics=true`` on
    the producer, Tansu created such a topic on the producer's metadata
    request, and the queue then refused it (4 partitions for an ordered
    queue)."""
    transport = await _kafka(kafka_config_factory, operation_timeout_s=2.0)
    topic = f"{transport.settings.namespace}.{_uid()}.requests"
    try:
        with pytest.raises(TransientTransportError):
            await transport.clients.produce(topic, None, b"{}", what="produce")
    finally:
        await transport.aclose()
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    assert topic not in admin.list_topics(timeout=10).topics
