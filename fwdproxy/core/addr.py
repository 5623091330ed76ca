"""Host and host:port parsing and normalisation (pure).

Every name is normalised once, at the edge, so that the rule engine can compare strings:
lower case, no trailing dot, IDNA (punycode) for non-ASCII names, IPv6 without brackets.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from typing import Final

_LABEL_OK: Final = re.compile(r"^[a-z0-9_*](?:[a-z0-9_\-*]{0,61}[a-z0-9_*])?$")
MAX_HOST_LEN: Final = 253


class AddressError(ValueError):
    """A host or host:port that cannot be used as a target."""


_IPV4_CHARS: Final = frozenset("0123456789.")


@functools.lru_cache(maxsize=4096)
def ip_of(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """The IP address if `host` is an IP literal (already unbracketed), else None.

    On the hot path, several times per connection (admission, loops, dial): names are told
    apart by their characters first, since letting `ipaddress` raise for each name costs
    microseconds, and answers are cached (the same few hosts come back all day; the cache is
    bounded, so hostile names only evict each other).
    """
    if not host:
        return None
    if ":" in host:
        try:
            return ipaddress.IPv6Address(host)
        except ValueError:
            return None
    if not host[-1].isdigit() or not _IPV4_CHARS.issuperset(host):
        return None
    try:
        return ipaddress.IPv4Address(host)
    except ValueError:
        return None


@functools.lru_cache(maxsize=4096)
def normalise_host(host: str) -> str:
    """Lower-case, strip one trailing dot and IPv6 brackets, IDNA-encode; raise AddressError."""
    h = host.strip()
    if h.startswith("[") and h.endswith("]"):
        h = h[1:-1]
    if not h:
        raise AddressError("empty host name")
    if ":" in h:
        try:
            v6 = ipaddress.IPv6Address(h.split("%", 1)[0])
        except ValueError:
            raise AddressError(f"invalid IPv6 address {host!r}") from None
        # ::ffff:a.b.c.d connects over IPv4: rules and the deny-list must see the IPv4 form.
        return str(v6.ipv4_mapped) if v6.ipv4_mapped is not None else str(v6)
    if h.endswith("."):
        h = h[:-1]
    h = h.lower()
    if not h.isascii():
        try:
            h = h.encode("idna").decode("ascii")
        except UnicodeError:
            raise AddressError(f"host name {host!r} is not valid IDNA") from None
    if len(h) > MAX_HOST_LEN:
        raise AddressError(f"host name longer than {MAX_HOST_LEN} characters")
    ip = ip_of(h)
    if ip is not None:
        return str(ip)
    legacy = _inet_aton(h)
    if legacy is not None:
        return legacy
    labels = h.split(".")
    if _NUMBER.match(labels[-1]):
        # A name whose last label is a number is an IPv4 address to every URL parser and
        # resolver (WHATWG URL "ends in a number"); one that is not a valid address
        # (`1.2.3.4.5`, `1.2.3.256`) is neither an address nor a name.
        raise AddressError(f"invalid host {host!r}: looks like an IPv4 address but is not one")
    for label in labels:
        if not _LABEL_OK.match(label):
            raise AddressError(f"invalid host name {host!r}")
    return h


_NUMBER: Final = re.compile(r"^(?:0x[0-9a-f]*|[0-9]+)$")


def _inet_aton(h: str) -> str | None:
    """Canonical dotted IPv4 for inet_aton spellings (`2130706433`, `127.1`, `0x7f.0.0.1`).

    The resolver accepts these forms, so they must be recognised as addresses here; otherwise
    a name like `2852039166` would slip past CIDR rules and the deny-list as a "host name".
    """
    parts = h.split(".")
    if not 1 <= len(parts) <= 4 or not all(_NUMBER.match(p) for p in parts):
        return None
    nums = []
    for p in parts:
        if p.startswith("0x"):
            nums.append(int(p[2:] or "0", 16))
        elif len(p) > 1 and p.startswith("0"):
            if any(c in "89" for c in p):
                raise AddressError(f"invalid octal number in address {h!r}")
            nums.append(int(p, 8))
        else:
            nums.append(int(p))
    *head, last = nums
    if any(n > 255 for n in head) or last >= 256 ** (4 - len(head)):
        raise AddressError(f"invalid IPv4 address {h!r}")
    value = last
    for i, n in enumerate(head):
        value |= n << (8 * (3 - i))
    return str(ipaddress.IPv4Address(value))


def parse_port(text: str, allow_zero: bool = False) -> int:
    """A TCP port 1..65535 from text (0 too for listeners: "any free port")."""
    if not (text.isascii() and text.isdigit()) or len(text) > 5:
        raise AddressError(f"invalid port {text!r}")
    port = int(text)
    if port == 0 and allow_zero:
        return 0
    if not 0 < port < 65536:
        raise AddressError(f"port {port} out of range 1-65535")
    return port


def split_host_port(
    authority: str, default_port: int | None = None, *, allow_zero: bool = False
) -> tuple[str, int]:
    """Split `host:port`, `[v6]:port` or (with a default) a bare host; normalise the host."""
    a = authority.strip()
    if a.startswith("["):
        end = a.find("]")
        if end < 0:
            raise AddressError(f"unterminated IPv6 literal in {authority!r}")
        host, rest = a[1:end], a[end + 1 :]
        if rest.startswith(":"):
            return normalise_host(host), parse_port(rest[1:], allow_zero)
        if rest:
            raise AddressError(f"garbage after IPv6 literal in {authority!r}")
        if default_port is None:
            raise AddressError(f"missing port in {authority!r}")
        return normalise_host(host), default_port
    if a.count(":") == 1:
        host, port = a.rsplit(":", 1)
        return normalise_host(host), parse_port(port, allow_zero)
    if a.count(":") > 1:
        # A bare IPv6 literal without brackets: only valid with a default port.
        if default_port is None:
            raise AddressError(f"IPv6 literal {authority!r} needs [brackets]:port")
        return normalise_host(a), default_port
    if default_port is None:
        raise AddressError(f"missing port in {authority!r}")
    return normalise_host(a), default_port


def format_host_port(host: str, port: int) -> str:
    """`host:port`, with IPv6 literals bracketed."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def is_loopback(host: str) -> bool:
    """True for loopback literals and the name `localhost` (and its subdomains, RFC 6761)."""
    ip = ip_of(host)
    if ip is not None:
        return ip.is_loopback or (
            isinstance(ip, ipaddress.IPv6Address)
            and ip.ipv4_mapped is not None
            and ip.ipv4_mapped.is_loopback
        )
    return host == "localhost" or host.endswith(".localhost")
