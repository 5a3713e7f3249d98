"""Clients this library does not use, on the topics docs/wire.md names:
aiokafka and ``kcat`` produce a request to ``NS.Q.requests`` (key = request
id), an ``Ensemble`` on ``kafka://`` answers it, and the same client reads
the completed ``DeliveryRecord`` from the registry's compacted topic and the
ensemble's ``Capability`` record from the capability registry's.

``kcat`` is Debian's package (``.ci/run`` installs it where ``apt-get``
works); without it the kcat test is skipped. Debian 12's kcat 1.7.1 is built
on librdkafka 2.0.2, which cannot parse the ApiVersions v3 response of the
dev broker (Tansu sends the KIP-482 tagged fields 0-3, including
``FinalizedFeaturesEpoch = -1``; librdkafka 2.0.2 stops with "Read underflow"
at the fourth tag); there the test runs the same kcat binary on the
librdkafka of the confluent-kafka wheel (a newer build of the same C
library, put first on ``LD_LIBRARY_PATH``), and says so in its output.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from tests._interop import (
    ENSEMBLE,
    PLAN,
    REPLY_TO,
    TASK,
    check_capability,
    check_completed,
    foreign_payload,
    foreign_request,
    foreign_request_id,
    kitchen,
)
from transport import connect

pytestmark = pytest.mark.broker

#: Bound of every wait on the broker (a consumer group join alone takes ~3 s
#: on Tansu, and the machine is shared).
WAIT_S = 60.0


def _topic(*parts: str) -> str:
    """A topic name as docs/wire.md builds it: parts joined with ``.``, every
    ``_`` of a name written twice."""
    return ".".join(part.replace("_", "__") for part in parts)


@dataclass
class _Topics:
    namespace: str
    requests: str = field(init=False)
    registry: str = field(init=False)
    capabilities: str = field(init=False)

    def __post_init__(self) -> None:
        self.requests = _topic(self.namespace, ENSEMBLE) + ".requests"
        self.registry = _topic(self.namespace, "registry", "delivery", REPLY_TO)
        self.capabilities = _topic(self.namespace, "registry", "capability", "capabilities")


def _namespace() -> str:
    # An underscore of its own, so the foreign side must double it too.
    return f"ix_{uuid.uuid4().hex[:8]}"


def _is_completed(value: bytes | None) -> bool:
    return value is not None and json.loads(value)["state"] == "completed"


async def _aiokafka_find(
    bootstrap: str, topic: str, accept: Callable[[Any], bool], *, to_end: bool = False
) -> Any:
    """The first record of partition 0 of ``topic`` that ``accept``s (with
    ``to_end``: the last one up to the end of the partition), read from the
    beginning without a consumer group."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        fetch_max_wait_ms=10,
    )
    await consumer.start()
    try:
        partition = TopicPartition(topic, 0)
        consumer.assign([partition])
        await consumer.seek_to_beginning(partition)
        end = (await consumer.end_offsets([partition]))[partition] if to_end else None
        found = None
        async with asyncio.timeout(WAIT_S):
            while True:
                batch = await consumer.getmany(partition, timeout_ms=1000)
                for record in batch.get(partition, []):
                    if accept(record):
                        if end is None:
                            return record
                        found = record
                if end is not None and await consumer.position(partition) >= end:
                    return found
    finally:
        await consumer.stop()


async def test_aiokafka_request_is_answered_by_an_ensemble(
    kafka_config_factory: Any, kafka_bootstrap: str
) -> None:
    ns = _namespace()
    topics = _Topics(ns)
    request_id = foreign_request_id()
    payload = foreign_payload("aiokafka")
    async with await connect(kafka_config_factory(namespace=ns)) as transport:
        # What an operator runs before other programs use the topics (the
        # library never relies on auto-create).
        await transport.provision(PLAN)
        # The caller's registration (a response is recorded only for a
        # registered request); the request itself comes from aiokafka.
        await transport.delivery_registry(REPLY_TO).register(request_id)
        async with kitchen(transport).serving():
            producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all")
            await producer.start()
            try:
                sent = await producer.send_and_wait(
                    topics.requests,
                    foreign_request(request_id, payload),
                    key=request_id.encode(),
                )
            finally:
                await producer.stop()
            assert sent.partition == 0

            record = await _aiokafka_find(
                kafka_bootstrap,
                topics.registry,
                lambda r: r.key == f"c.{request_id}".encode() and _is_completed(r.value),
            )
            assert record is not None
            check_completed(record.value, request_id, payload)

            capability = await _aiokafka_find(
                kafka_bootstrap,
                topics.capabilities,
                lambda r: r.key == f"{ENSEMBLE}.{TASK}".encode(),
                to_end=True,
            )
            assert capability is not None and capability.value is not None
            check_capability(capability.value)


def _env(library_dir: Path | None) -> dict[str, str] | None:
    """kcat's environment: this one, with ``library_dir`` first on
    ``LD_LIBRARY_PATH`` if given."""
    return None if library_dir is None else {**os.environ, "LD_LIBRARY_PATH": str(library_dir)}


@dataclass
class _Kcat:
    """How to run kcat against the session's broker. (The environment is
    built when kcat runs, so that no repr of this shows it.)"""

    bootstrap: str
    library_dir: Path | None
    note: str

    def argv(self, *args: str) -> list[str]:
        return ["kcat", "-b", self.bootstrap, "-q", *args]

    @property
    def env(self) -> dict[str, str] | None:
        return _env(self.library_dir)


def _probe(bootstrap: str, library_dir: Path | None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["kcat", "-b", bootstrap, "-L", "-m", "10"],
        capture_output=True,
        text=True,
        env=_env(library_dir),
        timeout=WAIT_S,
        check=False,
    )


def _wheel_librdkafka() -> Path | None:
    import confluent_kafka

    libs = Path(confluent_kafka.__file__).resolve().parent.parent / "confluent_kafka.libs"
    found = sorted(libs.glob("librdkafka*.so*"))
    return found[0] if found else None


@pytest.fixture
def kcat(kafka_bootstrap: str, tmp_path: Path) -> _Kcat:
    if shutil.which("kcat") is None:
        pytest.skip("kcat is not installed (Debian package kcat: apt-get install -y kcat)")
    probe = _probe(kafka_bootstrap, None)
    if probe.returncode == 0:
        return _Kcat(kafka_bootstrap, None, "kcat on its own librdkafka")
    if "ApiVersionRequest failed" not in probe.stderr:
        pytest.fail(f"kcat cannot list the broker's metadata: {probe.stderr[-2000:]}")
    # See the module docstring: an older librdkafka than the broker can talk to.
    library = _wheel_librdkafka()
    if library is None:
        pytest.skip(f"kcat's librdkafka cannot talk to this broker: {probe.stderr[-500:]}")
    (tmp_path / "librdkafka.so.1").symlink_to(library)
    again = _probe(kafka_bootstrap, tmp_path)
    if again.returncode != 0:
        pytest.skip(
            "kcat's librdkafka cannot talk to this broker, not even the wheel's: "
            f"{probe.stderr[-500:]} / {again.stderr[-500:]}"
        )
    return _Kcat(kafka_bootstrap, tmp_path, f"kcat on {library.name} (its own librdkafka failed)")


async def _kcat_find(kcat: _Kcat, topic: str, accept: Callable[[dict[str, Any]], bool]) -> Any:
    """The first record of ``topic`` (from the beginning, partition 0) that
    ``accept``s, as kcat's JSON envelope, waiting for it to be written."""
    process = await asyncio.create_subprocess_exec(
        *kcat.argv("-C", "-t", topic, "-p", "0", "-o", "beginning", "-J", "-u"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=kcat.env,
    )
    assert process.stdout is not None
    try:
        async with asyncio.timeout(WAIT_S):
            while line := await process.stdout.readline():
                envelope = json.loads(line)
                if accept(envelope):
                    return envelope
        raise AssertionError(f"kcat ended without the record: rc {await process.wait()}")
    finally:
        if process.returncode is None:
            process.kill()
        _, stderr = await process.communicate()
        if stderr:
            print(f"kcat stderr: {stderr.decode(errors='replace')[-2000:]}")


async def _kcat_read_to_end(kcat: _Kcat, topic: str) -> list[dict[str, Any]]:
    """Every record of partition 0 of ``topic`` up to its end (``-e``)."""
    process = await asyncio.create_subprocess_exec(
        *kcat.argv("-C", "-t", topic, "-p", "0", "-o", "beginning", "-e", "-J"),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=kcat.env,
    )
    try:
        async with asyncio.timeout(WAIT_S):
            stdout, stderr = await process.communicate()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    assert process.returncode == 0, stderr.decode(errors="replace")
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


async def test_kcat_request_is_answered_by_an_ensemble(
    kafka_config_factory: Any, kcat: _Kcat
) -> None:
    print(kcat.note)
    ns = _namespace()
    topics = _Topics(ns)
    request_id = foreign_request_id()
    payload = foreign_payload("kcat")
    async with await connect(kafka_config_factory(namespace=ns)) as transport:
        await transport.provision(PLAN)
        await transport.delivery_registry(REPLY_TO).register(request_id)  # as above
        async with kitchen(transport).serving():
            # One message from stdin (kcat splits on newlines; the body has none).
            producer = await asyncio.create_subprocess_exec(
                *kcat.argv("-P", "-t", topics.requests, "-k", request_id, "-c", "1"),
                stdin=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=kcat.env,
            )
            try:
                async with asyncio.timeout(WAIT_S):
                    _, stderr = await producer.communicate(foreign_request(request_id, payload))
            finally:
                if producer.returncode is None:
                    producer.kill()
                    await producer.wait()
            assert producer.returncode == 0, stderr.decode(errors="replace")

            envelope = await _kcat_find(
                kcat,
                topics.registry,
                lambda e: (
                    e["key"] == f"c.{request_id}"
                    and e["payload"] is not None
                    and json.loads(e["payload"])["state"] == "completed"
                ),
            )
            check_completed(envelope["payload"], request_id, payload)

            advertised = [
                e
                for e in await _kcat_read_to_end(kcat, topics.capabilities)
                if e["key"] == f"{ENSEMBLE}.{TASK}"
            ]
            assert advertised, "no capability record for kitchen.cook"
            check_capability(advertised[-1]["payload"])
