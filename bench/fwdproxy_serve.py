"""Start `fwdproxy serve` with a chosen relay implementation (bench only).

Usage: python bench/fwdproxy_serve.py --relay fast|streams -- serve -c CONFIG --loop uvloop

Sets FWDPROXY_RELAY for a session.py that reads it, and until then swaps the relay function
that fwdproxy.session imported by name, so both states of the tree run the chosen relay.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    argv = sys.argv[1:]
    relay = "fast"
    if argv[:1] == ["--relay"]:
        relay, argv = argv[1], argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    os.environ["FWDPROXY_RELAY"] = relay
    from fwdproxy import cli, relay_fast, session

    if relay == "fast":
        session.relay = relay_fast.relay  # type: ignore[attr-defined]
    else:
        from fwdproxy import relay as relay_streams

        session.relay = relay_streams.relay  # type: ignore[attr-defined]
    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
