"""Network namespaces and veth links for the end-to-end rig.

Everything is created under names with a random suffix so that a crashed run never collides with
the next one, and every object is recorded so teardown can remove exactly what this run made.
`ip netns exec` bind-mounts /etc/netns/<ns>/* over /etc, which is how each namespace gets its own
hosts and resolv.conf without touching the machine's real files.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path("/run/netns")
NETNS_ETC_DIR = Path("/etc/netns")

T = TypeVar("T")


def run_host(argv: Sequence[str], *, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command in the root namespace; failures raise with the command's own stderr."""
    proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=60)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} -> exit {proc.returncode}: {proc.stderr.strip()}")
    return proc


class Netns:
    """One network namespace: run commands in it, and open sockets from inside it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.etc_dir = NETNS_ETC_DIR / name

    def argv(self, argv: Sequence[str]) -> list[str]:
        """Prefix a command so it runs inside this namespace (with its /etc overrides)."""
        return ["ip", "netns", "exec", self.name, *argv]

    def run(
        self,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout_s: float = 60.0,
        check: bool = True,
        input_text: str | None = None,
        text: bool = True,
    ) -> subprocess.CompletedProcess[Any]:
        """Run a command inside the namespace and capture its output (bytes if not `text`)."""
        proc = subprocess.run(
            self.argv(argv),
            capture_output=True,
            text=text,
            env=dict(env) if env is not None else None,
            timeout=timeout_s,
            input=input_text,
        )
        if check and proc.returncode != 0:
            raise RuntimeError(
                f"[{self.name}] {' '.join(argv)} -> exit {proc.returncode}\n"
                f"stdout: {proc.stdout[-4000:]!s}\nstderr: {proc.stderr[-4000:]!s}"
            )
        return proc

    def ip(self, *args: str) -> None:
        run_host(["ip", "-n", self.name, *args])

    def call(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` on a fresh thread that has joined this namespace.

        setns(CLONE_NEWNET) only affects the calling thread, so the test process itself stays
        in the root namespace; sockets created by `fn` belong to this namespace for good.
        """
        box: dict[str, Any] = {}

        def target() -> None:
            try:
                libc = ctypes.CDLL(None, use_errno=True)
                fd = os.open(NETNS_RUN_DIR / self.name, os.O_RDONLY)
                try:
                    if libc.setns(fd, CLONE_NEWNET) != 0:
                        err = ctypes.get_errno()
                        raise OSError(err, f"setns({self.name}): {os.strerror(err)}")
                finally:
                    os.close(fd)
                box["value"] = fn(*args)
            except BaseException as exc:
                box["error"] = exc

        thread = threading.Thread(target=target, name=f"netns-{self.name}")
        thread.start()
        thread.join()
        if "error" in box:
            raise box["error"]
        return box["value"]

    def tcp_probe(self, host: str, port: int, timeout_s: float = 1.0) -> str | None:
        """Try one TCP connect from inside the namespace; None on success, else the error text."""

        def probe() -> str | None:
            try:
                with socket.create_connection((host, port), timeout=timeout_s):
                    return None
            except OSError as exc:
                return f"{type(exc).__name__}: {exc}"

        return self.call(probe)

    def wait_tcp(self, host: str, port: int, *, deadline_s: float = 20.0,
                 alive: Callable[[], str | None] | None = None) -> None:
        """Poll until host:port accepts in the namespace; `alive` reports a dead server early."""
        end = time.monotonic() + deadline_s
        last: str | None = "never tried"
        while time.monotonic() < end:
            if alive is not None:
                dead = alive()
                if dead:
                    raise RuntimeError(f"[{self.name}] waiting for {host}:{port}: {dead}")
            last = self.tcp_probe(host, port, timeout_s=0.5)
            if last is None:
                return
            time.sleep(0.05)
        raise TimeoutError(f"[{self.name}] {host}:{port} not accepting after {deadline_s}s: {last}")


class NetnsSet:
    """All namespaces and their /etc/netns dirs created by one rig, removed together."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.spaces: dict[str, Netns] = {}

    def add(self, role: str, *, hosts: Mapping[str, str], nameserver: str = "127.0.0.1") -> Netns:
        """Create namespace `<prefix>-<role>` with lo up and its own hosts/resolv.conf.

        The nameserver defaults to loopback where nothing listens, so any name missing from
        the hosts file fails to resolve at once instead of leaking to a real resolver.
        """
        ns = Netns(f"{self.prefix}-{role}")
        run_host(["ip", "netns", "add", ns.name])
        self.spaces[role] = ns
        ns.ip("link", "set", "lo", "up")
        ns.etc_dir.mkdir(parents=True, exist_ok=False)
        lines = ["127.0.0.1 localhost", "::1 localhost ip6-localhost"]
        lines += [f"{ip} {name}" for name, ip in hosts.items()]
        (ns.etc_dir / "hosts").write_text("\n".join(lines) + "\n")
        (ns.etc_dir / "resolv.conf").write_text(
            f"nameserver {nameserver}\noptions timeout:1 attempts:1\n"
        )
        return ns

    def link(self, a: Netns, a_if: str, a_cidr: str, b: Netns, b_if: str, b_cidr: str) -> None:
        """A veth pair created directly inside both namespaces (never visible in the root one)."""
        run_host([
            "ip", "link", "add", a_if, "netns", a.name, "type", "veth",
            "peer", "name", b_if, "netns", b.name,
        ])
        for ns, ifname, cidr in ((a, a_if, a_cidr), (b, b_if, b_cidr)):
            ns.ip("addr", "add", cidr, "dev", ifname)
            ns.ip("link", "set", ifname, "up")

    def teardown(self) -> list[str]:
        """Delete every namespace and /etc/netns dir; return what could not be removed."""
        problems: list[str] = []
        for ns in self.spaces.values():
            # Processes still inside would keep the namespace alive; the caller stops them first.
            with contextlib.suppress(FileNotFoundError):
                proc = run_host(["ip", "netns", "del", ns.name], check=False)
                if proc.returncode != 0 and (NETNS_RUN_DIR / ns.name).exists():
                    problems.append(f"ip netns del {ns.name}: {proc.stderr.strip()}")
            if ns.etc_dir.exists():
                shutil.rmtree(ns.etc_dir, ignore_errors=True)
            if ns.etc_dir.exists():
                problems.append(f"could not remove {ns.etc_dir}")
        return problems
