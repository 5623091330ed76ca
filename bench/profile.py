"""Where fwdproxy's CPU time goes under one load: py-spy samples, summed by function and module.

    python bench/profile.py [--load short|bulk] [--mode connect|socks5] [--variant fast/uvloop]

Starts the origin and fwdproxy (pinned as in bench/run.py), runs the load for ~6 s, samples
the proxy with `py-spy record --native` for 5 s, and prints the functions with the most
samples (own time and inclusive), plus the share spent in system calls.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import run as harness  # noqa: E402

SYSCALLS = {
    "write",
    "read",
    "send",
    "recv",
    "sendto",
    "recvfrom",
    "connect",
    "accept4",
    "shutdown",
    "close",
    "socket",
    "setsockopt",
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
    "dup",
}


def summarize(raw: Path, top: int) -> str:
    own: collections.Counter[str] = collections.Counter()
    incl: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack:
            continue
        k = int(n)
        total += k
        frames = stack.split(";")
        own[frames[-1]] += k
        for f in set(frames):
            incl[f] += k
    if not total:
        return "no samples"
    sys_share = sum(v for f, v in own.items() if f.split(" (")[0] in SYSCALLS) / total
    out = [f"{total} samples; {100 * sys_share:.0f}% of them inside system calls", "", "own time:"]
    out += [f"  {100 * v / total:5.1f}%  {f[:110]}" for f, v in own.most_common(top)]
    out += ["", "inclusive (Python frames of fwdproxy / asyncio):"]
    shown = 0
    for f, v in incl.most_common():
        if ("fwdproxy/" in f or "asyncio/" in f) and "cli.py" not in f and "runners" not in f:
            out.append(f"  {100 * v / total:5.1f}%  {f[:110]}")
            shown += 1
            if shown >= top:
                break
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--load", choices=["short", "bulk"], default="short")
    ap.add_argument("--mode", choices=["connect", "socks5"], default="connect")
    ap.add_argument("--variant", default="fast/uvloop")
    ap.add_argument("--top", type=int, default=25)
    args = ap.parse_args()
    loadgen = harness.build_loadgen()
    procs = harness.Procs()
    workdir = Path(tempfile.mkdtemp(prefix="fwdproxy-profile-"))
    try:
        oport = harness.free_port()
        o = procs.start(
            harness.pinned("1", [str(loadgen), "origin", f"127.0.0.1:{oport}"]),
            stdout=subprocess.DEVNULL,
        )
        harness.wait_port(oport, o)
        spec = harness.ProxySpec("fwdproxy", ("connect", "socks5"), "fwdproxy", args.variant)
        port = harness.free_port()
        p = procs.start(
            harness.pinned("0", harness.proxy_argv(spec, port, workdir)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            preexec_fn=harness.raise_nofile,
        )
        harness.wait_port(port, p)
        proxy, origin = f"127.0.0.1:{port}", f"127.0.0.1:{oport}"
        if args.load == "short":
            load = [str(loadgen), "short", args.mode, proxy, origin, "64", "0.5", "6"]
        else:
            load = [str(loadgen), "bulk", args.mode, proxy, origin, str(16 << 30)]
        lg = procs.start(harness.pinned("1", load), stdout=subprocess.PIPE, text=True)
        time.sleep(0.7)
        raw = workdir / "profile.txt"
        subprocess.run(
            [
                "py-spy",
                "record",
                "-p",
                str(p.pid),
                "-d",
                "5",
                "-r",
                "250",
                "-f",
                "raw",
                "-n",
                "-o",
                str(raw),
            ],
            capture_output=True,
            check=False,
            timeout=60,
        )
        procs.stop(lg)
        print(f"fwdproxy {args.variant}, {args.load} {args.mode}")
        print(summarize(raw, args.top))
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
