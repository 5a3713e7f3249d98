"""In-process backends: ``memory://`` (the test double) and ``sqlite://``
(durable, single node, the embedded default)."""

from transport_inprocess.memory import (
    MemoryRequestQueue,
    MemoryTransport,
    open_memory,
    reset_memory,
)
from transport_inprocess.sqlite import (
    SqliteRequestQueue,
    SqliteTransport,
    open_sqlite,
    sqlite_path,
)

__all__ = [
    "MemoryRequestQueue",
    "MemoryTransport",
    "SqliteRequestQueue",
    "SqliteTransport",
    "open_memory",
    "open_sqlite",
    "reset_memory",
    "sqlite_path",
]
