"""The admin API over real loopback sockets: every endpoint, its status codes and JSON shapes.

The proxy and its admin listener run in-process (Server with `admin:`), tunnels go through the
real SOCKS5 upstream subprocess of test_metrics.py's rig.
"""

from __future__ import annotations

import asyncio
import dataclasses
import socket
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest
from test_metrics import (
    DEADLINE_S,
    admin_url,
    close_and_settle,
    connect_tunnel,
    echo,
    make_config,
    poll,
    roundtrip,
    running,
    socks_upstream,
    stream,
    target_server,
)

from fwdproxy.admin.app import AdminServer
from fwdproxy.config import Config, Listener, parse_config
from fwdproxy.config.yamlsrc import load_yaml
from fwdproxy.core.errors import ConfigError
from fwdproxy.server import Server

TOKEN = "s3cret-token"


@pytest.fixture(scope="session")
def socks_port() -> Iterator[int]:
    yield from socks_upstream()


CONNECTION_KEYS = {
    "id", "client", "protocol", "target", "sni", "user", "rule", "route", "registry", "role",
    "bytes_up", "bytes_down", "age_s", "outcome", "listener", "upstream", "dial_s", "rate_up",
    "rate_down",
}  # fmt: skip


async def call(
    server: Server,
    method: str,
    path: str,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any, Any]:
    """One request to the admin API; returns (status, JSON body or text, headers)."""
    hdrs = dict(headers or {})
    if token:
        hdrs["Authorization"] = f"Bearer {token}"
    async with (
        aiohttp.ClientSession() as http,
        http.request(method, admin_url(server) + path, headers=hdrs) as resp,
    ):
        if resp.content_type == "application/json":
            body: Any = await resp.json()
        else:
            body = await resp.text()
        return resp.status, body, resp.headers


# -- probes -------------------------------------------------------------------------------------


async def test_admin_healthz_and_readyz_ok(socks_port: int) -> None:
    async with running(make_config(socks_port)) as server:
        status, body, _ = await call(server, "GET", "/healthz")
        assert status == 200
        host, port = server.addresses[0]
        assert body == {
            "status": "ok",
            "listening": [f"{host}:{port}"],
            "upstreams": {"tunnel": True, "dead": True},
            "problems": [],
        }
        status, body, _ = await call(server, "GET", "/readyz")
        assert (status, body) == (200, {"ready": True})


async def test_admin_healthz_503_when_no_upstream_member_is_healthy(socks_port: int) -> None:
    dead = make_config(socks_port).upstreams["dead"].members[0].url
    text = f"""
listen: 127.0.0.1:0
upstreams:
  pool:
    members: [{dead}, {dead.replace("socks5:", "socks4a:")}]
    check: {{interval_s: 3600, timeout_s: 2, target: "127.0.0.1:9"}}
rules:
  - {{domain: [example.test], via: pool}}
"""
    cfg = parse_config(load_yaml(text), "t.yaml")
    cfg = dataclasses.replace(cfg, admin=make_config(socks_port).admin)
    async with running(cfg) as server:
        await server.state.pool.check_once("pool")
        status, body, _ = await call(server, "GET", "/healthz")
    assert status == 503
    assert body["status"] == "unhealthy"
    assert body["upstreams"] == {"pool": False}
    assert body["problems"] == ["no upstream member is healthy: pool"]


async def test_admin_healthz_ok_without_upstreams(socks_port: int) -> None:
    cfg = parse_config(load_yaml("listen: 127.0.0.1:0\n"), "t.yaml")
    cfg = dataclasses.replace(cfg, admin=make_config(socks_port).admin)
    async with running(cfg) as server:
        status, body, _ = await call(server, "GET", "/healthz")
    assert (status, body["upstreams"], body["problems"]) == (200, {}, [])


async def test_admin_readyz_503_while_draining(socks_port: int) -> None:
    async with running(make_config(socks_port)) as server, target_server(echo) as port:
        r, w = await connect_tunnel(server, "localhost", port)
        await roundtrip(r, w, 10)
        stopping = asyncio.get_running_loop().create_task(server.stop(grace_s=DEADLINE_S))
        await poll(lambda: not server.state.accepting, "shutdown to begin")
        status, body, _ = await call(server, "GET", "/readyz")
        assert (status, body) == (503, {"ready": False, "reason": "shutting down"})
        status, body, _ = await call(server, "GET", "/api/stats")
        assert (status, body["accepting"]) == (200, False)
        w.close()  # the drain ends when the last tunnel does
        await asyncio.wait_for(stopping, DEADLINE_S)


# -- token --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path",
    ["/metrics", "/api/connections", "/api/stats", "/api/upstreams", "/api/route?host=x"],
    ids=["metrics", "connections", "stats", "upstreams", "route"],
)
async def test_admin_token_required(socks_port: int, path: str) -> None:
    async with running(make_config(socks_port, token=TOKEN)) as server:
        status, body, headers = await call(server, "GET", path)
        assert status == 401
        assert body == {"error": "bearer token required"}
        assert headers["WWW-Authenticate"] == 'Bearer realm="fwdproxy"'
        assert (await call(server, "GET", path, token="wrong"))[0] == 401
        basic = {"Authorization": "Basic czNjcmV0LXRva2Vu"}
        assert (await call(server, "GET", path, headers=basic))[0] == 401
        assert (await call(server, "GET", path, token=TOKEN))[0] == 200


async def test_admin_token_mutations_need_token(socks_port: int) -> None:
    async with running(make_config(socks_port, token=TOKEN)) as server:
        assert (await call(server, "POST", "/api/reload"))[0] == 401
        assert (await call(server, "DELETE", "/api/connections/1"))[0] == 401
        assert (await call(server, "DELETE", "/api/connections/1", token=TOKEN))[0] == 404


async def test_admin_probes_and_page_stay_open_with_token(socks_port: int) -> None:
    async with running(make_config(socks_port, token=TOKEN)) as server:
        assert (await call(server, "GET", "/healthz"))[0] == 200
        assert (await call(server, "GET", "/readyz"))[0] == 200
        assert (await call(server, "GET", "/"))[0] == 200
        status, body, _ = await call(server, "GET", "/api/auth")
        assert (status, body) == (200, {"required": True, "ok": False})
        _, body, _ = await call(server, "GET", "/api/auth", token=TOKEN)
        assert body == {"required": True, "ok": True}


async def test_admin_auth_reports_no_token_needed(socks_port: int) -> None:
    async with running(make_config(socks_port)) as server:
        _, body, _ = await call(server, "GET", "/api/auth")
    assert body == {"required": False, "ok": True}


# -- browser-facing guards ------------------------------------------------------------------------


async def test_admin_refuses_dns_rebinding_host_without_token(socks_port: int) -> None:
    async with running(make_config(socks_port)) as server:
        evil = {"Host": "attacker.example:9128"}
        status, body, _ = await call(server, "GET", "/api/connections", headers=evil)
        assert (status, body["error"]) == (403, "Host header must be an IP address or localhost")
        ok = {"Host": "localhost:9128"}
        assert (await call(server, "GET", "/api/connections", headers=ok))[0] == 200
    async with running(make_config(socks_port, token=TOKEN)) as server:
        assert (await call(server, "GET", "/metrics", token=TOKEN, headers=evil))[0] == 200


async def test_admin_refuses_cross_origin_mutations(socks_port: int) -> None:
    async with running(make_config(socks_port), reload_source=lambda: make_config(0)) as server:
        foreign = {"Origin": "http://attacker.example"}
        status, body, _ = await call(server, "POST", "/api/reload", headers=foreign)
        assert (status, body) == (403, {"error": "cross-origin POST refused"})
        assert (await call(server, "DELETE", "/api/connections/1", headers=foreign))[0] == 403
        own = {"Origin": admin_url(server)}
        assert (await call(server, "POST", "/api/reload", headers=own))[0] == 200
        assert (await call(server, "GET", "/api/stats", headers=foreign))[0] == 200


async def test_admin_port_is_refused_as_a_proxy_target(socks_port: int) -> None:
    async with running(make_config(socks_port)) as server:
        host, port = server.admin.addresses[0]
        with pytest.raises(ConnectionRefusedError, match="loop refused"):
            await connect_tunnel(server, host, port)


# -- connections --------------------------------------------------------------------------------


async def test_admin_connections_list_live_tunnel_with_rate(socks_port: int) -> None:
    async with running(make_config(socks_port)) as server, target_server(stream) as port:
        status, body, _ = await call(server, "GET", "/api/connections")
        assert (status, body) == (200, {"count": 0, "connections": []})
        r, w = await connect_tunnel(server, "localhost", port)
        w.write(b"G")
        sampler = server.admin.sampler
        sampler.sample()
        got = 0
        while got < 200_000:
            got += len(await asyncio.wait_for(r.read(65536), DEADLINE_S))
        sampler.sample()
        status, body, _ = await call(server, "GET", "/api/connections")
        await close_and_settle(server, w)
    assert status == 200
    assert body["count"] == 1
    (row,) = body["connections"]
    assert set(row) == CONNECTION_KEYS
    assert row["protocol"] == "connect"
    assert row["target"] == f"localhost:{port}"
    assert (row["route"], row["upstream"], row["rule"]) == ("tunnel", "tunnel", "lab-via-tunnel")
    assert (row["registry"], row["role"]) == ("lab", "api")
    assert row["bytes_up"] == 1
    assert row["bytes_down"] >= got
    assert row["rate_down"] > 0
    assert row["age_s"] >= 0
    assert row["outcome"] == "open"


async def test_admin_delete_closes_a_live_tunnel(socks_port: int) -> None:
    async with running(make_config(socks_port)) as server, target_server(stream) as port:
        r, w = await connect_tunnel(server, "mirror.test", port)
        w.write(b"G")
        await asyncio.wait_for(r.read(65536), DEADLINE_S)
        (conn_id,) = server.state.connections
        status, body, _ = await call(server, "DELETE", f"/api/connections/{conn_id}")
        assert (status, body) == (200, {"ok": True, "id": conn_id})

        async def drained() -> None:
            while await r.read(65536):
                pass

        await asyncio.wait_for(drained(), DEADLINE_S)  # EOF: the proxy closed the tunnel
        await poll(lambda: not server.state.connections, "the connection to be gone")
        status, body, _ = await call(server, "DELETE", f"/api/connections/{conn_id}")
        assert (status, body["ok"], body["error"]) == (404, False, "no such connection")
        assert (await call(server, "DELETE", "/api/connections/abc"))[0] == 400
        _, stats, _ = await call(server, "GET", "/api/stats")
        w.close()
    assert stats["totals"]["closed"] == 1
    assert stats["recent_errors"][0]["outcome"] == "closed-by-server"


# -- dry runs -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "host", "port", "route", "rule"),
    [
        ("host=localhost&port=5000", "localhost", 5000, "tunnel", "lab-via-tunnel"),
        ("host=LOCALHOST.", "localhost", 443, "tunnel", "lab-via-tunnel"),
        ("host=blobs.mirror.test:8443", "blobs.mirror.test", 8443, "direct", "mirror-direct"),
        ("host=https://mirror.test/v2/", "mirror.test", 443, "direct", "mirror-direct"),
        ("host=http://blocked.test/x", "blocked.test", 80, "reject", "blocked"),
        ("host=[::1]:80", "::1", 80, "direct", "default"),
    ],
    ids=["port-param", "normalised", "host-port", "https-url", "http-url", "ipv6"],
)
async def test_admin_route_dry_run(
    socks_port: int, query: str, host: str, port: int, route: str, rule: str
) -> None:
    async with running(make_config(socks_port)) as server:
        status, body, _ = await call(server, "GET", "/api/route?" + query)
    assert status == 200
    assert (body["host"], body["port"], body["route"], body["rule"]) == (host, port, route, rule)
    assert set(body) >= {"action", "upstream", "line", "matched", "registry", "role", "describe"}
    if route == "tunnel":
        assert body["members"] == [f"socks5://127.0.0.1:{socks_port}"]
        assert (body["registry"], body["role"]) == ("lab", "api")


@pytest.mark.parametrize(
    "query", ["", "host=", "host=a:b", "host=x&port=nope"], ids=["none", "empty", "bad-port", "nan"]
)
async def test_admin_route_bad_request(socks_port: int, query: str) -> None:
    async with running(make_config(socks_port)) as server:
        status, body, _ = await call(server, "GET", "/api/route?" + query)
    assert status == 400
    assert body["error"]


async def test_admin_explain_image(socks_port: int) -> None:
    async with running(make_config(socks_port)) as server:
        status, body, _ = await call(server, "GET", "/api/explain?image=localhost/team/app:1")
        assert status == 200
        assert body["registry"] == "lab"
        assert [(h["host"], h["route"]) for h in body["hosts"]] == [("localhost", "tunnel")]
        assert body["split"] is False
        status, body, _ = await call(server, "GET", "/api/explain?image=Bad..Ref::")
        assert status == 400
        assert body["error"].startswith("Bad..Ref::")
        assert (await call(server, "GET", "/api/explain"))[0] == 400


# -- reload, upstreams, stats, page, metrics ------------------------------------------------------


async def test_admin_reload_applies_or_reports_problems(socks_port: int) -> None:
    sources: list[Config] = []

    def source() -> Config:
        if not sources:
            raise ConfigError(["t.yaml:9: rules[1]: unknown upstream 'nope'"])
        return sources.pop()

    async with running(make_config(socks_port), reload_source=source) as server:
        status, body, _ = await call(server, "POST", "/api/reload")
        assert (status, body) == (
            422,
            {
                "ok": False,
                "problems": ["t.yaml:9: rules[1]: unknown upstream 'nope'"],
                "digest": "d1",
            },
        )
        sources.append(make_config(socks_port, digest="d2"))
        status, body, _ = await call(server, "POST", "/api/reload")
        assert (status, body) == (200, {"ok": True, "problems": [], "digest": "d2"})
        assert (await call(server, "GET", "/api/reload"))[0] == 405
        _, stats, _ = await call(server, "GET", "/api/stats")
    assert stats["config"]["reloads"] == {"ok": 1, "failed": 1}
    assert stats["config"]["digest"] == "d2"


async def test_admin_reload_reports_a_busy_new_listen_address(socks_port: int) -> None:
    cfg = make_config(socks_port)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        new = dataclasses.replace(
            cfg, listeners=(*cfg.listeners, Listener("127.0.0.1", busy.getsockname()[1]))
        )
        async with running(cfg, reload_source=lambda: new) as server:
            status, body, _ = await call(server, "POST", "/api/reload")
            _, stats, _ = await call(server, "GET", "/api/stats")
    assert status == 422
    assert body["ok"] is False
    (problem,) = body["problems"]
    assert problem.startswith("cannot listen on a new address")
    assert stats["config"]["reloads"] == {"ok": 0, "failed": 1}


async def test_admin_upstreams(socks_port: int) -> None:
    async with running(make_config(socks_port)) as server:
        status, body, _ = await call(server, "GET", "/api/upstreams")
    assert status == 200
    tunnel = body["upstreams"]["tunnel"]
    assert (tunnel["policy"], tunnel["failovers"], tunnel["healthy"]) == ("fallback", 0, True)
    (member,) = tunnel["members"]
    assert member["url"] == f"socks5://127.0.0.1:{socks_port}"
    assert member["healthy"] is True
    assert set(member) == {
        "name", "url", "healthy", "last_check", "latency_s", "last_error", "failures"
    }  # fmt: skip


async def test_admin_stats_totals_and_history(socks_port: int) -> None:
    async with running(make_config(socks_port)) as server, target_server(echo) as port:
        sampler = server.admin.sampler
        sampler.sample()
        r, w = await connect_tunnel(server, "localhost", port)
        await roundtrip(r, w, 4096)
        sampler.sample()
        status, body, _ = await call(server, "GET", "/api/stats")
        listening = ["{}:{}".format(*server.addresses[0])]
        await close_and_settle(server, w)
    assert status == 200
    assert body["totals"] == {
        "active": 1, "closed": 0, "errors": 0, "bytes_up": 4096, "bytes_down": 4096
    }  # fmt: skip
    assert body["routes"] == [
        {
            "route": "tunnel", "registry": "lab", "active": 1, "bytes_up": 4096,
            "bytes_down": 4096, "rate_up": pytest.approx(body["routes"][0]["rate_up"]),
            "rate_down": pytest.approx(body["routes"][0]["rate_down"]),
        }
    ]  # fmt: skip
    assert body["routes"][0]["rate_down"] > 0
    hist = body["history"]
    assert (hist["interval_s"], hist["keep_s"]) == (1.0, 300.0)
    assert len(hist["t"]) >= 2
    (series,) = hist["series"]
    assert (series["route"], series["registry"]) == ("tunnel", "lab")
    assert len(series["up"]) == len(series["down"]) == len(hist["t"])
    assert max(series["down"]) > 0
    assert body["config"] == {
        "path": "t.yaml", "digest": "d1", "rules": 4, "reloads": {"ok": 0, "failed": 0}
    }  # fmt: skip
    assert body["accepting"] is True
    assert body["listening"] == listening
    assert body["recent_errors"] == []


async def test_admin_dashboard_page(socks_port: int) -> None:
    async with running(make_config(socks_port)) as server:
        status, body, headers = await call(server, "GET", "/")
    assert status == 200
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert "<title>fwdproxy" in body
    assert "http://" not in body.replace('"http://www.w3.org/2000/svg"', "")  # no CDN


async def test_admin_metrics_text_and_openmetrics(socks_port: int) -> None:
    async with running(make_config(socks_port)) as server:
        status, body, headers = await call(server, "GET", "/metrics")
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
        assert "# TYPE fwdproxy_connections_total counter" in body
        om = {"Accept": "application/openmetrics-text; version=1.0.0"}
        status, body, headers = await call(server, "GET", "/metrics", headers=om)
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert body.rstrip().endswith("# EOF")


async def test_admin_unknown_api_path_is_json_404(socks_port: int) -> None:
    async with running(make_config(socks_port)) as server:
        status, body, _ = await call(server, "GET", "/api/nope")
        assert (status, body) == (404, {"error": "Not Found"})
        assert (await call(server, "GET", "/nope"))[0] == 404


async def test_admin_busy_port_fails_server_start(socks_port: int) -> None:
    async with running(make_config(socks_port)) as first:
        _, port = first.admin.addresses[0]
        cfg = make_config(socks_port)
        cfg = dataclasses.replace(cfg, admin=dataclasses.replace(cfg.admin, port=port))
        second = Server(cfg, admin_factory=AdminServer)
        with pytest.raises(OSError):
            await second.start()
        await second.stop(grace_s=0)
