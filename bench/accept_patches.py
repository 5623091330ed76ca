"""Prototype accept-path changes, applied by monkeypatching (bench only, `--patch accept`).

They measure what the proposed edits to session.py / dial.py / addr.py would buy before
anyone edits those files. Each patch mirrors one proposed change:

1. Parse deny-list networks once, not per connection (`_check_target` called
   `ipaddress.ip_network()` for every entry on every tunnel): cached parse here.
2. Memoise `ip_of` / `is_loopback` on host strings (the same few client and target strings
   are parsed several times per tunnel).
3. Handshake and dial timeouts with one `call_later` timer instead of `asyncio.wait_for`,
   which on Python < 3.12 wraps the awaitable in a new Task per read.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import types
from typing import Any, TypeVar

T = TypeVar("T")


async def timer_wait_for(aw: Any, timeout: float | None) -> Any:
    """`asyncio.wait_for` without the extra Task: cancel ourselves when a timer fires."""
    if timeout is None:
        return await aw
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    fired = False

    def fire() -> None:
        nonlocal fired
        fired = True
        task.cancel()

    handle = loop.call_later(max(timeout, 0.0), fire)
    try:
        return await aw
    except asyncio.CancelledError:
        if fired:
            raise asyncio.TimeoutError from None
        raise
    finally:
        handle.cancel()


def _shim(module: types.ModuleType, **overrides: Any) -> types.ModuleType:
    shim = types.ModuleType(module.__name__ + "_shim")
    shim.__dict__.update(module.__dict__)
    shim.__dict__.update(overrides)
    return shim


def apply() -> None:
    from fwdproxy import rules, server
    from fwdproxy.core import addr
    from fwdproxy.net import dial
    from fwdproxy.proxy import session

    ip_of = functools.lru_cache(maxsize=4096)(addr.ip_of)
    is_loopback = functools.lru_cache(maxsize=4096)(addr.is_loopback)
    for mod in (session, server, rules):
        if hasattr(mod, "ip_of"):
            mod.ip_of = ip_of  # type: ignore[attr-defined]
        if hasattr(mod, "is_loopback"):
            mod.is_loopback = is_loopback  # type: ignore[attr-defined]
    session.ipaddress = _shim(  # type: ignore[attr-defined]
        ipaddress, ip_network=functools.lru_cache(maxsize=256)(ipaddress.ip_network)
    )
    session.asyncio = _shim(asyncio, wait_for=timer_wait_for)  # type: ignore[attr-defined]
    dial.asyncio = _shim(asyncio, wait_for=timer_wait_for)  # type: ignore[attr-defined]
