"""A routing decision as data: one shape for `fwdproxy route --json` and the admin API."""

from __future__ import annotations

from typing import Any


def route_json(cfg: Any, host: str, port: int, d: Any) -> dict[str, Any]:
    """The dry-run decision as JSON (shared by `route --json` and the admin API)."""
    out: dict[str, Any] = {
        "host": host,
        "port": port,
        "action": d.action,
        "route": d.route,
        "upstream": d.upstream,
        "rule": d.rule,
        "line": d.line,
        "matched": d.matched,
        "registry": d.registry,
        "role": d.role,
    }
    if d.action == "via" and d.upstream in cfg.upstreams:
        out["members"] = [m.url for m in cfg.upstreams[d.upstream].members]
    return out
