"""``QueueStats.head_enqueued_at`` on ``pulsar://``: read through the admin
REST API (peek of the subscription's first unacknowledged message) when
``admin_url`` is set, ``None`` otherwise. pulsar-lite has no admin API, so
the admin path runs against a stand-in that answers like Apache Pulsar's
documented endpoints: it proves what the library asks for and how it reads
the answer, not what a broker does (the conformance scenario
``test_stats_report_how_long_the_head_has_waited`` covers a real one)."""

from __future__ import annotations

import http.server
import json
import threading
from datetime import UTC, datetime, timedelta
from urllib.parse import unquote

import pytest

from transport import WorkRequest, connect, encode

from .conftest import make_config

pytestmark = pytest.mark.broker


class _AdminStandIn:
    """Answers ``GET .../{topic}/stats`` with a scripted backlog for every
    subscription asked about, and ``GET .../{topic}/subscription/{sub}/position/{n}``
    with a scripted message (body + ``X-Pulsar-*`` headers) or 404."""

    def __init__(self) -> None:
        self.backlog = 0
        self.peeked: bytes | None = None
        self.calls: list[tuple[str, str | None]] = []  # (path, Authorization)
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _send(self, code: int, body: bytes, headers: dict[str, str]) -> None:
                self.send_response(code)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_GET(self) -> None:
                path = unquote(self.path.split("?")[0].removeprefix("/admin/v2/persistent/"))
                stand_in.calls.append((path, self.headers.get("Authorization")))
                parts = path.split("/")
                if parts[3:] == ["stats"]:
                    group = stand_in.group
                    stats = {"msgBacklog": stand_in.backlog, "unackedMessages": 0}
                    body = json.dumps({"subscriptions": {group: stats}}).encode()
                    return self._send(200, body, {"Content-Type": "application/json"})
                if parts[3:4] == ["subscription"] and parts[5:] == ["position", "1"]:
                    if parts[4] != stand_in.group or stand_in.peeked is None:
                        return self._send(404, b'{"reason":"Message not found"}', {})
                    headers = {
                        "Content-Type": "application/octet-stream",
                        "X-Pulsar-Message-ID": "7:3",
                        "X-Pulsar-publish-time": "2026-01-01T00:00:00.000Z",
                    }
                    return self._send(200, stand_in.peeked, headers)
                return self._send(404, b'{"reason":"not found"}', {})

        self.group = ""
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def peeks(self) -> list[str]:
        return [path for path, _ in self.calls if "/subscription/" in path]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_without_admin_url_the_head_is_not_known(pulsar_url: str) -> None:
    async with await connect(make_config(pulsar_url)) as transport:
        assert not transport.capabilities.queue_head
        queue = transport.request_queue("orders")
        await queue.enqueue(WorkRequest(task="t"))
        assert (await queue.stats()).head_enqueued_at is None
        await queue.aclose()


async def test_with_admin_url_the_head_is_the_peeked_first_unacknowledged_request(
    pulsar_url: str,
) -> None:
    admin = _AdminStandIn()
    options = {**make_config(pulsar_url).options, "admin_url": admin.url}
    config = make_config(
        pulsar_url, consumer_group="night-shift", token="s3cret-canary", options=options
    )
    admin.group = config.consumer_group
    try:
        async with await connect(config) as transport:
            assert transport.capabilities.queue_head
            queue = transport.request_queue("orders")
            topic = queue.topic.removeprefix("persistent://")  # type: ignore[attr-defined]
            # An empty backlog: no peek at all (a stats call stays one request).
            assert (await queue.stats()).head_enqueued_at is None
            assert admin.peeks() == []
            # The broker's first unacknowledged message is a request of ours.
            first = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=10)
            admin.backlog = 2
            admin.peeked = encode(WorkRequest(request_id="head-1", task="t", enqueued_at=first))
            stats = await queue.stats()
            assert stats.head_enqueued_at == first and stats.depth == 2
            # Position 1 of *this* subscription, with the configured token.
            assert admin.peeks() == [f"{topic}/subscription/night-shift/position/1"]
            assert admin.calls[-1][1] == "Bearer s3cret-canary"
            # Acked between the backlog and the peek: 404, nothing waits.
            admin.peeked = None
            assert (await queue.stats()).head_enqueued_at is None
            # Another program's bytes at the head: not a request, no age.
            admin.peeked = b"\xff not json"
            assert (await queue.stats()).head_enqueued_at is None
            await queue.aclose()
    finally:
        admin.close()
