"""TLS helpers shared by the broker tests: self-signed certificates made with
openssl, and a TLS-terminating proxy for dev brokers without a TLS listener."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path


def make_certificate(directory: Path, name: str, san: str) -> tuple[Path, Path]:
    """A self-signed certificate (its own CA) for ``san`` (``IP:…``/``DNS:…``)."""
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
            "-subj",
            f"/CN={name}",
            "-addext",
            f"subjectAltName={san}",
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(Exception):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(Exception):
        writer.close()


@contextlib.asynccontextmanager
async def tls_proxy(upstream_port: int, cert: Path, key: Path, port: int = 0) -> AsyncIterator[int]:
    """Terminate TLS on 127.0.0.1:``port`` (0: any free port) and forward the
    plain bytes to 127.0.0.1:``upstream_port``; yields the listening port.
    On exit every proxied connection is closed and its tasks are done, so no
    stream outlives the event loop (a writer collected after its loop closed
    warns inside whichever test runs next)."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    writers: set[asyncio.StreamWriter] = set()
    handlers: set[asyncio.Task[None]] = set()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        handlers.add(task)
        writers.add(writer)
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", upstream_port
            )
            writers.add(upstream_writer)
            await asyncio.gather(_pipe(reader, upstream_writer), _pipe(upstream_reader, writer))
        finally:
            handlers.discard(task)

    server = await asyncio.start_server(handle, "127.0.0.1", port, ssl=context)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        # A connection whose handshake was under way when the server closed
        # can still start a handler (and add writers) while this waits:
        # repeat until none is left, iterating over copies.
        while handlers or writers:
            closing = list(writers)
            writers.clear()
            for writer in closing:
                writer.close()
            tasks = list(handlers)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            handlers.difference_update(tasks)
            for writer in closing:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(writer.wait_closed(), 2)
        await server.wait_closed()
