"""``read_to_end`` (registry rebuilds, state replay) returns every record
written before it started, including the tail of a multi-record batch.

Tansu reports the high watermark after a batch of several records as the
batch's base offset + 1; a reader that stopped at that watermark missed the
rest of the batch (a delivery-count marker written in the same batch as a
tombstone was lost on replay this way)."""

from __future__ import annotations

import uuid

from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, NewTopic

from transport_kafka._client import read_to_end


def test_the_whole_last_batch_is_read(kafka_bootstrap: str) -> None:
    topic = f"rte-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for future in admin.create_topics([NewTopic(topic, 1, 1)]).values():
        future.result(30)
    producer = Producer({"bootstrap.servers": kafka_bootstrap, "linger.ms": 50, "acks": "all"})
    producer.produce(topic, key=b"single", value=b"0")
    producer.flush(30)
    for i in range(1, 6):  # one batch: linger holds them together
        producer.produce(topic, key=b"k%d" % i, value=b"%d" % i)
    assert producer.flush(30) == 0
    conf = {
        "bootstrap.servers": kafka_bootstrap,
        "group.id": f"rte-{uuid.uuid4().hex[:8]}",
        "enable.auto.commit": False,
        "enable.partition.eof": True,
    }
    records = read_to_end(conf, topic, 30.0)
    assert [r.value for r in records] == [b"%d" % i for i in range(6)]
