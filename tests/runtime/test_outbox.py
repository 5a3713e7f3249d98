"""The outbox holds the line through an outage and keeps FIFO."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from tenacity import wait_fixed

from transport import (
    DeadLetter,
    Delivery,
    EventLog,
    EventReader,
    InvalidNameError,
    LogEvent,
    Outbox,
    OutboxFile,
    PayloadTooLargeError,
    PermanentTransportError,
    QueueStats,
    RequestQueue,
    TransientTransportError,
    Transport,
    WorkRequest,
    encode,
)
from transport.cli import main as cli
from transport.kit import Start


class Outage(RequestQueue):
    """A queue in front of a real one that fails while ``down`` is true,
    and refuses requests whose payload says ``poison``."""

    def __init__(self, inner: RequestQueue) -> None:
        self.inner = inner
        self.name = inner.name
        self.lease_seconds = inner.lease_seconds
        self.max_attempts = inner.max_attempts
        self.down = True
        self.refused = 0
        self.failed_while_down = 0

    async def enqueue(self, request: WorkRequest) -> WorkRequest:
        if self.down:
            self.failed_while_down += 1
            if self.failed_while_down >= 25:
                self.down = False  # the broker comes back
            raise TransientTransportError("broker unreachable (simulated)")
        if request.payload == "poison":
            self.refused += 1
            raise PermanentTransportError("refused by broker policy (simulated)")
        return await self.inner.enqueue(request)

    async def poll(self, timeout: float | None = None) -> Delivery | None:
        return await self.inner.poll(timeout)

    async def stats(self) -> QueueStats:
        return await self.inner.stats()

    async def dead_letters(self, limit: int = 100) -> list[DeadLetter]:
        return await self.inner.dead_letters(limit)

    async def requeue_dead_letters(self, request_ids: Iterable[str] | None = None) -> int:
        return await self.inner.requeue_dead_letters(request_ids)

    async def aclose(self) -> None:
        await self.inner.aclose()


def _outbox(transport: Transport, tmp_path: Path, outage: Outage, wait: float) -> Outbox:
    """An outbox whose every request goes through ``outage``, retried every ``wait`` s."""
    return Outbox(
        transport,
        tmp_path / "outbox.db",
        retry_wait=wait_fixed(wait),
        queue_factory=lambda name, levels: outage,
    )


async def test_outage_loses_nothing_keeps_fifo_and_dead_letters_nothing(
    transport: Transport, tmp_path: Path
) -> None:
    outage = Outage(transport.request_queue("orders"))
    outbox = _outbox(transport, tmp_path, outage, 0.01)
    async with outbox:
        sent = [await outbox.enqueue("orders", WorkRequest(task="t", payload=i)) for i in range(50)]
        assert await outbox.depth() > 0  # held while the broker is down
        await outbox.flush(timeout=30)
        assert await outbox.dead_letters() == []
    assert outage.failed_while_down >= 25
    received = []
    queue = transport.request_queue("orders")
    while (delivery := await queue.poll(0.5)) is not None:
        received.append(delivery.request.request_id)
        await delivery.ack()
    assert received == [r.request_id for r in sent], "lost or reordered"


async def test_an_outage_is_logged_once_and_its_end_once(
    transport: Transport, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    outage = Outage(transport.request_queue("orders3"))
    outbox = _outbox(transport, tmp_path, outage, 0.001)
    with caplog.at_level(logging.DEBUG, logger="transport.outbox"):
        async with outbox:
            await outbox.enqueue("orders3", WorkRequest(task="t", payload=1))
            await outbox.flush(timeout=30)
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    retries = [r for r in caplog.records if r.levelno == logging.DEBUG]
    assert outage.failed_while_down == 25
    assert len(warnings) == 2, warnings
    assert "outbox: sending failed" in warnings[0] and "holding requests" in warnings[0]
    assert "outbox: sending works again after" in warnings[1] and "(25 failed tries)" in warnings[1]
    assert len(retries) == 24  # every further retry, at DEBUG only


async def test_only_definitive_failures_count_toward_dead_lettering(
    transport: Transport, tmp_path: Path
) -> None:
    outage = Outage(transport.request_queue("orders2"))
    outbox = _outbox(transport, tmp_path, outage, 0.01)
    async with outbox:
        poison = await outbox.enqueue("orders2", WorkRequest(task="t", payload="poison"))
        fine = await outbox.enqueue("orders2", WorkRequest(task="t", payload="fine"))
        await outbox.flush(timeout=30)
        [dead] = await outbox.dead_letters()
    assert dead.request.request_id == poison.request_id
    assert dead.attempts == 3 and "refused" in dead.error
    assert outage.refused == 3
    delivery = await transport.request_queue("orders2").poll(5)
    assert delivery is not None and delivery.request.request_id == fine.request_id


async def test_stored_requests_survive_a_restart_of_the_outbox(
    transport: Transport, tmp_path: Path
) -> None:
    path = tmp_path / "outbox.db"
    stuck = Outage(transport.request_queue("orders3"))
    stuck.failed_while_down = -(10**9)  # never comes back in this run
    first = Outbox(transport, path, retry_wait=wait_fixed(0.01), queue_factory=lambda n, lv: stuck)
    async with first:
        request = await first.enqueue("orders3", WorkRequest(task="t", payload="kept"))
    second = Outbox(transport, path)
    async with second:
        await second.flush(timeout=30)
    delivery = await transport.request_queue("orders3").poll(5)
    assert delivery is not None and delivery.request.request_id == request.request_id


class Recording(Outage):
    """A reachable queue that records every enqueue; after ``fail_after``
    of them it fails ``failures`` times (transiently), and with ``hold``
    set it blocks the enqueue after ``hold_after`` of them until released."""

    def __init__(self, inner: RequestQueue, *, fail_after: int = -1, failures: int = 0) -> None:
        super().__init__(inner)
        self.down = False
        self.fail_after = fail_after
        self.failures = failures
        self.sent: list[str] = []
        self.hold_after: int | None = None
        self.holding = asyncio.Event()
        self.release = asyncio.Event()

    async def enqueue(self, request: WorkRequest) -> WorkRequest:
        if len(self.sent) == self.fail_after and self.failures > 0:
            self.failures -= 1
            raise TransientTransportError("broker unreachable (simulated)")
        if self.hold_after is not None and len(self.sent) == self.hold_after:
            self.holding.set()
            await self.release.wait()
        self.sent.append(request.request_id)
        return await self.inner.enqueue(request)


async def _stored_while_down(transport: Transport, path: Path, queue: str, n: int) -> list[str]:
    """``n`` requests stored in the outbox file at ``path`` by an outbox
    whose broker never answered (nothing sent)."""
    stuck = Outage(transport.request_queue(queue))
    stuck.failed_while_down = -(10**9)
    first = Outbox(transport, path, retry_wait=wait_fixed(10), queue_factory=lambda n, lv: stuck)
    async with first:
        stored = [await first.enqueue(queue, WorkRequest(task="t", payload=i)) for i in range(n)]
    return [r.request_id for r in stored]


async def _drained(queue: RequestQueue) -> list[str]:
    """The request ids ``queue`` holds, in delivery order (each acked)."""
    received = []
    while (delivery := await queue.poll(0.5)) is not None:
        received.append(delivery.request.request_id)
        await delivery.ack()
    return received


async def test_the_drainer_deletes_what_it_sent_in_batches(
    transport: Transport, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The head of the line is read DRAIN_BATCH rows at a time; those sent
    # are deleted in one write, not one write (and fsync) per row.
    from transport._runtime import outbox as outbox_module

    path = tmp_path / "outbox.db"
    ids = await _stored_while_down(transport, path, "batched", 150)
    deletes: list[int] = []
    original = Outbox._delete

    def counted(conn: sqlite3.Connection, ids: list[int]) -> None:
        deletes.append(len(ids))
        original(conn, ids)

    monkeypatch.setattr(Outbox, "_delete", staticmethod(counted))
    recording = Recording(transport.request_queue("batched"))
    second = Outbox(transport, path, queue_factory=lambda n, lv: recording)
    async with second:
        await second.flush(timeout=30)
    assert recording.sent == ids
    assert (
        deletes
        == [64, 64, 22]
        == [min(outbox_module.DRAIN_BATCH, 150 - i) for i in range(0, 150, 64)]
    )


async def test_a_failure_in_the_middle_of_a_batch_sends_nothing_twice(
    transport: Transport, tmp_path: Path
) -> None:
    path = tmp_path / "outbox.db"
    ids = await _stored_while_down(transport, path, "midway", 40)
    recording = Recording(transport.request_queue("midway"), fail_after=25, failures=3)
    second = Outbox(
        transport, path, retry_wait=wait_fixed(0.01), queue_factory=lambda n, lv: recording
    )
    async with second:
        await second.flush(timeout=30)
    assert recording.failures == 0
    # The 25 sent before the failure were not sent again after it.
    assert recording.sent == ids


async def test_a_close_while_sending_sends_nothing_twice(
    transport: Transport, tmp_path: Path
) -> None:
    path = tmp_path / "outbox.db"
    ids = await _stored_while_down(transport, path, "closing", 20)
    recording = Recording(transport.request_queue("closing"))
    recording.hold_after = 7
    second = Outbox(transport, path, queue_factory=lambda n, lv: recording)
    await second.start()
    await asyncio.wait_for(recording.holding.wait(), 30)
    await second.aclose()  # cancels the drainer inside the 8th send
    assert recording.sent == ids[:7]
    again = Recording(transport.request_queue("closing"))
    async with Outbox(transport, path, queue_factory=lambda n, lv: again) as third:
        await third.flush(timeout=30)
    assert again.sent == ids[7:], "the rows sent before the close were sent again"
    assert await _drained(transport.request_queue("closing")) == ids


@pytest.mark.parametrize("levels", [3])
async def test_outbox_feeds_priority_queues(
    transport: Transport, tmp_path: Path, levels: int
) -> None:
    async with Outbox(transport, tmp_path / "outbox.db") as outbox:
        for level in (2, 0, 1):
            await outbox.enqueue(
                "prio", WorkRequest(task="t", payload=level, priority=level), levels=levels
            )
        await outbox.flush(timeout=30)
    pq = transport.priority_queue("prio", levels=levels)
    order = []
    while (delivery := await pq.poll(0.5)) is not None:
        order.append(delivery.request.payload)
        await delivery.ack()
    assert order == [0, 1, 2]


# Network.send through a broker outage is tested against a real one (a
# nats-server killed and restarted): tests/nats/test_outbox_outage.py.


async def test_outbox_starts_on_first_enqueue(transport: Transport, tmp_path: Path) -> None:
    outbox = Outbox(transport, tmp_path / "lazy.db", retry_wait=wait_fixed(0.01))
    await outbox.enqueue("lazy", WorkRequest(task="t", payload=1))
    await outbox.flush(timeout=10)
    delivery = await transport.request_queue("lazy").poll(5)
    assert delivery is not None and delivery.request.payload == 1
    await outbox.aclose()


class RefusingLog(EventLog):
    """An event log in front of a real one that is unreachable for its first
    ``down`` appends and refuses, for good, data that says ``poison``."""

    def __init__(self, inner: EventLog, down: int) -> None:
        self.inner = inner
        self.down = down
        self.refused = 0
        self.refuse_poison = True

    async def append(
        self,
        stream: str,
        data: Any = None,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> str:
        if self.down > 0:
            self.down -= 1
            raise TransientTransportError("broker unreachable (simulated)")
        if data == "poison" and self.refuse_poison:
            self.refused += 1
            raise PermanentTransportError("refused by broker policy (simulated)")
        return await self.inner.append(stream, data, key=key, headers=headers)

    async def read(
        self, stream: str, start: Start = "earliest", *, cursor: str | None = None
    ) -> EventReader:
        return await self.inner.read(stream, start, cursor=cursor)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def _events(transport: Transport, stream: str, n: int) -> list[LogEvent]:
    reader = await transport.event_log().read(stream, "earliest")
    try:
        async with asyncio.timeout(10):
            return [await anext(reader) for _ in range(n)]
    finally:
        await reader.aclose()


async def test_appends_keep_their_order_with_requests_and_poison_is_dead_lettered(
    transport: Transport, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    log = RefusingLog(transport.event_log(), down=5)
    path = tmp_path / "outbox.db"
    outbox = Outbox(transport, path, retry_wait=wait_fixed(0.01), event_log=log)
    async with outbox:
        await outbox.append("audit", {"n": 1}, key="a", headers={"x": "1"})
        await outbox.enqueue("orders", WorkRequest(task="t", payload=1))
        await outbox.append("audit", "poison")
        await outbox.append("audit", {"n": 2})
        await outbox.flush(timeout=10)
        assert log.refused == outbox.max_attempts  # only definitive refusals count
        [dead] = await outbox.dead_events()
        assert (dead.kind, dead.target, dead.data, dead.attempts) == (
            "event",
            "audit",
            "poison",
            outbox.max_attempts,
        )
        assert "refused by broker policy" in dead.error
        assert await outbox.dead_letters() == []  # requests only: none dead
    events = await _events(transport, "audit", 2)
    assert [(e.data, e.key, e.headers) for e in events] == [
        ({"n": 1}, "a", {"x": "1"}),
        ({"n": 2}, None, {}),
    ]
    delivery = await transport.request_queue("orders").poll(5)
    assert delivery is not None and delivery.request.payload == 1

    # The operator looks at the file and puts the dead letter back in line.
    assert await asyncio.to_thread(cli, ["outbox", "list", str(path)]) == 0
    out = capsys.readouterr().out
    assert "1 dead letter(s)" in out and "audit" in out and "refused by broker" in out
    assert await asyncio.to_thread(cli, ["--json", "outbox", "list", str(path)]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [d["kind"] for d in listed["dead"]] == ["event"]
    assert await asyncio.to_thread(cli, ["outbox", "requeue", str(path), "--id", "999"]) == 1
    assert "no dead letter with id 999" in capsys.readouterr().err
    assert (
        await asyncio.to_thread(
            cli, ["outbox", "requeue", str(path), "--id", str(listed["dead"][0]["id"])]
        )
        == 0
    )
    assert "requeued 1 dead letter(s)" in capsys.readouterr().out
    async with OutboxFile(path) as box:
        assert await box.depth() == {"event": 1}
        assert await box.dead() == []
    # The next run of the outbox sends it (the broker accepts it now).
    async with Outbox(transport, path, retry_wait=wait_fixed(0.01)) as again:
        await again.flush(timeout=10)
    assert [e.data for e in await _events(transport, "audit", 3)] == [{"n": 1}, {"n": 2}, "poison"]


async def test_two_outboxes_on_one_file_send_each_request_once_in_order(
    transport: Transport, tmp_path: Path
) -> None:
    # Two outboxes on one file (two replicas sharing it, a restart beside
    # the old process; flock excludes two of one process alike): one drains,
    # the other stands by. Both draining sent every row twice, out of order.
    path = tmp_path / "outbox.db"
    ids = await _stored_while_down(transport, path, "shared", 300)
    first = Recording(transport.request_queue("shared"))
    second = Recording(transport.request_queue("shared"))
    a = Outbox(transport, path, queue_factory=lambda n, lv: first)
    b = Outbox(transport, path, queue_factory=lambda n, lv: second)
    async with a, b:
        await asyncio.gather(a.flush(timeout=30), b.flush(timeout=30))
        assert sorted([first.sent, second.sent], key=len) == [[], ids]
        # The one standing by takes over when the other closes: what it
        # stores then goes out through itself.
        standby, standby_sent = (b, second) if first.sent else (a, first)
        await (a if standby is b else b).aclose()
        later = [
            await standby.enqueue("shared", WorkRequest(task="t", payload=i)) for i in range(5)
        ]
        await standby.flush(timeout=30)
    assert standby_sent.sent == [r.request_id for r in later]
    assert await _drained(transport.request_queue("shared")) == ids + [r.request_id for r in later]


async def test_a_running_outbox_sends_rows_requeued_by_another_process(
    transport: Transport, tmp_path: Path
) -> None:
    path = tmp_path / "outbox.db"
    log = RefusingLog(transport.event_log(), down=0)
    async with Outbox(transport, path, retry_wait=wait_fixed(0.01), event_log=log) as outbox:
        await outbox.append("audit", "poison")
        await outbox.flush(timeout=10)
        assert len(await outbox.dead_events()) == 1
        log.refuse_poison = False  # the broker's policy changed
        async with OutboxFile(path) as box:  # as `transport outbox requeue` does
            assert await box.requeue_dead() == 1
        # Not woken by this process (no store, no flush): the idle line
        # looks at the file again by itself.
        assert [e.data for e in await _events(transport, "audit", 1)] == ["poison"]


def test_outbox_cli_reports_a_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert cli(["outbox", "list", str(tmp_path / "none.db")]) == 1
    assert "no outbox file" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()


@pytest.mark.parametrize("action", ["list", "requeue"])
def test_outbox_cli_leaves_a_file_that_is_no_outbox_unchanged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], action: str
) -> None:
    # An application's database (or the transport's own) given by mistake
    # got the outbox's tables added and was switched to WAL, exit 0.
    app = tmp_path / "app.db"
    with sqlite3.connect(app) as conn:
        conn.execute("CREATE TABLE users (id INTEGER PRIMARY KEY)")
    conn.close()
    before = app.read_bytes()
    assert cli(["outbox", action, str(app)]) == 1
    assert "is not an outbox file (it has no outbox table); left unchanged" in (
        capsys.readouterr().err
    )
    assert app.read_bytes() == before
    assert not (tmp_path / "app.db-wal").exists()
    text = tmp_path / "notes.txt"
    text.write_text("not a database at all\n" * 100)
    assert cli(["outbox", action, str(text)]) == 1
    assert "is not an outbox file (file is not a database)" in capsys.readouterr().err
    assert text.read_text() == "not a database at all\n" * 100


async def test_a_file_of_an_earlier_release_is_migrated_and_drained(
    transport: Transport, tmp_path: Path
) -> None:
    path = tmp_path / "old.db"
    body = encode(WorkRequest(task="t", payload="kept", request_id="old-1"))
    with sqlite3.connect(path) as conn:  # the schema before events went through the outbox
        conn.executescript(
            "CREATE TABLE outbox (id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL,"
            " levels INTEGER NOT NULL, body BLOB NOT NULL, attempts INTEGER NOT NULL DEFAULT 0,"
            " last_error TEXT, created_at REAL NOT NULL, register INTEGER NOT NULL DEFAULT 0);"
            "CREATE TABLE outbox_dead (id INTEGER PRIMARY KEY AUTOINCREMENT, queue TEXT NOT NULL,"
            " body BLOB NOT NULL, error TEXT NOT NULL, attempts INTEGER NOT NULL,"
            " dead_at REAL NOT NULL);"
        )
        conn.execute(
            "INSERT INTO outbox(queue, levels, body, created_at) VALUES ('legacy', 1, ?, 0)",
            (body,),
        )
    conn.close()
    async with Outbox(transport, path, retry_wait=wait_fixed(0.01)) as outbox:
        await outbox.flush(timeout=10)
    delivery = await transport.request_queue("legacy").poll(5)
    assert delivery is not None and delivery.request.request_id == "old-1"


async def test_a_request_the_queue_would_refuse_is_refused_when_stored(
    transport: Transport, tmp_path: Path
) -> None:
    # An invalid queue name, or a body over the queue's own limit (below
    # max_payload_bytes on NATS), was stored, tried three times and
    # dead-lettered; appends and publishes were refused at once.
    outbox = Outbox(transport, tmp_path / "outbox.db")
    try:
        with pytest.raises(InvalidNameError):
            await outbox.enqueue("bad.name", WorkRequest(task="cook"))
        limited = transport.request_queue("kitchen")
        limited.max_payload_bytes = 1000  # as a broker with a lower limit sets it
        outbox._queues[("kitchen", 1)] = limited
        with pytest.raises(PayloadTooLargeError):
            await outbox.enqueue("kitchen", WorkRequest(task="cook", payload="x" * 2000))
        assert await outbox.depth() == 0
        await outbox.enqueue("kitchen", WorkRequest(task="cook", payload="x" * 100))
        assert await outbox.depth() == 1
    finally:
        await outbox.aclose()
