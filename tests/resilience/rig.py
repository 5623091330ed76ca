"""Fixtures for fault-injection tests: real upstream processes, origins and in-process proxies."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

from fwdproxy.config import Config, parse_config
from fwdproxy.config.yamlsrc import load_yaml
from fwdproxy.server import Server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, deadline_s: float = 10.0, host: str = "127.0.0.1") -> None:
    """Poll until something accepts on host:port (bounded)."""
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.2):
            return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listening on {host}:{port} after {deadline_s}s")


@dataclass
class Proc:
    proc: subprocess.Popen[bytes]
    port: int
    log: str

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)

    def text(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()


@contextlib.contextmanager
def socks_upstream(tmp_path: Any, port: int | None = None) -> Iterator[Proc]:
    """A real, independent SOCKS5 server (asyncio-socks-server) as a subprocess."""
    port = port or free_port()
    log = str(tmp_path / f"socks-{port}.log")
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "asyncio_socks_server",
                "-H",
                "127.0.0.1",
                "-P",
                str(port),
                "--access-log",
            ],
            stdout=f,
            stderr=subprocess.STDOUT,
        )
    p = Proc(proc, port, log)
    try:
        wait_port(port)
        yield p
    finally:
        p.stop()


@dataclass
class Sink:
    """A TCP origin: answers each connection with `reply_bytes` of data, hashes what it got."""

    server: asyncio.base_events.Server
    port: int
    received: list[str] = field(default_factory=list)


async def start_sink(reply_bytes: int = 0, echo: bool = False) -> Sink:
    sink: Sink

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        h = hashlib.sha256()
        send = asyncio.get_running_loop().create_task(_send_pattern(w, reply_bytes))
        try:
            while True:
                data = await r.read(256 * 1024)
                if not data:
                    break
                h.update(data)
                if echo:
                    w.write(data)
                    await w.drain()
            await send
            sink.received.append(h.hexdigest())
            if w.can_write_eof():
                w.write_eof()
        except (ConnectionError, OSError):
            send.cancel()
        finally:
            w.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    sink = Sink(server, server.sockets[0].getsockname()[1])
    return sink


def pattern(n: int, seed: int = 7) -> Iterator[bytes]:
    """Deterministic pseudo-random chunks totalling n bytes (cheap to regenerate and hash)."""
    block = hashlib.sha256(str(seed).encode()).digest() * 2048  # 64 KiB
    sent = 0
    i = 0
    while sent < n:
        chunk = block[i % 7 :] + block[: i % 7]
        chunk = chunk[: min(len(chunk), n - sent)]
        sent += len(chunk)
        i += 1
        yield chunk


def pattern_digest(n: int, seed: int = 7) -> str:
    h = hashlib.sha256()
    for c in pattern(n, seed):
        h.update(c)
    return h.hexdigest()


async def _send_pattern(w: asyncio.StreamWriter, n: int) -> None:
    for chunk in pattern(n, seed=9):
        w.write(chunk)
        await w.drain()


def make_config(text: str, path: str = "test.yaml") -> Config:
    return parse_config(load_yaml(text), path)


@contextlib.asynccontextmanager
async def running_proxy(text: str, **kw: Any) -> AsyncIterator[tuple[Server, int]]:
    server = Server(make_config(text), **kw)
    await server.start()
    try:
        yield server, server.addresses[0][1]
    finally:
        await server.stop(grace_s=1)


async def connect_tunnel(
    port: int, target: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """HTTP CONNECT through the proxy; asserts the 200."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 15)
    assert head.startswith(b"HTTP/1.1 200"), head
    return r, w


async def http_status_via(port: int, target: str) -> tuple[int, bytes]:
    """CONNECT and return (status, whole response) without asserting success."""
    r, w = await asyncio.open_connection("127.0.0.1", port)
    try:
        w.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 15)
        status = int(head.split(b" ", 2)[1])
        body = b""
        if status != 200:
            body = await asyncio.wait_for(r.read(), 5)
        return status, head + body
    finally:
        w.close()
