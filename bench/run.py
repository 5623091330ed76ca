"""fwdproxy benchmark: the same loads against no proxy, fwdproxy and peer proxies, in one run.

    python bench/run.py            # full run (~10 min), writes bench/results/<date>.md/.json
    python bench/run.py --quick    # smoke run (~1 min): fewer bytes, shorter windows, 1 repeat

The proxy under test is pinned to CPU 0, the load generator and the origin to CPU 1 (taskset).
The load generator and origin are one C program (bench/loadgen.c, compiled here with gcc). All
traffic stays on 127.0.0.0/8. See bench/README.md for what each load measures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
BUILD = BENCH / "build"
PROXY_CPU = "0"
LOAD_CPU = "1"
GIB = 1 << 30


@dataclass
class Settings:
    reps: int = 3
    bulk_bytes: int = 2 * GIB
    warmup_s: float = 0.3
    window_s: float = 1.5
    concurrency: tuple[int, ...] = (1, 64, 512)
    idle_steps: tuple[int, ...] = (1000, 10000)
    variants: tuple[str, ...] = (
        "fast/uvloop",
        "fast/asyncio",
        "fast/uvloop/nosplice",
        "streams/uvloop",
        "fast/uvloop/accept",
        "fast/uvloop/protocol",
    )
    peers: tuple[str, ...] = ("tinyproxy", "pproxy", "microsocks", "dante")
    rule_sizes: tuple[int, ...] = (10, 1000, 100_000)
    quiet_pct: float = 25.0  # wait for the machine to be this idle (% of one CPU)...
    quiet_wait_s: float = 8.0  # ...for at most this long before each measurement


QUICK = Settings(
    reps=1,
    bulk_bytes=256 << 20,
    warmup_s=0.2,
    window_s=0.5,
    idle_steps=(200, 1000),
    variants=("fast/uvloop", "streams/asyncio"),
    rule_sizes=(10, 1000, 10_000),
    quiet_wait_s=2.0,
)


# -- processes ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, proc: subprocess.Popen[Any], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout_s}s")


def raise_nofile() -> None:
    import resource

    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (200_000, 200_000))


def pinned(cpu: str, argv: list[str]) -> list[str]:
    return ["taskset", "-c", cpu, *argv]


def descendants(pid: int) -> list[int]:
    """pid and all its live descendants (dante forks; threads are counted by their process)."""
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if not d.name.isdigit():
            continue
        try:
            stat = (d / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(d.name))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(children.get(p, []))
    return out


def cpu_seconds(pid: int) -> float:
    """User+system CPU of the process tree, including reaped children."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for p in descendants(pid):
        try:
            f = (Path("/proc") / str(p) / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    return total / tick


def memory_kib(pid: int) -> dict[str, int]:
    """RSS and PSS of the process tree (PSS splits shared pages fairly between processes)."""
    rss = pss = 0
    for p in descendants(pid):
        try:
            text = (Path("/proc") / str(p) / "smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Rss:"):
                rss += int(line.split()[1])
            elif line.startswith("Pss:"):
                pss += int(line.split()[1])
    return {"rss_kib": rss, "pss_kib": pss}


class Procs:
    """Every process the benchmark starts, stopped in reverse order whatever happens."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[Any]] = []

    def start(self, argv: list[str], **kw: Any) -> subprocess.Popen[Any]:
        p = subprocess.Popen(argv, **kw)
        self.procs.append(p)
        return p

    def stop(self, p: subprocess.Popen[Any]) -> None:
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(5)
        if p in self.procs:
            self.procs.remove(p)

    def stop_all(self) -> None:
        for p in reversed(list(self.procs)):
            self.stop(p)


# -- proxies --------------------------------------------------------------------------------


@dataclass
class ProxySpec:
    name: str
    protos: tuple[str, ...]  # of "connect", "socks5", "http"
    kind: str  # "fwdproxy", "tinyproxy", ...
    variant: str = ""


def proxy_specs(s: Settings) -> list[ProxySpec]:
    out = [
        ProxySpec(f"fwdproxy {v}", ("connect", "socks5", "http"), "fwdproxy", v) for v in s.variants
    ]
    peers = {
        "tinyproxy": ProxySpec("tinyproxy", ("connect", "http"), "tinyproxy"),
        "pproxy": ProxySpec("pproxy", ("connect", "socks5", "http"), "pproxy"),
        "microsocks": ProxySpec("microsocks", ("socks5",), "microsocks"),
        "dante": ProxySpec("dante", ("socks5",), "dante"),
    }
    for name in s.peers:
        binary = {"tinyproxy": "tinyproxy", "microsocks": "microsocks", "dante": "danted"}.get(name)
        if name == "pproxy":
            ok = _has_module("pproxy")
        else:
            ok = binary is not None and shutil.which(binary) is not None
        if ok:
            out.append(peers[name])
        else:
            print(f"  (skipping {name}: not installed)", file=sys.stderr)
    return out


def _has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def render(template: str, port: int, workdir: Path, suffix: str) -> Path:
    text = (BENCH / "peers" / template).read_text().replace("@@PORT@@", str(port))
    path = workdir / f"{Path(template).stem}-{port}{suffix}"
    path.write_text(text)
    return path


def proxy_argv(spec: ProxySpec, port: int, workdir: Path) -> list[str]:
    if spec.kind == "fwdproxy":
        relay, loop, *extra = spec.variant.split("/")
        flags = extra[0].split("+") if extra else []
        cfg = render("fwdproxy.yaml", port, workdir, ".yaml")
        serve = [sys.executable, str(BENCH / "fwdproxy_serve.py"), "--relay", relay]
        if "accept" in flags:
            serve += ["--patch", "accept"]
        elif "protocol" in flags:
            serve += ["--patch", "protocol"]
        if "nosplice" in flags:
            serve += ["--no-splice"]
        return [*serve, "--", "serve", "-c", str(cfg), "--loop", loop]
    if spec.kind == "tinyproxy":
        return ["tinyproxy", "-d", "-c", str(render("tinyproxy.conf", port, workdir, ".conf"))]
    if spec.kind == "dante":
        return ["danted", "-f", str(render("danted.conf", port, workdir, ".conf"))]
    if spec.kind == "microsocks":
        return ["microsocks", "-i", "127.0.0.1", "-p", str(port)]
    if spec.kind == "pproxy":
        # pproxy installs uvloop when present, but its get_event_loop() call predates uvloop
        # 0.22's policy change; give it a loop so it runs the way its author intended.
        boot = (
            "import asyncio, sys\n"
            "try:\n"
            "    import uvloop\n"
            "    uvloop.install = lambda: asyncio.set_event_loop(uvloop.new_event_loop())\n"
            "except ImportError:\n"
            "    asyncio.set_event_loop(asyncio.new_event_loop())\n"
            "from pproxy.server import main\n"
            "sys.argv = ['pproxy', '-l', sys.argv[1]]\n"
            "main()\n"
        )
        return [sys.executable, "-c", boot, f"http+socks5://127.0.0.1:{port}"]
    raise ValueError(spec.kind)


# -- loads ----------------------------------------------------------------------------------


@dataclass
class Rig:
    loadgen: Path
    origin: str
    procs: Procs
    s: Settings
    skip: set[str] = field(default_factory=set)
    quiet_budget_s: float = 150.0  # total waiting for a quiet machine, per run

    def run_loadgen(self, *args: str, timeout_s: float = 120) -> dict[str, Any]:
        argv = pinned(LOAD_CPU, [str(self.loadgen), *args])
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout_s, check=False)
        if out.returncode != 0 or not out.stdout.strip():
            return {"failed": (out.stderr or out.stdout).strip()[-300:] or f"exit {out.returncode}"}
        return json.loads(out.stdout.strip().splitlines()[-1])


def summarize(values: list[float]) -> dict[str, float]:
    if not values:
        return {}
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def quiet_cpu_pct(interval_s: float = 0.3) -> float:
    """Busy CPU over a short interval, in % of one CPU (while nothing of ours is loading)."""
    a = cpu_snapshot()
    time.sleep(interval_s)
    b = cpu_snapshot()
    return 100 * (b["busy"] - a["busy"]) / (b["t"] - a["t"])


def wait_quiet(rig: Rig) -> float:
    """Wait (bounded) until other processes leave the CPUs mostly idle; return the last level.

    The machine may be shared: a measurement that starts while someone else's test suite
    runs is mostly noise. Waiting at most QUIET_WAIT_S keeps the run bounded; the level seen
    is recorded with every figure.
    """
    start = time.monotonic()
    deadline = start + min(rig.s.quiet_wait_s, rig.quiet_budget_s)
    level = quiet_cpu_pct()
    while level > rig.s.quiet_pct and time.monotonic() < deadline:
        level = quiet_cpu_pct(0.5)
    rig.quiet_budget_s = max(0.0, rig.quiet_budget_s - (time.monotonic() - start))
    return level


def bulk_once(rig: Rig, mode: str, proxy: str, pid: int | None) -> dict[str, Any]:
    noise = wait_quiet(rig)
    c0 = cpu_seconds(pid) if pid else 0.0
    r = rig.run_loadgen("bulk", mode, proxy, rig.origin, str(rig.s.bulk_bytes))
    if "failed" not in r and pid:
        r["cpu_s_per_gib"] = (cpu_seconds(pid) - c0) / (r["bytes"] / GIB)
    r["busy_before_pct"] = noise
    return r


def short_once(rig: Rig, mode: str, proxy: str, conc: int, pid: int | None) -> dict[str, Any]:
    noise = wait_quiet(rig)
    c0 = cpu_seconds(pid) if pid else 0.0
    r = rig.run_loadgen(
        "short", mode, proxy, rig.origin, str(conc), str(rig.s.warmup_s), str(rig.s.window_s)
    )
    if "failed" not in r and pid and r.get("total_ok"):
        r["cpu_us_per_tunnel"] = (cpu_seconds(pid) - c0) / r["total_ok"] * 1e6
    r["busy_before_pct"] = noise
    return r


def summarize_bulk(runs: list[dict[str, Any]]) -> dict[str, Any]:
    failed = [r["failed"] for r in runs if "failed" in r]
    if failed:
        return {"failed": failed[0]}
    return {
        "mibps": summarize([r["mibps"] for r in runs]),
        "cpu_s_per_gib": summarize([r["cpu_s_per_gib"] for r in runs if "cpu_s_per_gib" in r]),
        "runs": runs,
    }


def summarize_short(runs: list[dict[str, Any]]) -> dict[str, Any]:
    failed = [r["failed"] for r in runs if "failed" in r]
    if failed:
        return {"failed": failed[0]}
    return {
        "rate": summarize([r["rate"] for r in runs]),
        "p50_us": summarize([r["p50_us"] for r in runs if r["ok"]]),
        "p99_us": summarize([r["p99_us"] for r in runs if r["ok"]]),
        "cpu_us_per_tunnel": summarize(
            [r["cpu_us_per_tunnel"] for r in runs if "cpu_us_per_tunnel" in r]
        ),
        "errors": sum(r["errors"] for r in runs),
        "error_kinds": {
            k: sum(r[k] for r in runs)
            for k in ("err_connect", "err_handshake", "err_response", "err_timeout")
        },
        "runs": runs,
    }


def idle(rig: Rig, mode: str, proxy: str, pid: int) -> dict[str, Any]:
    """Open idle tunnels step by step; proxy memory at each step over the warm baseline."""
    # warm the proxy first (allocator arenas, caches), then take the baseline
    rig.run_loadgen("short", mode, proxy, rig.origin, "64", "0", "0.3")
    time.sleep(0.3)
    base = memory_kib(pid)
    steps = ",".join(str(n) for n in rig.s.idle_steps)
    argv = pinned(LOAD_CPU, [str(rig.loadgen), "idle", mode, proxy, rig.origin, steps])
    p = rig.procs.start(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    out: dict[str, Any] = {"baseline": base, "steps": []}
    try:
        assert p.stdout is not None and p.stdin is not None
        for _ in rig.s.idle_steps:
            line = p.stdout.readline().split()
            if not line or line[0] != "STEP":
                out["failed"] = "load generator ended early"
                break
            n, ok, err = int(line[1]), int(line[2]), int(line[3])
            time.sleep(0.5)  # let the proxy finish its bookkeeping for the last handshakes
            mem = memory_kib(pid)
            per = {k: (mem[k] - base[k]) / max(ok, 1) for k in mem}
            out["steps"].append(
                {"tunnels": n, "ok": ok, "errors": err, **mem, "per_tunnel_kib": per}
            )
            p.stdin.write("next\n")
            p.stdin.flush()
    finally:
        rig.procs.stop(p)
    return out


def measure_once(
    rig: Rig, name: str, protos: tuple[str, ...], proxy: str, pid: int | None, raw: dict[str, Any]
) -> None:
    """One repeat of every load against one target; appends to raw[section][key]."""
    modes = [m for m in ("connect", "socks5", "direct") if m in protos]
    for m in modes if "bulk" not in rig.skip else []:
        print(f"  {name}: bulk {m}", flush=True)
        raw["bulk"].setdefault(m, []).append(bulk_once(rig, m, proxy, pid))
    for m in modes if "short" not in rig.skip else []:
        for c in rig.s.concurrency:
            print(f"  {name}: short {m} c={c}", flush=True)
            raw["short"].setdefault(f"{m}/c{c}", []).append(short_once(rig, m, proxy, c, pid))
    if ("http" in protos or "direct" in protos) and "http" not in rig.skip:
        print(f"  {name}: http c=64", flush=True)
        mode = "direct" if "direct" in protos else "http"
        raw["http"].setdefault("c64", []).append(short_once(rig, mode, proxy, 64, pid))


def start_proxy(rig: Rig, spec: ProxySpec, workdir: Path) -> tuple[subprocess.Popen[Any], int]:
    port = free_port()
    log = open(workdir / f"{spec.name.replace(' ', '_').replace('/', '-')}.log", "a")  # noqa: SIM115
    try:
        p = rig.procs.start(
            pinned(PROXY_CPU, proxy_argv(spec, port, workdir)),
            stdout=log,
            stderr=subprocess.STDOUT,
            preexec_fn=raise_nofile,
        )
    finally:
        log.close()
    wait_port(port, p)
    return p, port


def run_loads(
    s: Settings, workdir: Path, loadgen: Path, only: set[str] | None, skip: set[str]
) -> dict[str, Any]:
    """Every target, every load; the repeats are interleaved across targets (rep 1 of all,
    then rep 2 of all...) so a noisy minute on a shared machine does not hit one target's
    every repeat. Proxies restart for each repeat; idle memory is measured in the first."""
    procs = Procs()
    specs = [sp for sp in proxy_specs(s) if only is None or sp.kind in only or sp.name in only]
    targets: list[ProxySpec | None] = ([None] if only is None or "direct" in only else []) + specs
    raw: dict[str, dict[str, Any]] = {}
    try:
        oport = free_port()
        origin = procs.start(
            pinned(LOAD_CPU, [str(loadgen), "origin", f"127.0.0.1:{oport}"]),
            stdout=subprocess.DEVNULL,
        )
        wait_port(oport, origin)
        rig = Rig(loadgen, f"127.0.0.1:{oport}", procs, s, skip)
        for rep in range(s.reps):
            for spec in targets:
                name = spec.name if spec else "direct"
                print(f"{name} (repeat {rep + 1}/{s.reps})", flush=True)
                r = raw.setdefault(name, {"bulk": {}, "short": {}, "http": {}, "idle": {}})
                if spec is None:
                    measure_once(rig, name, ("direct",), "127.0.0.1:1", None, r)
                    continue
                if "failed" in r:
                    continue
                try:
                    p, port = start_proxy(rig, spec, workdir)
                except RuntimeError as e:
                    r["failed"] = str(e)
                    continue
                try:
                    proxy = f"127.0.0.1:{port}"
                    measure_once(rig, name, spec.protos, proxy, p.pid, r)
                    modes = [m for m in ("connect", "socks5") if m in spec.protos]
                    if rep == 0 and modes and "idle" not in skip:
                        print(f"  {name}: idle tunnels {modes[0]}", flush=True)
                        r["idle"] = idle(rig, modes[0], proxy, p.pid)
                    r["protos"] = list(spec.protos)
                finally:
                    procs.stop(p)
    finally:
        procs.stop_all()
    results: dict[str, Any] = {}
    for name, r in raw.items():
        if "failed" in r:
            results[name] = {"failed": r["failed"]}
            continue
        results[name] = {
            "bulk": {k: summarize_bulk(v) for k, v in r["bulk"].items()},
            "short": {k: summarize_short(v) for k, v in r["short"].items()},
            "http": {k: summarize_short(v) for k, v in r["http"].items()},
            "idle": r["idle"],
            "protos": r.get("protos", []),
        }
    return results


# -- rules and CLI ----------------------------------------------------------------------------


def rules_bench(s: Settings) -> dict[str, Any]:
    sizes = [str(n) for n in s.rule_sizes]
    argv = pinned(PROXY_CPU, [sys.executable, str(BENCH / "rules_bench.py"), *sizes])
    out = subprocess.run(argv, capture_output=True, text=True, timeout=600, check=False, cwd=REPO)
    if out.returncode != 0:
        return {"failed": out.stderr[-500:]}
    return json.loads(out.stdout)


def cli_bench(workdir: Path, reps: int = 10) -> dict[str, Any]:
    """Wall time of `fwdproxy route HOST` through the installed console script."""
    exe = Path(sys.executable).parent / "fwdproxy"
    cfg = REPO / "rules.yaml"
    check = subprocess.run(
        [str(exe), "check", "-c", str(cfg)], capture_output=True, text=True, check=False
    )
    note = "shipped rules.yaml"
    if check.returncode != 0:
        cfg = render("fwdproxy.yaml", free_port(), workdir, ".yaml")
        note = f"bench config (shipped rules.yaml did not load: {check.stderr.strip()[:160]})"
    argv = pinned(PROXY_CPU, [str(exe), "route", "-c", str(cfg), "registry-1.docker.io"])
    base_argv = pinned(PROXY_CPU, [sys.executable, "-c", "pass"])

    def wall(cmd: list[str]) -> list[float]:
        subprocess.run(cmd, capture_output=True, check=False)  # warm the page cache
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=False)
            times.append(time.perf_counter() - t0)
        return times

    imp = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            str(exe),
            "route",
            "-c",
            str(cfg),
            "registry-1.docker.io",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    top = []
    for line in imp.stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            parts = [x.strip() for x in line[len("import time:") :].split("|")]
            if parts[0].isdigit():
                top.append((int(parts[1]), parts[2]))
    top.sort(reverse=True)
    return {
        "config": note,
        "route_s": summarize(wall(argv)),
        "python_startup_s": summarize(wall(base_argv)),
        "imports_cumulative_us": [{"module": m.strip(), "us": us} for us, m in top[:12]],
    }


# -- noise: CPU used by processes that are not ours ----------------------------------------


def cpu_snapshot() -> dict[str, float]:
    import resource

    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    busy = (f[0] + f[1] + f[2] + f[5] + f[6] + f[7]) / os.sysconf("SC_CLK_TCK")
    ours = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        ours += ru.ru_utime + ru.ru_stime
    return {"t": time.monotonic(), "busy": busy, "ours": ours, "load": os.getloadavg()[0]}


def foreign_cpu(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    wall = max(b["t"] - a["t"], 1e-6)
    foreign = max(0.0, (b["busy"] - a["busy"]) - (b["ours"] - a["ours"]))
    return {
        "foreign_cpu_pct": 100 * foreign / wall,
        "loadavg_start": a["load"],
        "loadavg_end": b["load"],
    }


# -- main -----------------------------------------------------------------------------------


def build_loadgen() -> Path:
    BUILD.mkdir(exist_ok=True)
    out = BUILD / "loadgen"
    src = BENCH / "loadgen.c"
    if not out.exists() or out.stat().st_mtime < src.stat().st_mtime:
        subprocess.run(["gcc", "-O2", "-Wall", "-o", str(out), str(src)], check=True)
    return out


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    mem = ""
    with contextlib.suppress(OSError):
        mem = Path("/proc/meminfo").read_text().splitlines()[0].split(":", 1)[1].strip()
    versions = {}
    for mod in ("uvloop", "pproxy"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    for cmd in (["tinyproxy", "-v"], ["danted", "-v"]):
        with contextlib.suppress(OSError):
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            versions[cmd[0]] = (r.stdout or r.stderr).strip().splitlines()[0][:60]
    return {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: small loads, 1 repeat")
    ap.add_argument(
        "--only", help="comma list of targets: direct,fwdproxy,tinyproxy,pproxy,microsocks,dante"
    )
    ap.add_argument(
        "--skip", default="", help="comma list of sections to skip: loads,idle,rules,cli"
    )
    ap.add_argument("--reps", type=int, help="repeats per figure (default 3, --quick 1)")
    ap.add_argument("--variants", help="fwdproxy variants RELAY/LOOP[/accept], comma list")
    ap.add_argument("--out", help="results file stem (default bench/results/<date>[-quick])")
    args = ap.parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        print("need 2 CPUs (proxy on CPU 0, load on CPU 1)", file=sys.stderr)
        return 2
    s = QUICK if args.quick else Settings()
    if args.reps:
        s = dataclasses.replace(s, reps=args.reps)
    if args.variants:
        s = dataclasses.replace(s, variants=tuple(args.variants.split(",")))
    only = set(args.only.split(",")) if args.only else None
    skip = set(args.skip.split(",")) if args.skip else set()
    raise_nofile()
    workdir = BUILD / "run"
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    data: dict[str, Any] = {"machine": machine(), "settings": s.__dict__, "quick": args.quick}
    if "loads" not in skip:
        loadgen = build_loadgen()
        before = cpu_snapshot()
        data["loads"] = run_loads(s, workdir, loadgen, only, skip)
        data["noise"] = foreign_cpu(before, cpu_snapshot())
    if "rules" not in skip:
        print("rule engine", flush=True)
        data["rules"] = rules_bench(s)
    if "cli" not in skip:
        print("cli latency", flush=True)
        data["cli"] = cli_bench(workdir)
    data["elapsed_s"] = round(time.monotonic() - started, 1)
    from report import write_report  # bench/report.py

    stem = args.out or (
        BENCH / "results" / (dt.date.today().isoformat() + ("-quick" if args.quick else ""))
    )
    md = write_report(data, Path(stem))
    print(md)
    print(f"\nwrote {stem}.md and {stem}.json in {data['elapsed_s']}s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH))
    raise SystemExit(main())
