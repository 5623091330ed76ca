"""Start `fwdproxy serve` with a chosen relay implementation (bench only).

Usage: python bench/fwdproxy_serve.py --relay fast|streams [--patch accept] [--no-splice] --
           serve -c CONFIG --loop uvloop|asyncio

`--patch accept` applies the accept-path prototypes of bench/accept_patches.py, `--patch protocol`
the protocol-level accept path of bench/accept_protocol.py.

Sets FWDPROXY_RELAY for a session.py that reads it, and until then swaps the relay function
that fwdproxy.session imported by name, so both states of the tree run the chosen relay.
"""

from __future__ import annotations

import os
import sys


def main() -> int:
    argv = sys.argv[1:]
    relay = "fast"
    patch = ""
    if argv[:1] == ["--relay"]:
        relay, argv = argv[1], argv[2:]
    if argv[:1] == ["--patch"]:
        patch, argv = argv[1], argv[2:]
    if argv[:1] == ["--no-splice"]:
        os.environ["FWDPROXY_SPLICE"] = "0"
        argv = argv[1:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    os.environ["FWDPROXY_RELAY"] = relay
    from fwdproxy import cli, relay_fast, session

    if relay == "fast":
        session.relay = relay_fast.relay  # type: ignore[attr-defined]
    else:
        from fwdproxy import relay as relay_streams

        session.relay = relay_streams.relay  # type: ignore[attr-defined]
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    if patch == "accept":
        import accept_patches

        accept_patches.apply()
    elif patch == "protocol":
        import accept_protocol

        accept_protocol.apply()
    return cli.main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
