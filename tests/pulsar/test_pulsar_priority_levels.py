"""A priority worker opened with fewer levels than its producers is warned
on ``pulsar://`` when ``admin_url`` is set: whether the levels above its
own exist is read from the namespace's topic list. pulsar-lite has no admin
API, so the requests go through pulsar-lite and the topic list comes from
a stand-in that answers like Apache Pulsar's documented endpoint
(``GET /admin/v2/persistent/{tenant}/{namespace}``): it proves what the
library asks and how it reads the answer, not what a broker lists. Without
``admin_url`` the conformance scenario checks that nothing is said."""

from __future__ import annotations

import http.server
import json
import logging
import threading
from datetime import timedelta

import pytest

from transport import WorkRequest, connect

from .conftest import make_config

pytestmark = pytest.mark.broker


class _TopicList:
    """Answers ``GET /admin/v2/persistent/{tenant}/{namespace}`` with
    :attr:`topics`; every other request 404."""

    def __init__(self) -> None:
        self.topics: list[str] = []
        self.asked: list[str] = []
        stand_in = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_GET(self) -> None:
                path = self.path.split("?")[0].removeprefix("/admin/v2/persistent/")
                stand_in.asked.append(path)
                if path.count("/") == 1:  # tenant/namespace: the topic list
                    body, code = json.dumps(stand_in.topics).encode(), 200
                else:
                    body, code = b'{"reason":"not found"}', 404
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


async def test_with_admin_url_levels_above_the_workers_are_named(
    pulsar_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    admin = _TopicList()
    config = make_config(pulsar_url)
    config = config.model_copy(update={"options": {**config.options, "admin_url": admin.url}})
    hour = timedelta(hours=1)
    try:
        producer = await connect(config)
        try:
            pq = producer.priority_queue("kitchen", levels=5, aging_interval=hour)
            urgent = await pq.enqueue(WorkRequest(task="t"), priority=0)
            await pq.enqueue(WorkRequest(task="t"), priority=4)
            # What the namespace lists: the topics of the levels written to.
            admin.topics = [
                topic
                for level in (0, 4)
                for topic in producer._broker_objects("queue", f"kitchen__p{level}")
            ]
        finally:
            await producer.aclose()
        worker_client = await connect(config)
        try:
            worker = worker_client.priority_queue("kitchen", levels=3, aging_interval=hour)
            with caplog.at_level(logging.WARNING, logger="transport.priority"):
                delivery = await worker.poll(20)
                assert delivery is not None and delivery.request.request_id == urgent.request_id
                assert await delivery.ack()
                await worker._levels_checked()
        finally:
            await worker_client.aclose()
    finally:
        admin.close()
    said = [r.getMessage() for r in caplog.records if r.name == "transport.priority"]
    assert len(said) == 1, said
    assert "priority queue 'kitchen' is polled with 3 levels" in said[0]
    assert "level(s) 4 exist on the broker" in said[0] and "levels=5" in said[0], said
    assert [p for p in admin.asked if p.count("/") == 1], admin.asked  # the list was read
