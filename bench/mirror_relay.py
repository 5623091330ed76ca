"""The far end of the benchmark's tunnel: a TCP relay that adds latency and counts bytes.

    python bench/mirror_relay.py LISTEN_HOST:PORT TARGET_HOST:PORT --delay-ms 20 --stats SOCK

`bench/mirror_bench.py` runs it in the "internet" namespace between the SOCKS5 server and the
registry. Every chunk is held for `--delay-ms` in each direction (a delay line with a bounded
queue, so a slow reader still slows the sender down: no unbounded buffering), which gives each
request/response exchange a round trip of twice that on top of the link's own. Payload bytes
are counted per direction when they are written on: `down` is registry -> client. A connect to
the Unix socket `--stats` returns the counters as one JSON line, so the benchmark can read them
from outside the namespace (the socket is a file).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
from typing import Final

CHUNK: Final = 64 * 1024
QUEUE: Final = 32  # chunks in the delay line of one direction (<= 2 MiB)

counts = {"down": 0, "up": 0, "connections": 0, "open": 0}


async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay_s: float,
               key: str) -> None:
    loop = asyncio.get_running_loop()
    line: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(QUEUE)

    async def read_side() -> None:
        while True:
            try:
                data = await reader.read(CHUNK)
            except OSError:
                data = b""
            await line.put((loop.time() + delay_s, data))
            if not data:
                return

    async def write_side() -> None:
        while True:
            due, data = await line.get()
            wait = due - loop.time()
            if wait > 0:
                await asyncio.sleep(wait)
            if not data:
                with contextlib.suppress(OSError):
                    if writer.can_write_eof():
                        writer.write_eof()
                return
            writer.write(data)
            counts[key] += len(data)
            await writer.drain()

    reading = asyncio.ensure_future(read_side())
    try:
        await write_side()
    finally:
        reading.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await reading


async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter,
                 target: tuple[str, int], delay_s: float) -> None:
    counts["connections"] += 1
    counts["open"] += 1
    server_w: asyncio.StreamWriter | None = None
    try:
        server_r, server_w = await asyncio.open_connection(*target)
        await asyncio.gather(pump(client_r, server_w, delay_s, "up"),
                             pump(server_r, client_w, delay_s, "down"))
    except OSError:
        pass
    finally:
        counts["open"] -= 1
        for w in (client_w, server_w):
            if w is not None:
                w.close()


async def stats(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    w.write((json.dumps(counts) + "\n").encode())
    with contextlib.suppress(OSError):
        await w.drain()
    w.close()


def split(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("listen")
    ap.add_argument("target")
    ap.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay per direction")
    ap.add_argument("--stats", required=True, help="Unix socket answering the counters")
    args = ap.parse_args(argv)
    target = split(args.target)
    delay_s = args.delay_ms / 1000
    host, port = split(args.listen)
    server = await asyncio.start_server(lambda r, w: handle(r, w, target, delay_s), host, port)
    stat_server = await asyncio.start_unix_server(stats, args.stats)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"relay {args.listen} -> {args.target}, +{args.delay_ms:g} ms each way", flush=True)
    async with server, stat_server:
        await stop.wait()
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main(sys.argv[1:])))
