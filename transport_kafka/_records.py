"""The data a Kafka queue engine works on: fetched records, leases, the
request headers of a re-produced request, and the format of the state topic.

* :class:`_Record` — one fetched request record with its delivery count;
* :class:`_Lease` — one delivery of a record to a handle (client-side lease);
* ``H_*`` — the headers a ``nack`` re-produce carries (attempts so far,
  not-before time, last error, the request id delivered);
* :func:`_replay_markers` — the state topic (per-record delivery counts,
  rounds of counts, "settled" markers) folded into markers per record.

Plain data and pure functions: no I/O, no threads.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from transport import WorkRequest
from transport.kit import HEADER_ATTEMPTS, HEADER_ERROR, HEADER_NOT_BEFORE, HEADER_REQUEST_ID

if TYPE_CHECKING:
    from transport_kafka._queue import KafkaRequestQueue

H_ATTEMPTS = HEADER_ATTEMPTS
H_NOT_BEFORE = HEADER_NOT_BEFORE
H_ERROR = HEADER_ERROR
H_REQUEST_ID = HEADER_REQUEST_ID

_tokens = itertools.count(1)
_SETTLED = b'{"s":1}'
_TICK = 0.05
# A settled record that no commit covers yet (an earlier record is still
# being worked on) gets a "settled" marker after this long.
_MARKER_AFTER_S = 0.05
_ACK_TICK = 0.001  # consumer poll timeout while acks are waiting for a commit
_RESERVE_MAX = 1024  # deliveries counted in one round of state markers


@dataclass(eq=False, slots=True)
class _Record:
    partition: int
    offset: int
    generation: int
    key: bytes | None
    value: bytes | None
    base: int  # deliveries before this record was produced (header)
    deliveries: int  # deliveries of this record (state topic + local)
    not_before: float  # epoch seconds; 0 = at once
    last_error: str | None
    carried_id: str | None = None  # ae-request-id of a re-produced copy
    reserved: bool = False  # the next delivery is already counted in the state topic
    # Picked by a round whose state write is in flight: ``deliveries``
    # already includes the coming delivery, which is not made yet.
    counting: bool = False
    count_key: bytes | None = None  # the state key holding that count
    request: WorkRequest | None = None  # decoded once
    undecodable: str | None = None  # why it could not be decoded
    # Settled, and made durable by a "settled" marker written while its
    # partition was being handed over (no commit of this generation covers it).
    marked_at_handover: bool = False

    @property
    def attempts(self) -> int:
        return self.base + self.deliveries

    @property
    def state_key(self) -> bytes:
        return f"{self.partition}:{self.offset}".encode()


@dataclass(eq=False, slots=True)
class _Lease:
    record: _Record
    request: WorkRequest
    handle: KafkaRequestQueue
    deadline: float
    state: Literal["held", "settling", "done", "lost"] = "held"
    token: int = field(default_factory=lambda: next(_tokens))
    # The state key that counted this delivery, with its round's counts and
    # records: a give-back without counting reserves the count again there.
    counted: tuple[bytes, tuple[int, dict[int, int], list[_Record]]] | None = None
    # Held by a priority queue to compare levels, no handler has it: given
    # back uncounted at exit too (see _Counts._withdraw_at_exit).
    unseen: bool = False


def _int_header(headers: dict[str, bytes], name: str) -> int:
    try:
        return int(headers.get(name, b"0").decode())
    except (ValueError, UnicodeDecodeError):
        return 0


def _replay_markers(
    replay: Iterable[Any], assigned: set[int], committed: dict[int, int]
) -> tuple[
    dict[tuple[int, int], dict[str, Any]], set[tuple[int, int]], dict[int, dict[bytes, int]]
]:
    """Fold the state topic into per-record markers for ``assigned``
    partitions, above their committed offsets.

    Keys: ``"<p>:<offset>"`` (one record: ``{"d": n}`` or ``{"s": 1}``) and
    ``"<p>:r<low>-<high>.<id>"`` (a round of delivery counts:
    ``{"ds": [[offset, n], ...]}``). The latest value of a key holds (a
    consumer that gives a partition up rewrites its keys to withdraw counts
    it reserved but did not hand out, as compaction would keep); across keys
    counts merge by maximum and "settled" sticks. Returns the markers, the
    offsets that have a one-record key, and the round keys with their
    highest offset.
    """
    latest: dict[bytes, bytes] = {}
    for rec in replay:
        key = rec.key or b""
        if rec.value is None:
            latest.pop(key, None)
        else:
            latest.pop(key, None)  # keep the order of the latest writes
            latest[key] = rec.value
    markers: dict[tuple[int, int], dict[str, Any]] = {}
    individual: set[tuple[int, int]] = set()
    rounds: dict[int, dict[bytes, int]] = {}
    for key, value in latest.items():
        try:
            p_s, _, o_s = key.decode().partition(":")
            p = int(p_s)
        except (ValueError, UnicodeDecodeError):
            continue
        if p not in assigned:
            continue
        floor = committed.get(p, -1)
        if o_s.startswith("r"):
            try:
                entries = [(int(o), int(n)) for o, n in json.loads(value)["ds"]]
            except (ValueError, KeyError, TypeError):
                continue
            if not entries:
                continue
            rounds.setdefault(p, {})[key] = max(o for o, _ in entries)
            for off, count in entries:
                if off >= floor:
                    marker = markers.setdefault((p, off), {})
                    marker["d"] = max(count, int(marker.get("d", 0)))
            continue
        try:
            off = int(o_s)
        except ValueError:
            continue
        if off < floor:
            continue
        try:
            loaded = json.loads(value)
        except ValueError:
            continue
        if not isinstance(loaded, dict):
            continue
        marker = markers.setdefault((p, off), {})
        if loaded.get("s"):
            marker["s"] = 1
        if "d" in loaded:
            marker["d"] = max(int(loaded["d"]), int(marker.get("d", 0)))
        individual.add((p, off))
    return markers, individual, rounds
