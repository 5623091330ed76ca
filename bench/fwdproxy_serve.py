"""Start `fwdproxy serve` with a chosen relay implementation (bench only).

Usage: python bench/fwdproxy_serve.py --relay fast|streams [--patch accept] [--no-splice] --
           serve -c CONFIG --loop uvloop|asyncio

`--patch accept` applies the accept-path prototypes of bench/accept_patches.py, `--patch protocol`
the protocol-level accept path of bench/accept_protocol.py.

Sets FWDPROXY_RELAY (which session.py reads when it is imported) and also sets the chosen
function on fwdproxy.session directly, so the choice holds whatever state the tree is in.
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
    from fwdproxy.cli import main as cli
    from fwdproxy.net import relay as relay_streams
    from fwdproxy.net import relay_fast
    from fwdproxy.proxy import session

    chosen = relay_fast.relay if relay == "fast" else relay_streams.relay
    if hasattr(session, "RELAY"):
        session.RELAY = chosen  # session.py picks the relay by FWDPROXY_RELAY at import
    else:
        session.relay = chosen  # type: ignore[attr-defined]  # older session.py
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
