"""``sqlite:///relative.db`` / ``sqlite:////abs/path.db`` — the embedded
default: durable single-node production, no server.

Feature matrix: persistent ✓ (an ``enqueue`` that returned survives
``kill -9`` and power loss with the default ``synchronous=FULL``), ordered ✓
(FIFO by enqueue; a nacked request goes to the back), consumer_groups ✓
(several processes on one machine share the file), native_delay ✓,
lease_extension ✓.

Options (URL query or ``TransportConfig.options``): ``synchronous``
(``FULL`` default, ``NORMAL``, ``OFF``: fsync policy of commits),
``poll_interval`` (seconds, default 0.05: how often an idle poller checks for
work written by *other* processes; this process's own writes wake it at once),
``busy_timeout_ms`` (30000).

Every stored name is ``<namespace>/<name>`` (``TransportConfig.namespace``):
clients of one file with different namespaces share nothing.

Leases are rows: a leased request carries a random token and an expiry in
``available_at``; once that passes, the row is simply eligible again, so a
crashed worker's requests come back without any cleanup process.
"""

from transport_inprocess.sqlite._config import sqlite_path
from transport_inprocess.sqlite._queue import SqliteRequestQueue
from transport_inprocess.sqlite._transport import SqliteTransport, open_sqlite

__all__ = ["SqliteRequestQueue", "SqliteTransport", "open_sqlite", "sqlite_path"]
