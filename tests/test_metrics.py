"""Prometheus metrics after real traffic through a real in-process proxy.

The rig here (a SOCKS5 upstream subprocess, loopback targets, a Server with its admin API) is
shared with test_admin.py and test_dashboard_browser.py. Every assertion reads /metrics over
HTTP, as Prometheus would, after bytes went through real sockets.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from fwdproxy import __version__
from fwdproxy.admin.app import AdminServer
from fwdproxy.admin.metrics import ByteLedger, ProxyMetrics, ThroughputSampler
from fwdproxy.config import AdminSpec, Config, parse_config
from fwdproxy.config.yamlsrc import load_yaml
from fwdproxy.core.errors import ConfigError
from fwdproxy.proxy.state import ConnInfo
from fwdproxy.server import Server

DEADLINE_S = 10.0

CONFIG = """
listen: 127.0.0.1:0
loopback_targets: true
upstreams:
  tunnel: socks5://127.0.0.1:{socks_port}
  dead: socks5://127.0.0.1:{dead_port}
registries:
  lab:
    title: Lab registry
    refs: [localhost]
    api: localhost
    hosts:
      - {{domain: localhost, role: api}}
  mirror:
    title: Mirror registry
    refs: [mirror.test]
    api: mirror.test
    hosts:
      - {{domain: mirror.test, role: api}}
      - {{domain: blobs.mirror.test, role: blob}}
hosts:
  mirror.test: 127.0.0.1
  blobs.mirror.test: 127.0.0.1
  plain.test: 127.0.0.1
rules:
  - {{name: lab-via-tunnel, registries: [lab], via: tunnel}}
  - {{name: mirror-direct, registries: [mirror], action: direct}}
  - {{name: blocked, domain: [blocked.test], action: reject}}
  - {{name: dead-upstream, domain: [dead.test], via: dead}}
default: direct
"""


# -- rig (shared with test_admin.py and test_dashboard_browser.py) --------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, deadline_s: float = DEADLINE_S) -> None:
    end = time.monotonic() + deadline_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > end:
                raise
            time.sleep(0.05)


def socks_upstream() -> Iterator[int]:
    """A real SOCKS5 server (asyncio-socks-server) on loopback, as the `tunnel` upstream."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "asyncio_socks_server", "-H", "127.0.0.1", "-P", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_port(port)
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture(scope="session")
def socks_port() -> Iterator[int]:
    yield from socks_upstream()


def make_config(
    socks_port: int, token: str | None = None, digest: str = "d1", extra_rules: str = ""
) -> Config:
    text = CONFIG.format(socks_port=socks_port, dead_port=free_port())
    text = text.replace("default: direct", extra_rules + "default: direct")
    cfg = parse_config(load_yaml(text), "t.yaml")
    return dataclasses.replace(cfg, admin=AdminSpec("127.0.0.1", 0, token), digest=digest)


async def poll(check: Callable[[], Any], what: str, deadline_s: float = DEADLINE_S) -> Any:
    """Await until check() is truthy (bounded), returning its value."""
    end = time.monotonic() + deadline_s
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def running(cfg: Config, **kw: Any) -> AsyncIterator[Server]:
    kw.setdefault("admin_factory", AdminServer)  # as `fwdproxy serve` wires it
    server = Server(cfg, **kw)
    await server.start()
    try:
        yield server
    finally:
        await server.stop(grace_s=0.5)


def proxy_addr(server: Server) -> tuple[str, int]:
    return server.addresses[0]


def admin_url(server: Server) -> str:
    host, port = server.admin.addresses[0]
    return f"http://{host}:{port}"


@contextlib.asynccontextmanager
async def target_server(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
) -> AsyncIterator[int]:
    """A loopback TCP target; yields its port. Handlers are cancelled at exit."""
    tasks: set[asyncio.Task[None]] = set()

    def spawn(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        t = asyncio.get_running_loop().create_task(_guarded(handler, r, w))
        tasks.add(t)
        t.add_done_callback(tasks.discard)

    srv = await asyncio.start_server(spawn, "127.0.0.1", 0)
    try:
        yield int(srv.sockets[0].getsockname()[1])
    finally:
        srv.close()
        for t in list(tasks):
            t.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        await srv.wait_closed()


async def _guarded(
    handler: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]],
    r: asyncio.StreamReader,
    w: asyncio.StreamWriter,
) -> None:
    try:
        await handler(r, w)
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        w.close()


async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while data := await r.read(65536):
        w.write(data)
        await w.drain()


async def stream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    """After the client's first byte, sends 32 KiB chunks until it goes away: a 'download'.

    Client-first on purpose: asyncio-socks-server 0.3 relays target bytes that arrive before
    its own SOCKS reply ahead of that reply, which breaks server-first protocols through it.
    """
    if not await r.read(1):
        return
    chunk = b"x" * 32768
    while not w.is_closing():
        w.write(chunk)
        await w.drain()
        await asyncio.sleep(0.02)


async def connect_tunnel(
    server: Server, host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """HTTP CONNECT through the proxy; fails unless the reply is 200."""
    r, w = await asyncio.open_connection(*proxy_addr(server))
    w.write(f"CONNECT {host}:{port} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode())
    head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), DEADLINE_S)
    if not head.startswith(b"HTTP/1.1 200"):
        body = await asyncio.wait_for(r.read(4096), DEADLINE_S)
        w.close()
        status = head.split(b"\r\n", 1)[0].decode()
        raise ConnectionRefusedError(f"{status}: {body.decode(errors='replace').strip()}")
    return r, w


async def connect_socks5(
    server: Server, host: str, port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """SOCKS5 CONNECT with a domain name through the proxy."""
    r, w = await asyncio.open_connection(*proxy_addr(server))
    w.write(b"\x05\x01\x00")
    assert await r.readexactly(2) == b"\x05\x00"
    name = host.encode()
    w.write(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + port.to_bytes(2, "big"))
    ver, rep, _, atyp = await asyncio.wait_for(r.readexactly(4), DEADLINE_S)
    assert (ver, rep) == (5, 0), f"SOCKS5 reply {rep}"
    await r.readexactly({1: 4, 4: 16}[atyp] + 2)
    return r, w


async def roundtrip(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
    w.write(b"a" * n)
    await w.drain()
    got = await asyncio.wait_for(r.readexactly(n), DEADLINE_S)
    assert len(got) == n


async def close_and_settle(server: Server, w: asyncio.StreamWriter) -> None:
    w.close()
    await poll(lambda: not server.state.connections, "the proxy to close the connection")


async def scrape(
    server: Server, token: str | None = None
) -> dict[tuple[str, frozenset[Any]], float]:
    """GET /metrics and parse it with prometheus_client's own parser."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with (
        aiohttp.ClientSession() as http,
        http.get(admin_url(server) + "/metrics", headers=headers) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        text = await resp.text()
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, frozenset(s.labels.items()))] = s.value
    return out


def value(samples: dict[tuple[str, frozenset[Any]], float], name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


# -- tests ------------------------------------------------------------------------------------


async def test_metrics_count_tunnelled_and_direct_connections(socks_port: int) -> None:
    async with running(make_config(socks_port)) as server, target_server(echo) as port:
        r, w = await connect_tunnel(server, "localhost", port)
        await roundtrip(r, w, 1000)
        await close_and_settle(server, w)
        r, w = await connect_socks5(server, "mirror.test", port)
        await roundtrip(r, w, 500)
        await roundtrip(r, w, 250)
        await close_and_settle(server, w)
        m = await scrape(server)

    conns = "fwdproxy_connections_total"
    via = {"route": "tunnel", "rule": "lab-via-tunnel", "registry": "lab", "outcome": "ok"}
    assert value(m, conns, protocol="connect", **via) == 1
    direct = {"route": "direct", "rule": "mirror-direct", "registry": "mirror", "outcome": "ok"}
    assert value(m, conns, protocol="socks5", **direct) == 1
    assert value(m, "fwdproxy_bytes_total", direction="up", route="tunnel", registry="lab") == 1000
    assert (
        value(m, "fwdproxy_bytes_total", direction="down", route="tunnel", registry="lab") == 1000
    )
    assert (
        value(m, "fwdproxy_bytes_total", direction="up", route="direct", registry="mirror") == 750
    )
    assert (
        value(m, "fwdproxy_bytes_total", direction="down", route="direct", registry="mirror") == 750
    )
    assert value(m, "fwdproxy_dial_duration_seconds_count", route="tunnel") == 1
    assert value(m, "fwdproxy_dial_duration_seconds_count", route="direct") == 1
    assert 0 < value(m, "fwdproxy_dial_duration_seconds_sum", route="tunnel") < DEADLINE_S
    assert value(m, "fwdproxy_active_connections", route="direct") == 0
    assert ("fwdproxy_active_connections", frozenset({("route", "tunnel")})) in m
    member = f"socks5://127.0.0.1:{socks_port}"
    assert value(m, "fwdproxy_upstream_member_healthy", upstream="tunnel", member=member) == 1
    assert value(m, "fwdproxy_config_info", path="t.yaml", digest="d1") == 1
    assert value(m, "fwdproxy_build_info", version=__version__) == 1
    assert value(m, "fwdproxy_accepting") == 1
    assert sum(v for (n, _), v in m.items() if n == "fwdproxy_handshake_errors_total") == 0


async def test_metrics_never_label_by_destination_host(socks_port: int) -> None:
    async with running(make_config(socks_port)) as server, target_server(echo) as port:
        for host in ("mirror.test", "blobs.mirror.test", "plain.test", "localhost"):
            r, w = await connect_tunnel(server, host, port)
            await roundtrip(r, w, 10)
            await close_and_settle(server, w)
        m = await scrape(server)
    labels = {v for (_, ls) in m for (_, v) in ls}
    for host in ("mirror.test", "blobs.mirror.test", "plain.test", f"localhost:{port}", str(port)):
        assert host not in labels
    assert value(m, "fwdproxy_connections_total", protocol="connect", route="direct",
                 rule="default", registry="", outcome="ok") == 1  # fmt: skip
    assert value(m, "fwdproxy_bytes_total", direction="up", route="direct", registry="mirror") == 20


async def test_metrics_handshake_errors_by_kind(socks_port: int) -> None:
    async with running(make_config(socks_port)) as server:
        with pytest.raises(ConnectionRefusedError, match="403"):
            await connect_tunnel(server, "blocked.test", 443)
        with pytest.raises(ConnectionRefusedError, match=r"50[234]"):
            await connect_tunnel(server, "plain.test", free_port())
        r, w = await asyncio.open_connection(*proxy_addr(server))
        w.write(b"GARBAGE / HTTP/1.1\r\n\r\n")
        await r.read()
        w.close()
        await poll(lambda: not server.state.connections, "connections to end")
        m = await scrape(server)
    errors = {
        dict(ls)["kind"]: v for (n, ls), v in m.items() if n == "fwdproxy_handshake_errors_total"
    }
    assert errors.pop("rejected") == 1
    assert errors.pop("bad-request") == 1
    assert [(k[:5], v) for k, v in errors.items()] == [("dial-", 1)]
    assert value(m, "fwdproxy_connections_total", protocol="connect", route="reject",
                 rule="blocked", registry="", outcome="rejected") == 1  # fmt: skip
    assert value(m, "fwdproxy_dial_duration_seconds_count", route="direct") == 1


async def test_metrics_count_live_download_bytes_without_double_counting(socks_port: int) -> None:
    async with running(make_config(socks_port)) as server, target_server(stream) as port:
        r, w = await connect_tunnel(server, "localhost", port)
        w.write(b"G")
        got = 0
        while got < 300_000:
            got += len(await asyncio.wait_for(r.read(65536), DEADLINE_S))
        live = await scrape(server)
        down = value(live, "fwdproxy_bytes_total", direction="down", route="tunnel", registry="lab")
        assert down >= got
        assert value(live, "fwdproxy_active_connections", route="tunnel") == 1
        info = next(iter(server.state.connections.values()))
        again = await scrape(server)
        later = value(
            again, "fwdproxy_bytes_total", direction="down", route="tunnel", registry="lab"
        )
        assert later >= down
        await close_and_settle(server, w)
        final = await scrape(server)
    total = value(final, "fwdproxy_bytes_total", direction="down", route="tunnel", registry="lab")
    assert total == info.counters.down  # every byte exactly once
    assert value(final, "fwdproxy_active_connections", route="tunnel") == 0


async def test_metrics_reload_counters_and_config_digest(socks_port: int) -> None:
    sources: list[Config] = []

    def source() -> Config:
        if not sources:
            raise ConfigError(["t.yaml:3: rules[0]: broken on purpose"])
        return sources.pop()

    async with running(make_config(socks_port), reload_source=source) as server:
        assert await server.reload() == ["t.yaml:3: rules[0]: broken on purpose"]
        sources.append(make_config(socks_port, digest="d2"))
        assert await server.reload() == []
        m = await scrape(server)
    assert value(m, "fwdproxy_config_reloads_total", result="ok") == 1
    assert value(m, "fwdproxy_config_reloads_total", result="failed") == 1
    assert value(m, "fwdproxy_config_info", path="t.yaml", digest="d2") == 1
    assert value(m, "fwdproxy_config_info", path="t.yaml", digest="d1") == 0
    assert value(m, "fwdproxy_config_last_reload_timestamp_seconds") > 0


async def test_metrics_upstream_failures_survive_a_reload(socks_port: int) -> None:
    """A reload builds a new pool whose counts restart at 0; the counter must not go back."""
    cfg = make_config(socks_port)
    member = cfg.upstreams["dead"].members[0].url
    async with running(cfg, reload_source=lambda: cfg) as server:
        with pytest.raises(ConnectionRefusedError, match=r"50[234]"):
            await connect_tunnel(server, "dead.test", 443)
        m = await scrape(server)
        assert (
            value(m, "fwdproxy_upstream_member_failures_total", upstream="dead", member=member) == 1
        )
        assert value(m, "fwdproxy_upstream_member_healthy", upstream="dead", member=member) == 1
        assert await server.reload() == []
        with pytest.raises(ConnectionRefusedError, match=r"50[234]"):
            await connect_tunnel(server, "dead.test", 443)  # on the new pool, not yet scraped
        assert await server.reload() == []
        m = await scrape(server)
    assert value(m, "fwdproxy_upstream_member_failures_total", upstream="dead", member=member) == 2
    assert value(m, "fwdproxy_upstream_failovers_total", upstream="dead") == 0
    assert ("fwdproxy_upstream_failovers_total", frozenset({("upstream", "dead")})) in m


async def test_metrics_registry_is_per_server(socks_port: int) -> None:
    async with running(make_config(socks_port)) as a, running(make_config(socks_port)) as b:
        async with target_server(echo) as port:
            r, w = await connect_tunnel(a, "plain.test", port)
            await roundtrip(r, w, 5)
            await close_and_settle(a, w)
        ma, mb = await scrape(a), await scrape(b)
    key = {"protocol": "connect", "route": "direct", "rule": "default", "registry": ""}
    assert value(ma, "fwdproxy_connections_total", **key, outcome="ok") == 1
    assert value(mb, "fwdproxy_connections_total", **key, outcome="ok") == 0


async def test_metrics_observer_is_removed_when_admin_stops(socks_port: int) -> None:
    async with running(make_config(socks_port)) as server:
        metrics = server.admin.metrics
        assert metrics in server.state.observers
    assert metrics not in server.state.observers


# -- the ledger and sampler on their own (fed ConnInfo objects, no sockets) ----------------------


def _info(route: str | None, registry: str | None = None) -> ConnInfo:
    from fwdproxy.routing.rules import Decision

    info = ConnInfo(client="127.0.0.1:1", listener="127.0.0.1:2")
    if route is not None:
        action = route if route in ("direct", "reject") else "via"
        upstream = None if action != "via" else route
        info.decision = Decision(action, upstream, "r", registry=registry, role="api")
    return info


def test_ledger_counts_each_byte_once_across_route_changes() -> None:
    ledger = ByteLedger()
    info = _info("tunnel", "lab")
    info.counters.down = 100
    ledger.settle(info)
    ledger.settle(info)
    info.decision = _info("direct").decision  # plain HTTP: the next request went elsewhere
    info.counters.down = 150
    info.counters.up = 7
    ledger.close(info)
    assert ledger.totals == {("tunnel", "lab"): [0, 100], ("direct", ""): [7, 50]}


def test_sampler_rates_from_deltas(socks_port: int) -> None:
    state = Server(make_config(socks_port)).state
    metrics = ProxyMetrics(state)
    sampler = ThroughputSampler(state, metrics.ledger, interval_s=1.0, keep_s=3.0)
    info = _info("tunnel", "lab")
    state.connections[info.id] = info
    sampler.sample(now=10.0)
    info.counters.down, info.counters.up = 2000, 10
    sampler.sample(now=12.0)
    assert sampler.rate(info.id) == (5.0, 1000.0)
    assert sampler.current() == {("tunnel", "lab"): (5.0, 1000.0)}
    for k in range(5):
        sampler.sample(now=13.0 + k)
    series = sampler.series()
    assert len(series["t"]) == 3  # keep_s / interval_s
    assert series["series"] == [
        {"route": "tunnel", "registry": "lab", "up": [0.0] * 3, "down": [0.0] * 3}
    ]
    state.connections.clear()
    sampler.sample(now=20.0)
    assert sampler.rate(info.id) == (0.0, 0.0)


def test_handshake_errors_count_only_failed_handshakes_and_dials(socks_port: int) -> None:
    """Resets, relay errors, idle timeouts and closes by the server are not handshake errors."""
    from fwdproxy.core.outcome import Outcome

    state = Server(make_config(socks_port)).state
    metrics = ProxyMetrics(state)
    ends = [
        Outcome.OK,
        Outcome.CLIENT_RESET,
        Outcome.TARGET_RESET,
        Outcome.CLIENT_ERROR,
        Outcome.IDLE_TIMEOUT,
        Outcome.CLOSED_BY_SERVER,
        Outcome.REJECTED,
        Outcome.DIAL_TIMEOUT,
        Outcome.BAD_REQUEST,
    ]
    for outcome in ends:
        info = _info("tunnel", "lab")
        info.outcome = outcome
        metrics.closed(info)
    counted = {
        s.labels["kind"]: s.value
        for m in metrics.registry.collect()
        if m.name == "fwdproxy_handshake_errors"
        for s in m.samples
        if s.name.endswith("_total")
    }
    assert counted == {"rejected": 1.0, "dial-timeout": 1.0, "bad-request": 1.0}
    assert metrics.errors_total == 5  # client-error and closed-by-server: errors, not handshake
