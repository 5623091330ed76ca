"""fwdproxy benchmark: the same loads against no proxy, fwdproxy and peer proxies, in one run.

    python bench/run.py            # full run (~12-15 min), writes bench/results/<date>.md/.json
    python bench/run.py --quick    # smoke run (~1.5 min): fewer bytes, shorter windows, 1 repeat

fwdproxy is started exactly as a user starts it, `python -m fwdproxy serve -c CONFIG --loop
uvloop|asyncio`, with the checkout under test (--tree, default: this repository) first on
PYTHONPATH. The proxy under test is pinned to CPU 0, the load generator and the origin to CPU 1
(taskset). The load generator and origin are one C program (bench/loadgen.c, compiled here with
gcc). All traffic stays on 127.0.0.0/8. See bench/README.md for what each load measures.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import json
import os
import platform
import re
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
LOOPS = ("uvloop", "asyncio")
FLAGS = ("nosplice",)
PEERS = ("tinyproxy", "squid", "pproxy", "microsocks", "dante")


@dataclass
class Settings:
    reps: int = 3
    bulk_bytes: int = 2 * GIB
    warmup_s: float = 0.3
    window_s: float = 1.5
    concurrency: tuple[int, ...] = (1, 64, 512)
    idle_steps: tuple[int, ...] = (1000, 10000)
    # fwdproxy variants: LOOP[+FLAG...]; the first uvloop one is what the targets are judged on
    variants: tuple[str, ...] = ("uvloop", "asyncio")
    peers: tuple[str, ...] = PEERS
    rule_sizes: tuple[int, ...] = (10, 1000, 100_000)  # bench/rules_bench.py
    rules_scale_n: int = 100_000  # bench/rules_scale.py (it takes at least 20,000)
    profile_s: float = 5.0  # py-spy sampling per load
    quiet_pct: float = 25.0  # wait for the machine to be this idle (% of one CPU)...
    quiet_wait_s: float = 8.0  # ...for at most this long before each measurement
    quiet_budget_s: float = 150.0  # ...and at most this long in all


QUICK = Settings(
    reps=1,
    bulk_bytes=256 << 20,
    warmup_s=0.2,
    window_s=0.5,
    idle_steps=(1000,),
    rule_sizes=(10, 1000, 10_000),
    rules_scale_n=20_000,
    profile_s=2.0,
    quiet_wait_s=1.0,
    quiet_budget_s=10.0,
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
    variant: str = ""  # fwdproxy: LOOP[+FLAG...]


def parse_variant(v: str) -> tuple[str, list[str]]:
    loop, *flags = v.split("+")
    if loop not in LOOPS or any(f not in FLAGS for f in flags):
        raise SystemExit(
            f"unknown fwdproxy variant {v!r}: LOOP[+FLAG] with LOOP in {'|'.join(LOOPS)}, "
            f"FLAG in {'|'.join(FLAGS)} (e.g. uvloop, asyncio, uvloop+nosplice)"
        )
    return loop, flags


def fwd_name(variant: str) -> str:
    return f"fwdproxy {variant}"


def judged_variant(variants: tuple[str, ...] | list[str]) -> str:
    """The variant the targets are judged on: plain uvloop (what `fwdproxy serve` runs by
    default when uvloop is installed), else the first uvloop one, else the first."""
    if "uvloop" in variants:
        return "uvloop"
    return next((v for v in variants if v.startswith("uvloop")), variants[0])


def pproxy_name() -> str:
    """pproxy runs on uvloop when it is installed (bench/peers/pproxy_uvloop.py)."""
    return "pproxy+uvloop" if has_module("uvloop") else "pproxy+asyncio"


def has_module(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def peer_spec(name: str) -> ProxySpec:
    return {
        "tinyproxy": ProxySpec("tinyproxy", ("connect", "http"), "tinyproxy"),
        "squid": ProxySpec("squid", ("connect", "http"), "squid"),
        "pproxy": ProxySpec(pproxy_name(), ("connect", "socks5", "http"), "pproxy"),
        "microsocks": ProxySpec("microsocks", ("socks5",), "microsocks"),
        "dante": ProxySpec("dante", ("socks5",), "dante"),
    }[name]


def peer_installed(name: str) -> bool:
    if name == "pproxy":
        return has_module("pproxy")
    binary = {"tinyproxy": "tinyproxy", "squid": "squid", "microsocks": "microsocks"}
    return shutil.which(binary.get(name, "danted")) is not None


def proxy_specs(s: Settings) -> tuple[list[ProxySpec], list[str]]:
    """The targets to run, and the peers that are not installed."""
    out = [ProxySpec(fwd_name(v), ("connect", "socks5", "http"), "fwdproxy", v) for v in s.variants]
    missing = []
    for name in s.peers:
        if peer_installed(name):
            out.append(peer_spec(name))
        else:
            missing.append(name)
            print(f"  ({name}: not installed, skipped)", file=sys.stderr)
    return out, missing


def render(template: str, port: int, workdir: Path, suffix: str, **subst: str) -> Path:
    text = (BENCH / "peers" / template).read_text().replace("@@PORT@@", str(port))
    for k, v in subst.items():
        text = text.replace(f"@@{k}@@", v)
    path = workdir / f"{Path(template).stem}-{port}{suffix}"
    path.write_text(text)
    return path


def fwdproxy_env(tree: Path, flags: list[str] | tuple[str, ...] = ()) -> dict[str, str]:
    """The environment of `python -m fwdproxy`: the tree under test first on the path, and no
    FWDPROXY_* variable from the caller's shell (an upstream there would change every route)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FWDPROXY_")}
    env["PYTHONPATH"] = os.pathsep.join([str(tree), *filter(None, [env.get("PYTHONPATH")])])
    if "nosplice" in flags:
        env["FWDPROXY_SPLICE"] = "0"
    return env


def squid_dir(workdir: Path, port: int) -> Path:
    """Squid drops root for its cache_effective_user (Debian: proxy), which must write here."""
    d = workdir / f"squid-{port}"
    d.mkdir(exist_ok=True)
    if os.geteuid() == 0:
        try:
            shutil.chown(d, user="proxy")
        except (LookupError, OSError):
            d.chmod(0o777)
    return d


def proxy_command(
    spec: ProxySpec, port: int, workdir: Path, tree: Path
) -> tuple[list[str], dict[str, str] | None]:
    """argv and environment (None: inherit) of one proxy listening on 127.0.0.1:port."""
    if spec.kind == "fwdproxy":
        loop, flags = parse_variant(spec.variant)
        cfg = render("fwdproxy.yaml", port, workdir, ".yaml")
        argv = [sys.executable, "-m", "fwdproxy", "serve", "-c", str(cfg), "--loop", loop]
        return argv, fwdproxy_env(tree, flags)
    if spec.kind == "tinyproxy":
        cfg = render("tinyproxy.conf", port, workdir, ".conf")
        return ["tinyproxy", "-d", "-c", str(cfg)], None
    if spec.kind == "squid":
        d = squid_dir(workdir, port)
        return ["squid", "-N", "-f", str(render("squid.conf", port, d, ".conf", DIR=str(d)))], None
    if spec.kind == "dante":
        return ["danted", "-f", str(render("danted.conf", port, workdir, ".conf"))], None
    if spec.kind == "microsocks":
        return ["microsocks", "-i", "127.0.0.1", "-p", str(port)], None
    if spec.kind == "pproxy":
        shim = BENCH / "peers" / "pproxy_uvloop.py"
        return [sys.executable, str(shim), "-l", f"http+socks5://127.0.0.1:{port}"], None
    raise ValueError(spec.kind)


def log_path(workdir: Path, spec: ProxySpec) -> Path:
    return workdir / f"{spec.name.replace(' ', '_').replace('+', '-')}.log"


def start_proxy(
    procs: Procs, spec: ProxySpec, workdir: Path, tree: Path
) -> tuple[subprocess.Popen[Any], int]:
    """Start one proxy pinned to the proxy CPU; its stdout and stderr go to its log file."""
    port = free_port()
    argv, env = proxy_command(spec, port, workdir, tree)
    with open(log_path(workdir, spec), "a") as log:
        p = procs.start(
            pinned(PROXY_CPU, argv),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=raise_nofile,
            env=env,
            cwd=tree if spec.kind == "fwdproxy" else None,
        )
    try:
        wait_port(port, p)
    except RuntimeError:
        procs.stop(p)
        raise
    return p, port


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
    used = sum(b[k] - a[k] for k in ("busy", "irq", "steal"))
    return 100 * used / (b["t"] - a["t"])


def wait_quiet(rig: Rig) -> float:
    """Wait (bounded) until other processes leave the CPUs mostly idle; return the last level.

    The machine may be shared: a measurement that starts while someone else's test suite
    runs is mostly noise. Waiting at most quiet_wait_s each time and quiet_budget_s in all
    keeps the run bounded; the level seen is recorded with every figure.
    """
    start = time.monotonic()
    deadline = start + min(rig.s.quiet_wait_s, rig.quiet_budget_s)
    level = quiet_cpu_pct(0.2)
    while level > rig.s.quiet_pct and time.monotonic() < deadline:
        level = quiet_cpu_pct(0.5)
    rig.quiet_budget_s = max(0.0, rig.quiet_budget_s - (time.monotonic() - start))
    return level


def settle(pid: int | None, max_s: float = 3.0) -> float:
    """Wait (bounded) until the proxy is idle: under 10% of a CPU over 0.1 s. A load leaves
    connections in flight when it stops; the proxy finishes or drops them first, so the next
    load starts on an idle proxy and the CPU of this one includes them."""
    if not pid:
        return 0.0
    start = time.monotonic()
    while time.monotonic() - start < max_s:
        c0 = cpu_seconds(pid)
        time.sleep(0.1)
        if cpu_seconds(pid) - c0 <= 0.01:
            break
    return time.monotonic() - start


def bulk_once(rig: Rig, mode: str, proxy: str, pid: int | None) -> dict[str, Any]:
    settle(pid)
    noise = wait_quiet(rig)
    c0 = cpu_seconds(pid) if pid else 0.0
    r = rig.run_loadgen("bulk", mode, proxy, rig.origin, str(rig.s.bulk_bytes))
    settle(pid)
    if "failed" not in r and pid:
        r["cpu_s_per_gib"] = (cpu_seconds(pid) - c0) / (r["bytes"] / GIB)
    r["busy_before_pct"] = noise
    return r


def short_once(rig: Rig, mode: str, proxy: str, conc: int, pid: int | None) -> dict[str, Any]:
    settle(pid)
    noise = wait_quiet(rig)
    c0 = cpu_seconds(pid) if pid else 0.0
    r = rig.run_loadgen(
        "short", mode, proxy, rig.origin, str(conc), str(rig.s.warmup_s), str(rig.s.window_s)
    )
    r["settle_s"] = round(settle(pid), 2)
    if "failed" not in r and pid and r.get("total_ok"):
        # CPU over warm-up, window and drain, divided by every tunnel completed
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
    out: dict[str, Any] = {"mode": mode, "baseline": base, "steps": []}
    t0 = time.monotonic()
    try:
        assert p.stdout is not None and p.stdin is not None
        for _ in rig.s.idle_steps:
            line = p.stdout.readline().split()
            if not line or line[0] != "STEP":
                out["failed"] = "load generator ended early"
                break
            n, ok, err = int(line[1]), int(line[2]), int(line[3])
            stalled = int(line[4]) if len(line) > 4 else 0
            opened_s = time.monotonic() - t0
            time.sleep(0.5)  # let the proxy finish its bookkeeping for the last handshakes
            mem = memory_kib(pid)
            per = {k: (mem[k] - base[k]) / max(ok, 1) for k in mem}
            out["steps"].append(
                {
                    "tunnels": n,
                    "ok": ok,
                    "errors": err,
                    "stalled": stalled,
                    "open_s": round(opened_s, 2),
                    **mem,
                    "per_tunnel_kib": per,
                }
            )
            p.stdin.write("next\n")
            p.stdin.flush()
            t0 = time.monotonic()
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


def access_log_lines(path: Path) -> int:
    """Access-log lines fwdproxy wrote (text format: '<ts> info access ...')."""
    try:
        with open(path, errors="replace") as f:
            return sum(1 for line in f if " access " in line)
    except OSError:
        return 0


def loop_reported(path: Path) -> str | None:
    """The event loop class pproxy_uvloop.py reported, if any."""
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            if line.startswith("bench: pproxy event loop "):
                return line.rsplit(" ", 1)[1]
    return None


def run_loads(
    s: Settings,
    workdir: Path,
    loadgen: Path,
    only: set[str] | None,
    skip: set[str],
    tree: Path,
) -> dict[str, Any]:
    """Every target, every load; the repeats are interleaved across targets (rep 1 of all,
    then rep 2 of all...) so a noisy minute on a shared machine does not hit one target's
    every repeat. Proxies restart for each repeat; idle memory is measured in the first."""
    procs = Procs()
    all_specs, missing = proxy_specs(s)
    specs = [sp for sp in all_specs if only is None or sp.kind in only or sp.name in only]
    targets: list[ProxySpec | None] = ([None] if only is None or "direct" in only else []) + specs
    raw: dict[str, dict[str, Any]] = {}
    for spec in specs:
        log_path(workdir, spec).unlink(missing_ok=True)
    try:
        oport = free_port()
        origin = procs.start(
            pinned(LOAD_CPU, [str(loadgen), "origin", f"127.0.0.1:{oport}"]),
            stdout=subprocess.DEVNULL,
        )
        wait_port(oport, origin)
        rig = Rig(loadgen, f"127.0.0.1:{oport}", procs, s, skip, s.quiet_budget_s)
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
                    p, port = start_proxy(procs, spec, workdir, tree)
                except RuntimeError as e:
                    tail = log_path(workdir, spec).read_text(errors="replace")[-300:].strip()
                    r["failed"] = f"{e}: {tail}" if tail else str(e)
                    print(f"  {name}: failed to start: {r['failed']}", flush=True)
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
    for spec_or_none in targets:
        name = spec_or_none.name if spec_or_none else "direct"
        r = raw.get(name)
        if r is None:
            continue
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
        if spec_or_none and spec_or_none.kind == "fwdproxy":
            results[name]["access_log_lines"] = access_log_lines(log_path(workdir, spec_or_none))
        if spec_or_none and spec_or_none.kind == "pproxy":
            results[name]["event_loop"] = loop_reported(log_path(workdir, spec_or_none))
    for name in missing:
        results[peer_spec(name).name] = {"not_installed": True}
    return results


# -- rules and CLI ----------------------------------------------------------------------------


def rules_step(s: Settings, tree: Path, workdir: Path) -> dict[str, Any]:
    """The rule-engine benchmark that this checkout has: bench/rules_scale.py (newer) or
    bench/rules_bench.py (older); either measures the fwdproxy of `tree`."""
    scale, old = BENCH / "rules_scale.py", BENCH / "rules_bench.py"
    env = fwdproxy_env(tree)
    if scale.exists():
        n = s.rules_scale_n
        out_json = workdir / "rules-scale.json"
        out_json.unlink(missing_ok=True)
        argv = [sys.executable, str(scale), "-n", str(n), "--json", str(out_json)]
        argv += ["--checkout", str(tree)]
        out = subprocess.run(
            pinned(PROXY_CPU, argv),
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
            cwd=tree,
            env=env,
        )
        if out.returncode != 0:
            return {"tool": scale.name, "failed": (out.stderr or out.stdout)[-500:]}
        res: dict[str, Any] = {"tool": scale.name, "rules": n, "table": out.stdout.rstrip()}
        with contextlib.suppress(OSError, ValueError):
            res["figures"] = json.loads(out_json.read_text())
        return res
    if old.exists():
        argv = [sys.executable, str(old), *(str(n) for n in s.rule_sizes)]
        out = subprocess.run(
            pinned(PROXY_CPU, argv),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
            cwd=tree,
            env=env,
        )
        if out.returncode != 0:
            return {"tool": old.name, "failed": out.stderr[-500:]}
        return {"tool": old.name, "sizes": json.loads(out.stdout)}
    return {"failed": "no rule benchmark script (bench/rules_scale.py or bench/rules_bench.py)"}


def cli_bench(workdir: Path, tree: Path, reps: int = 10) -> dict[str, Any]:
    """Wall time of `python -m fwdproxy route HOST` with the tree under test."""
    env = fwdproxy_env(tree)
    fwd = [sys.executable, "-m", "fwdproxy"]
    cfg = tree / "fwdproxy" / "rules.yaml"
    check = subprocess.run(
        [*fwd, "check", "-c", str(cfg)], capture_output=True, text=True, check=False, env=env
    )
    note = "shipped fwdproxy/rules.yaml"
    if check.returncode != 0:
        cfg = render("fwdproxy.yaml", free_port(), workdir, ".yaml")
        note = f"bench config (shipped rules.yaml did not load: {check.stderr.strip()[:160]})"
    route = ["-m", "fwdproxy", "route", "-c", str(cfg), "registry-1.docker.io"]
    argv = pinned(PROXY_CPU, [sys.executable, *route])
    base_argv = pinned(PROXY_CPU, [sys.executable, "-c", "pass"])

    def wall(cmd: list[str]) -> list[float]:
        subprocess.run(cmd, capture_output=True, check=False, env=env)  # warm the page cache
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            subprocess.run(cmd, capture_output=True, check=False, env=env)
            times.append(time.perf_counter() - t0)
        return times

    imp = subprocess.run(
        [sys.executable, "-X", "importtime", *route],
        capture_output=True,
        text=True,
        check=False,
        env=env,
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
    """Machine CPU from /proc/stat and our own (this process and its reaped children).

    busy: user+nice+system of every process; irq: interrupt and softirq time, which is where
    the kernel moves loopback packets (our loads' own traffic, in nobody's rusage); steal: time
    the hypervisor gave to other guests; all in CPU seconds.
    """
    import resource

    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    tick = os.sysconf("SC_CLK_TCK")
    ours = 0.0
    for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN):
        ru = resource.getrusage(who)
        ours += ru.ru_utime + ru.ru_stime
    return {
        "t": time.monotonic(),
        "busy": (f[0] + f[1] + f[2]) / tick,
        "irq": (f[5] + f[6]) / tick,
        "steal": f[7] / tick,
        "ours": ours,
        "load": os.getloadavg()[0],
    }


def foreign_cpu(a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    wall = max(b["t"] - a["t"], 1e-6)
    foreign = max(0.0, (b["busy"] - a["busy"]) - (b["ours"] - a["ours"]))
    return {
        "foreign_cpu_pct": 100 * foreign / wall,
        "irq_cpu_pct": 100 * (b["irq"] - a["irq"]) / wall,
        "steal_cpu_pct": 100 * (b["steal"] - a["steal"]) / wall,
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


def tree_revision(tree: Path) -> str:
    """Commit of the checkout under test, '+dirty' when it has uncommitted changes."""
    try:
        rev = subprocess.run(
            ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(tree), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + ("+dirty" if dirty else "")


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
    versions = {}
    for mod in ("uvloop", "pproxy"):
        with contextlib.suppress(Exception):
            versions[mod] = __import__(mod).__version__
    for cmd in (["tinyproxy", "-v"], ["squid", "-v"], ["danted", "-v"]):
        with contextlib.suppress(OSError, IndexError):
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            first = (r.stdout or r.stderr).strip().splitlines()[0]
            found = re.search(r"\d+(\.\d+)+", first)
            versions[cmd[0]] = found.group(0) if found else first[:40]
    return {
        "date": dt.datetime.now().strftime("%Y-%m-%d %H:%M"),
        "cpu": model,
        "cpus": os.cpu_count(),
        "memory": mem,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
        "tree": str(tree),
        "revision": tree_revision(tree),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--quick", action="store_true", help="smoke run: small loads, 1 repeat")
    ap.add_argument(
        "--only",
        help="comma list of targets: direct,fwdproxy,tinyproxy,squid,pproxy,microsocks,dante "
        "(or a full name such as 'fwdproxy asyncio')",
    )
    ap.add_argument(
        "--skip",
        default="",
        help="comma list of steps to skip: loads (all of bulk,short,http,idle),bulk,short,"
        "http,idle,profile,rules,cli",
    )
    ap.add_argument("--reps", type=int, help="repeats per figure (default 3, --quick 1)")
    ap.add_argument(
        "--variants",
        help="fwdproxy variants, comma list of LOOP[+nosplice] (default uvloop,asyncio)",
    )
    ap.add_argument(
        "--tree",
        default=str(REPO),
        help="checkout whose fwdproxy is measured (default: the one holding this bench/)",
    )
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
    for v in s.variants:
        parse_variant(v)
    tree = Path(args.tree).resolve()
    if not (tree / "fwdproxy" / "__main__.py").exists():
        print(f"{tree} has no fwdproxy package", file=sys.stderr)
        return 2
    only = set(args.only.split(",")) if args.only else None
    skip = set(args.skip.split(",")) if args.skip else set()
    stem = Path(
        args.out
        or BENCH / "results" / (dt.date.today().isoformat() + ("-quick" if args.quick else ""))
    )
    raise_nofile()
    workdir = BUILD / "run"
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    data: dict[str, Any] = {
        "machine": machine(tree),
        "settings": dataclasses.asdict(s),
        "quick": args.quick,
        "workdir": str(workdir),
    }
    steps: dict[str, float] = {}

    def took(step: str, t0: float) -> None:
        steps[step] = round(time.monotonic() - t0, 1)

    if "loads" not in skip:
        t0 = time.monotonic()
        loadgen = build_loadgen()
        before = cpu_snapshot()
        data["loads"] = run_loads(s, workdir, loadgen, only, skip, tree)
        data["noise"] = foreign_cpu(before, cpu_snapshot())
        took("loads", t0)
    judged = judged_variant(s.variants)
    if "profile" not in skip and (only is None or "fwdproxy" in only):
        import profile as prof  # bench/profile.py

        print("profile (py-spy)", flush=True)
        t0 = time.monotonic()
        fwd = data.get("loads", {}).get(fwd_name(judged), {})
        ref = {
            m: r["cpu_us_per_tunnel"]["median"]
            for m, r in (
                ("connect", fwd.get("short", {}).get("connect/c64")),
                ("socks5", fwd.get("short", {}).get("socks5/c64")),
                ("http", fwd.get("http", {}).get("c64")),
            )
            if r and r.get("cpu_us_per_tunnel")
        }
        data["profile"] = prof.profile_loads(
            s, workdir, tree, Path(f"{stem}-profile.txt"), variant=judged, ref_cpu_us=ref
        )
        took("profile", t0)
    if "rules" not in skip:
        print("rule engine", flush=True)
        t0 = time.monotonic()
        data["rules"] = rules_step(s, tree, workdir)
        took("rules", t0)
    if "cli" not in skip:
        print("cli latency", flush=True)
        t0 = time.monotonic()
        data["cli"] = cli_bench(workdir, tree)
        took("cli", t0)
    data["elapsed_s"] = round(time.monotonic() - started, 1)
    data["step_s"] = steps
    from report import write_report  # bench/report.py

    md = write_report(data, stem)
    print(md)
    print(f"\nwrote {stem}.md and {stem}.json in {data['elapsed_s']}s")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(BENCH))
    raise SystemExit(main())
