"""The backend kit: everything a backend package needs from the core.

The SPI a backend implements (:class:`~transport.Transport`,
:class:`~transport.RequestQueue`, :class:`~transport.Delivery`,
:class:`~transport.KeyedLog`, :class:`~transport.EventBus`,
:class:`~transport.EventLog`, ...) and the models it stores are in
:mod:`transport`. This module holds the helpers that every backend shipped
with the library uses to implement them, so that a third-party backend can be
written from public names only and behave the same way (the conformance
suite in :mod:`transport.testing` checks that it does). No backend package
imports a private ``transport._*`` module.

What is here, by concern:

* **Wire format** — :data:`WIRE_SCHEMA_VERSION` (the major version every
  record carries; readers refuse later ones), the ``HEADER_*`` names of a
  re-published copy and :func:`error_header`, :func:`encode` (JSON, payload limit enforced),
  :func:`decode`, :func:`decode_request` (a delivered body; a body without
  ``request_id`` gets an id derived from the broker's identity of the
  message, so a redelivery is recognised; pass ``codec=queue.request_codec``
  so another program's dialect is read, and set ``Transport._reads_request_codec``),
  :class:`RequestCodec` and :func:`request_codec_for` (the dialect
  ``TransportConfig.request_codec`` selects), :class:`WireModel` (base of every
  record on the wire: frozen, unknown fields ignored, validation errors
  raised as the library's own), :func:`replace_fields` (a copy with fields
  changed),
  :func:`derived_request_id` (a stable id for a foreign message),
  :func:`utcnow`.
* **Names** — :func:`validate_name` (queue, registry, stream names),
  :func:`internal_name` (``<name>__<suffix>`` objects a backend derives),
  :func:`validate_header`, :func:`check_headers`.
* **Keyed logs** — :func:`read_checkpoint` (the resume position and records
  of a checkpoint the shared registry readers saved, for a log that reads
  its own from a position), :func:`encode_checkpoint` (one in that format).
* **Events** — :func:`check_start` (the ``start`` argument of readers),
  :data:`Start`, :func:`make_event`.
* **Asyncio plumbing** — :func:`seconds` (timeouts and delays as float
  seconds, negatives refused), :func:`hand_to_waiter` (give a value to the
  first waiter still waiting), :func:`ack_each` and :func:`acked_or_raise`
  (acks of a batch one by one, and its results or first error: for the
  deliveries a native ``ack_many`` does not settle itself), :class:`SharedRun` (one run of an operation
  shared by concurrent callers that need a result taken after their call
  began), :class:`InFlight` (at most one run of an operation per key,
  joined by the callers that ask while it runs), :func:`retrieve` (a done callback that marks a future's exception
  retrieved), :func:`wait_within` (``asyncio.wait_for`` without its
  Python 3.11 race that loses a cancellation), :class:`AtExit` (objects
  to settle within a time bound when a program ends without ``aclose()``),
  :class:`SqliteStore` (a SQLite file on its own thread with
  group commit, given its schema: the store of ``sqlite://`` and of the
  outbox).
* **Operations** — :class:`ClientLog` (a broker client's log lines, repeated
  ones collapsed), :class:`OutageLog` (a retry loop's failures logged once
  per outage, with a reminder every 30 s and a line when it is over), :class:`DoctorFinding`, :class:`ProvisionPlan` and
  :data:`ObjectKind` for ``transport doctor`` and ``transport provision``.

Stability: these names follow the library's version like the SPI does; a
change that breaks a backend is a breaking change.
"""

from __future__ import annotations

from transport._ops.logging import ClientLog
from transport._runtime.atexit import AtExit
from transport._runtime.shared import InFlight, SharedRun, retrieve, wait_within
from transport._runtime.sqlitestore import SqliteStore
from transport._spi.codec import (
    RequestCodec,
    decode,
    decode_request,
    encode,
    encode_dead_letter,
    request_codec_for,
)
from transport._spi.config import options_error, redact_url, url_options
from transport._spi.doctor import DoctorFinding, ObjectKind, ProvisionPlan
from transport._spi.events import (
    EventInbox,
    Start,
    check_headers,
    check_start,
    make_event,
    position_number,
    to_millisecond,
)
from transport._spi.keyed import encode_checkpoint, read_checkpoint
from transport._spi.models import WIRE_SCHEMA_VERSION, derived_request_id, replace_fields, utcnow
from transport._spi.models import _WireModel as WireModel
from transport._spi.naming import internal_name, validate_header, validate_name
from transport._spi.outage import OutageLog
from transport._spi.queue import (
    REQUEUED_HEADER,
    ack_each,
    acked_or_raise,
    hand_to_waiter,
    requeued,
    seconds,
)
from transport._spi.wireheaders import (
    HEADER_ATTEMPTS,
    HEADER_ERROR,
    HEADER_NOT_BEFORE,
    HEADER_REQUEST_ID,
    LEGACY_ERROR_HEADERS,
    MAX_ERROR_BYTES,
    error_header,
)

__all__ = [
    "HEADER_ATTEMPTS",
    "HEADER_ERROR",
    "HEADER_NOT_BEFORE",
    "HEADER_REQUEST_ID",
    "LEGACY_ERROR_HEADERS",
    "MAX_ERROR_BYTES",
    "REQUEUED_HEADER",
    "WIRE_SCHEMA_VERSION",
    "AtExit",
    "ClientLog",
    "DoctorFinding",
    "EventInbox",
    "InFlight",
    "ObjectKind",
    "OutageLog",
    "ProvisionPlan",
    "RequestCodec",
    "SharedRun",
    "SqliteStore",
    "Start",
    "WireModel",
    "ack_each",
    "acked_or_raise",
    "check_headers",
    "check_start",
    "decode",
    "decode_request",
    "derived_request_id",
    "encode",
    "encode_checkpoint",
    "encode_dead_letter",
    "error_header",
    "hand_to_waiter",
    "internal_name",
    "make_event",
    "options_error",
    "position_number",
    "read_checkpoint",
    "redact_url",
    "replace_fields",
    "request_codec_for",
    "requeued",
    "retrieve",
    "seconds",
    "to_millisecond",
    "url_options",
    "utcnow",
    "validate_header",
    "validate_name",
    "wait_within",
]
