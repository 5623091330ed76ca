"""systemd's sd_notify datagram protocol, without libsystemd.

With Type=notify systemd waits for READY=1 before it starts units ordered after fwdproxy
(docker, containerd...), so they never pull through a proxy that is not listening yet.
Outside systemd ($NOTIFY_SOCKET unset) every call is a cheap no-op returning False.

Order the server follows: ready() once listening; reloading() on SIGHUP, then ready() when
the new rules are in place; stopping() on SIGTERM before draining.
"""

from __future__ import annotations

import os
import socket
import time

_SEND_TIMEOUT_S = 1.0


def notify(*lines: str) -> bool:
    """Send `lines` as one datagram to $NOTIFY_SOCKET; True if it was sent."""
    addr = os.environ.get("NOTIFY_SOCKET", "")
    if addr.startswith("@"):
        addr = "\0" + addr[1:]  # abstract namespace socket
    elif not addr.startswith("/"):
        return False  # unset, or a transport we do not speak (vsock:)
    payload = "\n".join(line.replace("\n", " ") for line in lines).encode("utf-8")
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.settimeout(_SEND_TIMEOUT_S)
            sock.connect(addr)
            sock.send(payload)
    except OSError:
        return False
    return True


def status(text: str) -> bool:
    """Free-form status shown by `systemctl status fwdproxy`."""
    return notify(f"STATUS={text}")


def ready(status_text: str = "") -> bool:
    """Startup (or a reload) finished: dependent units may start now."""
    return notify("READY=1", *([f"STATUS={status_text}"] if status_text else []))


def reloading() -> bool:
    """A reload began; MONOTONIC_USEC lets systemd match it to `systemctl reload` (v253+)."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def stopping() -> bool:
    """Shutdown began (connections are draining)."""
    return notify("STOPPING=1")
