"""The ``pulsar`` module used directly (its own client, not
``transport_pulsar``) on what docs/wire.md names: a request sent to
``NS.q.Q`` (partition key = request id), registered first (a ``pending``
``DeliveryRecord`` sent to the registry's keyed topic ``NS.kv.delivery.R``
with partition key ``p.<id>``), is answered by an ``Ensemble`` on
``pulsar://``; a plain reader of that topic finds the completed
``DeliveryRecord`` (partition key ``c.<id>``), and one of
``NS.kv.capability.capabilities`` the ensemble's ``Capability``."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import pulsar
import pytest

from tests._interop import (
    ENSEMBLE,
    PLAN,
    REPLY_TO,
    TASK,
    check_capability,
    check_completed,
    foreign_payload,
    foreign_registration,
    foreign_request,
    foreign_request_id,
    kitchen,
    registration_key,
    response_key,
)
from tests.pulsar.conftest import make_config
from transport import connect

pytestmark = pytest.mark.broker

#: pulsar-lite on a shared two-core machine: a reader create once took over
#: 10 s in a parallel run (tests/pulsar/conftest.py).
WAIT_S = 60.0
_LOG = logging.getLogger("tests.pulsar.raw")


def _client(url: str) -> pulsar.Client:
    return pulsar.Client(url, operation_timeout_seconds=int(WAIT_S), logger=_LOG)


def _send(url: str, topic: str, body: bytes, key: str) -> None:
    client = _client(url)
    try:
        producer = client.create_producer(topic, batching_enabled=False)
        producer.send(body, partition_key=key)
        producer.close()
    finally:
        client.close()


def _is_record(message: Any) -> bool:
    """A keyed-topic value: not a delete (``ae-tombstone``) or an empty marker."""
    return bool(message.data()) and "ae-tombstone" not in message.properties()


def _find(url: str, topic: str, accept: Callable[[Any], bool]) -> Any:
    """The first message of ``topic`` from the earliest that ``accept``s,
    waiting for it to be written."""
    client = _client(url)
    try:
        reader = client.create_reader(topic, pulsar.MessageId.earliest)
        deadline = time.monotonic() + WAIT_S
        while time.monotonic() < deadline:
            try:
                message = reader.read_next(timeout_millis=1000)
            except pulsar.Timeout:
                continue
            if accept(message):
                return message
        raise AssertionError(f"{topic}: no matching message within {WAIT_S:g} s")
    finally:
        client.close()


def _last(url: str, topic: str, key: str) -> Any:
    """The last value of ``key`` in ``topic`` up to its end, or ``None``."""
    client = _client(url)
    try:
        reader = client.create_reader(topic, pulsar.MessageId.earliest)
        last = None
        while reader.has_message_available():
            message = reader.read_next(timeout_millis=int(WAIT_S * 1000))
            if message.partition_key() == key:
                last = message if _is_record(message) else None
        return last
    finally:
        client.close()


async def test_raw_pulsar_request_is_answered_by_an_ensemble(pulsar_url: str) -> None:
    config = make_config(pulsar_url)
    base = f"persistent://public/default/{config.namespace}"
    request_id = foreign_request_id()
    payload = foreign_payload("pulsar-client")
    async with await connect(config) as transport:
        await transport.provision(PLAN)
        async with kitchen(transport).serving():
            # Registered before it is sent: a request nobody awaits is not run.
            await asyncio.to_thread(
                _send,
                pulsar_url,
                f"{base}.kv.delivery.{REPLY_TO}",
                foreign_registration(request_id),
                registration_key(request_id),
            )
            await asyncio.to_thread(
                _send,
                pulsar_url,
                f"{base}.q.{ENSEMBLE}",
                foreign_request(request_id, payload),
                request_id,
            )
            message = await asyncio.to_thread(
                _find,
                pulsar_url,
                f"{base}.kv.delivery.{REPLY_TO}",
                lambda m: (
                    m.partition_key() == response_key(request_id)
                    and _is_record(m)
                    and json.loads(m.data())["state"] == "completed"
                ),
            )
            check_completed(message.data(), request_id, payload)

            advertised = await asyncio.to_thread(
                _last, pulsar_url, f"{base}.kv.capability.capabilities", f"{ENSEMBLE}.{TASK}"
            )
            assert advertised is not None, "no capability record for kitchen.cook"
            check_capability(advertised.data())
