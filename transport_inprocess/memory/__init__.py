"""``memory://[name]`` — the in-process backend and the official test double.

Feature matrix: persistent ✗ (state lives as long as the process), ordered ✓
(FIFO; redeliveries and nacks go to the back), consumer_groups ✗ (one
process), native_delay ✓, lease_extension ✓.

Every ``connect("memory://name")`` in a process shares one broker named
``name`` (``memory://`` is the broker ``default``), like clients of a server:
a "restarted" caller re-attaches by connecting again. Clients with different
``TransportConfig.namespace`` share nothing (a broker per name and namespace). Requests are stored as
their JSON encoding, exactly as on the wire, so payloads that a broker would
refuse are refused here too. Thread-safe and usable from several event loops.
"""

from transport_inprocess.memory._client import reset_memory
from transport_inprocess.memory._queue import MemoryRequestQueue
from transport_inprocess.memory._transport import MemoryTransport, open_memory

__all__ = ["MemoryRequestQueue", "MemoryTransport", "open_memory", "reset_memory"]
