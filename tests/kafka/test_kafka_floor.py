"""The Kafka batch floor of ``python -m benchmarks.floors --kafka`` on the
session's broker, at a tiny size: it makes the durable steps it claims (a
delivery-count record per batch, written before the batch is decoded, and a
commit covering every record) and runs to the end. Not a timed assertion."""

from __future__ import annotations

import json
import uuid

import pytest
from confluent_kafka import Consumer, TopicPartition

from benchmarks import floors, kafka

pytestmark = [pytest.mark.timeout(120)]


def _read_all(bootstrap: str, topic: str) -> list[bytes]:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"r{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    end = consumer.get_watermark_offsets(TopicPartition(topic, 0), timeout=10)[1]
    consumer.assign([TopicPartition(topic, 0, 0)])
    values: list[bytes] = []
    try:
        while len(values) < end:
            msg = consumer.poll(10)
            assert msg is not None, f"{topic}: {len(values)} of {end} records read"
            if not msg.error():
                values.append(msg.value())
    finally:
        consumer.close()
    return values


def test_the_batch_floor_counts_each_batch_and_commits_every_record(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = f"floor{uuid.uuid4().hex[:8]}"
    kafka._create_topic(kafka_bootstrap, topic)
    kafka._produce_many(kafka_bootstrap, topic, 1199, 256)  # plus its warm-up record
    groups: list[str] = []
    states: list[str] = []
    make_consumer, make_topic = kafka._consumer, kafka._create_topic

    def consumer(bootstrap: str, group: str) -> Consumer:
        groups.append(group)
        return make_consumer(bootstrap, group)

    def create_topic(bootstrap: str, name: str) -> None:
        states.append(name)
        make_topic(bootstrap, name)

    monkeypatch.setattr(kafka, "_consumer", consumer)
    monkeypatch.setattr(kafka, "_create_topic", create_topic)
    assert floors.kafka_batch_floor(kafka_bootstrap, topic, 1200) > 0
    [group], [state] = groups, states
    checker = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": group})
    try:
        [committed] = checker.committed([TopicPartition(topic, 0)], timeout=10)
    finally:
        checker.close()
    assert committed.offset == 1200  # every record acked, durably
    rounds = [json.loads(v) for v in _read_all(kafka_bootstrap, state)[1:]]  # after the warm-up
    counted = [offset for batch in rounds for _, offset, _ in batch]
    assert counted == list(range(1200)), "each record counted once, in order"
    assert 3 <= len(rounds) <= 1200  # batches of at most 500


async def test_the_floor_row_runs_beside_ours_and_raw(kafka_bootstrap: str) -> None:
    name, target, base, floor, ours = floors._kafka_case(kafka_bootstrap, 600)
    assert name == f"kafka poll_many({kafka.BATCH})+ack_many" and target == 0.5
    for measure in (base, floor, ours):
        assert await measure() > 0
