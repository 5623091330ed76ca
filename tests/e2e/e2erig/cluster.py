"""A cluster of container hosts behind the rig's gateway, for the mirror's parent cache.

    outside (10.77.3.2)          the registry stand-ins (nginx :443)
        | 10.77.3.0/24           "the tunnel": the gateway's link to the registries
    gateway                      parent fwdproxy mirror on 10.77.{4,5,6}.1:5000 (allow: the
        |                        node subnets; it fetches straight over the tunnel) and a danted
        |                        on 10.77.{4,5,6}.1:1082, the nodes' own route
        | 10.77.4.0/24    | 10.77.5.0/24    | 10.77.6.0/24
    cnode1 (10.77.4.2)    cnode2 (10.77.5.2)    cnode3 (10.77.6.2)
        each: containerd, fwdproxy mirror on 127.0.0.1:5000 with its admin API on :9128
    cnode1 (10.77.7.1) <-> cnode2 (10.77.7.2): a direct link, only for the parent-loop test

Like the rig: veth pairs only, no forwarding anywhere, names resolve only in the gateway, so a
node reaches a registry through the parent mirror or the gateway's danted and nothing else.
The rig's own node is left alone (its 127.0.0.1:5000 belongs to test_e2e_mirror).

Exact iptables byte counters (`-x`, IP and TCP headers included) in the gateway measure:
- `tunnel`: every packet between the gateway and the registry front (OUT_IP:443) on its link to
  the outside; both the parent's fetches and danted's (the nodes' own routes) cross it;
- `own<i>`: node i's traffic with the danted (its own route);
- `parent<i>`: node i's traffic with the parent mirror.
"""

from __future__ import annotations

import concurrent.futures
import json
import subprocess
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from e2erig.daemons import Containerd, start_containerd
from e2erig.mirror import CACHE_STATE_RE
from e2erig.netns import Netns, NetnsSet
from e2erig.procs import Proc, wait_for
from e2erig.proxy import fwdproxy_argv, fwdproxy_env
from e2erig.topology import GW_OUT_IP, OUT_IP, Rig

NODES = 3
SUBNET = "10.77.{}.0/24"
FIRST_SUBNET = 4  # node i (1-based) is on 10.77.(3+i).0/24
LOOP_SUBNET = "10.77.7.0/24"
LOOP_IPS = ("10.77.7.1", "10.77.7.2")  # cnode1, cnode2
DANTED_PORT = 1082
MIRROR_PORT = 5000
ADMIN_PORT = 9128
PROXY_PORT = 3140  # the proxy listener fwdproxy insists on; nothing uses it
CLIENT_NETS = "10.77.4.0/22"  # the node subnets, for danted (10.77.4.0 - 10.77.7.255)


@dataclass
class Fwdproxy:
    """One fwdproxy serving a mirror (a node's or the parent), with its config and cache."""

    name: str
    ns: Netns
    proc: Proc
    config: dict[str, Any]
    cache_dir: Path

    def log_text(self) -> str:
        return self.proc.log.read_text(errors="replace")

    def states(self) -> list[dict[str, str]]:
        """Per-request lines: method, kind, what, via, status, cache state."""
        return [m.groupdict() for line in self.log_text().splitlines()
                if (m := CACHE_STATE_RE.search(line))]

    def api_mirror(self) -> dict[str, Any]:
        """GET /api/mirror from its admin listener (loopback in its own namespace)."""
        out = self.ns.run(["curl", "-sS", "--fail", "--max-time", "10",
                           f"http://127.0.0.1:{ADMIN_PORT}/api/mirror"], timeout_s=20).stdout
        data: dict[str, Any] = json.loads(out)
        return data


@dataclass
class Node:
    index: int  # 1-based
    ns: Netns
    ip: str
    gw_ip: str
    containerd: Containerd | None = None
    mirror: Fwdproxy | None = None

    @property
    def name(self) -> str:
        return f"cnode{self.index}"

    @property
    def subnet(self) -> str:
        return SUBNET.format(FIRST_SUBNET + self.index - 1)

    @property
    def parent_url(self) -> str:
        """The parent mirror as this node reaches it: the gateway's address on its link."""
        return f"http://{self.gw_ip}:{MIRROR_PORT}"


class Counters:
    """Exact byte counters in one namespace: rules without a target in two chains of their
    own, hooked into INPUT and OUTPUT, read back in the order they were added."""

    def __init__(self, ns: Netns, tag: str) -> None:
        self.ns = ns
        self.chains = {"in": f"{tag}-in", "out": f"{tag}-out"}
        self.rules: dict[str, list[tuple[str, list[str]]]] = {"in": [], "out": []}
        self.installed: list[str] = []

    def add(self, name: str, direction: str, match: list[str]) -> None:
        self.rules[direction].append((name, match))

    def _iptables(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return self.ns.run(["iptables", "-w", *args], check=check)

    def install(self) -> None:
        for direction, hook in (("in", "INPUT"), ("out", "OUTPUT")):
            chain = self.chains[direction]
            self._iptables("-N", chain)
            self.installed.append(direction)
            for _, match in self.rules[direction]:
                self._iptables("-A", chain, *match)
            self._iptables("-A", hook, "-j", chain)

    def remove(self) -> None:
        for direction in self.installed:
            hook = "INPUT" if direction == "in" else "OUTPUT"
            chain = self.chains[direction]
            self._iptables("-D", hook, "-j", chain, check=False)
            self._iptables("-F", chain, check=False)
            self._iptables("-X", chain, check=False)
        self.installed.clear()

    def read(self) -> dict[str, int]:
        found: dict[str, int] = {}
        for direction, chain in self.chains.items():
            out = self._iptables("-n", "-v", "-x", "-L", chain).stdout
            rows = [ln.split() for ln in out.splitlines()[2:] if ln.strip()]
            names = [name for name, _ in self.rules[direction]]
            assert len(rows) == len(names), f"iptables {chain}: {len(names)} rules?\n{out}"
            for name, row in zip(names, rows, strict=True):
                found[name] = int(row[1])
        return found


@dataclass(frozen=True)
class Bytes:
    """Counter values (after - before); `x_down` is what the gateway side sent, `x_up` what
    it received, per counter name."""

    values: dict[str, int]

    def __getitem__(self, name: str) -> int:
        return self.values[name]

    def total(self, name: str) -> int:
        return self.values[f"{name}_down"] + self.values[f"{name}_up"]

    def __sub__(self, other: Bytes) -> Bytes:
        return Bytes({k: v - other.values.get(k, 0) for k, v in self.values.items()})


@dataclass
class Cluster:
    rig: Rig
    nets: NetnsSet
    nodes: list[Node]
    counters: Counters
    hosts_dir: Path
    danted: Proc | None = None
    started: list[Fwdproxy] = field(default_factory=list)

    @property
    def gw(self) -> Netns:
        return self.rig.gw

    def bytes(self) -> Bytes:
        return Bytes(self.counters.read())

    # -- fwdproxy instances -------------------------------------------------------------------
    def _start(self, name: str, ns: Netns, config: dict[str, Any],
               addrs: list[tuple[str, int]]) -> Fwdproxy:
        conf = self.rig.tmp / f"{name}.yaml"
        conf.write_text(yaml.safe_dump(config, sort_keys=False))
        proc = self.rig.sup.start(name, ns, fwdproxy_argv("serve", "-c", str(conf)),
                                  env={**fwdproxy_env(self.rig),
                                       "SSL_CERT_FILE": str(self.rig.ca.cert)})
        fp = Fwdproxy(name, ns, proc, config, Path(config["cache"]["dir"]))
        self.started.append(fp)
        for host, port in addrs:
            ns.wait_tcp(host, port, alive=proc.dead, deadline_s=30)
        wait_for(f"{name}: mirror start line", lambda: "registry mirror on" in proc.tail(),
                 alive=proc.dead)
        return fp

    def stop(self, fp: Fwdproxy) -> None:
        self.rig.sup.stop(fp.proc)
        if fp in self.started:
            self.started.remove(fp)

    def start_parent(self, tag: str) -> Fwdproxy:
        """The cluster's parent mirror in the gateway: one listener per node link, open only
        to the node subnets; its fetches go straight over the tunnel (the gateway's link)."""
        name = f"cluster-parent-{tag}"
        listen = [f"{n.gw_ip}:{MIRROR_PORT}" for n in self.nodes]
        config = {
            "listen": f"127.0.0.1:{PROXY_PORT}",
            "default": "direct",
            "admin": {"listen": f"127.0.0.1:{ADMIN_PORT}"},
            "mirror": {"listen": listen, "allow": [n.subnet for n in self.nodes]},
            "cache": {"dir": str(self.rig.tmp / f"{name}-cache")},
        }
        return self._start(name, self.gw, config,
                           [(n.gw_ip, MIRROR_PORT) for n in self.nodes])

    def node_config(self, node: Node, tag: str, *, parent: str | None = None,
                    extra_listen: str | None = None) -> dict[str, Any]:
        listen: list[Any] = [f"127.0.0.1:{MIRROR_PORT}"]
        if extra_listen is not None:
            listen.append({"listen": f"{extra_listen}:{MIRROR_PORT}", "allow": [LOOP_SUBNET]})
        mirror: dict[str, Any] = {"listen": listen}
        if parent is not None:
            mirror["parent"] = parent
        return {
            "listen": f"127.0.0.1:{PROXY_PORT}",
            # The node's own route: registries through the gateway's danted; anything else
            # (the parent's address) direct.
            "upstreams": {"tunnel": f"socks5://{node.gw_ip}:{DANTED_PORT}"},
            "rules": [{"name": "registries", "registries": "all", "via": "tunnel"}],
            "default": "direct",
            "admin": {"listen": f"127.0.0.1:{ADMIN_PORT}"},
            "mirror": mirror,
            "cache": {"dir": str(self.rig.tmp / f"cluster-{node.name}-{tag}-cache")},
        }

    def start_nodes(self, tag: str, configs: dict[int, dict[str, Any]]) -> dict[int, Fwdproxy]:
        """Start the given nodes' mirrors (by 1-based index) side by side; each replaces the
        node's previous mirror, which must have been stopped."""
        def one(i: int) -> Fwdproxy:
            node = self.nodes[i - 1]
            assert node.mirror is None, f"{node.name}: a mirror is still running"
            addrs = [(a["listen"] if isinstance(a, dict) else a).rsplit(":", 1)
                     for a in configs[i]["mirror"]["listen"]]
            fp = self._start(f"cluster-{node.name}-{tag}", node.ns, configs[i],
                             [(h, int(p)) for h, p in addrs] + [("127.0.0.1", ADMIN_PORT)])
            node.mirror = fp
            return fp

        with concurrent.futures.ThreadPoolExecutor(max_workers=len(configs)) as pool:
            futures = {i: pool.submit(one, i) for i in configs}
            return {i: f.result() for i, f in futures.items()}

    def stop_nodes(self) -> None:
        for node in self.nodes:
            if node.mirror is not None:
                self.stop(node.mirror)
                node.mirror = None

    # -- teardown -------------------------------------------------------------------------------
    def close(self) -> list[str]:
        problems: list[str] = []
        for fp in list(self.started):
            try:
                self.stop(fp)
            except Exception as exc:
                problems.append(f"stopping {fp.name}: {exc!r}")
        for node in self.nodes:
            node.mirror = None
            if node.containerd is not None:
                try:
                    self.rig.sup.stop(node.containerd.proc)
                except Exception as exc:
                    problems.append(f"stopping {node.name}'s containerd: {exc!r}")
        if self.danted is not None:
            try:
                self.rig.sup.stop(self.danted)
            except Exception as exc:
                problems.append(f"stopping the cluster danted: {exc!r}")
        try:
            self.counters.remove()
        except Exception as exc:
            problems.append(f"removing the counters: {exc!r}")
        # Deleting a node namespace takes its veth pairs (and the gateway's ends) with it.
        problems += self.nets.teardown()
        return problems


def build_cluster(rig: Rig, hosts_dir: Path) -> Cluster:
    """Node namespaces, links, the danted, counters and one containerd per node. The caller
    closes the cluster (also when this raises: it is returned only when complete, so a
    failure part way closes what was made here)."""
    nets = NetnsSet(rig.prefix)
    nodes = []
    counters = Counters(rig.gw, "fpcluster")
    counters.add("tunnel_up", "out", ["-o", "to-out", "-p", "tcp", "-d", OUT_IP,
                                      "--dport", "443"])
    counters.add("tunnel_down", "in", ["-i", "to-out", "-p", "tcp", "-s", OUT_IP,
                                       "--sport", "443"])
    cluster = Cluster(rig, nets, nodes, counters, hosts_dir)
    try:
        for i in range(1, NODES + 1):
            net = FIRST_SUBNET + i - 1
            node = Node(i, nets.add(f"cnode{i}", hosts={}), f"10.77.{net}.2", f"10.77.{net}.1")
            nets.link(node.ns, "to-gw", f"{node.ip}/24", rig.gw, f"to-{node.name}",
                      f"{node.gw_ip}/24")
            nodes.append(node)
            dev = f"to-{node.name}"
            counters.add(f"own{i}_up", "in", ["-i", dev, "-p", "tcp", "--dport",
                                              str(DANTED_PORT)])
            counters.add(f"own{i}_down", "out", ["-o", dev, "-p", "tcp", "--sport",
                                                 str(DANTED_PORT)])
            counters.add(f"parent{i}_up", "in", ["-i", dev, "-p", "tcp", "--dport",
                                                 str(MIRROR_PORT)])
            counters.add(f"parent{i}_down", "out", ["-o", dev, "-p", "tcp", "--sport",
                                                    str(MIRROR_PORT)])
        nets.link(nodes[0].ns, "to-peer", f"{LOOP_IPS[0]}/24", nodes[1].ns, "to-peer",
                  f"{LOOP_IPS[1]}/24")
        counters.install()
        _start_danted(cluster)
        with concurrent.futures.ThreadPoolExecutor(max_workers=NODES) as pool:
            started = list(pool.map(
                lambda n: start_containerd(rig, f"containerd-{n.name}", n.ns), nodes))
        for node, cd in zip(nodes, started, strict=True):
            node.containerd = cd
    except BaseException:
        problems = cluster.close()
        if problems:
            print("cluster teardown after a failed build:", "; ".join(problems))
        raise
    return cluster


def _start_danted(cluster: Cluster) -> None:
    rig = cluster.rig
    conf = rig.tmp / "danted-cluster.conf"
    internal = "".join(f"internal: {n.gw_ip} port = {DANTED_PORT}\n" for n in cluster.nodes)
    conf.write_text(
        "# The nodes' own route: a SOCKS5 server on the gateway, one address per node link.\n"
        f"logoutput: {rig.logs / 'danted-cluster.log'}\n{internal}"
        f"external: {GW_OUT_IP}\nclientmethod: none\nsocksmethod: none\n"
        "user.privileged: root\nuser.unprivileged: root\n"
        f"client pass {{\n    from: {CLIENT_NETS} to: 0.0.0.0/0\n    log: connect error\n}}\n"
        f"socks pass {{\n    from: {CLIENT_NETS} to: 0.0.0.0/0\n    command: connect\n"
        "    log: connect disconnect error\n}\n"
    )
    cluster.danted = rig.sup.start("danted-cluster", rig.gw,
                                   ["danted", "-f", str(conf), "-p",
                                    str(rig.tmp / "danted-cluster.pid")])
    for node in cluster.nodes:
        rig.gw.wait_tcp(node.gw_ip, DANTED_PORT, alive=cluster.danted.dead)
