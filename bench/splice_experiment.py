"""Experiment: is a splice(2) relay faster than the Protocol relay for bulk transfers?

    python bench/splice_experiment.py            # prints one JSON line per relay kind

A bare TCP forwarder (no proxy handshake) listens on loopback and relays every accepted
connection to the bench origin, either with `fwdproxy.net.relay_fast` with its own splice
switched off (FWDPROXY_SPLICE=0: recv/send through Python bytes) or with `os.splice` socket ->
pipe -> socket (the bytes never enter user space). The forwarder is pinned to CPU 0, the load
generator and origin to CPU 1, as in bench/run.py. Linux only; its result is why relay_fast
hands bulk directions to splice. It measures the fwdproxy of the checkout holding this file and
uses its stream-based relay API (`relay_fast.relay` on `fwdproxy.net.relay.Endpoint`), so it
has to follow (or be retired with) a rewrite of that API.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))

import run as harness  # noqa: E402

PIPE_SIZE = 1 << 20
FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK


class SpliceDirection:
    """src socket -> pipe -> dst socket, driven by add_reader/add_writer."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        src: socket.socket,
        dst: socket.socket,
        done: asyncio.Future[None],
    ) -> None:
        self.loop, self.src, self.dst, self.done = loop, src, dst, done
        self.r, self.w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        fcntl.fcntl(self.w, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        self.in_pipe = 0
        self.eof = False
        loop.add_reader(src.fileno(), self.readable)

    def readable(self) -> None:
        try:
            n = os.splice(self.src.fileno(), self.w, PIPE_SIZE, flags=FLAGS)
        except BlockingIOError:
            return
        except OSError:
            self.finish()
            return
        if n == 0:
            self.eof = True
            self.loop.remove_reader(self.src.fileno())
            if not self.in_pipe:
                self.shut()
            return
        self.in_pipe += n
        self.flush()

    def flush(self) -> None:
        while self.in_pipe:
            try:
                m = os.splice(self.r, self.dst.fileno(), self.in_pipe, flags=FLAGS)
            except BlockingIOError:
                # destination full: stop reading, wait until it can take more
                self.loop.remove_reader(self.src.fileno())
                self.loop.add_writer(self.dst.fileno(), self.writable)
                return
            except OSError as e:
                if e.errno != errno.EAGAIN:
                    self.finish()
                return
            self.in_pipe -= m
        if self.eof:
            self.shut()

    def writable(self) -> None:
        self.loop.remove_writer(self.dst.fileno())
        self.flush()
        if not self.in_pipe and not self.eof:
            self.loop.add_reader(self.src.fileno(), self.readable)

    def shut(self) -> None:
        with contextlib.suppress(OSError):
            self.dst.shutdown(socket.SHUT_WR)
        self.finish()

    def finish(self) -> None:
        self.loop.remove_reader(self.src.fileno())
        self.loop.remove_writer(self.dst.fileno())
        os.close(self.r)
        os.close(self.w)
        if not self.done.done():
            self.done.set_result(None)


async def serve(kind: str, port: int, origin: tuple[str, int]) -> None:
    from fwdproxy.net import relay_fast
    from fwdproxy.net.relay import Endpoint

    async def on_conn(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tr, tw = await asyncio.open_connection(*origin)
        if kind == "protocol":
            await relay_fast.relay(Endpoint(reader, writer), Endpoint(tr, tw), idle_timeout_s=60)
            return
        loop = asyncio.get_running_loop()
        a, b = writer.get_extra_info("socket"), tw.get_extra_info("socket")
        # Take the raw sockets away from the transports: splice works on file descriptors.
        ca, cb = a.dup(), b.dup()
        writer.transport.abort()
        tw.transport.abort()
        if reader._buffer:  # bytes the StreamReader read before the takeover go first
            cb.sendall(bytes(reader._buffer))
        for s in (ca, cb):
            s.setblocking(False)
        d1: asyncio.Future[None] = loop.create_future()
        d2: asyncio.Future[None] = loop.create_future()
        SpliceDirection(loop, ca, cb, d1)
        SpliceDirection(loop, cb, ca, d2)
        await asyncio.wait([d1, d2])
        ca.close()
        cb.close()

    srv = await asyncio.start_server(on_conn, "127.0.0.1", port)
    async with srv:
        await srv.serve_forever()


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--serve":
        kind, port, oport = sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
        sys.path.insert(0, str(harness.REPO))  # this checkout's fwdproxy, not an installed one
        if kind == "protocol":
            os.environ["FWDPROXY_SPLICE"] = "0"  # read when relay_fast is imported
        loop_kind = sys.argv[5] if len(sys.argv) > 5 else "asyncio"
        if loop_kind == "uvloop":
            import uvloop

            uvloop.install()
        asyncio.run(serve(kind, port, ("127.0.0.1", oport)))
        return 0
    loadgen = harness.build_loadgen()
    procs = harness.Procs()
    size = 2 << 30
    try:
        oport = harness.free_port()
        o = procs.start(
            harness.pinned("1", [str(loadgen), "origin", f"127.0.0.1:{oport}"]),
            stdout=subprocess.DEVNULL,
        )
        harness.wait_port(oport, o)
        for kind, loop_kind in (
            ("protocol", "uvloop"),
            ("splice", "uvloop"),
            ("protocol", "asyncio"),
            ("splice", "asyncio"),
        ):
            port = harness.free_port()
            p = procs.start(
                harness.pinned(
                    "0",
                    [sys.executable, __file__, "--serve", kind, str(port), str(oport), loop_kind],
                )
            )
            harness.wait_port(port, p)
            rates, cpu = [], []
            for _ in range(3):
                c0 = harness.cpu_seconds(p.pid)
                t0 = time.monotonic()
                out = subprocess.run(
                    harness.pinned(
                        "1",
                        [
                            str(loadgen),
                            "bulk",
                            "direct",
                            "127.0.0.1:1",
                            f"127.0.0.1:{port}",
                            str(size),
                        ],
                    ),
                    capture_output=True,
                    text=True,
                    check=False,
                    timeout=120,
                )
                r = json.loads(out.stdout)
                rates.append(r["mibps"])
                cpu.append((harness.cpu_seconds(p.pid) - c0) / (size / (1 << 30)))
                del t0
            procs.stop(p)
            print(
                json.dumps(
                    {
                        "relay": kind,
                        "loop": loop_kind,
                        "mibps": harness.summarize(rates),
                        "cpu_s_per_gib": harness.summarize(cpu),
                    }
                ),
                flush=True,
            )
        direct = []
        for _ in range(3):
            out = subprocess.run(
                harness.pinned(
                    "1",
                    [
                        str(loadgen),
                        "bulk",
                        "direct",
                        "127.0.0.1:1",
                        f"127.0.0.1:{oport}",
                        str(size),
                    ],
                ),
                capture_output=True,
                text=True,
                check=False,
                timeout=120,
            )
            direct.append(json.loads(out.stdout)["mibps"])
        print(json.dumps({"relay": "none (direct)", "mibps": harness.summarize(direct)}))
    finally:
        procs.stop_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
