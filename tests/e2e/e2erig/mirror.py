"""fwdproxy's registry mirror in the node, its own tunnel on the gateway, and what to measure.

The mirror's upstream fetches go through a danted of their own (gateway :1081, same external
address as the rig's), so the bytes of the mirror's tunnel can be counted apart from anything
else the rig does: two iptables rules in the gateway namespace count every IP packet between
the node and that port (`-x`, exact bytes including TCP/IP headers). `down` is what the gateway
sent to the mirror (blobs, manifests, tokens); `up` what the mirror sent (requests, TLS).

Links can be slowed with tc's token bucket (netem is not available in these kernels) so a
transfer lasts long enough to be cut or joined part way.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from e2erig.netns import Netns
from e2erig.procs import Proc, wait_for
from e2erig.proxy import fwdproxy_argv, fwdproxy_env
from e2erig.topology import GW_NODE_IP, GW_OUT_IP, Rig, render

MIRROR_HOST = "127.0.0.1"
MIRROR_PORT = 5000
MIRROR_URL = f"http://{MIRROR_HOST}:{MIRROR_PORT}"
MIRROR_SOCKS_PORT = 1081
MIRROR_PROXY_PORT = 3140  # the proxy listener fwdproxy insists on; the tests do not use it
# `mirror: GET blob docker.io/library/x@sha256:.. via ns -> 200 miss (3 ms)`
CACHE_STATE_RE = re.compile(r"mirror: (?P<method>GET|HEAD) (?P<kind>[a-z-]+) (?P<what>\S+) "
                            r"via (?P<via>.+?) -> (?P<status>\d{3}) (?P<state>\S+)")


@dataclass(frozen=True)
class TunnelBytes:
    up: int    # node -> gateway
    down: int  # gateway -> node

    def __sub__(self, other: TunnelBytes) -> TunnelBytes:
        return TunnelBytes(self.up - other.up, self.down - other.down)

    @property
    def total(self) -> int:
        return self.up + self.down


class MirrorTunnel:
    """danted on GW_NODE_IP:1081 for the mirror alone, and byte counters on it."""

    RULES = (
        ("INPUT", ["-i", "to-node", "-p", "tcp", "--dport", str(MIRROR_SOCKS_PORT)]),
        ("OUTPUT", ["-o", "to-node", "-p", "tcp", "--sport", str(MIRROR_SOCKS_PORT)]),
    )

    def __init__(self, rig: Rig) -> None:
        self.rig = rig
        self.proc: Proc | None = None
        self.log = rig.logs / "danted-mirror.log"
        self.url = f"socks5://{GW_NODE_IP}:{MIRROR_SOCKS_PORT}"
        self._counting = False

    def start(self) -> None:
        conf = render(
            "danted.conf", self.rig.tmp / "danted-mirror.conf", LOG=str(self.log),
            INTERNAL_IP=GW_NODE_IP, PORT=str(MIRROR_SOCKS_PORT), EXTERNAL_IP=GW_OUT_IP,
            CLIENT_NET="10.77.1.0/24",
        )
        self.proc = self.rig.sup.start(
            "danted-mirror", self.rig.gw,
            ["danted", "-f", str(conf), "-p", str(self.rig.tmp / "danted-mirror.pid")],
        )
        self.rig.gw.wait_tcp(GW_NODE_IP, MIRROR_SOCKS_PORT, alive=self.proc.dead)

    def stop(self) -> None:
        """Kill danted and every child (each holds tunnels): established tunnels break."""
        if self.proc is not None:
            self.rig.sup.stop(self.proc)
            self.proc = None
        refused = self.rig.node.tcp_probe(GW_NODE_IP, MIRROR_SOCKS_PORT)
        if refused is None:
            raise RuntimeError("the mirror's SOCKS port still accepts after danted stopped")

    @contextlib.contextmanager
    def down(self) -> Iterator[None]:
        """The tunnel is gone for the body of the `with`, and back (restarted) after it."""
        try:
            self.stop()
            yield
        finally:
            if self.proc is None:
                self.start()

    def cut(self) -> None:
        """Break every tunnel at once (danted and its children killed), then start it again."""
        with self.down():
            pass

    # -- counters ------------------------------------------------------------------------------
    def _iptables(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.rig.gw.run(["iptables", "-w", *args], check=check)

    def count(self) -> None:
        for chain, match in self.RULES:
            self._iptables("-A", chain, *match)
        self._counting = True

    def uncount(self) -> None:
        if self._counting:
            for chain, match in self.RULES:
                self._iptables("-D", chain, *match, check=False)
            self._counting = False

    def bytes(self) -> TunnelBytes:
        found = {}
        for chain, _ in self.RULES:
            out = self._iptables("-n", "-v", "-x", "-L", chain).stdout
            port = f"{'dpt' if chain == 'INPUT' else 'spt'}:{MIRROR_SOCKS_PORT}"
            lines = [ln for ln in out.splitlines() if port in ln]
            assert len(lines) == 1, f"iptables {chain}: expected one counter rule:\n{out}"
            found[chain] = int(lines[0].split()[1])
        return TunnelBytes(up=found["INPUT"], down=found["OUTPUT"])


class Shaper:
    """A tc token bucket on one interface (root qdisc), removed by `lift()` or on exit."""

    def __init__(self, ns: Netns, dev: str) -> None:
        self.ns = ns
        self.dev = dev
        self.active = False

    def rate(self, rate: str) -> None:
        verb = "change" if self.active else "add"
        self.ns.run(["tc", "qdisc", verb, "dev", self.dev, "root", "tbf", "rate", rate,
                     "burst", "64kb", "latency", "50ms"])
        self.active = True

    def lift(self) -> None:
        if self.active:
            self.ns.run(["tc", "qdisc", "del", "dev", self.dev, "root"], check=False)
            self.active = False
        left = self.ns.run(["tc", "qdisc", "show", "dev", self.dev]).stdout
        assert "tbf" not in left, f"tbf still on {self.dev}: {left}"


@contextlib.contextmanager
def shaped(ns: Netns, dev: str, rate: str) -> Iterator[Shaper]:
    shaper = Shaper(ns, dev)
    shaper.rate(rate)
    try:
        yield shaper
    finally:
        shaper.lift()


@dataclass
class RunningMirror:
    """fwdproxy serving the mirror on 127.0.0.1:5000 in the node, with its cache dir."""

    rig: Rig
    proc: Proc
    config: Path
    cache_dir: Path

    def log_text(self) -> str:
        return self.proc.log.read_text(errors="replace")

    def log_lines(self, since: int = 0) -> list[str]:
        return self.log_text()[since:].splitlines()

    def log_mark(self) -> int:
        return len(self.log_text())

    def blob_file(self, digest: str) -> Path:
        alg, hexd = digest.split(":", 1)
        return self.cache_dir / "blobs" / alg / hexd[:2] / hexd

    def cached(self, digest: str) -> bool:
        """Committed in the cache with content that still hashes to its name."""
        path = self.blob_file(digest)
        if not path.is_file():
            return False
        return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest() == digest

    def tmp_files(self) -> list[Path]:
        tmp = self.cache_dir / "tmp"
        return sorted(tmp.iterdir()) if tmp.is_dir() else []

    def tmp_readers(self, tmp: Path) -> int:
        """Open descriptors of the mirror process on a cache temp file: the fetcher's writer
        and read fd plus one per client streaming the blob while it downloads."""
        n = 0
        fd_dir = Path(f"/proc/{self.server_pid()}/fd")
        for fd in fd_dir.iterdir():
            with contextlib.suppress(OSError):
                if os.readlink(fd) == str(tmp):
                    n += 1
        return n

    def server_pid(self) -> int:
        """The python process itself (`ip netns exec` execs it, so it is the Popen pid)."""
        return self.proc.pid

    def states(self, since: int = 0) -> list[dict[str, str]]:
        """The mirror's per-request log lines since a mark: method, kind (blob, manifest),
        what (`registry/repo@digest` or `registry/repo:tag`), via, status, cache state."""
        return [m.groupdict() for line in self.log_lines(since)
                if (m := CACHE_STATE_RE.search(line))]

    def curl(self, path: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """curl against the mirror from the node (no proxy); `-D -` puts headers in stdout."""
        return self.rig.node.run(["curl", "-sS", "--max-time", "30", *args,
                                  MIRROR_URL + path], env=self.rig.client_env(), check=check,
                                 timeout_s=40)


def mirror_config(rig: Rig, tunnel: MirrorTunnel, cache_dir: Path, **mirror: Any) -> dict[str, Any]:
    return {
        "listen": f"127.0.0.1:{MIRROR_PROXY_PORT}",
        "upstreams": {"tunnel": tunnel.url},
        "rules": [{"name": "registries", "registries": "all", "via": "tunnel"}],
        "default": "direct",  # nothing else is reachable from the node anyway
        "mirror": {"listen": f"{MIRROR_HOST}:{MIRROR_PORT}", **mirror},
        "cache": {"dir": str(cache_dir)},
    }


def start_mirror(rig: Rig, tunnel: MirrorTunnel, name: str = "fwdproxy-mirror",
                 **mirror: Any) -> RunningMirror:
    cache_dir = rig.tmp / f"{name}-cache"
    conf = rig.tmp / f"{name}.yaml"
    conf.write_text(yaml.safe_dump(mirror_config(rig, tunnel, cache_dir, **mirror),
                                   sort_keys=False))
    proc = rig.sup.start(name, rig.node, fwdproxy_argv("serve", "-c", str(conf)),
                         env={**fwdproxy_env(rig), "SSL_CERT_FILE": str(rig.ca.cert)})
    rig.node.wait_tcp(MIRROR_HOST, MIRROR_PORT, alive=proc.dead)
    wait_for("mirror start line", lambda: "registry mirror on" in proc.tail(), alive=proc.dead)
    return RunningMirror(rig, proc, conf, cache_dir)


# -- client configuration ------------------------------------------------------------------------
def gen_mirror(rig: Rig, target: str, root: Path) -> dict[str, str]:
    """`fwdproxy gen TARGET --mirror 127.0.0.1:5000 --write --root ROOT` in the node, as a user
    sets a runtime up for the mirror; returns what it wrote, by path below ROOT."""
    rig.node.run(fwdproxy_argv("gen", target, "--mirror", f"{MIRROR_HOST}:{MIRROR_PORT}",
                               "--write", "--root", str(root)), env=fwdproxy_env(rig))
    return {str(p.relative_to(root)): p.read_text() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith(".bak")}
