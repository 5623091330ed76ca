"""Hostile and heavy load: slowloris, connection limits, fd exhaustion, oversized heads."""

from __future__ import annotations

import asyncio
import contextlib
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path

from .rig import connect_tunnel, free_port, running_proxy, start_sink, wait_port


async def _roundtrip(port: int, target: str) -> float:
    start = time.monotonic()
    r, w = await connect_tunnel(port, target)
    w.write(b"x" * 100)
    w.write_eof()
    data = await asyncio.wait_for(r.read(), 10)
    w.close()
    assert data == b"x" * 100
    return time.monotonic() - start


async def test_slowloris_1000_clients_while_normal_clients_served() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 4096 <= hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= 2500, "need ~2500 fds for this test"
    sink = await start_sink(echo=True)
    cfg = """
listen: 127.0.0.1:0
loopback_targets: true
limits: {handshake_timeout_s: 3, max_connections: 5000}
"""
    slow: list[asyncio.StreamWriter] = []
    readers: list[asyncio.StreamReader] = []
    try:
        async with running_proxy(cfg) as (srv, port):
            for i in range(1000):
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(b"CONNECT localhost:1 HTTP/1.1\r\nX-Slow: " + str(i).encode())
                slow.append(w)
                readers.append(r)
            await asyncio.sleep(0)  # let the proxy accept them
            latencies = [await _roundtrip(port, f"localhost:{sink.port}") for _ in range(20)]
            print(
                f"slowloris: 1000 idle heads open; 20 tunnels p50 "
                f"{sorted(latencies)[10] * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms"
            )
            assert max(latencies) < 2.0, latencies
            assert len(srv.state.connections) >= 1000
            # The proxy drops every slow client after the handshake timeout, with a 408.
            answers = await asyncio.wait_for(asyncio.gather(*(r.read() for r in readers)), 30)
            assert all(a.startswith(b"HTTP/1.1 408") for a in answers)
            assert len(srv.state.connections) == 0
            await _roundtrip(port, f"localhost:{sink.port}")
    finally:
        for w in slow:
            w.close()
        sink.server.close()


async def test_max_connections_refused_politely_others_keep_working() -> None:
    sink = await start_sink(echo=True)
    cfg = """
listen: 127.0.0.1:0
loopback_targets: true
limits: {max_connections: 3}
"""
    open_tunnels: list[asyncio.StreamWriter] = []
    try:
        async with running_proxy(cfg) as (_, port):
            for _ in range(3):
                r, w = await connect_tunnel(port, f"localhost:{sink.port}")
                open_tunnels.append(w)
            # HTTP: 503 with a reason
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(f"CONNECT localhost:{sink.port} HTTP/1.1\r\n\r\n".encode())
            resp = await asyncio.wait_for(r.read(), 5)
            w.close()
            assert resp.startswith(b"HTTP/1.1 503"), resp
            assert b"too many connections" in resp
            # SOCKS5: reply 0x01
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"\x05\x01\x00")
            assert await r.readexactly(2) == b"\x05\x00"
            w.write(b"\x05\x01\x00\x01\x7f\x00\x00\x01" + sink.port.to_bytes(2, "big"))
            reply = await asyncio.wait_for(r.readexactly(10), 5)
            w.close()
            assert reply[1] == 0x01
            # The open tunnels still work; closing one frees a slot.
            open_tunnels.pop().close()
            for _ in range(50):
                try:
                    await _roundtrip(port, f"localhost:{sink.port}")
                    break
                except AssertionError:
                    await asyncio.sleep(0.05)
            else:
                raise AssertionError("slot not freed")
    finally:
        for w in open_tunnels:
            w.close()
        sink.server.close()


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (48, 48))


async def test_fd_exhaustion_backs_off_and_recovers(tmp_path: Path) -> None:
    """With 48 fds the proxy runs out; it must not spin, must keep the live tunnel, and recover."""
    port = free_port()
    cfg = tmp_path / "rules.yaml"
    cfg.write_text(f"listen: 127.0.0.1:{port}\nloopback_targets: true\n")
    sink = await start_sink(echo=True)
    log = tmp_path / "proxy.log"
    clients: list[socket.socket] = []
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fwdproxy", "serve", "-c", str(cfg)],
            stdout=f,
            stderr=subprocess.STDOUT,
            preexec_fn=_limit_fds,
        )
    try:
        wait_port(port)
        r, w = await connect_tunnel(port, f"localhost:{sink.port}")
        for _ in range(80):  # far more than the proxy has fds for
            s = socket.socket()
            s.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                s.connect_ex(("127.0.0.1", port))
            clients.append(s)
        await asyncio.sleep(1.5)  # the exhaustion itself is the condition under test
        cpu_before = _cpu_seconds(proc.pid)
        await asyncio.sleep(1.0)
        cpu_used = _cpu_seconds(proc.pid) - cpu_before
        assert cpu_used < 0.5, f"proxy spins while out of fds ({cpu_used:.2f}s CPU in 1s)"
        w.write(b"tunnel alive")
        assert await asyncio.wait_for(r.readexactly(12), 5) == b"tunnel alive"
        for s in clients:
            s.close()
        clients.clear()
        end = time.monotonic() + 15
        while True:
            try:
                await _roundtrip(port, f"localhost:{sink.port}")
                break
            except (AssertionError, OSError, asyncio.TimeoutError, asyncio.IncompleteReadError):
                if time.monotonic() > end:
                    raise
                await asyncio.sleep(0.2)
        w.close()
        assert proc.poll() is None
    finally:
        for s in clients:
            s.close()
        proc.terminate()
        await asyncio.get_running_loop().run_in_executor(None, proc.wait, 10)
        sink.server.close()


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    return ticks / 100.0


async def test_oversized_head_gets_431_and_proxy_keeps_serving() -> None:
    sink = await start_sink(echo=True)
    try:
        async with running_proxy("listen: 127.0.0.1:0\nloopback_targets: true\n") as (_, port):
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"CONNECT localhost:1 HTTP/1.1\r\n" + b"X-Big: " + b"a" * 40000 + b"\r\n\r\n")
            resp = await asyncio.wait_for(r.read(), 5)
            w.close()
            assert resp.startswith(b"HTTP/1.1 431"), resp[:100]
            await _roundtrip(port, f"localhost:{sink.port}")
    finally:
        sink.server.close()


async def test_garbage_on_every_protocol_proxy_keeps_serving() -> None:
    sink = await start_sink(echo=True)
    garbage = [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03",  # TLS hello to a plain port
        b"\x00\x01\x02\x03",
        b"\x05\xff",  # SOCKS5 greeting claiming 255 methods, then EOF
        b"\x05\x01\x00\x05\x09\x00\x01",
        b"\x04\x02\x00\x50\x01\x02\x03\x04\x00",  # SOCKS4 BIND
        b"GET / HTTP/1.1\r\n\r\n",
        b"CONNECT nohostport HTTP/1.1\r\n\r\n",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n",
    ]
    try:
        async with running_proxy("listen: 127.0.0.1:0\nloopback_targets: true\n") as (_, port):
            for g in garbage:
                r, w = await asyncio.open_connection("127.0.0.1", port)
                w.write(g)
                with contextlib.suppress(ConnectionError):
                    w.write_eof()
                with contextlib.suppress(ConnectionError):
                    await asyncio.wait_for(r.read(), 5)
                w.close()
            await _roundtrip(port, f"localhost:{sink.port}")
    finally:
        sink.server.close()
