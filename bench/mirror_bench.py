"""Registry mirror benchmark: nodes pull one image through a rate-limited tunnel, through
fwdproxy as a proxy only and through fwdproxy as registry mirror + layer cache.

    python bench/mirror_bench.py              # ~200 MiB image, 8 nodes (about 4 minutes)
    python bench/mirror_bench.py --quick      # ~30 MiB image, 3 nodes (under a minute)
    python bench/mirror_bench.py --render bench/results/mirror-DATE.json   # markdown again

Needs root (network namespaces, tc) and the Debian packages iproute2, skopeo,
docker-registry, dante-server and curl. Everything runs in two network namespaces of its own:

    fpmb-out ("the internet")                      fpmb-node (a container host)
      docker-registry  127.0.0.1:5001                fwdproxy serve -c CONFIG
      relay 10.123.0.2:5000 -> :5001 (+latency)        proxy 127.0.0.1:3128, admin :9128,
      danted (SOCKS5)  10.123.0.2:1080                 mirror 127.0.0.1:5000 (mode b only)
      veth fpmb-o 10.123.0.2 ===== tbf ====> veth fpmb-n 10.123.0.1   skopeo: the nodes' pulls

The veth pair is the tunnel: `tc tbf` limits the download direction (fpmb-out -> fpmb-node),
its kernel byte counter is read before and after every pull, and the relay counts the HTTP
payload that crosses it. fwdproxy reaches the registry only through its upstream `tunnel`
(danted), by the rule `cidr: [10.123.0.0/24] -> via: tunnel`, as it would reach a registry
on the internet. See bench/README.md, section "Mirror benchmark".
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime as dt
import fcntl
import gzip
import hashlib
import io
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
BUILD = BENCH / "build"
MIB = 1 << 20

NS_OUT = "fpmb-out"
NS_NODE = "fpmb-node"
IF_OUT = "fpmb-o"  # in fpmb-out; its egress is the download direction, shaped by tbf
IF_NODE = "fpmb-n"
IP_OUT = "10.123.0.2"
IP_NODE = "10.123.0.1"
NET = "10.123.0.0/24"
REGISTRY_PORT = 5001  # docker-registry, loopback of fpmb-out
RELAY_PORT = 5000  # the registry as the node sees it: 10.123.0.2:5000
SOCKS_PORT = 1080
PROXY_PORT = 3128
MIRROR_PORT = 5000
ADMIN_PORT = 9128
REGISTRY = f"{IP_OUT}:{RELAY_PORT}"
REPOSITORY = "bench/img"
TAG = "1"
PREFIX = "fpmb"  # mirror.prefixes: /v2/fpmb/... means the registry 10.123.0.2:5000
LOCK = Path("/run/lock/fpmb-mirror-bench.lock")
TOOLS = {  # command -> Debian package
    "ip": "iproute2",
    "tc": "iproute2",
    "skopeo": "skopeo",
    "docker-registry": "docker-registry",
    "danted": "dante-server",
    "curl": "curl",
}
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"

T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    layers_mib: tuple[int, ...] = (120, 60, 20)
    nodes: int = 8
    tunnel_mibps: float = 20.0  # tbf rate of the download direction (MiB/s of wire bytes)
    latency_ms: float = 20.0  # added by the relay in each direction (RTT + 2x this)
    hit_reps: int = 7  # cache hit vs reading the file: repeats, median
    seed: str = "fwdproxy-mirror-bench"
    quiet_pct: float = 30.0  # before each measurement, wait for other processes to use less
    quiet_wait_s: float = 5.0  # ...than this % of one CPU, at most this long each time
    quiet_budget_s: float = 60.0  # ...and this long in all


QUICK = Settings(layers_mib=(18, 9, 3), nodes=3, hit_reps=3, quiet_wait_s=1.0,
                 quiet_budget_s=5.0)

TARGETS = {
    "tunnel_ratio": 1.05,  # tunnel bytes of all mirror pulls / image size, at most
    "warm_speedup": 10.0,  # pull through the limited tunnel / warm mirror pull, at least
    "hit_vs_disk": 0.7,  # cache-hit MiB/s / reading the file MiB/s, at least
}


class BenchError(Exception):
    """A failure the benchmark reports in one line (missing tool, daemon that did not start)."""


# -- commands and namespaces ------------------------------------------------------------------


def run(argv: list[str], *, timeout_s: float = 120, check: bool = True,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, env=env)
    if check and proc.returncode != 0:
        raise BenchError(f"{' '.join(argv)} -> exit {proc.returncode}\n"
                         f"{proc.stderr.strip()[-3000:]}")
    return proc


def in_ns(ns: str, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


def ns_call(ns: str, fn: Callable[[], T]) -> T:
    """Run `fn` on a thread that joined network namespace `ns` (setns affects that thread
    only); sockets it opens live in that namespace."""
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = os.open(f"/run/netns/{ns}", os.O_RDONLY)
            try:
                if libc.setns(fd, 0x40000000) != 0:  # CLONE_NEWNET
                    err = ctypes.get_errno()
                    raise OSError(err, f"setns({ns}): {os.strerror(err)}")
            finally:
                os.close(fd)
            box["value"] = fn()
        except BaseException as e:
            box["error"] = e

    t = threading.Thread(target=target, name=f"ns-{ns}")
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box["value"]


def wait_port(ns: str, host: str, port: int, proc: subprocess.Popen[Any], what: str,
              log: Path, timeout_s: float = 20.0) -> None:
    """Poll until host:port accepts inside `ns`; a clear error with the log's tail if not."""
    deadline = time.monotonic() + timeout_s

    def probe() -> bool:
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.3):
            return True
        return False

    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"{what} exited with {proc.returncode} before listening on "
                             f"{host}:{port}; end of {log}:\n{tail(log)}")
        if ns_call(ns, probe):
            return
        time.sleep(0.05)
    raise BenchError(f"{what}: nothing listens on {host}:{port} in {ns} after {timeout_s}s; "
                     f"end of {log}:\n{tail(log)}")


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def http_get(ns: str, url: str, headers: dict[str, str] | None = None,
             sink: Callable[[bytes], None] | None = None, timeout_s: float = 60) -> bytes:
    """GET from inside `ns` (no proxy); the body, or fed to `sink` chunk by chunk."""

    def get() -> bytes:
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        req = urllib.request.Request(url, headers=headers or {})
        with opener.open(req, timeout=timeout_s) as r:
            if sink is None:
                return bytes(r.read())
            while chunk := r.read(1 << 20):
                sink(chunk)
            return b""

    return ns_call(ns, get)


class Procs:
    """Every process the benchmark starts, each in its own process group, stopped by its
    group id (dante forks) in reverse order whatever happens."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[Any]]] = []

    def start(self, name: str, argv: list[str], log: Path,
              env: dict[str, str] | None = None) -> subprocess.Popen[Any]:
        with log.open("ab") as out:
            p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env,
                                 start_new_session=True, stdin=subprocess.DEVNULL)
        self.procs.append((name, p))
        return p

    def stop(self, p: subprocess.Popen[Any]) -> None:
        for sig, wait_s in ((signal.SIGTERM, 8.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)  # the group is ours: start_new_session above
            try:
                p.wait(wait_s)
                break
            except subprocess.TimeoutExpired:
                continue
        self.procs = [(n, q) for n, q in self.procs if q is not p]

    def stop_all(self) -> None:
        for _name, p in reversed(list(self.procs)):
            self.stop(p)


class Topology:
    """The two namespaces, the veth pair and its tbf; removed by `teardown`."""

    def __init__(self, s: Settings) -> None:
        self.s = s
        self.made = False

    @staticmethod
    def leftovers() -> list[str]:
        """Remove namespaces of a crashed run of this benchmark (only its own fpmb-* names),
        after stopping the processes still inside them (by pid, from `ip netns pids`)."""
        found = []
        for ns in (NS_OUT, NS_NODE):
            if not Path(f"/run/netns/{ns}").exists():
                continue
            found.append(ns)
            pids = run(["ip", "netns", "pids", ns], check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            run(["ip", "netns", "del", ns], check=False)
        return found

    def setup(self) -> None:
        self.made = True
        for ns in (NS_OUT, NS_NODE):
            run(["ip", "netns", "add", ns])
            run(["ip", "-n", ns, "link", "set", "lo", "up"])
        run(["ip", "link", "add", IF_OUT, "netns", NS_OUT, "type", "veth", "peer", "name",
             IF_NODE, "netns", NS_NODE])
        for ns, ifname, ip in ((NS_OUT, IF_OUT, IP_OUT), (NS_NODE, IF_NODE, IP_NODE)):
            run(["ip", "-n", ns, "addr", "add", f"{ip}/24", "dev", ifname])
            run(["ip", "-n", ns, "link", "set", ifname, "up"])
        self.shape(self.s.tunnel_mibps)

    @staticmethod
    def shape(mibps: float | None) -> None:
        """tbf on the download direction (fpmb-out -> fpmb-node); None: unlimited."""
        run(in_ns(NS_OUT, ["tc", "qdisc", "del", "dev", IF_OUT, "root"]), check=False)
        if mibps:
            rate = f"{int(mibps * 1024)}kibps"
            run(in_ns(NS_OUT, ["tc", "qdisc", "add", "dev", IF_OUT, "root", "tbf", "rate", rate,
                               "burst", "256kb", "latency", "100ms"]))

    @staticmethod
    def qdisc() -> str:
        return run(in_ns(NS_OUT, ["tc", "qdisc", "show", "dev", IF_OUT])).stdout.strip()

    @staticmethod
    def counters() -> dict[str, int]:
        """The tunnel link's kernel counters, seen from fpmb-out: tx = download direction."""
        out = run(["ip", "-n", NS_OUT, "-s", "-j", "link", "show", "dev", IF_OUT]).stdout
        st = json.loads(out)[0]["stats64"]
        return {"down_bytes": st["tx"]["bytes"], "down_packets": st["tx"]["packets"],
                "up_bytes": st["rx"]["bytes"], "up_packets": st["rx"]["packets"]}

    def teardown(self) -> list[str]:
        """Delete both namespaces (and with them the veth pair); a process of ours still
        inside one (none should be: Procs stopped them) is killed by pid first."""
        problems = []
        if not self.made:
            return problems
        for ns in (NS_OUT, NS_NODE):
            if not Path(f"/run/netns/{ns}").exists():
                continue
            for pid in run(["ip", "netns", "pids", ns], check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
                    problems.append(f"killed pid {pid} still in {ns}")
            r = run(["ip", "netns", "del", ns], check=False)
            if r.returncode != 0:
                problems.append(f"ip netns del {ns}: {r.stderr.strip()}")
        return problems


@contextlib.contextmanager
def bench_lock() -> Iterator[None]:
    LOCK.parent.mkdir(parents=True, exist_ok=True)
    with LOCK.open("a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise BenchError(f"another mirror benchmark holds {LOCK}") from None
        yield


# -- the image --------------------------------------------------------------------------------


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def canonical(obj: object) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def build_image(s: Settings, directory: Path) -> None:
    """An OCI layout of an image with one incompressible file per layer: a tar, gzip-framed
    with stored blocks (level 0: random data does not compress, and it is fast to make)."""
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    layers, diff_ids = [], []
    for i, mib in enumerate(s.layers_mib):
        data = random.Random(f"{s.seed}-{i}").randbytes(mib * MIB)
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo(f"bench/layer{i}.bin")
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))
        del data
        diff_ids.append("sha256:" + sha256_hex(buf.getvalue()))
        blob = gzip.compress(buf.getvalue(), compresslevel=0, mtime=0)
        (blobs / sha256_hex(blob)).write_bytes(blob)
        layers.append({"mediaType": OCI_LAYER, "digest": "sha256:" + sha256_hex(blob),
                       "size": len(blob)})
    config = canonical({
        "architecture": "amd64", "os": "linux",
        "config": {"Labels": {"org.fwdproxy.bench": "mirror"}},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
        "history": [{"created_by": "bench/mirror_bench.py"} for _ in layers],
    })
    (blobs / sha256_hex(config)).write_bytes(config)
    manifest = canonical({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": OCI_CONFIG, "digest": "sha256:" + sha256_hex(config),
                   "size": len(config)},
        "layers": layers,
    })
    (blobs / sha256_hex(manifest)).write_bytes(manifest)
    (directory / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}))
    (directory / "index.json").write_bytes(canonical({
        "schemaVersion": 2,
        "manifests": [{"mediaType": OCI_MANIFEST, "digest": "sha256:" + sha256_hex(manifest),
                       "size": len(manifest),
                       "annotations": {"org.opencontainers.image.ref.name": TAG}}],
    }))


def image_dir(s: Settings) -> Path:
    """The generated image, kept under bench/build/ between runs (same settings, same bytes)."""
    key = sha256_hex(f"{s.seed}/{s.layers_mib}".encode())[:12]
    d = BUILD / "mirror-image" / f"{'-'.join(map(str, s.layers_mib))}-{key}"
    if not (d / "index.json").exists():
        shutil.rmtree(d, ignore_errors=True)
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        build_image(s, tmp)
        tmp.rename(d)
    return d


# -- the pieces in the namespaces -------------------------------------------------------------


def write_configs(work: Path, data: Path) -> dict[str, Path]:
    cfg = {}
    cfg["registry"] = work / "registry.yml"
    cfg["registry"].write_text(
        "version: 0.1\n"
        "log: {level: warn, accesslog: {disabled: true}}\n"
        f"storage: {{filesystem: {{rootdirectory: {data / 'registry'}}}, "
        "cache: {blobdescriptor: inmemory}}\n"
        f"http: {{addr: '127.0.0.1:{REGISTRY_PORT}'}}\n"
    )
    cfg["danted"] = work / "danted.conf"
    cfg["danted"].write_text(
        "# the tunnel's far end: SOCKS5 without auth on the fpmb-out side of the link\n"
        "logoutput: stderr\n"
        f"internal: {IP_OUT} port = {SOCKS_PORT}\n"
        f"external: {IP_OUT}\n"
        "clientmethod: none\nsocksmethod: none\n"
        "user.privileged: root\nuser.unprivileged: root\ntimeout.io: 0\n"
        f"client pass {{\n  from: {NET} to: 0.0.0.0/0\n  log: error\n}}\n"
        f"socks pass {{\n  from: {NET} to: {IP_OUT}/32\n  command: connect\n  log: error\n}}\n"
    )
    common = (
        f"listen: 127.0.0.1:{PROXY_PORT}\n"
        f"admin: {{listen: '127.0.0.1:{ADMIN_PORT}'}}\n"
        f"upstreams:\n  tunnel: socks5://{IP_OUT}:{SOCKS_PORT}\n"
        "rules:\n"
        "  - name: bench-registry\n"
        f"    cidr: [{NET}]\n"
        "    via: tunnel\n"
        "default: reject\n"
    )
    cfg["proxy"] = work / "fwdproxy-proxy.yaml"
    cfg["proxy"].write_text("# (a) fwdproxy as a proxy only\n" + common)
    cfg["mirror"] = work / "fwdproxy-mirror.yaml"
    cfg["mirror"].write_text(
        "# (b) fwdproxy as registry mirror + layer cache\n" + common +
        "mirror:\n"
        f"  listen: 127.0.0.1:{MIRROR_PORT}\n"
        f"  prefixes: {{{PREFIX}: '{REGISTRY}'}}\n"
        f"  registries: {{'{REGISTRY}': {{plain_http: true}}}}\n"
        "cache:\n"
        f"  dir: {data / 'cache'}\n"
    )
    cfg["registries.conf"] = work / "registries.conf"  # skopeo: no system mirrors or aliases
    cfg["registries.conf"].write_text("unqualified-search-registries = []\n")
    return cfg


def relay_stats(sock: Path) -> dict[str, int]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(sock))
        data = b""
        while chunk := s.recv(4096):
            data += chunk
    return json.loads(data)


def fwdproxy_env(tree: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("FWDPROXY_") and k.lower() not in
           ("http_proxy", "https_proxy", "all_proxy", "no_proxy")}
    env["PYTHONPATH"] = str(tree)
    return env


def skopeo_env(work: Path, cfg: dict[str, Path], proxy: str | None) -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(work / "home"),
           "TMPDIR": str(work / "tmp"),
           "CONTAINERS_REGISTRIES_CONF": str(cfg["registries.conf"])}
    if proxy:
        env |= {"HTTP_PROXY": proxy, "HTTPS_PROXY": proxy, "http_proxy": proxy,
                "https_proxy": proxy}
    return env


# -- pulls ------------------------------------------------------------------------------------


@dataclass
class Image:
    manifest_digest: str
    manifest_size: int
    blobs: dict[str, int]  # digest -> size: config and layers
    layers: list[str]

    @property
    def size(self) -> int:
        return self.manifest_size + sum(self.blobs.values())


def verify_pull(dest: Path, image: Image) -> dict[str, Any]:
    """Every file skopeo wrote hashes to its name, and they are exactly the image's blobs."""
    manifest = (dest / "manifest.json").read_bytes()
    problems = []
    if "sha256:" + sha256_hex(manifest) != image.manifest_digest:
        problems.append("manifest.json is not the pushed manifest")
    seen = {}
    for f in dest.iterdir():
        if f.name in ("manifest.json", "version"):
            continue
        h = hashlib.sha256()
        with f.open("rb") as fh:
            while chunk := fh.read(4 * MIB):
                h.update(chunk)
        seen["sha256:" + f.name] = f.stat().st_size
        if h.hexdigest() != f.name:
            problems.append(f"{f.name}: content hashes to {h.hexdigest()}")
    if seen != image.blobs:
        problems.append(f"blobs {sorted(seen)} != image blobs {sorted(image.blobs)}")
    return {"ok": not problems, "problems": problems, "bytes": sum(seen.values())}


# -- noise, timing helpers --------------------------------------------------------------------


def ns_pids() -> list[int]:
    pids = []
    for ns in (NS_OUT, NS_NODE):
        if Path(f"/run/netns/{ns}").exists():
            out = run(["ip", "netns", "pids", ns], check=False).stdout.split()
            pids += [int(p) for p in out if p.isdigit()]
    return pids


def proc_cpu(pid: int, children: bool = False) -> float:
    """User+system CPU seconds of one process (with its reaped children if asked); 0 if gone."""
    try:
        f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    ticks = int(f[11]) + int(f[12]) + (int(f[13]) + int(f[14]) if children else 0)
    return ticks / os.sysconf("SC_CLK_TCK")


def cpu_snapshot() -> dict[str, float]:
    """Machine CPU (/proc/stat) and ours: this process, its reaped children (the pulls) and
    every process in our namespaces (the daemons), in CPU seconds."""
    import resource

    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    ours = sum(proc_cpu(p, children=True) for p in ns_pids())
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        ours += ru.ru_utime + ru.ru_stime
    return {"t": time.monotonic(), "busy": (f[0] + f[1] + f[2]) / tick,
            "irq": (f[5] + f[6]) / tick, "ours": ours}


def foreign_pct(a: dict[str, float], b: dict[str, float]) -> float:
    """CPU used by processes that are not ours between two snapshots, in % of one CPU."""
    wall = max(b["t"] - a["t"], 1e-6)
    return max(0.0, (b["busy"] - a["busy"]) - (b["ours"] - a["ours"])) / wall * 100


class Quiet:
    """Before each measurement, wait (bounded) for other users of the machine to calm down;
    the level seen is recorded with the figure."""

    def __init__(self, pct: float, wait_s: float, budget_s: float) -> None:
        self.pct, self.wait_s, self.budget_s = pct, wait_s, budget_s

    def wait(self) -> float:
        start = time.monotonic()
        deadline = start + min(self.wait_s, self.budget_s)
        while True:
            a = cpu_snapshot()
            time.sleep(0.3)
            level = foreign_pct(a, cpu_snapshot())
            if level <= self.pct or time.monotonic() >= deadline:
                break
        self.budget_s = max(0.0, self.budget_s - (time.monotonic() - start))
        return level


def read_file_s(path: Path, buf: memoryview) -> float:
    """Read a whole file into one reused buffer (in this process): seconds."""
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY)
    try:
        while os.readv(fd, [buf]):
            pass
    finally:
        os.close(fd)
    return time.perf_counter() - t0


def get_s(port: int, path: str, buf: memoryview) -> tuple[float, int, int]:
    """GET http://127.0.0.1:port/path with `Connection: close` from this process (call it in
    the node namespace) and discard the body into one reused buffer: seconds, status, body
    bytes. No HTTP library on the path: what is measured is the server and the socket."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n"
                  "\r\n".encode())
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = s.recv(65536)
            if not chunk:
                raise BenchError(f"GET {path}: connection closed in the response head")
            head += chunk
        head, body = head.split(b"\r\n\r\n", 1)
        status = int(head.split(None, 2)[1])
        n = len(body)
        while k := s.recv_into(buf):
            n += k
    return time.perf_counter() - t0, status, n


def serve_file(path: str, port: int) -> None:
    """The ceiling for a GET over loopback: answer every request with the file, sent with
    os.sendfile from a thread per connection, then close. (`--serve-file`, in fpmb-node.)"""
    size = os.path.getsize(path)
    srv = socket.create_server(("127.0.0.1", port))

    def answer(c: socket.socket) -> None:
        with c, open(path, "rb") as f:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = c.recv(65536)
                if not chunk:
                    return
                head += chunk
            c.sendall(f"HTTP/1.1 200 OK\r\nContent-Length: {size}\r\nConnection: close\r\n"
                      "\r\n".encode())
            off = 0
            while off < size:
                off += os.sendfile(c.fileno(), f.fileno(), off, size - off)

    while True:
        c, _ = srv.accept()
        threading.Thread(target=answer, args=(c,), daemon=True).start()


# -- the benchmark ----------------------------------------------------------------------------


class Bench:
    def __init__(self, s: Settings, tree: Path, work: Path, data: Path, dest: Path,
                 profile: str) -> None:
        self.s = s
        self.tree = tree
        self.work = work  # logs and configs (kept)
        self.data = data  # registry storage, cache (removed)
        self.dest = dest  # where the pulls write (removed after each)
        self.profile = profile  # auto | always | never
        self.procs = Procs()
        self.topo = Topology(s)
        self.cfg: dict[str, Path] = {}
        self.relay_sock = data / "relay.sock"
        self.image: Image | None = None
        self.oci: Path | None = None
        self.fwd: subprocess.Popen[Any] | None = None
        self.quiet = Quiet(s.quiet_pct, s.quiet_wait_s, s.quiet_budget_s)

    # set-up

    def start_out(self) -> None:
        w = self.work
        reg = self.procs.start("registry", in_ns(NS_OUT, [
            "docker-registry", "serve", str(self.cfg["registry"])]), w / "registry.log")
        wait_port(NS_OUT, "127.0.0.1", REGISTRY_PORT, reg, "docker-registry",
                  w / "registry.log")
        relay = self.procs.start("relay", in_ns(NS_OUT, [
            sys.executable, str(BENCH / "mirror_relay.py"), f"{IP_OUT}:{RELAY_PORT}",
            f"127.0.0.1:{REGISTRY_PORT}", "--delay-ms", str(self.s.latency_ms),
            "--stats", str(self.relay_sock)]), w / "relay.log")
        wait_port(NS_OUT, IP_OUT, RELAY_PORT, relay, "relay", w / "relay.log")
        dante = self.procs.start("danted", in_ns(NS_OUT, [
            "danted", "-f", str(self.cfg["danted"])]), w / "danted.log")
        wait_port(NS_OUT, IP_OUT, SOCKS_PORT, dante, "danted", w / "danted.log")

    def push(self, oci: Path) -> Image:
        """Fill the registry on its loopback (not through the tunnel), then read back what
        it serves: those digests and sizes are what every pull must get."""
        run(in_ns(NS_OUT, ["skopeo", "copy", "--insecure-policy", "--dest-tls-verify=false",
                           f"oci:{oci}:{TAG}",
                           f"docker://127.0.0.1:{REGISTRY_PORT}/{REPOSITORY}:{TAG}"]),
            timeout_s=300, env=skopeo_env(self.work, self.cfg, None))
        body = http_get(NS_OUT, f"http://127.0.0.1:{REGISTRY_PORT}/v2/{REPOSITORY}/manifests/"
                        f"{TAG}", {"Accept": OCI_MANIFEST})
        m = json.loads(body)
        blobs = {m["config"]["digest"]: m["config"]["size"]}
        blobs |= {x["digest"]: x["size"] for x in m["layers"]}
        return Image("sha256:" + sha256_hex(body), len(body), blobs,
                     [x["digest"] for x in m["layers"]])

    def start_fwdproxy(self, mode: str, loop: str | None = None) -> subprocess.Popen[Any]:
        name = mode + (f"-{loop}" if loop else "")
        log = self.work / f"fwdproxy-{name}.log"
        log.unlink(missing_ok=True)
        argv = [sys.executable, "-m", "fwdproxy", "serve", "-c", str(self.cfg[mode])]
        if loop:
            argv += ["--loop", loop]
        p = self.procs.start(f"fwdproxy {name}", in_ns(NS_NODE, argv), log,
                             env=fwdproxy_env(self.tree))
        for port in (PROXY_PORT, ADMIN_PORT) + ((MIRROR_PORT,) if mode == "mirror" else ()):
            wait_port(NS_NODE, "127.0.0.1", port, p, f"fwdproxy ({name})", log)
        self.fwd = p
        return p

    def stop_fwdproxy(self) -> None:
        if self.fwd is not None:
            self.procs.stop(self.fwd)
            self.fwd = None

    # pulls

    def counters(self) -> dict[str, int]:
        c = self.topo.counters()
        r = relay_stats(self.relay_sock)
        c["payload_down"] = r["down"]
        c["payload_up"] = r["up"]
        c["connections"] = r["connections"]
        return c

    def pull(self, mode: str, n: int, ref: str, proxy: str | None) -> dict[str, Any]:
        """One node's pull: `skopeo copy REF dir:FRESH`, timed; tunnel counters around it;
        then every file it wrote re-hashed (not timed)."""
        assert self.image is not None
        dest = self.dest / f"{mode}-{n}"
        shutil.rmtree(dest, ignore_errors=True)
        os.sync()  # the previous pull's writes are not this one's
        quiet = self.quiet.wait()
        argv = ["skopeo", "copy", "--insecure-policy", "--src-tls-verify=false", ref,
                f"dir:{dest}"]
        if not ref.startswith("oci:"):
            argv = in_ns(NS_NODE, argv)
        before = self.counters()
        cpu0 = cpu_snapshot()
        t0 = time.perf_counter()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=600,
                              env=skopeo_env(self.work, self.cfg, proxy))
        wall = time.perf_counter() - t0
        noise = foreign_pct(cpu0, cpu_snapshot())
        time.sleep(0.3)  # let the last ACKs and FINs cross before reading the counters
        after = self.counters()
        out: dict[str, Any] = {"node": n, "wall_s": round(wall, 3), "exit": proc.returncode,
                               "quiet_pct": round(quiet), "foreign_cpu_pct": round(noise)}
        for k in before:
            out[k] = after[k] - before[k]
        state = ""
        if proc.returncode != 0:
            out["error"] = (proc.stderr or proc.stdout).strip()[-2000:]
            out["verified"] = False
            state = "FAILED"
        else:
            v = verify_pull(dest, self.image)
            out["verified"] = v["ok"]
            out["bytes"] = v["bytes"]
            if v["problems"]:
                out["problems"] = v["problems"]
                state = "WRONG BYTES: " + "; ".join(v["problems"])[:300]
        shutil.rmtree(dest, ignore_errors=True)
        print(f"  {mode:6} pull {n}: {wall:6.2f} s, tunnel {out['down_bytes'] / MIB:7.2f} MiB "
              f"(payload {out['payload_down'] / MIB:.2f}), other load {noise:3.0f}% {state}",
              flush=True)
        if proc.returncode:
            print(f"    {out['error'][-500:]}", flush=True)
        return out

    def floor(self, n: int) -> dict[str, Any]:
        """The same copy from the local OCI layout: no network, no proxy, same destination."""
        assert self.oci is not None
        return self.pull("local", n, f"oci:{self.oci}:{TAG}", None)

    def mirror_api(self) -> dict[str, Any]:
        return json.loads(http_get(NS_NODE, f"http://127.0.0.1:{ADMIN_PORT}/api/mirror"))

    # cache hits

    def biggest(self) -> tuple[str, int, Path]:
        assert self.image is not None
        img = self.image
        digest = max(img.layers, key=lambda d: img.blobs[d])
        hexd = digest.split(":", 1)[1]
        path = self.data / "cache" / "blobs" / "sha256" / hexd[:2] / hexd
        if not path.is_file():
            raise BenchError(f"the cache has no file for {digest} at {path}")
        return digest, img.blobs[digest], path

    def hits(self, name: str, port: int, url_path: str, *, processes: bool,
             pid: int | None) -> dict[str, Any]:
        """GET the biggest blob from `port` vs reading its cache file, repeats interleaved,
        both warm in the page cache; medians. In this process (a reused 4 MiB buffer for the
        socket, 1 MiB for the file) and, with `processes`, as processes in the node namespace
        writing to /dev/null: `curl -o /dev/null URL` vs `cat FILE`."""
        _digest, size, path = self.biggest()
        sbuf, fbuf = memoryview(bytearray(4 * MIB)), memoryview(bytearray(MIB))
        url = f"http://127.0.0.1:{port}{url_path}"
        cat = in_ns(NS_NODE, ["cat", str(path)])
        curl = in_ns(NS_NODE, ["curl", "-sS", "--noproxy", "*", "-o", "/dev/null", "-w",
                               "%{http_code} %{size_download} %{time_total}", url])

        def proc_s(argv: list[str]) -> tuple[float, str]:
            t0 = time.perf_counter()
            p = subprocess.run(argv, stdout=subprocess.PIPE if argv is curl else
                               subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                               timeout=120)
            wall = time.perf_counter() - t0
            if p.returncode != 0:
                raise BenchError(f"{' '.join(argv)} -> exit {p.returncode}: {p.stderr}")
            return wall, (p.stdout or "").strip()

        def hit() -> float:
            secs, status, got = ns_call(NS_NODE, lambda: get_s(port, url_path, sbuf))
            if status != 200 or got != size:
                raise BenchError(f"{name}: GET {url_path} answered {status} with {got} of "
                                 f"{size} bytes")
            return secs

        read_file_s(path, fbuf)  # warm-up
        hit()
        if processes:
            proc_s(cat)
            proc_s(curl)
        quiet = self.quiet.wait()
        cpu0 = proc_cpu(pid) if pid else 0.0
        snap = cpu_snapshot()
        rows = []
        for _ in range(self.s.hit_reps):
            row = {"read_s": read_file_s(path, fbuf), "get_s": hit()}
            if processes:
                row["cat_s"] = proc_s(cat)[0]
                wall, text = proc_s(curl)
                code, got, total = text.split()
                if code != "200" or int(got) != size:
                    raise BenchError(f"{name}: curl got {code} with {got} of {size} bytes")
                row["curl_s"], row["curl_timer_s"] = wall, float(total)
            rows.append(row)
        noise = foreign_pct(snap, cpu_snapshot())
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        out: dict[str, Any] = {
            "name": name, "bytes": size, "reps": rows, "quiet_pct": round(quiet),
            "foreign_cpu_pct": round(noise),
            "read_mibps": size / MIB / med["read_s"], "get_mibps": size / MIB / med["get_s"],
            "ratio": med["read_s"] / med["get_s"],
        }
        if processes:
            out |= {"cat_mibps": size / MIB / med["cat_s"],
                    "curl_mibps": size / MIB / med["curl_s"],
                    "curl_timer_mibps": size / MIB / med["curl_timer_s"],
                    "process_ratio": med["cat_s"] / med["curl_s"]}
        if pid:
            gets = self.s.hit_reps * (2 if processes else 1)
            out["server_cpu_s_per_gib"] = (proc_cpu(pid) - cpu0) / (gets * size / (1 << 30))
        print(f"  {name}: GET {out['get_mibps']:.0f} MiB/s vs file read "
              f"{out['read_mibps']:.0f} MiB/s = {out['ratio']:.2f}x"
              + (f"; curl {out['curl_mibps']:.0f} vs cat {out['cat_mibps']:.0f} MiB/s"
                 if processes else ""), flush=True)
        return out

    def hit_body_ok(self) -> bool:
        """A cache hit in full, through an HTTP client: the body hashes to the digest."""
        digest, _size, _path = self.biggest()
        h = hashlib.sha256()
        http_get(NS_NODE, f"http://127.0.0.1:{MIRROR_PORT}/v2/{PREFIX}/{REPOSITORY}/blobs/"
                 f"{digest}", sink=h.update)
        return "sha256:" + h.hexdigest() == digest

    def cache_files_ok(self) -> dict[str, Any]:
        """Every committed cache file hashes to its name, and the cache holds the image."""
        assert self.image is not None
        found, bad = {}, []
        for f in (self.data / "cache" / "blobs").rglob("*"):
            if f.is_file():
                h = hashlib.sha256()
                with f.open("rb") as fh:
                    while chunk := fh.read(4 * MIB):
                        h.update(chunk)
                found["sha256:" + f.name] = f.stat().st_size
                if h.hexdigest() != f.name:
                    bad.append(f.name)
        missing = [d for d in self.image.blobs if d not in found]
        return {"ok": not bad and not missing, "files": len(found), "bad": bad,
                "missing": missing}

    def profile_hits(self, stem: Path, url_path: str) -> dict[str, Any]:
        """Where a cache hit's time goes in fwdproxy: py-spy (native frames) over a series of
        GETs, and the system calls of one GET (strace -c). Written to STEM-profile.txt."""
        assert self.fwd is not None
        pid = self.fwd.pid
        out: dict[str, Any] = {"file": f"{stem}-profile.txt"}
        text = [f"# cache-hit profile of fwdproxy (pid {pid}), GET {url_path}\n"]
        sbuf = memoryview(bytearray(4 * MIB))
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        raw = self.work / "hits.pyspy"
        if Path(spy).exists():
            seconds = 6
            p = subprocess.Popen([spy, "record", "-p", str(pid), "-r", "250", "-d",
                                  str(seconds), "--native", "-f", "raw", "-o", str(raw)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            time.sleep(1.0)
            end = time.monotonic() + seconds - 1.5
            gets = 0
            while time.monotonic() < end:
                ns_call(NS_NODE, lambda: get_s(MIRROR_PORT, url_path, sbuf))
                gets += 1
            _o, err = p.communicate(timeout=60)
            if raw.exists():
                out["pyspy"] = pyspy_summary(raw)
                out["pyspy"]["gets"] = gets
                text.append(pyspy_text(out["pyspy"]))
            else:
                out["pyspy_error"] = err.strip()[-500:]
        else:
            out["pyspy_error"] = "py-spy not installed (pip install py-spy)"
        if shutil.which("strace"):
            log = self.work / "hits.strace"
            p = subprocess.Popen(["strace", "-f", "-c", "-p", str(pid), "-o", str(log)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(0.5)
            for _ in range(2):
                ns_call(NS_NODE, lambda: get_s(MIRROR_PORT, url_path, sbuf))
            p.send_signal(signal.SIGINT)
            p.wait(10)
            table = log.read_text() if log.exists() else ""
            out["strace"] = strace_summary(table)
            text.append("\n## strace -f -c during 2 GETs\n\n" + table)
        else:
            out["strace_error"] = "strace not installed (apt-get install strace)"
        Path(out["file"]).write_text("".join(text))
        return out

    # the run

    def run(self, stem: Path) -> dict[str, Any]:
        s = self.s
        res: dict[str, Any] = {}
        self.cfg = write_configs(self.work, self.data)
        for d in ("home", "tmp"):
            (self.work / d).mkdir(exist_ok=True)
        self.dest.mkdir(parents=True, exist_ok=True)
        print("image", flush=True)
        self.oci = image_dir(s)
        self.topo.setup()
        res["qdisc"] = self.topo.qdisc()
        self.start_out()
        self.image = self.push(self.oci)
        img = self.image
        res["image"] = {"manifest": img.manifest_digest, "manifest_bytes": img.manifest_size,
                        "blobs": img.blobs, "layers": img.layers, "bytes": img.size}
        print(f"image {img.size / MIB:.1f} MiB in {len(img.layers)} layers; {res['qdisc']}",
              flush=True)
        floor = [self.floor(0)]

        print("(a) fwdproxy as a proxy only", flush=True)
        self.start_fwdproxy("proxy")
        ref = f"docker://{REGISTRY}/{REPOSITORY}:{TAG}"
        res["proxy"] = {"pulls": [self.pull("proxy", n, ref, f"http://127.0.0.1:{PROXY_PORT}")
                                  for n in range(1, s.nodes + 1)]}
        self.stop_fwdproxy()
        res["proxy"]["log"] = log_summary(self.work / "fwdproxy-proxy.log")

        print("(b) fwdproxy as registry mirror + layer cache (empty at start); each warm pull "
              "is followed by a local copy (the floor)", flush=True)
        shutil.rmtree(self.data / "cache", ignore_errors=True)
        self.start_fwdproxy("mirror")
        ref = f"docker://127.0.0.1:{MIRROR_PORT}/{PREFIX}/{REPOSITORY}:{TAG}"
        pulls = []
        for n in range(1, s.nodes + 1):
            pulls.append(self.pull("mirror", n, ref, None))
            if n > 1:
                floor.append(self.floor(n))
        res["mirror"] = {"pulls": pulls}
        res["floor"] = floor

        print("cache hit vs reading the file", flush=True)
        digest, _size, path = self.biggest()
        url_path = f"/v2/{PREFIX}/{REPOSITORY}/blobs/{digest}"
        hit: dict[str, Any] = {"digest": digest, "file": str(path),
                               "body_ok": self.hit_body_ok()}
        assert self.fwd is not None
        hit["mirror"] = self.hits("fwdproxy mirror", MIRROR_PORT, url_path, processes=True,
                                  pid=self.fwd.pid)
        if self.profile == "always" or (self.profile == "auto" and
                                        hit["mirror"]["process_ratio"] < TARGETS["hit_vs_disk"]):
            print("  profiling the cache hit (py-spy, strace)", flush=True)
            hit["profile"] = self.profile_hits(stem, url_path)
        res["mirror"]["api"] = self.mirror_api()
        self.stop_fwdproxy()
        res["mirror"]["log"] = log_summary(self.work / "fwdproxy-mirror.log")
        res["cache_files"] = self.cache_files_ok()

        # For comparison: the same hit with the stdlib loop (native sendfile), and a bare
        # sendfile server (the ceiling of a GET over loopback on this machine).
        self.start_fwdproxy("mirror", loop="asyncio")
        hit["mirror_asyncio"] = self.hits("fwdproxy mirror --loop asyncio", MIRROR_PORT,
                                          url_path, processes=True, pid=self.fwd.pid)
        self.stop_fwdproxy()
        log = self.work / "sendfile-server.log"
        p = self.procs.start("sendfile server", in_ns(NS_NODE, [
            sys.executable, str(Path(__file__).resolve()), "--serve-file", f"{path}:5999"]), log)
        wait_port(NS_NODE, "127.0.0.1", 5999, p, "sendfile server", log)
        hit["ceiling"] = self.hits("bare sendfile server", 5999, "/blob", processes=True,
                                   pid=p.pid)
        self.procs.stop(p)
        res["cache_hit"] = hit
        return res

    def close(self) -> list[str]:
        self.procs.stop_all()
        return self.topo.teardown()


def pyspy_summary(raw: Path) -> dict[str, Any]:
    """py-spy raw stacks -> shares: event-loop thread vs worker threads, the loop thread's own
    time by leaf frame, its total time by Python function (the loop's scaffolding left out)."""
    loop_own: dict[str, int] = {}
    loop_total: dict[str, int] = {}
    worker_own: dict[str, int] = {}
    n = n_loop = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        c = int(count)
        frames = stack.split(";")
        n += c
        leaf = frames[-1][:140]
        if any("concurrent/futures/thread.py" in f for f in frames):
            worker_own[leaf] = worker_own.get(leaf, 0) + c
            continue
        n_loop += c
        loop_own[leaf] = loop_own.get(leaf, 0) + c
        for f in {f[:140] for f in frames if ".py:" in f}:
            loop_total[f] = loop_total.get(f, 0) + c

    def top(d: dict[str, int], k: int, of: int) -> list[tuple[str, float]]:
        return [(f, round(100 * c / max(of, 1), 1))
                for f, c in sorted(d.items(), key=lambda x: -x[1])[:k]]

    scaffold = [f for f, c in loop_total.items() if c >= 0.98 * n_loop]
    for f in scaffold:
        del loop_total[f]
    return {"samples": n, "loop_samples": n_loop, "worker_samples": n - n_loop,
            "loop_own": top(loop_own, 15, n_loop), "loop_total": top(loop_total, 20, n_loop),
            "worker_own": top(worker_own, 8, n - n_loop)}


def pyspy_text(p: dict[str, Any]) -> str:
    lines = [f"\n## py-spy --native, {p['gets']} GETs: {p['samples']} samples, event-loop thread "
             f"{p['loop_samples']}, executor threads {p['worker_samples']} (includes their "
             "waiting)\n", "\n### event-loop thread, own time by leaf frame (% of its samples)\n"]
    lines += [f"{pct:5.1f}%  {f}\n" for f, pct in p["loop_own"]]
    lines.append("\n### event-loop thread, total time by Python function\n")
    lines += [f"{pct:5.1f}%  {f}\n" for f, pct in p["loop_total"]]
    lines.append("\n### executor threads, own time by leaf frame (% of their samples)\n")
    lines += [f"{pct:5.1f}%  {f}\n" for f, pct in p["worker_own"]]
    return "".join(lines)


def strace_summary(table: str) -> dict[str, int]:
    """calls per system call from `strace -c` output."""
    calls = {}
    for line in table.splitlines():
        parts = line.split()
        if len(parts) >= 5 and parts[0].replace(".", "").isdigit() and parts[-1].isidentifier() \
                and parts[-1] != "total":
            with contextlib.suppress(ValueError):
                calls[parts[-1]] = int(parts[3])
    return calls


def log_summary(path: Path) -> dict[str, Any]:
    """What fwdproxy said: counts by level and the mirror's cache answers, warnings verbatim."""
    text = path.read_text(errors="replace") if path.exists() else ""
    levels: dict[str, int] = {}
    answers: dict[str, int] = {}
    bad = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) > 1 and parts[1] in ("debug", "info", "warning", "error", "critical"):
            levels[parts[1]] = levels.get(parts[1], 0) + 1
            if parts[1] in ("warning", "error", "critical"):
                bad.append(line[:400])
        if "mirror: " in line and " -> " in line and "(" in line:
            after = line.split(" -> ", 1)[1].split()
            if len(after) >= 2:
                key = f"{after[0]} {after[1]}"
                answers[key] = answers.get(key, 0) + 1
        elif "Traceback" in line:
            bad.append(line[:400])
    return {"levels": levels, "mirror_answers": answers, "warnings": bad[:40],
            "file": str(path)}


# -- summary and report -----------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    img = res["image"]["bytes"]
    proxy = res["proxy"]["pulls"]
    mirror = res["mirror"]["pulls"]
    floor = res["floor"]
    ok = [p for p in proxy if p["exit"] == 0]
    warm = [p for p in mirror[1:] if p["exit"] == 0]
    hit = res["cache_hit"]
    out: dict[str, Any] = {
        "image_bytes": img,
        "proxy_tunnel_bytes": sum(p["down_bytes"] for p in proxy),
        "mirror_tunnel_bytes": sum(p["down_bytes"] for p in mirror),
        "proxy_payload_bytes": sum(p["payload_down"] for p in proxy),
        "mirror_payload_bytes": sum(p["payload_down"] for p in mirror),
        "proxy_median_s": _median([p["wall_s"] for p in ok]),
        "cold_s": mirror[0]["wall_s"] if mirror[0]["exit"] == 0 else None,
        "warm_median_s": _median([p["wall_s"] for p in warm]),
        "floor_median_s": _median([p["wall_s"] for p in floor if p["exit"] == 0]),
        "failed_pulls": sum(p["exit"] != 0 for p in proxy + mirror + floor),
        "all_verified": all(p["verified"] for p in proxy + mirror + floor)
        and hit["body_ok"] and res["cache_files"]["ok"],
    }
    out["mirror_tunnel_ratio"] = out["mirror_tunnel_bytes"] / img
    out["mirror_payload_ratio"] = out["mirror_payload_bytes"] / img
    out["proxy_tunnel_ratio"] = out["proxy_tunnel_bytes"] / img
    if out["warm_median_s"]:
        if out["proxy_median_s"]:
            out["speedup_vs_proxy"] = out["proxy_median_s"] / out["warm_median_s"]
        if out["cold_s"]:
            out["speedup_vs_cold"] = out["cold_s"] / out["warm_median_s"]
        if out["floor_median_s"] and out["proxy_median_s"]:
            out["speedup_ceiling"] = out["proxy_median_s"] / out["floor_median_s"]
    m = hit["mirror"]
    out["targets"] = [
        {"target": "tunnel bytes of the 8 mirror pulls / image size".replace(
            "8", str(len(mirror))),
         "requirement": f"<= {TARGETS['tunnel_ratio']}x",
         "measured": f"{out['mirror_tunnel_ratio']:.3f}x ({out['mirror_tunnel_bytes'] / MIB:.1f}"
                     f" MiB for {img / MIB:.1f} MiB; HTTP payload "
                     f"{out['mirror_payload_ratio']:.3f}x)",
         "met": out["mirror_tunnel_ratio"] <= TARGETS["tunnel_ratio"]},
        {"target": "warm mirror pull vs a pull through the limited tunnel (proxy only, medians)",
         "requirement": f">= {TARGETS['warm_speedup']:g}x faster",
         "measured": _speed(out, "speedup_vs_proxy", "proxy_median_s"),
         "met": out.get("speedup_vs_proxy", 0) >= TARGETS["warm_speedup"]},
        {"target": "warm mirror pull vs the cold mirror pull (the one that filled the cache)",
         "requirement": f">= {TARGETS['warm_speedup']:g}x faster",
         "measured": _speed(out, "speedup_vs_cold", "cold_s"),
         "met": out.get("speedup_vs_cold", 0) >= TARGETS["warm_speedup"]},
        {"target": "cache-hit throughput / reading the cache file (both in the page cache): "
                   "`curl -o /dev/null` vs `cat`, medians",
         "requirement": f">= {TARGETS['hit_vs_disk']}x",
         "measured": f"{m['process_ratio']:.2f}x ({m['curl_mibps']:.0f} vs {m['cat_mibps']:.0f} "
                     f"MiB/s; in-process GET vs read {m['ratio']:.2f}x)",
         "met": m["process_ratio"] >= TARGETS["hit_vs_disk"]},
        {"target": "no wrong byte served",
         "requirement": "every pull, a full cache hit and every cache file hash to their digests",
         "measured": "all verified" if out["all_verified"] else "MISMATCH or failed pull",
         "met": out["all_verified"] and out["failed_pulls"] == 0},
    ]
    return out


def _speed(out: dict[str, Any], key: str, base: str) -> str:
    if key not in out:
        return "n/a (failed pulls)"
    return f"{out[key]:.1f}x ({out[base]:.2f} s / {out['warm_median_s']:.2f} s)"


def render(data: dict[str, Any]) -> str:
    m, s, r, sm = data["machine"], data["settings"], data["results"], data["summary"]
    img = r["image"]
    lines = [
        f"# fwdproxy mirror benchmark, {m['date']}{' (quick)' if data['quick'] else ''}",
        "",
        f"{m['cpus']} CPUs ({m['cpu']}), {m['memory']}, Linux {m['kernel']}, Python "
        f"{m['python']}; fwdproxy {m['tree']} @ {m['revision']}, event loop {m['loop']}; "
        f"skopeo {m['skopeo']}, docker-registry {m['registry']}, dante {m['danted']}.",
        "",
        f"Image: {len(img['layers'])} layers + config, {img['bytes'] / MIB:.1f} MiB "
        f"({img['bytes']} bytes with the manifest), incompressible. {s['nodes']} nodes pull it "
        "one after another with `skopeo copy docker://... dir:DIR` (a fresh directory on "
        f"{data['dest_fs']}; every file re-hashed afterwards, untimed). The tunnel: a veth pair "
        f"shaped by `tc tbf` at {s['tunnel_mibps']:g} MiB/s of wire bytes in the download "
        f"direction (`{r['qdisc']}`), danted (SOCKS5) on the far side as fwdproxy's upstream, "
        f"and a relay adding {s['latency_ms']:g} ms each way in front of the registry. "
        "**Tunnel bytes** = the kernel's tx byte counter of the shaped veth (TCP/IP headers "
        "counted once per offload batch); **payload** = HTTP bytes the relay forwarded.",
        "",
        "## Targets",
        "",
        "| target | requirement | measured | met |",
        "|---|---|---|---|",
    ]
    for t in sm["targets"]:
        lines.append(f"| {t['target']} | {t['requirement']} | {t['measured']} | "
                     f"{'**yes**' if t['met'] else '**NO**'} |")
    lines += [
        "",
        "## Pulls",
        "",
        "| node | (a) proxy only: wall s | tunnel MiB | payload MiB | (b) mirror: wall s | "
        "tunnel MiB | payload MiB | local copy s (floor) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    floor = {p["node"]: p for p in r["floor"]}
    for pa, pb in zip(r["proxy"]["pulls"], r["mirror"]["pulls"], strict=False):
        fl = floor.get(pb["node"])
        lines.append(
            f"| {pa['node']} | {_wall(pa)} | {pa['down_bytes'] / MIB:.1f} | "
            f"{pa['payload_down'] / MIB:.1f} | {_wall(pb)}{' (cold)' if pb['node'] == 1 else ''}"
            f" | {pb['down_bytes'] / MIB:.2f} | {pb['payload_down'] / MIB:.2f} | "
            f"{_wall(fl) if fl else '-'} |")
    lines.append(
        f"| **total** | {sum(p['wall_s'] for p in r['proxy']['pulls']):.1f} | "
        f"**{sm['proxy_tunnel_bytes'] / MIB:.1f}** ({sm['proxy_tunnel_ratio']:.2f}x image) | "
        f"{sm['proxy_payload_bytes'] / MIB:.1f} | "
        f"{sum(p['wall_s'] for p in r['mirror']['pulls']):.1f} | "
        f"**{sm['mirror_tunnel_bytes'] / MIB:.1f}** ({sm['mirror_tunnel_ratio']:.3f}x image) | "
        f"{sm['mirror_payload_bytes'] / MIB:.1f} | |")
    noise = [p["foreign_cpu_pct"] for p in r["proxy"]["pulls"] + r["mirror"]["pulls"]]
    lines += [
        "",
        f"Medians: proxy-only pull {_s(sm['proxy_median_s'])}, cold mirror pull "
        f"{_s(sm['cold_s'])}, warm mirror pull {_s(sm['warm_median_s'])}, local copy "
        f"{_s(sm['floor_median_s'])}. The local copy is the same `skopeo copy` from the image's "
        "OCI layout on disk (no network, no proxy) into the same kind of directory, run right "
        "after each warm pull (node 0: before everything): what a pull costs this client on "
        "this machine with an infinitely fast mirror"
        + (f", so no mirror can make a warm pull more than {sm['speedup_ceiling']:.1f}x faster "
           "than a proxy-only pull here" if "speedup_ceiling" in sm else "")
        + f". The tunnel carried {_rate(r['proxy']['pulls'])} MiB/s of payload during the "
        f"proxy-only pulls. Other processes on the machine used {min(noise)}-{max(noise)}% of a "
        "CPU during the pulls (per pull in the JSON).",
        "",
        "## Cache hit vs reading the file",
        "",
    ]
    hit = r["cache_hit"]
    mh = hit["mirror"]
    lines += [
        f"The biggest layer ({mh['bytes'] / MIB:.1f} MiB), {len(mh['reps'])} repeats, "
        "interleaved with reading its cache file; both warm in the page cache; medians. "
        "In-process: one `GET` with `Connection: close` read into a reused 4 MiB buffer "
        "(raw socket in the node namespace) vs reading the file into a reused 1 MiB buffer. "
        "Processes: `curl -o /dev/null URL` vs `cat FILE > /dev/null`, each started with "
        "`ip netns exec` (process start included in both).",
        "",
        "| server | GET MiB/s | file read MiB/s | GET/read | curl MiB/s | cat MiB/s | curl/cat | "
        "server CPU s/GiB | other load |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for key in ("mirror", "mirror_asyncio", "ceiling"):
        h = hit.get(key)
        if not h:
            continue
        proc = (f"{h['curl_mibps']:.0f} (own timer {h['curl_timer_mibps']:.0f}) | "
                f"{h['cat_mibps']:.0f} | **{h['process_ratio']:.2f}x**" if "curl_mibps" in h
                else "- | - | -")
        cpu = f"{h['server_cpu_s_per_gib']:.2f}" if "server_cpu_s_per_gib" in h else "-"
        lines.append(f"| {h['name']} | {h['get_mibps']:.0f} | {h['read_mibps']:.0f} | "
                     f"{h['ratio']:.2f}x | {proc} | {cpu} | {h['foreign_cpu_pct']}% |")
    lines += [
        "",
        "`fwdproxy mirror` is fwdproxy as users start it (the target is judged on its curl/cat "
        "ratio); `--loop asyncio` is "
        "the same process on the standard-library event loop; the bare sendfile server "
        "(`mirror_bench.py --serve-file`) answers every GET with one `os.sendfile` per "
        "connection and nothing else: the ceiling of a GET over loopback on this machine. "
        f"A full cache hit hashed to its digest: {'yes' if hit['body_ok'] else '**NO**'}; "
        f"cache files re-hashed: {r['cache_files']['files']}, "
        f"{'all good' if r['cache_files']['ok'] else '**BAD**: ' + str(r['cache_files'])}.",
        "",
    ]
    prof = hit.get("profile")
    if prof:
        lines += ["### Profile of the cache hit", ""]
        if "strace" in prof:
            calls = ", ".join(f"{k} {v}" for k, v in sorted(prof["strace"].items(),
                                                              key=lambda x: -x[1])[:8]
                              if k != "total")
            lines.append(f"System calls of fwdproxy during 2 GETs (`strace -f -c`): {calls}.")
        py = prof.get("pyspy")
        if py:
            lines += ["", f"py-spy (`--native`, {py['gets']} GETs): {py['samples']} samples, "
                      f"{py['loop_samples']} in the event-loop thread, {py['worker_samples']} in "
                      "executor threads (mostly waiting for work). Event-loop thread, total "
                      "time by Python function:", "",
                      "| share | function |", "|---|---|"]
            lines += [f"| {pct}% | `{f}` |" for f, pct in py["loop_total"][:10]]
            lines += ["", "Own time by leaf frame:", "", "| share | frame |", "|---|---|"]
            lines += [f"| {pct}% | `{f}` |" for f, pct in py["loop_own"][:8]]
        lines += ["", f"Full tables: `{prof['file']}`.", ""]
    lines += ["## What fwdproxy said", ""]
    for mode in ("proxy", "mirror"):
        log = r[mode]["log"]
        lines.append(f"- ({mode}) log lines by level: {_kv(log['levels'])}"
                     + (f"; mirror answers: {_kv(log['mirror_answers'])}"
                        if log["mirror_answers"] else ""))
        for w in log["warnings"][:10]:
            lines.append(f"  - `{w}`")
    api = r["mirror"].get("api", {})
    if api:
        brief = {k: v for k, v in api.items() if k not in ("addresses", "registries")}
        lines.append(f"- `/api/mirror` after the pulls and hits: `{json.dumps(brief)}`")
    lines += ["", f"Run time {data['elapsed_s']:.0f} s. Logs and configs: `{data['workdir']}`.",
              ""]
    return "\n".join(lines)


def _wall(p: dict[str, Any]) -> str:
    if p["exit"] != 0:
        return "**failed**"
    return f"{p['wall_s']:.2f}" + ("" if p["verified"] else " **WRONG**")


def _s(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f} s"


def _rate(pulls: list[dict[str, Any]]) -> str:
    ok = [p for p in pulls if p["exit"] == 0]
    if not ok:
        return "n/a"
    return f"{sum(p['payload_down'] for p in ok) / MIB / sum(p['wall_s'] for p in ok):.1f}"


def _kv(d: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in sorted(d.items())) or "none"


def tool_version(argv: list[str]) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError, IndexError):
        p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        return ((p.stdout or p.stderr).strip().splitlines() or ["?"])[0][:80]
    return "?"


def machine(tree: Path) -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    rev = "unknown"
    with contextlib.suppress(OSError, subprocess.SubprocessError, BenchError):
        rev = run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"]).stdout.strip()
        if run(["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"]
               ).stdout.strip():
            rev += "+dirty"
    dante = tool_version(["danted", "-v"]).split()
    loop = "uvloop" if subprocess.run([sys.executable, "-c", "import uvloop"],
                                      capture_output=True).returncode == 0 else "asyncio"
    return {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": model, "cpus": os.cpu_count(), "memory": mem, "kernel": platform.release(),
        "python": platform.python_version(), "tree": str(tree), "revision": rev,
        "loop": f"{loop} (serve's default, --loop auto)",
        "skopeo": tool_version(["skopeo", "--version"]).replace("skopeo version ", ""),
        "registry": tool_version(["docker-registry", "--version"]).split()[-1],
        "danted": dante[1].rstrip(".") if len(dante) > 1 else "?",
    }


def check_prereqs() -> None:
    if os.geteuid() != 0:
        raise BenchError("needs root: it creates network namespaces and a tc qdisc")
    missing = [f"{t} (apt-get install {pkg})" for t, pkg in TOOLS.items() if not shutil.which(t)]
    if missing:
        raise BenchError("missing: " + ", ".join(missing))
    p = subprocess.run([sys.executable, "-c", "import aiohttp, h11, yaml"], capture_output=True)
    if p.returncode != 0:
        raise BenchError(f"{sys.executable} cannot import fwdproxy's dependencies: run it with "
                         "the project's virtualenv")


def fs_type(path: Path) -> str:
    with contextlib.suppress(BenchError, OSError, subprocess.SubprocessError):
        return run(["stat", "-f", "-c", "%T", str(path)]).stdout.strip()
    return "?"


def _terminate(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="~30 MiB image, 3 nodes")
    ap.add_argument("--nodes", type=int, help="pulls per mode (default 8, --quick 3)")
    ap.add_argument("--layers", help="layer sizes in MiB, comma list (default 120,60,20)")
    ap.add_argument("--rate", type=float, help="tunnel MiB/s (default 20)")
    ap.add_argument("--latency-ms", type=float, help="relay delay each way (default 20)")
    ap.add_argument("--dest", help="directory the pulls write into (default: a temporary "
                    "directory in /var/tmp, i.e. on disk)")
    ap.add_argument("--profile", choices=("auto", "always", "never"), default="auto",
                    help="profile the cache hit (py-spy, strace): auto = when its target is "
                    "missed")
    ap.add_argument("--tree", default=str(REPO),
                    help="checkout whose fwdproxy is measured (default: this one)")
    ap.add_argument("--out", help="results file stem (default bench/results/mirror-<date>)")
    ap.add_argument("--render", metavar="JSON", help="only re-render FILE.json as markdown")
    ap.add_argument("--serve-file", metavar="FILE:PORT", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve_file:
        path, _, port = args.serve_file.rpartition(":")
        serve_file(path, int(port))
        return 0
    if args.render:
        data = json.loads(Path(args.render).read_text())
        data["summary"] = summarize(data["results"])
        md = render(data)
        Path(args.render).with_suffix(".md").write_text(md)
        print(md)
        return 0
    s = QUICK if args.quick else Settings()
    if args.nodes:
        s = dataclasses.replace(s, nodes=args.nodes)
    if args.layers:
        s = dataclasses.replace(s, layers_mib=tuple(int(x) for x in args.layers.split(",")))
    if args.rate:
        s = dataclasses.replace(s, tunnel_mibps=args.rate)
    if args.latency_ms is not None:
        s = dataclasses.replace(s, latency_ms=args.latency_ms)
    if s.nodes < 2:
        print("need at least 2 nodes (one cold pull, then warm ones)", file=sys.stderr)
        return 2
    tree = Path(args.tree).resolve()
    if not (tree / "fwdproxy" / "mirror").is_dir():
        print(f"{tree} has no fwdproxy with a mirror", file=sys.stderr)
        return 2
    stem = Path(args.out or BENCH / "results" / (
        f"mirror-{dt.date.today().isoformat()}" + ("-quick" if args.quick else "")))
    stem.parent.mkdir(parents=True, exist_ok=True)
    work = BUILD / "mirror"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    started = time.monotonic()
    signal.signal(signal.SIGTERM, _terminate)  # clean up as after Ctrl-C
    data_dir: Path | None = None
    dest: Path | None = None
    try:
        check_prereqs()
        with bench_lock():
            left = Topology.leftovers()
            for d in Path("/var/tmp").glob("fpmb-*"):  # ours, and no other run holds the lock
                shutil.rmtree(d, ignore_errors=True)
                left.append(str(d))
            if left:
                print(f"removed leftovers of a crashed run: {', '.join(left)}", flush=True)
            data_dir = Path(tempfile.mkdtemp(prefix="fpmb-", dir="/var/tmp"))
            dest = Path(tempfile.mkdtemp(prefix="fpmb-pulls-", dir=args.dest)) if args.dest \
                else data_dir / "pulls"
            bench = Bench(s, tree, work, data_dir, dest, args.profile)
            try:
                results = bench.run(stem)
                dest_fs = fs_type(dest)
            finally:
                problems = bench.close()
                if problems:
                    print("cleanup problems: " + "; ".join(problems), file=sys.stderr)
    except BenchError as e:
        print(f"mirror benchmark failed: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        print(f"mirror benchmark interrupted ({e or 'Ctrl-C'}); its namespaces and processes "
              "were removed", file=sys.stderr)
        return 130
    finally:
        for d in (dest, data_dir):
            if d is not None:
                shutil.rmtree(d, ignore_errors=True)
    data = {
        "machine": machine(tree),
        "settings": dataclasses.asdict(s),
        "quick": args.quick,
        "targets": TARGETS,
        "results": results,
        "dest_fs": dest_fs,
        "workdir": str(work),
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    data["summary"] = summarize(results)
    Path(f"{stem}.json").write_text(json.dumps(data, indent=1) + "\n")
    md = render(data)
    Path(f"{stem}.md").write_text(md)
    print(md)
    print(f"wrote {stem}.md and {stem}.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
