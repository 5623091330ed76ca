"""Loopback test rig: real upstream proxies as subprocesses, origin servers, raw clients.

Everything here listens on 127.0.0.1 (or ::1) with port 0 and is stopped by whoever started
it. Waiting is always a bounded poll against a deadline, never a bare sleep used as a signal.

Names used by the integration tests (no DNS query ever leaves the machine):
- `localhost` is routed through the upstream, which resolves it itself (/etc/hosts);
- `direct.test` / `direct2.test` are routed direct and resolved by the proxy's `hosts:`;
- `*.blocked.test` hits a reject rule; `slow.test` / `down.test` go to broken upstreams.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import json
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

from fwdproxy.config import parse_config
from fwdproxy.config.yamlsrc import load_yaml
from fwdproxy.server import Server

LOOPBACK = "127.0.0.1"
TUNNEL_NAME = "localhost"
DIRECT_NAME = "direct.test"
DIRECT_NAME2 = "direct2.test"
BLOCKED_NAME = "x.blocked.test"
MiB = 1024 * 1024
CHUNK = 256 * 1024


# -- waiting -----------------------------------------------------------------------------------


# Ports handed to subprocesses (or used as "nothing listens here") come from below the
# kernel's ephemeral range, so that the many outgoing connections and port-0 listeners of a
# test run cannot grab them between our check and their use.
_PORTS = random.Random(os.getpid() ^ int(time.time()))


def closed_port() -> int:
    """A loopback port with nothing listening on it right now, outside the ephemeral range."""
    for _ in range(200):
        port = _PORTS.randrange(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind((LOOPBACK, port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port found in 20000-32000")


def wait_port_sync(host: str, port: int, timeout_s: float = 15.0, proc: Proc | None = None) -> None:
    """Poll until host:port accepts a TCP connection; fail with the process log otherwise."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=0.5).close()
            return
        except OSError:
            pass
        if proc is not None and proc.popen.poll() is not None:
            raise RuntimeError(f"{proc.name} exited with {proc.popen.returncode}:\n{proc.log()}")
        if time.monotonic() > deadline:
            extra = f"\n{proc.log()}" if proc is not None else ""
            raise TimeoutError(f"{host}:{port} not accepting after {timeout_s}s{extra}")
        time.sleep(0.02)


async def poll_until(
    check: Callable[[], bool], timeout_s: float = 5.0, what: str = "condition"
) -> None:
    """Re-evaluate `check` every 10 ms until it is true; raise AssertionError at the deadline."""
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")
        await asyncio.sleep(0.01)


# -- subprocesses ------------------------------------------------------------------------------


class Proc:
    """A long-running helper process in its own session, output captured in a log file."""

    def __init__(
        self, name: str, argv: list[str], log_path: Path, env: dict[str, str] | None = None
    ):
        self.name = name
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            argv,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, grace_s: float = 5.0) -> int | None:
        """SIGTERM, then SIGKILL after grace_s; returns the exit code."""
        if self in STARTED_UPSTREAMS:
            STARTED_UPSTREAMS.remove(self)  # type: ignore[arg-type]
        try:
            if self.popen.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.popen.pid, signal.SIGTERM)
                try:
                    self.popen.wait(timeout=grace_s)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(self.popen.pid, signal.SIGKILL)
                    self.popen.wait(timeout=5)
            return self.popen.returncode
        finally:
            self._log.close()


STARTED_UPSTREAMS: list[Upstream] = []


class Upstream(Proc):
    """A real upstream proxy process whose log tells which targets it carried.

    Upstreams live for the whole run while origins come and go, and a new origin may get the
    port of an earlier one: `carried()` and `total()` therefore count only log lines written
    since `reset()`, which conftest calls before every test.
    """

    def __init__(
        self,
        name: str,
        argv: list[str],
        log_path: Path,
        scheme: str,
        port: int,
        carried_fmt: str,
        env: dict[str, str] | None = None,
    ):
        super().__init__(name, argv, log_path, env)
        self.scheme = scheme
        self.port = port
        self._carried_fmt = carried_fmt  # regex with {port}
        self._since = 0
        STARTED_UPSTREAMS.append(self)

    def reset(self) -> None:
        """Forget what was carried so far (the log file stays whole for debugging)."""
        try:
            self._since = self.log_path.stat().st_size
        except FileNotFoundError:
            self._since = 0

    def recent_log(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._since)
                return f.read().decode(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def url(self) -> str:
        return f"{self.scheme}://{LOOPBACK}:{self.port}"

    def carried(self, port: int) -> int:
        """How many tunnels to target port `port` this upstream has logged so far."""
        rx = re.compile(self._carried_fmt.format(port=port), re.M)
        return len(rx.findall(self.recent_log()))

    def total(self) -> int:
        """Tunnels carried to any port."""
        rx = re.compile(self._carried_fmt.format(port=r"\d+"), re.M)
        return len(rx.findall(self.recent_log()))

    async def wait_carried(self, port: int, count: int = 1, timeout_s: float = 5.0) -> None:
        await poll_until(
            lambda: self.carried(port) >= count,
            timeout_s,
            f"{self.name} to log {count} tunnel(s) to port {port}; "
            f"log:\n{self.recent_log()[-2000:]}",
        )


def _py_env() -> dict[str, str]:
    env = clean_env()
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _with_retries(start: Callable[[Path], Upstream], tmp: Path) -> Upstream:
    """Start an upstream on a fresh port, again if another process took the port meanwhile."""
    for attempt in range(5):
        try:
            return start(tmp)
        except RuntimeError:  # exited early: most likely "address already in use"
            if attempt == 4:
                raise
    raise AssertionError("unreachable")


def start_asyncio_socks(tmp: Path) -> Upstream:
    return _with_retries(_start_asyncio_socks, tmp)


def start_microsocks(tmp: Path) -> Upstream:
    return _with_retries(_start_microsocks, tmp)


def start_tinyproxy(tmp: Path) -> Upstream:
    return _with_retries(_start_tinyproxy, tmp)


def _start_asyncio_socks(tmp: Path) -> Upstream:
    port = closed_port()
    up = Upstream(
        "asyncio-socks-server",
        [
            sys.executable,
            "-m",
            "asyncio_socks_server",
            "-H",
            LOOPBACK,
            "-P",
            str(port),
            "--access-log",
        ],
        tmp / "asyncio-socks.log",
        "socks5",
        port,
        r"Established TCP stream between .* and \('127\.0\.0\.1', {port}\)$",
        env=_py_env(),
    )
    _wait_started(up)
    return up


MICROSOCKS_USER = ("fwd", "s3cret:pw@x")


def start_microsocks_auth(tmp: Path) -> Upstream:
    """microsocks requiring RFC 1929 username/password (MICROSOCKS_USER)."""
    return _with_retries(lambda t: _start_microsocks(t, auth=True), tmp)


def _start_microsocks(tmp: Path, auth: bool = False) -> Upstream:
    port = closed_port()
    extra = ["-u", MICROSOCKS_USER[0], "-P", MICROSOCKS_USER[1]] if auth else []
    up = Upstream(
        "microsocks-auth" if auth else "microsocks",
        ["microsocks", "-i", LOOPBACK, "-p", str(port), *extra],
        tmp / "microsocks.log",
        "socks5",
        port,
        r"connected to \S+:{port}$",
    )
    _wait_started(up)
    return up


def _start_tinyproxy(tmp: Path) -> Upstream:
    port = closed_port()
    log = tmp / "tinyproxy.log"
    conf = tmp / "tinyproxy.conf"
    conf.write_text(
        f'Port {port}\nListen {LOOPBACK}\nTimeout 60\nLogFile "{log}"\nLogLevel Connect\n'
        f"MaxClients 64\nAllow 127.0.0.1\nDisableViaHeader Yes\n"
    )
    up = Upstream(
        "tinyproxy",
        ["tinyproxy", "-d", "-c", str(conf)],
        tmp / "tinyproxy.out",
        "http",
        port,
        r"Request \(file descriptor \d+\): CONNECT \S+:{port} HTTP",
    )
    up.log_path = log  # its own log file carries the request lines
    _wait_started(up)
    return up


def _wait_started(up: Upstream) -> None:
    try:
        wait_port_sync(LOOPBACK, up.port, 20.0, up)
    except BaseException:
        up.stop()
        raise
    up.reset()


def clean_env() -> dict[str, str]:
    """The environment without proxy variables (a client must only use the proxy we give it)."""
    drop = {"http_proxy", "https_proxy", "all_proxy", "no_proxy", "ftp_proxy", "fwdproxy_upstream"}
    return {k: v for k, v in os.environ.items() if k.lower() not in drop}


# -- the proxy under test ----------------------------------------------------------------------


class DnsGuard:
    """Wraps the loop's getaddrinfo so the in-process proxy can never query a real DNS server.

    Only `localhost` resolves (from /etc/hosts); any other name fails like NXDOMAIN and is
    recorded, so a test can assert that the proxy never tried to resolve a name it should
    have taken from `hosts:` or left to the upstream.
    """

    ALLOWED = frozenset({"localhost"})

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.real = loop.getaddrinfo
        self.blocked: list[str] = []

    async def getaddrinfo(self, host: Any, *args: Any, **kw: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name in self.ALLOWED or _is_ip(name):
            return await self.real(host, *args, **kw)
        self.blocked.append(name)
        raise socket.gaierror(socket.EAI_NONAME, f"test DNS guard: {name} not resolvable")

    def install(self) -> None:
        self.loop.getaddrinfo = self.getaddrinfo  # type: ignore[method-assign]

    def uninstall(self) -> None:
        if self.loop.getaddrinfo == self.getaddrinfo:
            del self.loop.getaddrinfo  # back to the class attribute


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name.split("%", 1)[0])
    except ValueError:
        return False
    return True


def proxy_config(
    upstream_url: str | None = None,
    *,
    upstreams: dict[str, Any] | None = None,
    rules: list[dict[str, Any]] | None = None,
    limits: dict[str, Any] | None = None,
    **top: Any,
) -> dict[str, Any]:
    """The standard integration config: `localhost` via `tunnel`, `*.test` names direct."""
    ups: dict[str, Any] = {"tunnel": upstream_url or f"socks5://{LOOPBACK}:{closed_port()}"}
    ups.update(upstreams or {})
    cfg: dict[str, Any] = {
        "listen": f"{LOOPBACK}:0",
        "loopback_targets": True,
        "upstreams": ups,
        "hosts": {DIRECT_NAME: LOOPBACK, DIRECT_NAME2: LOOPBACK},
        "rules": [
            *(rules or []),
            {"name": "blocked", "suffix": ["blocked.test"], "action": "reject"},
            {"name": "tunnelled", "domain": [TUNNEL_NAME], "via": "tunnel"},
        ],
        "default": "direct",
        "limits": {"dial_timeout_s": 5, "handshake_timeout_s": 5, **(limits or {})},
    }
    cfg.update(top)
    return cfg


@dataclass
class RunningProxy:
    server: Server
    host: str
    port: int

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def addr(self) -> str:
        return f"{self.host}:{self.port}"

    async def open(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection(self.host, self.port)


@contextlib.asynccontextmanager
async def running_proxy(cfg: dict[str, Any]) -> AsyncIterator[RunningProxy]:
    """Start the proxy in-process on this loop; stop it whatever happens."""
    text = yaml.safe_dump(cfg, sort_keys=False)
    config = parse_config(load_yaml(text), "test.yaml", env={})
    server = Server(config)
    await server.start()
    try:
        host, port = server.addresses[0]
        yield RunningProxy(server, host, port)
    finally:
        await server.stop(grace_s=1)


# -- payloads ----------------------------------------------------------------------------------


def payload(n: int, seed: int = 0) -> bytes:
    """n deterministic pseudo-random bytes."""
    return random.Random(seed * 1_000_003 + n).randbytes(n)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- raw TCP servers ---------------------------------------------------------------------------


class TcpServer:
    """Base for the raw asyncio servers; `async with` starts and stops it."""

    host = LOOPBACK

    def __init__(self, host: str | None = None) -> None:
        if host is not None:
            self.host = host
        self.port = 0
        self._srv: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self.connections = 0

    async def start(self) -> TcpServer:
        self._srv = await asyncio.start_server(self._handle, self.host, 0)
        self.port = int(self._srv.sockets[0].getsockname()[1])
        return self

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        self._writers.add(w)
        try:
            await self.handle(r, w)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._writers.discard(w)
            w.close()

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        raise NotImplementedError

    async def stop(self) -> None:
        if self._srv is not None:
            self._srv.close()
            for w in list(self._writers):
                w.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._srv.wait_closed(), 2)

    async def __aenter__(self) -> Any:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


class EchoServer(TcpServer):
    """Echoes every byte; `received` keeps what each connection sent, in order."""

    def __init__(self, host: str | None = None) -> None:
        super().__init__(host)
        self.received: list[bytearray] = []

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        got = bytearray()
        self.received.append(got)
        while data := await r.read(CHUNK):
            got += data
            w.write(data)
            await w.drain()
        if w.can_write_eof():
            w.write_eof()


class HashServer(TcpServer):
    """Integrity peer: sends a seeded stream while hashing what it receives.

    The client opens with `!QQQB` (bytes wanted, seed, bytes it will upload, half-close flag),
    then uploads. The server sends exactly the bytes wanted while reading the upload; with the
    flag set it then also waits for the client's EOF (which must come with no extra bytes).
    Finally it appends a trailer sha256(sent) + sha256(received) + `!Q` received length, and
    closes. Without the flag no half-close is needed anywhere on the path.
    """

    HEADER = struct.Struct("!QQQB")

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        want, seed, up_len, wait_eof = self.HEADER.unpack(await r.readexactly(self.HEADER.size))

        async def send() -> bytes:
            rnd = random.Random(seed)
            h = hashlib.sha256()
            left = want
            while left:
                data = rnd.randbytes(min(CHUNK, left))
                h.update(data)
                w.write(data)
                await w.drain()
                left -= len(data)
            return h.digest()

        async def recv() -> tuple[bytes, int]:
            h = hashlib.sha256()
            n = 0
            while n < up_len:
                data = await r.read(min(CHUNK, up_len - n))
                if not data:
                    break
                h.update(data)
                n += len(data)
            if wait_eof:
                extra = await r.read()
                h.update(extra)
                n += len(extra)
            return h.digest(), n

        sent, (got, n) = await asyncio.gather(send(), recv())
        w.write(sent + got + struct.pack("!Q", n))
        await w.drain()


@dataclass
class Exchange:
    up_bytes: int
    down_bytes: int
    seconds: float


async def hash_exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_bytes: int,
    down_bytes: int,
    seed: int = 7,
    *,
    half_close: bool = False,
) -> Exchange:
    """Drive a HashServer, both directions at once; with half_close the client sends EOF
    right after its upload and must still receive the whole download and trailer.

    Asserts that every byte arrived intact in both directions (sha256 and length).
    """
    start = time.monotonic()
    writer.write(HashServer.HEADER.pack(down_bytes, seed, up_bytes, int(half_close)))

    async def send() -> bytes:
        rnd = random.Random(seed ^ 0x5A5A5A5A)
        h = hashlib.sha256()
        left = up_bytes
        while left:
            data = rnd.randbytes(min(CHUNK, left))
            h.update(data)
            writer.write(data)
            await writer.drain()
            left -= len(data)
        if half_close:
            writer.write_eof()
        return h.digest()

    async def recv() -> tuple[bytes, bytes, bytes]:
        h = hashlib.sha256()
        left = down_bytes
        while left:
            data = await reader.read(min(CHUNK, left))
            if not data:
                raise AssertionError(f"stream ended with {left} of {down_bytes} bytes missing")
            h.update(data)
            left -= len(data)
        trailer = await reader.readexactly(72)
        rest = await reader.read()
        return h.digest(), trailer, rest

    sent_digest, (recv_digest, trailer, rest) = await asyncio.gather(send(), recv())
    assert trailer[:32] == recv_digest, "download corrupted (sha256 differs)"
    assert struct.unpack("!Q", trailer[64:])[0] == up_bytes, "upload length differs"
    assert trailer[32:64] == sent_digest, "upload corrupted (sha256 differs)"
    assert rest == b"", f"unexpected bytes after the trailer: {rest[:40]!r}"
    return Exchange(up_bytes, down_bytes, time.monotonic() - start)


class HalfCloseServer(TcpServer):
    """Sends a banner, half-closes its side at once, then keeps reading until the client's EOF."""

    BANNER = b"server-says-bye\n" * 1000

    def __init__(self) -> None:
        super().__init__()
        self.got: asyncio.Future[bytes] | None = None

    async def start(self) -> TcpServer:
        self.got = asyncio.get_running_loop().create_future()
        return await super().start()

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(self.BANNER)
        await w.drain()
        w.write_eof()
        data = await r.read()
        assert self.got is not None
        if not self.got.done():
            self.got.set_result(data)


class Blackhole(TcpServer):
    """Accepts TCP and never answers (a hung upstream); drains and discards input."""

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while await r.read(CHUNK):
            pass


class MiniSocks5(TcpServer):
    """A minimal but correct SOCKS5 upstream that relays with half-close (write_eof).

    asyncio-socks-server and microsocks tear the whole tunnel down on the first EOF, so the
    half-close tests through an upstream use this one. It serves only loopback targets.
    """

    def __init__(self) -> None:
        super().__init__()
        self.carried: list[tuple[str, int]] = []

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        _, n = await r.readexactly(2)
        await r.readexactly(n)
        w.write(b"\x05\x00")
        _, cmd, _, atyp = await r.readexactly(4)
        if atyp == 3:
            host = (await r.readexactly((await r.readexactly(1))[0])).decode()
        elif atyp == 1:
            host = str(ipaddress.IPv4Address(await r.readexactly(4)))
        else:
            host = str(ipaddress.IPv6Address(await r.readexactly(16)))
        port = struct.unpack("!H", await r.readexactly(2))[0]
        if host not in ("localhost", LOOPBACK, "::1") or cmd != 1:
            w.write(b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00")
            return
        try:
            tr, tw = await asyncio.open_connection(LOOPBACK if host == "localhost" else host, port)
        except OSError:
            w.write(b"\x05\x05\x00\x01\x00\x00\x00\x00\x00\x00")
            return
        self.carried.append((host, port))
        w.write(b"\x05\x00\x00\x01\x7f\x00\x00\x01" + struct.pack("!H", self.port))

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            while data := await src.read(CHUNK):
                dst.write(data)
                await dst.drain()
            if dst.can_write_eof():
                dst.write_eof()

        try:
            await asyncio.gather(pump(r, tw), pump(tr, w))
        finally:
            tw.close()


class GatedSocks5(TcpServer):
    """A SOCKS5 upstream that holds its CONNECT reply until `gate` is set, then echoes.

    Lets a test observe that the proxy answers its client only after the upstream dial ended.
    """

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.request_seen = asyncio.Event()
        self.requested: list[tuple[str, int]] = []

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        _ver, n = await r.readexactly(2)
        await r.readexactly(n)
        w.write(b"\x05\x00")
        head = await r.readexactly(4)
        if head[3] == 3:
            host = (await r.readexactly((await r.readexactly(1))[0])).decode()
        elif head[3] == 1:
            host = str(ipaddress.IPv4Address(await r.readexactly(4)))
        else:
            host = str(ipaddress.IPv6Address(await r.readexactly(16)))
        port = struct.unpack("!H", await r.readexactly(2))[0]
        self.requested.append((host, port))
        self.request_seen.set()
        await self.gate.wait()
        w.write(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x10\x92")
        while data := await r.read(CHUNK):
            w.write(data)
            await w.drain()


@dataclass
class Captured:
    request_line: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}


class CaptureOrigin(TcpServer):
    """A raw HTTP/1.1 origin that records each request exactly as received (keep-alive)."""

    def __init__(self, response: bytes | None = None, *, close_after: bool = False) -> None:
        super().__init__()
        self.close_after = close_after
        self.requests: list[Captured] = []
        self.response = response or (
            b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
        )

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:
            try:
                head = await r.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                return
            lines = head.decode("latin-1").split("\r\n")
            headers = []
            for line in lines[1:]:
                if line:
                    k, _, v = line.partition(":")
                    headers.append((k, v.strip()))
            cap = Captured(lines[0], headers, b"")
            length = cap.header("content-length")
            if length:
                cap.body = await r.readexactly(int(length))
            elif (cap.header("transfer-encoding") or "").lower() == "chunked":
                cap.body = await read_chunked(r)
            self.requests.append(cap)
            w.write(self.response)
            await w.drain()
            if self.close_after:
                return


# -- aiohttp origin ----------------------------------------------------------------------------


class Origin:
    """An aiohttp origin: /echo/*, /bytes/N, /stream/N (chunked), /upload, /status/CODE."""

    def __init__(self, host: str = LOOPBACK) -> None:
        self.host = host
        self.port = 0
        self.runner: web.AppRunner | None = None
        self.hits = 0

    def url(self, path: str, host: str | None = None) -> str:
        h = host or self.host
        if ":" in h:
            h = f"[{h}]"
        return f"http://{h}:{self.port}{path}"

    async def start(self) -> Origin:
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/echo{tail:.*}", self._echo)
        app.router.add_get("/bytes/{n}", self._bytes)
        app.router.add_get("/stream/{n}", self._stream)
        app.router.add_route("*", "/upload", self._upload)
        app.router.add_route("*", "/status/{code}", self._status)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, self.host, 0)
        await site.start()
        self.port = int(self.runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    async def __aenter__(self) -> Origin:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _body_digest(self, request: web.Request) -> tuple[int, str]:
        h = hashlib.sha256()
        n = 0
        async for chunk in request.content.iter_chunked(CHUNK):
            h.update(chunk)
            n += len(chunk)
        return n, h.hexdigest()

    async def _echo(self, request: web.Request) -> web.Response:
        self.hits += 1
        n, digest = await self._body_digest(request)
        body = {
            "method": request.method,
            "path": request.raw_path,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
            "body_len": n,
            "body_sha256": digest,
            "peer_port": request.transport.get_extra_info("peername")[1]
            if request.transport
            else None,
        }
        return web.json_response(body, headers={"X-Origin": "yes"})

    async def _bytes(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.Response(body=payload(int(request.match_info["n"])))

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        n = int(request.match_info["n"])
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        data = payload(n)
        for i in range(0, n, 100_000):
            await resp.write(data[i : i + 100_000])
        await resp.write_eof()
        return resp

    async def _upload(self, request: web.Request) -> web.Response:
        self.hits += 1
        n, digest = await self._body_digest(request)
        return web.json_response(
            {"body_len": n, "body_sha256": digest, "te": request.headers.get("Transfer-Encoding")}
        )

    async def _status(self, request: web.Request) -> web.Response:
        self.hits += 1
        code = int(request.match_info["code"])
        headers = {"ETag": '"v1"'} if code == 304 else {}
        return web.Response(status=code, headers=headers)


# -- raw clients -------------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes = b""
    informational: list[int] = field(default_factory=list)

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k.lower() == name.lower():
                return v
        return None

    def names(self) -> set[str]:
        return {k.lower() for k, _ in self.headers}

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")

    def json(self) -> Any:
        return json.loads(self.body)


async def read_chunked(r: asyncio.StreamReader) -> bytes:
    out = bytearray()
    while True:
        size_line = await r.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0].strip(), 16)
        if size == 0:
            while (await r.readuntil(b"\r\n")) != b"\r\n":
                pass
            return bytes(out)
        out += await r.readexactly(size)
        await r.readexactly(2)


async def read_response(
    r: asyncio.StreamReader, *, method: str = "GET", timeout_s: float = 10.0
) -> Response:
    """Read one HTTP/1.1 response, framing the body like a client would."""

    async def go() -> Response:
        informational = []
        while True:
            head = await r.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            _, status, *reason = lines[0].split(" ", 2)
            headers = []
            for line in lines[1:]:
                if line:
                    k, _, v = line.partition(":")
                    headers.append((k, v.strip()))
            resp = Response(int(status), reason[0] if reason else "", headers)
            if 100 <= resp.status < 200:
                informational.append(resp.status)
                continue
            resp.informational = informational
            break
        if (
            method == "HEAD"
            or resp.status in (204, 304)
            or (method == "CONNECT" and 200 <= resp.status < 300)
        ):
            return resp
        length = resp.header("content-length")
        if length is not None:
            resp.body = await r.readexactly(int(length))
        elif (resp.header("transfer-encoding") or "").lower() == "chunked":
            resp.body = await read_chunked(r)
        else:
            resp.body = await r.read()
        return resp

    return await asyncio.wait_for(go(), timeout_s)


async def http_exchange(
    proxy: RunningProxy, raw: bytes, *, method: str = "GET", timeout_s: float = 10.0
) -> Response:
    """Send raw bytes on a new connection to the proxy, read one response, close."""
    r, w = await proxy.open()
    try:
        w.write(raw)
        await w.drain()
        return await read_response(r, method=method, timeout_s=timeout_s)
    finally:
        w.close()


def connect_head(authority: str, extra: str = "") -> bytes:
    return f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n{extra}\r\n".encode()


async def open_connect_tunnel(
    proxy: RunningProxy, authority: str, extra: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """CONNECT through the proxy and return the tunnel streams (asserting 200)."""
    r, w = await proxy.open()
    w.write(connect_head(authority, extra))
    resp = await read_response(r, method="CONNECT")
    if resp.status != 200:
        w.close()
        raise AssertionError(f"CONNECT {authority}: {resp.status} {resp.text}")
    return r, w


async def assert_closed_without_reply(r: asyncio.StreamReader, timeout_s: float = 5.0) -> None:
    data = await asyncio.wait_for(r.read(), timeout_s)
    assert data == b"", f"expected the proxy to close silently, got {data[:80]!r}"


def socks5_addr(host: str) -> bytes:
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        name = host.encode("idna")
        return b"\x03" + bytes([len(name)]) + name
    return (b"\x01" if ip.version == 4 else b"\x04") + ip.packed


@dataclass
class SocksReply:
    code: int
    host: str
    port: int


async def read_socks5_reply(r: asyncio.StreamReader) -> SocksReply:
    ver, rep, _, atyp = await r.readexactly(4)
    assert ver == 5, f"bad SOCKS5 reply version {ver}"
    if atyp == 1:
        host = str(ipaddress.IPv4Address(await r.readexactly(4)))
    elif atyp == 4:
        host = str(ipaddress.IPv6Address(await r.readexactly(16)))
    elif atyp == 3:
        host = (await r.readexactly((await r.readexactly(1))[0])).decode()
    else:
        raise AssertionError(f"bad ATYP {atyp} in SOCKS5 reply")
    (port,) = struct.unpack("!H", await r.readexactly(2))
    return SocksReply(rep, host, port)


async def socks5_request(
    proxy: RunningProxy,
    host: str,
    port: int,
    *,
    cmd: int = 1,
    auth: tuple[str, str] | None = None,
    then: bytes = b"",
) -> tuple[SocksReply, asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw SOCKS5 handshake; returns the reply and the (still open) streams."""
    r, w = await proxy.open()
    w.write(b"\x05\x01\x02" if auth else b"\x05\x01\x00")
    choice = await asyncio.wait_for(r.readexactly(2), 10)
    if auth:
        assert choice == b"\x05\x02", choice
        u, p = auth[0].encode(), auth[1].encode()
        w.write(b"\x01" + bytes([len(u)]) + u + bytes([len(p)]) + p)
        status = await r.readexactly(2)
        if status[1] != 0:
            return SocksReply(-1, "", 0), r, w
    else:
        assert choice == b"\x05\x00", choice
    w.write(bytes([5, cmd, 0]) + socks5_addr(host) + struct.pack("!H", port) + then)
    reply = await asyncio.wait_for(read_socks5_reply(r), 10)
    return reply, r, w


def socks4_request_bytes(host: str, port: int, user: bytes = b"tester") -> bytes:
    try:
        ip = ipaddress.IPv4Address(host)
        return b"\x04\x01" + struct.pack("!H", port) + ip.packed + user + b"\x00"
    except ValueError:
        return (
            b"\x04\x01"
            + struct.pack("!H", port)
            + b"\x00\x00\x00\x01"
            + user
            + b"\x00"
            + host.encode()
            + b"\x00"
        )


async def socks4_request(
    proxy: RunningProxy, host: str, port: int
) -> tuple[int, asyncio.StreamReader, asyncio.StreamWriter]:
    r, w = await proxy.open()
    w.write(socks4_request_bytes(host, port))
    reply = await asyncio.wait_for(r.readexactly(8), 10)
    assert reply[0] == 0, reply
    return reply[1], r, w


# -- curl --------------------------------------------------------------------------------------


@dataclass
class CurlResult:
    rc: int
    out: bytes
    err: str

    @property
    def text(self) -> str:
        return self.out.decode("utf-8", "replace")


async def curl(*args: str, timeout_s: float = 30.0, stdin: bytes | None = None) -> CurlResult:
    """Run curl with a clean environment; killed if it outlives timeout_s."""
    proc = await asyncio.create_subprocess_exec(
        "curl",
        "-sS",
        "--max-time",
        str(int(timeout_s)),
        *args,
        stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=clean_env(),
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout_s + 5)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return CurlResult(int(proc.returncode or 0), out, err.decode("utf-8", "replace"))


async def ensure(awaitable: Awaitable[Any], timeout_s: float = 10.0) -> Any:
    """Await with a bound, so that a hang fails the test instead of the whole run."""
    return await asyncio.wait_for(awaitable, timeout_s)
