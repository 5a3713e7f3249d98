"""The one broker query pulsar-client's Python binding lacks: a
subscription's backlog, over Pulsar's binary protocol (``CommandConsumerStats``).

A short-lived connection joins the queue's subscription as a consumer that
never grants permits (so nothing is dispatched to it), asks for the
consumer stats — whose ``msgBacklog`` is the subscription's backlog — and
leaves. Used by ``stats()`` when no admin REST endpoint is configured; it
talks to the broker of the service URL directly (single-broker deployments
and dev brokers; on a cluster set ``admin_url``).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import ssl
import struct
from dataclasses import dataclass

from transport.errors import PermanentTransportError, TransientTransportError
from transport.kit import wait_within

__all__ = ["SubscriptionBacklog", "subscription_backlog"]

# BaseCommand.Type values; the BaseCommand field carrying each command has
# the same number.
_CONNECT, _CONNECTED, _SUBSCRIBE, _SUCCESS, _ERROR, _CLOSE_CONSUMER = 2, 3, 4, 13, 14, 16
_PING, _PONG, _CONSUMER_STATS, _CONSUMER_STATS_RESPONSE = 18, 19, 25, 26
_SUB_TYPES = {"shared": 1, "key_shared": 3}
_EARLIEST = 1
_PROTOCOL_VERSION = 15


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _int_field(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _bytes_field(number: int, value: bytes) -> bytes:
    return _varint((number << 3) | 2) + _varint(len(value)) + value


def _parse(data: bytes) -> dict[int, object]:
    """Fields of one protobuf message (last value wins; enough here)."""
    fields: dict[int, object] = {}
    pos = 0
    while pos < len(data):
        key, pos = _read_varint(data, pos)
        number, wire = key >> 3, key & 7
        value: object
        if wire == 0:
            value, pos = _read_varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _read_varint(data, pos)
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        fields[number] = value
    return fields


def _read_varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result, pos
        shift += 7


def _command(kind: int, body: bytes) -> bytes:
    command = _int_field(1, kind) + _bytes_field(kind, body)
    return struct.pack(">II", len(command) + 4, len(command)) + command


@dataclass(frozen=True)
class SubscriptionBacklog:
    backlog: int


async def _read_command(reader: asyncio.StreamReader) -> tuple[int, dict[int, object]]:
    total, size = struct.unpack(">II", await reader.readexactly(8))
    command = await reader.readexactly(size)
    if total > size + 4:
        await reader.readexactly(total - size - 4)  # payload of a MESSAGE: not expected
    fields = _parse(command)
    kind = int(fields.get(1, 0))  # type: ignore[call-overload]
    raw = fields.get(kind, b"")
    return kind, _parse(raw if isinstance(raw, bytes) else b"")


async def subscription_backlog(
    host: str,
    port: int,
    *,
    topic: str,
    subscription: str,
    subscription_type: str,
    token: str | None,
    tls: ssl.SSLContext | None,
    timeout: float,
) -> SubscriptionBacklog:
    """Ask the broker at ``host:port`` for the backlog of ``subscription``.

    Raises: TransientTransportError (unreachable, timeout), PermanentTransportError
    (the broker refused: auth, unknown command).
    """
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(
                host, port, ssl=tls, server_hostname=host if tls else None
            )
            try:
                return await _exchange(
                    reader, writer, topic, subscription, subscription_type, token
                )
            finally:
                writer.close()
                with contextlib.suppress(Exception):
                    await writer.wait_closed()
    except (OSError, TimeoutError, asyncio.IncompleteReadError) as exc:
        raise TransientTransportError(f"backlog query for {topic}: {type(exc).__name__}") from exc


async def _exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    topic: str,
    subscription: str,
    subscription_type: str,
    token: str | None,
) -> SubscriptionBacklog:
    connect = _bytes_field(1, b"agentensemble-transport-stats") + _int_field(4, _PROTOCOL_VERSION)
    if token is not None:
        connect += _bytes_field(3, token.encode()) + _bytes_field(5, b"token")
    writer.write(_command(_CONNECT, connect))
    # Consumer ids are per connection in Pulsar; a random one also avoids
    # pulsar-lite's clash with other connections' consumers on the subscription.
    consumer_id, request_id = secrets.randbits(40), 1

    async def answer(expected: int) -> dict[int, object]:
        while True:
            kind, fields = await _read_command(reader)
            if kind == _PING:
                writer.write(_command(_PONG, b""))
                continue
            if kind == _ERROR or (kind == _CONSUMER_STATS_RESPONSE and fields.get(2)):
                message = fields.get(3, b"")
                text = message.decode(errors="replace") if isinstance(message, bytes) else ""
                raise PermanentTransportError(f"broker refused the backlog query: {text or kind}")
            if kind == expected:
                return fields

    await answer(_CONNECTED)
    subscribe = (
        _bytes_field(1, topic.encode())
        + _bytes_field(2, subscription.encode())
        + _int_field(3, _SUB_TYPES[subscription_type])
        + _int_field(4, consumer_id)
        + _int_field(5, request_id)
        + _bytes_field(6, b"agentensemble-stats")
        + _int_field(13, _EARLIEST)
    )
    writer.write(_command(_SUBSCRIBE, subscribe))
    await answer(_SUCCESS)
    request_id += 1
    writer.write(_command(_CONSUMER_STATS, _int_field(1, request_id) + _int_field(4, consumer_id)))
    stats = await answer(_CONSUMER_STATS_RESPONSE)
    request_id += 1
    writer.write(_command(_CLOSE_CONSUMER, _int_field(1, consumer_id) + _int_field(2, request_id)))
    with contextlib.suppress(Exception):
        await wait_within(answer(_SUCCESS), 2.0)
    backlog = stats.get(15, 0)
    return SubscriptionBacklog(backlog=int(backlog) if isinstance(backlog, int) else 0)
