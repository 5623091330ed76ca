"""The real process: reload under load (SIGHUP), graceful drain (SIGTERM), sd_notify order."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .rig import connect_tunnel, free_port, pattern, pattern_digest, start_sink, wait_port

MIB = 1024 * 1024


def rules_text(port: int, extra: str = "", grace: float = 30) -> str:
    return f"""
listen: 127.0.0.1:{port}
loopback_targets: true
limits: {{shutdown_grace_s: {grace}}}
rules:
{extra}  - domain: [never.test]
    action: reject
default: direct
"""


@contextlib.contextmanager
def proxy_process(
    cfg: Path, port: int, env: dict[str, str] | None = None
) -> Iterator[subprocess.Popen[bytes]]:
    log = cfg.with_suffix(".log")
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fwdproxy", "serve", "-c", str(cfg), "--loop", "asyncio"],
            stdout=f,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
    try:
        wait_port(port)
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def log_of(cfg: Path) -> str:
    return cfg.with_suffix(".log").read_text(errors="replace")


async def _wait_log(cfg: Path, text: str, deadline_s: float = 10) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if text in log_of(cfg):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{text!r} not in log:\n{log_of(cfg)}")


async def _stream(port: int, target: str, size: int, started: asyncio.Event) -> tuple[str, str]:
    """Upload `size` bytes and download what the sink sends; return both sha256 digests."""
    r, w = await connect_tunnel(port, target)
    down = hashlib.sha256()

    async def reader() -> None:
        while True:
            data = await r.read(256 * 1024)
            if not data:
                return
            down.update(data)

    rt = asyncio.get_running_loop().create_task(reader())
    sent = 0
    for chunk in pattern(size):
        w.write(chunk)
        await w.drain()
        sent += len(chunk)
        if sent >= 8 * MIB:
            started.set()
    w.write_eof()
    await asyncio.wait_for(rt, 60)
    w.close()
    return "sent", down.hexdigest()


async def test_reload_under_load_loses_nothing(tmp_path: Path) -> None:
    """4 tunnels x 64 MiB up + 16 MiB down while SIGHUP applies one valid and one invalid config."""
    port = free_port()
    cfg = tmp_path / "rules.yaml"
    cfg.write_text(rules_text(port))
    sink = await start_sink(reply_bytes=16 * MIB)
    try:
        with proxy_process(cfg, port) as proc:
            n, size = 4, 64 * MIB
            events = [asyncio.Event() for _ in range(n)]
            tasks = [
                asyncio.get_running_loop().create_task(
                    _stream(port, f"localhost:{sink.port}", size, ev)
                )
                for ev in events
            ]
            await asyncio.wait_for(asyncio.gather(*(e.wait() for e in events)), 60)
            # 1: a valid config that adds a reject rule
            cfg.write_text(rules_text(port, "  - domain: [blocked.test]\n    action: reject\n"))
            proc.send_signal(signal.SIGHUP)
            await _wait_log(cfg, "reloaded")
            # 2: an invalid config: rejected, the previous one stays in force
            cfg.write_text("rules: [ {suffix: x, via: nowhere} ]\nlisten: [\n")
            proc.send_signal(signal.SIGHUP)
            await _wait_log(cfg, "reload rejected")
            results = await asyncio.wait_for(asyncio.gather(*tasks), 120)
            want_down = pattern_digest(16 * MIB, seed=9)
            assert all(down == want_down for _, down in results)
            assert sorted(sink.received) == [pattern_digest(size)] * n
            # The valid reload is in force for new connections; the bad one was not applied.
            r, w = await asyncio.open_connection("127.0.0.1", port)
            w.write(b"CONNECT blocked.test:443 HTTP/1.1\r\nHost: blocked.test:443\r\n\r\n")
            head = await asyncio.wait_for(r.read(), 5)
            w.close()
            assert head.startswith(b"HTTP/1.1 403"), head
            assert b"rules[0]" in head
            assert proc.poll() is None
            text = log_of(cfg)
            assert "YAML syntax error" in text
    finally:
        sink.server.close()


async def test_sigterm_drains_tunnels_then_exits_zero(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "rules.yaml"
    cfg.write_text(rules_text(port, grace=30))
    sink = await start_sink(echo=True)
    try:
        with proxy_process(cfg, port) as proc:
            r, w = await connect_tunnel(port, f"localhost:{sink.port}")
            proc.send_signal(signal.SIGTERM)
            await _wait_log(cfg, "shutting down")
            # New connections are refused while draining...
            refused = False
            for _ in range(50):
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                        pass
                except OSError:
                    refused = True
                    break
                await asyncio.sleep(0.05)
            assert refused
            # ...while the live tunnel keeps working.
            w.write(b"still here")
            assert await asyncio.wait_for(r.readexactly(10), 5) == b"still here"
            assert proc.poll() is None
            w.write_eof()
            await asyncio.wait_for(r.read(), 5)
            w.close()
            start = time.monotonic()
            code = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 15)
            assert code == 0
            assert time.monotonic() - start < 10  # did not wait for the whole grace period
    finally:
        sink.server.close()


async def test_sigterm_closes_stuck_tunnels_after_grace(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "rules.yaml"
    cfg.write_text(rules_text(port, grace=1))
    sink = await start_sink(echo=True)
    try:
        with proxy_process(cfg, port) as proc:
            r, w = await connect_tunnel(port, f"localhost:{sink.port}")
            proc.send_signal(signal.SIGTERM)
            code = await asyncio.get_running_loop().run_in_executor(None, proc.wait, 15)
            assert code == 0
            assert await asyncio.wait_for(r.read(), 5) == b""
            w.close()
    finally:
        sink.server.close()


async def test_sd_notify_order_across_start_reload_stop(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "rules.yaml"
    cfg.write_text(rules_text(port))
    sock_path = str(tmp_path / "notify.sock")
    rx = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    rx.bind(sock_path)
    rx.settimeout(10)
    msgs: list[str] = []

    def recv_until(word: str) -> None:
        while not any(word in m for m in msgs):
            msgs.append(rx.recv(4096).decode())

    try:
        with proxy_process(cfg, port, env={"NOTIFY_SOCKET": sock_path}) as proc:
            recv_until("READY=1")
            proc.send_signal(signal.SIGHUP)
            recv_until("RELOADING=1")
            n = len(msgs)
            while not any("READY=1" in m for m in msgs[n - 1 :]):
                msgs.append(rx.recv(4096).decode())
            proc.send_signal(signal.SIGTERM)
            recv_until("STOPPING=1")
            assert proc.wait(15) == 0
    finally:
        rx.close()
    kinds = [k for m in msgs for k in ("READY=1", "RELOADING=1", "STOPPING=1") if k in m]
    assert kinds == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"], msgs
    assert any("STATUS=" in m and str(port) in m for m in msgs[:1]), msgs
