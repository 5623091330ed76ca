"""Start pproxy through its own main(), on a uvloop loop when uvloop is installed.

    python bench/peers/pproxy_uvloop.py -l http+socks5://127.0.0.1:PORT

pproxy's main() calls `uvloop.install()` (when uvloop imports) and then
`asyncio.get_event_loop()`. Since uvloop 0.22 that call raises "There is no current event
loop" (the policy no longer creates a loop on demand), so `python -m pproxy` as shipped does
not start at all once uvloop is installed, and no flag or environment variable avoids it.
This wrapper makes `uvloop.install()` also set a fresh uvloop loop as the current one, which
is what pproxy's author intended; nothing else of pproxy is touched. The loop class actually
in use is printed as "bench: pproxy event loop MODULE.CLASS" so the harness can record it.
"""

from __future__ import annotations

import asyncio
import sys


def main() -> int:
    try:
        import uvloop
    except ImportError:
        asyncio.set_event_loop(asyncio.new_event_loop())
    else:

        def install() -> None:
            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            asyncio.set_event_loop(uvloop.new_event_loop())

        uvloop.install = install  # type: ignore[assignment]

    from pproxy import server

    real_get = asyncio.get_event_loop

    def get_event_loop() -> asyncio.AbstractEventLoop:
        loop = real_get()
        cls = type(loop)
        print(f"bench: pproxy event loop {cls.__module__}.{cls.__qualname__}", flush=True)
        asyncio.get_event_loop = real_get  # report once: the call in main() before serving
        return loop

    asyncio.get_event_loop = get_event_loop
    server.main(sys.argv[1:])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
