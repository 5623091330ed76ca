"""Real container runtimes in the node namespace, configured the way users configure them.

dockerd gets its proxy from the systemd drop-in that `fwdproxy gen docker-dropin` writes (we
parse its Environment= lines, since systemd is not managing the daemon here) and runs in a
private mount namespace where a tmp dir is bind-mounted over /etc/docker, so certs.d and the
key file it writes never touch the machine's real /etc/docker. podman reads the containers.conf
file `fwdproxy gen podman` writes. ctr fetches in its own process, so the proxy goes in its env.
"""

from __future__ import annotations

import json
import shlex
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from e2erig.netns import Netns
from e2erig.procs import Proc, wait_for
from e2erig.proxy import fwdproxy_argv, fwdproxy_env
from e2erig.topology import INTRA_REGISTRY, INTRA_REGISTRY_PORT, Rig, render

DOCKER_ETC = Path("/etc/docker")


def parse_systemd_environment(text: str) -> dict[str, str]:
    """The variables a unit's `Environment=` lines set (systemd quoting, later wins)."""
    env: dict[str, str] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line.startswith("Environment="):
            continue
        for item in shlex.split(line.removeprefix("Environment=")):
            key, sep, value = item.partition("=")
            if sep:
                env[key] = value
    return env


def gen_file(rig: Rig, target: str, proxy_url: str, root: Path) -> str:
    """Run `fwdproxy gen TARGET --write --root ROOT` in the node and return what it wrote."""
    rig.node.run(
        fwdproxy_argv("gen", target, "--proxy", proxy_url, "--no-detect", "--write",
                      "--root", str(root)),
        env=fwdproxy_env(rig),
    )
    written = [p for p in root.rglob("*") if p.is_file()]
    assert len(written) == 1, f"gen {target} wrote {written}"
    return written[0].read_text()


# --- containerd / ctr -------------------------------------------------------------------------
@dataclass
class Containerd:
    proc: Proc
    socket: Path
    hosts_dir: Path


def start_containerd(rig: Rig, name: str = "containerd", ns: Netns | None = None) -> Containerd:
    """A containerd of its own (state under rig.tmp/NAME) with certs.d entries that send the
    public registries and the intranet one straight to their servers (with the rig's CA).
    It runs in the node unless `ns` names another namespace (a cluster's other hosts)."""
    ns = ns or rig.node
    base = rig.tmp / name
    base.mkdir()
    conf = render("containerd.toml", base / "config.toml", DIR=str(base))
    proc = rig.sup.start(name, ns, ["containerd", "--config", str(conf)])
    sock = base / "containerd.sock"

    def answers() -> bool:
        if not sock.exists():
            return False
        probe = ns.run(["ctr", "-a", str(sock), "version"], check=False, timeout_s=10)
        return probe.returncode == 0

    wait_for("containerd socket", answers, deadline_s=30, alive=proc.dead, step_s=0.1)
    hosts_dir = base / "certs.d"
    servers = {"docker.io": "https://registry-1.docker.io", "quay.io": "https://quay.io",
               f"{INTRA_REGISTRY}:{INTRA_REGISTRY_PORT}":
                   f"https://{INTRA_REGISTRY}:{INTRA_REGISTRY_PORT}"}
    for name, server in servers.items():
        d = hosts_dir / name
        d.mkdir(parents=True)
        (d / "hosts.toml").write_text(
            f'server = "{server}"\n\n[host."{server}"]\n'
            f'  capabilities = ["pull", "resolve"]\n  ca = "{rig.ca.cert}"\n'
        )
    return Containerd(proc=proc, socket=sock, hosts_dir=hosts_dir)


def ctr(rig: Rig, cd: Containerd, args: list[str], env: dict[str, str],
        timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return rig.node.run(["ctr", "-a", str(cd.socket), "-n", "e2e", *args], env=env,
                        timeout_s=timeout_s)


# --- dockerd ----------------------------------------------------------------------------------
@dataclass
class Dockerd:
    proc: Proc
    host: str
    env: dict[str, str]
    dropin: str


def start_dockerd(rig: Rig, containerd: Containerd, proxy_url: str | None, *,
                  name: str = "docker", daemon_json: dict[str, object] | None = None) -> Dockerd:
    """dockerd in the node with its own data/exec roots and socket under rig.tmp/NAME.

    With `proxy_url` it takes its proxy from the generated systemd drop-in; without one it has
    no proxy at all (e.g. a daemon that only pulls through a registry mirror on loopback).
    `daemon_json` is its daemon.json. A second daemon keeps its containers in a containerd
    namespace of its own, so two can share one containerd.
    """
    if not DOCKER_ETC.is_dir():
        raise RuntimeError(f"{DOCKER_ETC} must exist as a mount point (docker.io creates it)")
    base = rig.tmp / name
    etc = base / "etc"
    for registry in ("quay.io", f"{INTRA_REGISTRY}:{INTRA_REGISTRY_PORT}"):
        (etc / "certs.d" / registry).mkdir(parents=True)
        shutil.copy(rig.ca.cert, etc / "certs.d" / registry / "ca.crt")
    (etc / "daemon.json").write_text(json.dumps(daemon_json or {}) + "\n")
    dropin = ""
    env: dict[str, str] = {}
    if proxy_url is not None:
        dropin = gen_file(rig, "docker-dropin", proxy_url, base / "dropin-root")
        env = parse_systemd_environment(dropin)
        assert env.get("HTTPS_PROXY") == proxy_url, f"drop-in without HTTPS_PROXY:\n{dropin}"
    # Docker Hub has no certs.d entry of its own (dockerd uses the system pool for it).
    env["SSL_CERT_FILE"] = str(rig.ca.cert)
    sock = base / "docker.sock"
    # Not `ip netns exec`: it remounts /sys, which hides the cgroup mounts dockerd insists on.
    # nsenter joins only the network namespace; the private mount namespace then gets the
    # node's hosts/resolv.conf and our /etc/docker, all bind mounts that vanish with it.
    script = (
        'mount --bind "$0/hosts" /etc/hosts && mount --bind "$0/resolv.conf" /etc/resolv.conf'
        ' && mount --bind "$1" /etc/docker && shift && exec "$@"'
    )
    argv = [
        "nsenter", f"--net=/run/netns/{rig.node.name}",
        "unshare", "--mount", "--propagation", "private", "sh", "-c", script,
        str(rig.node.etc_dir), str(etc),
        "dockerd", "--config-file", str(etc / "daemon.json"),
        "--data-root", str(base / "data"), "--exec-root", str(base / "exec"),
        "--pidfile", str(base / "docker.pid"), "-H", f"unix://{sock}",
        "--containerd", str(containerd.socket),
        "--iptables=false", "--ip-forward=false", "--ip-masq=false", "--bridge=none",
        "--storage-driver=vfs", "--userland-proxy=false",
    ]
    if name != "docker":
        argv += ["--containerd-namespace", f"{name}-moby",
                 "--containerd-plugins-namespace", f"{name}-plugins"]
    proc = rig.sup.start(f"dockerd-{name}" if name != "docker" else "dockerd", None, argv,
                         env=env)
    host = f"unix://{sock}"

    def answers() -> bool:
        if not sock.exists():
            return False
        return rig.node.run(["docker", "-H", host, "version"], check=False,
                            env=rig.client_env(), timeout_s=10).returncode == 0

    wait_for("dockerd socket", answers, deadline_s=60, alive=proc.dead, step_s=0.2)
    return Dockerd(proc=proc, host=host, env=env, dropin=dropin)


def docker(rig: Rig, d: Dockerd, args: list[str],
           timeout_s: float = 60.0) -> subprocess.CompletedProcess[str]:
    return rig.node.run(["docker", "-H", d.host, *args], env=rig.client_env(),
                        timeout_s=timeout_s)


# --- podman -----------------------------------------------------------------------------------
@dataclass
class Podman:
    base: Path
    conf: Path
    config_text: str

    def argv(self, args: list[str]) -> list[str]:
        return ["podman", "--root", str(self.base / "root"), "--runroot", str(self.base / "run"),
                "--tmpdir", str(self.base / "libpod-tmp"), "--storage-driver", "vfs",
                "--cgroup-manager", "cgroupfs", "--events-backend", "none", *args]


def setup_podman(rig: Rig, proxy_url: str) -> Podman:
    base = rig.tmp / "podman"
    base.mkdir()
    text = gen_file(rig, "podman", proxy_url, base / "gen-root")
    conf = next((base / "gen-root").rglob("*.conf"))
    return Podman(base=base, conf=conf, config_text=text)


def podman(rig: Rig, p: Podman, args: list[str], timeout_s: float = 60.0,
           **extra_env: str) -> subprocess.CompletedProcess[str]:
    # No proxy variables in the environment: podman must take them from the generated file.
    env = rig.client_env(CONTAINERS_CONF=str(p.conf), **extra_env)
    return rig.node.run(p.argv(args), env=env, timeout_s=timeout_s)


def image_inspect(out: str) -> dict[str, object]:
    data = json.loads(out)
    return data[0] if isinstance(data, list) else data
