"""`fwdproxy route` shows the live member health of the running proxy (via its admin API)."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from fwdproxy.admin.app import AdminServer
from fwdproxy.config import load_config
from fwdproxy.server import Server

from .rig import free_port


async def _route(cfg: Path, host: str) -> str:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "fwdproxy",
        "route",
        "-c",
        str(cfg),
        host,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 0, out
    return out.decode()


async def test_route_reports_member_health(tmp_path: Path) -> None:
    dead = free_port()
    cfg = tmp_path / "rules.yaml"
    cfg.write_text(f"""
listen: 127.0.0.1:0
admin: {{listen: 127.0.0.1:{free_port()}, token: s3cret}}
upstreams:
  tunnel:
    members: [socks5://127.0.0.1:{dead}]
    check: {{interval_s: 60, target: "example.test:443"}}
rules:
  - domain: [registry.example.test]
    via: tunnel
""")
    server = Server(load_config(cfg), admin_factory=AdminServer)
    await server.start()
    try:
        out = await _route(cfg, "registry.example.test")
        assert f"health:   ok: socks5://127.0.0.1:{dead} up" in out, out
        await server.state.pool.check_once("tunnel")
        out = await _route(cfg, "registry.example.test")
        assert "health:   ALL MEMBERS DOWN" in out, out
        assert "DOWN" in out.split("ALL MEMBERS DOWN", 1)[1]
        direct = await _route(cfg, "other.example.test")
        assert "health:" not in direct
    finally:
        await server.stop(grace_s=1)
    out = await _route(cfg, "registry.example.test")
    assert "health:   unknown" in out
