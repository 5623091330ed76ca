"""Upstream groups under faults: a member killed, blackholed, recovering; live tunnels' fate."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fwdproxy.core.errors import DialError
from fwdproxy.net.dial import Deadline

from .rig import (
    connect_tunnel,
    free_port,
    http_status_via,
    running_proxy,
    socks_upstream,
    start_sink,
)


def group_config(p1: int, p2: int, sink_port: int, interval: float = 0.2) -> str:
    return f"""
listen: 127.0.0.1:0
loopback_targets: true
limits: {{dial_timeout_s: 4}}
upstreams:
  tunnel:
    members: [socks5://127.0.0.1:{p1}, socks5://127.0.0.1:{p2}]
    policy: fallback
    check: {{interval_s: {interval}, timeout_s: 1, target: "localhost:{sink_port}", rise: 2}}
rules:
  - domain: [localhost]
    via: tunnel
"""


async def _roundtrip(port: int, target: str) -> None:
    r, w = await connect_tunnel(port, target)
    w.write(b"ping")
    w.write_eof()
    await asyncio.wait_for(r.read(), 10)
    w.close()


def _carried(log_text: str, port: int) -> int:
    return log_text.count(f"('127.0.0.1', {port})")


async def _until(pred: Any, deadline_s: float = 10.0) -> None:
    end = time.monotonic() + deadline_s
    while time.monotonic() < end:
        if pred():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("condition not reached in time")


async def test_failover_when_primary_killed(tmp_path: Any) -> None:
    sink = await start_sink()
    target = f"localhost:{sink.port}"
    try:
        with socks_upstream(tmp_path) as a, socks_upstream(tmp_path) as b:
            async with running_proxy(group_config(a.port, b.port, sink.port, 30)) as (srv, port):
                await _roundtrip(port, target)
                assert _carried(a.text(), sink.port) == 1
                assert _carried(b.text(), sink.port) == 0
                a.stop()
                start = time.monotonic()
                await _roundtrip(port, target)  # the first tunnel after the kill must not fail
                failover_s = time.monotonic() - start
                print(f"failover: first tunnel after the kill took {failover_s * 1000:.1f} ms")
                assert _carried(b.text(), sink.port) == 1
                members = srv.state.pool.groups["tunnel"].members
                assert [m.healthy for m in members] == [False, True]
                assert srv.state.pool.groups["tunnel"].failovers == 1
                # Once marked down, new tunnels go straight to the secondary.
                for _ in range(5):
                    await _roundtrip(port, target)
                assert _carried(b.text(), sink.port) == 6
                assert failover_s < 2.0, failover_s
    finally:
        sink.server.close()


async def test_failover_blackholed_primary_within_deadline(tmp_path: Any) -> None:
    """A primary that accepts TCP but never answers: the secondary still serves in time."""
    sink = await start_sink()
    held: list[asyncio.StreamWriter] = []

    async def blackhole(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        held.append(w)

    hole = await asyncio.start_server(blackhole, "127.0.0.1", 0)
    hole_port = hole.sockets[0].getsockname()[1]
    try:
        with socks_upstream(tmp_path) as b:
            async with running_proxy(group_config(hole_port, b.port, sink.port, 30)) as (srv, port):
                start = time.monotonic()
                await _roundtrip(port, f"localhost:{sink.port}")
                elapsed = time.monotonic() - start
                print(f"failover past a blackholed primary took {elapsed * 1000:.0f} ms")
                assert elapsed < 4.0  # within the 4 s dial deadline
                assert _carried(b.text(), sink.port) == 1
                assert srv.state.pool.groups["tunnel"].members[0].healthy is False
    finally:
        for w in held:
            w.close()
        hole.close()
        sink.server.close()


async def test_all_members_down_gives_502_naming_them(tmp_path: Any) -> None:
    p1, p2 = free_port(), free_port()
    sink = await start_sink()
    try:
        async with running_proxy(group_config(p1, p2, sink.port, 30)) as (_, port):
            status, body = await http_status_via(port, f"localhost:{sink.port}")
            assert status == 502
            assert b"all members of tunnel failed" in body
            assert str(p1).encode() in body and str(p2).encode() in body
    finally:
        sink.server.close()


async def test_recovered_primary_taken_back_after_rise_checks(tmp_path: Any) -> None:
    sink = await start_sink()
    target = f"localhost:{sink.port}"
    p1 = free_port()
    try:
        with socks_upstream(tmp_path) as b:
            async with running_proxy(group_config(p1, b.port, sink.port, 30)) as (srv, port):
                pool = srv.state.pool
                await pool.check_once("tunnel")
                m1 = pool.groups["tunnel"].members[0]
                assert m1.healthy is False
                with socks_upstream(tmp_path, port=p1) as a:
                    await pool.check_once("tunnel")
                    assert m1.healthy is False  # one good check is not enough (rise: 2)
                    await pool.check_once("tunnel")
                    assert m1.healthy is True
                    await _roundtrip(port, target)
                    assert _carried(a.text(), sink.port) >= 1
    finally:
        sink.server.close()


async def test_periodic_checks_mark_member_down_without_traffic(tmp_path: Any) -> None:
    sink = await start_sink()
    try:
        with socks_upstream(tmp_path) as a, socks_upstream(tmp_path) as b:
            async with running_proxy(group_config(a.port, b.port, sink.port, 0.1)) as (srv, _):
                m1 = srv.state.pool.groups["tunnel"].members[0]
                a.stop()
                await _until(lambda: not m1.healthy)
                assert "refused" in (m1.last_error or "").lower() or m1.last_error
                assert srv.state.pool.healthy("tunnel")  # b still up
                assert b.proc.poll() is None
    finally:
        sink.server.close()


async def test_live_tunnel_ends_when_its_member_dies_new_ones_use_next(tmp_path: Any) -> None:
    sink = await start_sink(echo=True)
    target = f"localhost:{sink.port}"
    try:
        with socks_upstream(tmp_path) as a, socks_upstream(tmp_path) as b:
            async with running_proxy(group_config(a.port, b.port, sink.port, 30)) as (_, port):
                r, w = await connect_tunnel(port, target)
                w.write(b"before")
                assert await asyncio.wait_for(r.readexactly(6), 5) == b"before"
                a.stop()
                rest = await asyncio.wait_for(r.read(), 10)  # ends, without hanging
                assert rest == b""
                w.close()
                await _roundtrip(port, target)
                assert _carried(b.text(), sink.port) == 1
    finally:
        sink.server.close()


async def test_target_failure_through_healthy_member_does_not_fail_over(tmp_path: Any) -> None:
    """The upstream answered 'refused': the member is fine, only that target is down."""
    sink = await start_sink()
    dead = free_port()
    try:
        with socks_upstream(tmp_path) as a, socks_upstream(tmp_path) as b:
            async with running_proxy(group_config(a.port, b.port, sink.port, 30)) as (srv, port):
                status, _body = await http_status_via(port, f"localhost:{dead}")
                assert status == 502
                assert srv.state.pool.groups["tunnel"].members[0].healthy is True
                assert _carried(b.text(), dead) == 0
    finally:
        sink.server.close()


async def test_pool_respects_deadline_when_dial_hangs(tmp_path: Any) -> None:
    from fwdproxy.net.upstreams import UpstreamPool

    from .rig import make_config

    cfg = make_config(group_config(free_port(), free_port(), 1))

    async def hang(spec: Any, host: str, port: int, t: float) -> Any:
        await asyncio.sleep(t)
        from fwdproxy.core.errors import DialTimeout

        raise DialTimeout("slow", hop=spec.name)

    pool = UpstreamPool(cfg, dialer=hang)
    start = time.monotonic()
    try:
        await pool.open("tunnel", "localhost", 1, Deadline(0.5))
    except DialError as e:
        assert "all members" in str(e)
    assert time.monotonic() - start < 1.0
