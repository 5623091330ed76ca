"""Starting the proxy under test inside the node namespace.

The suite runs fwdproxy. FWDPROXY_E2E_PROXY=tinyproxy swaps in tinyproxy (HTTP CONNECT only,
chained to the SOCKS tunnel for registry names) to validate the rig itself without fwdproxy.
"""

from __future__ import annotations

import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from e2erig.procs import Proc
from e2erig.topology import GW_NODE_IP, HTTP_UPSTREAM_PORT, REPO_ROOT, SOCKS_PORT, Rig, render

SOCKS_UPSTREAM = f"socks5://{GW_NODE_IP}:{SOCKS_PORT}"
HTTP_UPSTREAM = f"http://{GW_NODE_IP}:{HTTP_UPSTREAM_PORT}"
FIELD_RE = re.compile(r'(\w+)=("[^"]*"|\S+)')


def proxy_kind() -> str:
    return os.environ.get("FWDPROXY_E2E_PROXY", "fwdproxy")


def fwdproxy_argv(*args: str) -> list[str]:
    """`python -m fwdproxy ARGS` from this checkout, whatever the current directory."""
    return [sys.executable, "-m", "fwdproxy", *args]


def fwdproxy_env(rig: Rig) -> dict[str, str]:
    return rig.client_env(PYTHONPATH=str(REPO_ROOT), PYTHONUNBUFFERED="1")


@dataclass
class RunningProxy:
    """A proxy listening on 127.0.0.1:port inside the node namespace."""

    proc: Proc
    port: int
    config: Path
    kind: str

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def socks5_url(self) -> str:
        return f"socks5://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.proc.log.read_text(errors="replace")

    def access_records(self) -> list[dict[str, str]]:
        """fwdproxy's access lines as key=value maps (one line per client connection)."""
        records = []
        for line in self.log_text().splitlines():
            if " access " not in line:
                continue
            fields = dict(m.groups() for m in FIELD_RE.finditer(line))
            fields["line"] = line
            records.append(fields)
        return records

    def routes_for(self, target: str, deadline_s: float = 5.0) -> set[tuple[str, str]]:
        """(rule, route) pairs logged for connections to `target` (host:port).

        The access line is written when the connection ends, which can be a moment after the
        client exits, so wait for at least one line up to the deadline.
        """
        end = time.monotonic() + deadline_s
        while True:
            found = {(r.get("rule", ""), r.get("route", "")) for r in self.access_records()
                     if r.get("target") == target}
            if found or time.monotonic() >= end:
                return found
            time.sleep(0.05)


def start_proxy(rig: Rig, name: str, template: str, port: int, *,
                upstream: str = SOCKS_UPSTREAM, **values: str) -> RunningProxy:
    """Render `template` for `port` and start the proxy under test with it in the node ns."""
    kind = proxy_kind()
    if kind == "tinyproxy":
        target = upstream.split("://", 1)[1]
        sites = [""] if "blanket" in template else [".docker.io", ".docker.com", "quay.io",
                                                      ".quay.io"]
        lines = [f'Upstream socks5 {target} "{site}"' if site else f"Upstream socks5 {target}"
                 for site in sites]
        conf = render(
            "tinyproxy-standin.conf", rig.tmp / f"{name}.conf", PORT=str(port),
            LOG=str(rig.logs / f"{name}-access.log"), PID=str(rig.tmp / f"{name}.pid"),
            UPSTREAMS="\n".join(lines),
        )
        proc = rig.sup.start(name, rig.node, ["tinyproxy", "-d", "-c", str(conf)])
    else:
        conf = render(template, rig.tmp / f"{name}.yaml", PORT=str(port), UPSTREAM=upstream,
                      **values)
        proc = rig.sup.start(
            name, rig.node,
            fwdproxy_argv("serve", "-c", str(conf), "--listen", f"127.0.0.1:{port}"),
            env=fwdproxy_env(rig),
        )
    rig.node.wait_tcp("127.0.0.1", port, alive=proc.dead)
    return RunningProxy(proc=proc, port=port, config=conf, kind=kind)
