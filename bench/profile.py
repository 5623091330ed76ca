"""Where fwdproxy's CPU goes per tunnel: py-spy samples under the c=64 loads, as top-N tables.

    python bench/profile.py                         # CONNECT, SOCKS5, plain HTTP at c=64
    python bench/profile.py --loads connect --seconds 8 --variant asyncio --out STEM

Starts the origin and `python -m fwdproxy serve` (pinned as in bench/run.py, same config),
and for each load runs the load generator at c=64 while `py-spy record --native --function`
samples the proxy (py-spy itself runs on the load CPU). Samples of an idle proxy are dropped
by py-spy, so the shares are shares of the proxy's CPU time; multiplied by the proxy CPU µs
per tunnel measured over the same load they give µs per tunnel. Written as tables to
STEM-profile.txt (default bench/results/<date>-profile.txt); bench/run.py runs this as its
`profile` step with the run's stem. Needs py-spy (pip install py-spy) and ptrace rights (root).
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import run as harness  # noqa: E402

SYSCALLS = {
    "write",
    "writev",
    "read",
    "readv",
    "send",
    "sendmsg",
    "recv",
    "recvmsg",
    "sendto",
    "recvfrom",
    "connect",
    "accept",
    "accept4",
    "shutdown",
    "close",
    "socket",
    "setsockopt",
    "getsockopt",
    "getsockname",
    "getpeername",
    "epoll_ctl",
    "epoll_pwait",
    "epoll_wait",
    "splice",
    "getpid",
    "syscall",
    "pipe2",
    "fcntl",
    "ioctl",
    "dup",
    "clock_gettime",
}
# frames that are the event loop's own scaffolding: present in (nearly) every sample
SCAFFOLD_SHARE = 0.98
_LINE = re.compile(r":\d+\)$")


def frame_name(frame: str) -> str:
    """'func (file.py:123)' -> 'func (file.py)': one row per function, not per line."""
    return _LINE.sub(")", frame.strip())


def category(frame: str) -> str:
    name, _, where = frame.partition(" (")
    where = where.rstrip(")")
    if "libc.so" in where or where.startswith("0x"):
        return "system calls" if name in SYSCALLS else "libc (other)"
    if "fwdproxy/" in where:
        return "fwdproxy (Python)"
    if where.startswith("logging/"):
        return "logging (Python)"
    if where.startswith("asyncio/") or "_asynciomodule.c" in where:
        return "asyncio (Python and C)"
    if where.endswith(".py") or where.startswith("<frozen"):
        return "other Python (stdlib)"
    if "libpython" in where or where.endswith(".h") or where in {"ceval.c", "Python"}:
        return "CPython interpreter"
    if where.endswith(".c"):
        return "uvloop / libuv / C extensions"
    return "other native"


def parse_raw(raw: Path) -> list[tuple[list[str], int]]:
    out = []
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            out.append(([frame_name(f) for f in stack.split(";")], int(n)))
    return out


def tables(
    samples: list[tuple[list[str], int]], cpu_us: float | None, top: int
) -> tuple[str, dict[str, Any]]:
    """Own time, total time, own time by kind, and time by innermost fwdproxy function."""
    total = sum(n for _, n in samples)
    if not total:
        return "no samples (is the proxy running, and may py-spy ptrace it?)", {}
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    kinds: collections.Counter[str] = collections.Counter()
    by_fwd: collections.Counter[str] = collections.Counter()
    for frames, n in samples:
        own[frames[-1]] += n
        kinds[category(frames[-1])] += n
        for f in set(frames):
            incl[f] += n
    scaffold = {f for f, v in incl.items() if v / total >= SCAFFOLD_SHARE}
    for frames, n in samples:
        inner = next((f for f in reversed(frames) if "fwdproxy/" in f and f not in scaffold), None)
        by_fwd[inner or "(no fwdproxy frame: event loop, accept, transport callbacks)"] += n

    def rows(counter: collections.Counter[str], limit: int, skip_scaffold: bool) -> list[str]:
        out = ["   share   µs/tunnel  function (file)"]
        shown = 0
        for f, v in counter.most_common():
            if skip_scaffold and f in scaffold:
                continue
            us = f"{v / total * cpu_us:9.1f}" if cpu_us else "        -"
            out.append(f"  {100 * v / total:5.1f}%  {us}  {f[:120]}")
            shown += 1
            if shown >= limit:
                break
        return out

    lines = [f"{total} samples of the busy proxy", ""]
    lines += ["Own time by kind (leaf frame):", *rows(kinds, 20, False), ""]
    lines += [f"Own time, top {top} (leaf frame):", *rows(own, top, False), ""]
    lines += [
        f"Total time, top {top} (frame anywhere on the stack; frames in >= "
        f"{100 * SCAFFOLD_SHARE:.0f}% of samples, the loop's scaffolding, left out):",
        *rows(incl, top, True),
        "",
    ]
    lines += [
        f"By innermost fwdproxy function (it and what it calls), top {top}:",
        *rows(by_fwd, top, False),
    ]
    brief = {
        "kinds": {k: v / total for k, v in kinds.most_common()},
        "top_fwdproxy": [(f, v / total) for f, v in by_fwd.most_common(6)],
    }
    return "\n".join(lines), brief


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


def profile_loads(
    s: Any,
    workdir: Path,
    tree: Path,
    out: Path,
    *,
    variant: str = "uvloop",
    loads: tuple[str, ...] = ("connect", "socks5", "http"),
    conc: int = 64,
    top: int = 25,
    ref_cpu_us: dict[str, float] | None = None,
) -> dict[str, Any]:
    """Profile fwdproxy under each load; write the tables to `out`; return a summary."""
    spy = py_spy()
    if spy is None:
        return {"failed": "py-spy not installed (pip install py-spy)"}
    seconds = float(s.profile_s)
    loadgen = harness.build_loadgen()
    procs = harness.Procs()
    spec = harness.ProxySpec(
        harness.fwd_name(variant), ("connect", "socks5", "http"), "fwdproxy", variant
    )
    head = [
        f"fwdproxy {variant} (python -m fwdproxy serve, tree {tree}, "
        f"{harness.tree_revision(tree)}), {dt.datetime.now():%Y-%m-%d %H:%M}",
        f"py-spy record --native --function -r 200, {seconds:g} s per load, c={conc}; the",
        "sampling slows the proxy and adds CPU to it, so the rates here are below, and the CPU",
        "per tunnel above, the benchmark's. µs/tunnel = share x the proxy CPU µs per tunnel of",
        "the benchmark's own c=64 load when the caller passes it (bench/run.py does), else x",
        "the CPU per tunnel measured under sampling (the title of each section says which).",
    ]
    sections, summary = ["\n".join(head)], {}
    try:
        oport = harness.free_port()
        o = procs.start(
            harness.pinned(harness.LOAD_CPU, [str(loadgen), "origin", f"127.0.0.1:{oport}"]),
            stdout=subprocess.DEVNULL,
        )
        harness.wait_port(oport, o)
        for mode in loads:
            p, port = harness.start_proxy(procs, spec, workdir, tree)
            try:
                raw = Path(tempfile.mkdtemp(prefix="fwdproxy-profile-")) / f"{mode}.txt"
                argv = [str(loadgen), "short", mode, f"127.0.0.1:{port}", f"127.0.0.1:{oport}"]
                argv += [str(conc), "0.5", str(seconds + 1.5)]
                c0 = harness.cpu_seconds(p.pid)
                lg = procs.start(
                    harness.pinned(harness.LOAD_CPU, argv), stdout=subprocess.PIPE, text=True
                )
                time.sleep(0.8)
                spy_argv = [spy, "record", "-p", str(p.pid), "-d", f"{seconds:g}", "-r", "200"]
                spy_argv += ["-f", "raw", "--native", "--function", "-o", str(raw)]
                rec = subprocess.run(
                    harness.pinned(harness.LOAD_CPU, spy_argv),
                    capture_output=True,
                    text=True,
                    check=False,
                    timeout=seconds + 60,
                )
                stdout, _ = lg.communicate(timeout=seconds + 30)
                procs.stop(lg)
                cpu = harness.cpu_seconds(p.pid) - c0
            finally:
                procs.stop(p)
            result: dict[str, Any] = {}
            if stdout.strip():
                result = json.loads(stdout.strip().splitlines()[-1])
            ok = result.get("total_ok") or 0
            sampled_us = cpu / ok * 1e6 if ok else None
            ref = (ref_cpu_us or {}).get(mode)
            cpu_us = ref or sampled_us
            title = f"== {mode} c={conc}: {result.get('rate', 0):,.0f} tunnels/s under sampling, "
            title += (
                f"proxy CPU {sampled_us:,.0f} µs/tunnel under sampling"
                if sampled_us
                else "no tunnels completed"
            )
            if ref:
                title += f"; µs below are shares of the benchmark's {ref:,.0f} µs/tunnel"
            title += " =="
            if rec.returncode != 0 or not raw.exists():
                body = f"py-spy failed: {(rec.stderr or rec.stdout).strip()[-300:]}"
                summary[mode] = {"failed": body}
            else:
                samples = parse_raw(raw)
                body, brief = tables(samples, cpu_us, top)
                summary[mode] = {
                    "samples": sum(n for _, n in samples),
                    "cpu_us_per_tunnel": cpu_us,
                    "cpu_us_per_tunnel_sampled": sampled_us,
                    "rate": result.get("rate"),
                    **brief,
                }
            sections.append(f"{title}\n\n{body}")
    finally:
        procs.stop_all()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n\n".join(sections) + "\n")
    return {"file": str(out), "loads": summary}


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--loads", default="connect,socks5,http", help="comma list (c=64 each)")
    ap.add_argument("--variant", default="uvloop", help="LOOP[+nosplice], as in run.py")
    ap.add_argument("--seconds", type=float, default=harness.Settings.profile_s)
    ap.add_argument("--top", type=int, default=25)
    ap.add_argument("--tree", default=str(harness.REPO), help="checkout under test")
    ap.add_argument("--out", help="results stem (writes STEM-profile.txt)")
    args = ap.parse_args()
    harness.parse_variant(args.variant)
    harness.raise_nofile()
    stem = args.out or str(BENCH / "results" / dt.date.today().isoformat())
    out = Path(f"{stem}-profile.txt")
    workdir = harness.BUILD / "run"
    workdir.mkdir(parents=True, exist_ok=True)
    s = harness.Settings(profile_s=args.seconds)
    res = profile_loads(
        s,
        workdir,
        Path(args.tree).resolve(),
        out,
        variant=args.variant,
        loads=tuple(args.loads.split(",")),
        top=args.top,
    )
    if "failed" in res:
        print(res["failed"], file=sys.stderr)
        return 1
    print(out.read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
