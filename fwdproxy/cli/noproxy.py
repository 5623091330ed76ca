"""NO_PROXY: compute a value for a container host, and match it exactly as Go does.

Every runtime fwdproxy generates settings for (dockerd, containerd, CRI-O, podman, k3s, RKE2) is
a Go program that reads NO_PROXY through golang.org/x/net/http/httpproxy. `go_bypasses` is a
faithful port of that matcher, so tests and `fwdproxy doctor` judge a value the way the runtime
will, not the way curl or Python would.

Choices for the generated list (Go rules, registries.md §3.1):
- Cluster suffixes are written `.svc` / `.cluster.local`. In Go a leading dot means "subdomains
  only", which is all anyone addresses (nobody requests the bare `svc`), and it is the one form
  every other implementation also reads as a suffix (Node treats a bare `cluster.local` as one
  exact host).
- CIDRs match IP-literal request hosts only; a name inside the range is proxied. The generators
  say so in a comment next to the value.
- Loopback needs no entry for Go (never proxied), but `localhost,127.0.0.1` stay for curl, wget
  and Python, which share the same environment variables in the `env` target.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

IPAddr = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNet = ipaddress.IPv4Network | ipaddress.IPv6Network

BASE_ENTRIES: Final = ("localhost", "127.0.0.1", "127.0.0.0/8", "::1")
CLUSTER_SUFFIXES: Final = (".svc", ".cluster.local")
METADATA_IP: Final = "169.254.169.254"
_LINK_LOCAL_V6: Final = ipaddress.IPv6Network("fe80::/10")


# --- Go's matcher ---------------------------------------------------------------------------


def go_split_host_port(hostport: str) -> tuple[str, str] | None:
    """net.SplitHostPort: (host, port) or None where Go returns an error."""
    i = hostport.rfind(":")
    if i < 0:
        return None
    j = k = 0
    if hostport.startswith("["):
        end = hostport.find("]")
        if end < 0 or end + 1 != i:
            return None
        host = hostport[1:end]
        j, k = 1, end + 1
    else:
        host = hostport[:i]
        if ":" in host:
            return None
    if "[" in hostport[j:] or "]" in hostport[k:]:
        return None
    return host, hostport[i + 1 :]


def _to4(ip: IPAddr) -> IPAddr:
    """Go keeps IPv4 in 16-byte form: ::ffff:a.b.c.d and a.b.c.d are the same address."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def go_parse_ip(s: str) -> IPAddr | None:
    """net.ParseIP (no zones, no leading zeros), IPv4-mapped addresses folded to IPv4."""
    if "%" in s or not s.isascii():
        return None
    try:
        return _to4(ipaddress.ip_address(s))
    except ValueError:
        return None


def go_parse_host_ip(s: str) -> IPAddr | None:
    """netip.ParseAddr, as useProxy parses the request host: an IPv6 zone is accepted and
    dropped (so `[::1%25.example.com]` is an IP, not a name under example.com)."""
    addr, pct, zone = s.partition("%")
    if pct and (not zone or ":" not in addr):
        return None
    return go_parse_ip(addr)


def go_parse_cidr(s: str) -> IPNet | None:
    """net.ParseCIDR: host bits are masked off; prefix must be plain decimal digits."""
    addr, sep, bits = s.partition("/")
    if not sep or "%" in addr or not (bits.isascii() and bits.isdigit()) or len(bits) > 4:
        return None
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return None
    if int(bits) > ip.max_prefixlen:
        return None
    net = ipaddress.ip_network((ip, int(bits)), strict=False)
    mapped = getattr(net.network_address, "ipv4_mapped", None)
    if mapped is not None:  # only survives masking with prefix >= 96: Go compares the IPv4 part
        return ipaddress.IPv4Network((mapped, net.prefixlen - 96))
    return net


def _idna_ascii(s: str) -> str:
    """idna.Lookup.ToASCII for non-ASCII names; on failure Go keeps the original string."""
    if s.isascii():
        return s
    try:
        import idna  # shipped with aiohttp's yarl; UTS #46 like Go's Lookup profile

        return ".".join(
            lab if lab.isascii() else idna.encode(lab, uts46=True).decode("ascii")
            for lab in s.split(".")
        )
    except ImportError:
        try:
            return ".".join(
                lab if lab.isascii() else lab.encode("idna").decode() for lab in s.split(".")
            )
        except UnicodeError:
            return s
    except (UnicodeError, ValueError):
        return s


@dataclass(frozen=True, slots=True)
class GoEntry:
    """One parsed NO_PROXY element: kind is "all", "cidr", "ip" or "domain"."""

    kind: str
    text: str
    port: str = ""
    net: IPNet | None = None
    ip: IPAddr | None = None
    suffix: str = ""  # domain: always starts with "."
    match_apex: bool = False  # domain written without a leading dot

    def matches(self, host: str, port: str, ip: IPAddr | None) -> bool:
        if self.kind == "all":
            return True
        if self.kind == "cidr":
            return (
                ip is not None
                and self.net is not None
                and ip.version == self.net.version
                and ip in self.net
            )
        if self.kind == "ip":
            return ip is not None and ip == self.ip and self.port in ("", port)
        if ip is not None:  # x/net >= 0.36 (CVE-2025-22870): names never match IP hosts
            return False
        hit = host.endswith(self.suffix) or (self.match_apex and host == self.suffix[1:])
        return hit and self.port in ("", port)


def parse_go_no_proxy(no_proxy: str) -> list[GoEntry]:
    """httpproxy config.init(): the elements Go keeps, in order; `*` anywhere wins outright."""
    out: list[GoEntry] = []
    for raw in no_proxy.split(","):
        p = raw.strip().lower()
        if not p:
            continue
        if p == "*":
            return [GoEntry("all", p)]
        net = go_parse_cidr(p)
        if net is not None:
            out.append(GoEntry("cidr", p, net=net))
            continue
        hp = go_split_host_port(p)
        phost, pport = hp if hp is not None else (p, "")
        if hp is not None and not phost:
            continue  # ":80" - malformed, Go ignores it
        ip = go_parse_ip(phost)
        if ip is not None:
            out.append(GoEntry("ip", p, port=pport, ip=ip))
            continue
        if not phost:
            continue
        if phost.startswith("*."):
            phost = phost[1:]
        apex = not phost.startswith(".")
        suffix = _idna_ascii("." + phost if apex else phost)
        out.append(GoEntry("domain", p, port=pport, suffix=suffix, match_apex=apex))
    return out


def go_bypasses(no_proxy: str, url_host: str, port: int | str) -> bool:
    """True if a Go client with this NO_PROXY connects to url_host:port without the proxy.

    Port of golang.org/x/net/http/httpproxy useProxy() as of x/net v0.36 (Go 1.23.7/1.24.1,
    the CVE-2025-22870 fix). url_host is URL.Hostname() (IPv6 brackets optional). Faithful
    quirks: `localhost` is compared before lower-casing; name entries never match an IP host;
    a trailing dot is NOT normalised (golang/go#79944), so `example.com.` is proxied even with
    NO_PROXY=example.com.
    """
    host = url_host[1:-1] if url_host.startswith("[") and url_host.endswith("]") else url_host
    host = _idna_ascii(host)
    hostport = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    hp = go_split_host_port(hostport)
    if hp is None:
        return True  # useProxy() returns false on a split error
    host, sport = hp
    if host == "localhost":
        return True
    ip = go_parse_host_ip(host)
    if ip is not None and ip.is_loopback:
        return True
    addr = host.strip().lower()
    entries = parse_go_no_proxy(no_proxy)
    if ip is not None and any(
        e.kind in ("all", "cidr", "ip") and e.matches(addr, sport, ip) for e in entries
    ):
        return True
    return any(e.kind in ("all", "domain") and e.matches(addr, sport, ip) for e in entries)


# --- node address detection ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class NodeAddress:
    ifname: str
    ip: IPAddr
    network: IPNet


def parse_ip_json(text: str) -> list[NodeAddress]:
    """Addresses from `ip -j addr show` output, minus loopback and IPv6 link-local.

    Link-local fe80::/10 needs a zone to be usable, and Go's NO_PROXY cannot express zones.
    """
    out: list[NodeAddress] = []
    for link in json.loads(text or "[]"):
        if "LOOPBACK" in link.get("flags", ()):
            continue
        for a in link.get("addr_info", ()):
            if a.get("family") not in ("inet", "inet6") or a.get("scope") == "host":
                continue
            try:
                iface = ipaddress.ip_interface(f"{a['local']}/{a['prefixlen']}")
            except (KeyError, ValueError):
                continue
            if iface.ip.is_loopback or (iface.version == 6 and iface.ip in _LINK_LOCAL_V6):
                continue
            out.append(NodeAddress(link.get("ifname", "?"), iface.ip, iface.network))
    return out


def detect_node_addresses() -> tuple[list[NodeAddress], str | None]:
    """Run `ip -j addr show`; (addresses, None) or ([], reason) when detection is impossible."""
    import subprocess

    try:
        res = subprocess.run(
            ["ip", "-j", "addr", "show"], capture_output=True, text=True, timeout=10, check=True
        )
        return parse_ip_json(res.stdout), None
    except (OSError, subprocess.SubprocessError, ValueError) as e:
        return [], f"cannot detect node addresses with `ip -j addr` (Debian package iproute2): {e}"


def node_entries(addrs: Iterable[NodeAddress]) -> list[str]:
    """Each node IP, then its subnet (the IP is kept for clients without CIDR support)."""
    out: list[str] = []
    for a in addrs:
        out.append(str(a.ip))
        if a.network.prefixlen < a.network.max_prefixlen:
            out.append(str(a.network))
    return out


# --- building a value ------------------------------------------------------------------------


class NoProxyError(ValueError):
    """A user-supplied NO_PROXY element or CIDR that cannot be used."""


def normalise_cidr(text: str) -> str:
    """Canonical CIDR text; host bits are dropped (10.42.0.1/16 -> 10.42.0.0/16)."""
    try:
        return str(ipaddress.ip_network(text.strip(), strict=False))
    except ValueError:
        raise NoProxyError(f"not a CIDR: {text!r} (expected e.g. 10.42.0.0/16)") from None


def normalise_entry(text: str) -> tuple[str, str | None]:
    """One --no-proxy-extra element in portable form, plus a note when it was rewritten."""
    e = text.strip()
    if not e or e == "*":
        raise NoProxyError("'*' would send nothing through fwdproxy" if e else "empty entry")
    if any(c.isspace() for c in e) or "://" in e:
        raise NoProxyError(f"{text!r} is not a host name, IP, CIDR or host:port")
    if "/" in e:
        return normalise_cidr(e), None
    if e.startswith("*."):
        note = f"{e!r} written as {e[1:]!r}: same for Go, and curl ignores '*.'"
        return e[1:].lower(), note
    if "*" in e:
        raise NoProxyError(f"{text!r}: NO_PROXY has no wildcards but a lone '*' or '*.' prefix")
    ip = go_parse_ip(e.strip("[]"))
    return (str(ip) if ip is not None else e.lower()), None


def build_no_proxy(
    *,
    node: Sequence[str] = (),
    cluster_cidrs: Sequence[str] = (),
    service_cidrs: Sequence[str] = (),
    extra: Sequence[str] = (),
) -> tuple[list[str], list[str]]:
    """The entry list (deduplicated, stable order) and notes about rewritten extras.

    `extra` items may themselves be comma lists. Raises NoProxyError on unusable input.
    """
    entries: list[str] = [*BASE_ENTRIES, *node]
    entries += [normalise_cidr(c) for c in (*cluster_cidrs, *service_cidrs)]
    entries += [*CLUSTER_SUFFIXES, METADATA_IP]
    notes: list[str] = []
    for item in extra:
        for part in item.split(","):
            if part.strip():
                value, note = normalise_entry(part)
                entries.append(value)
                if note:
                    notes.append(note)
    return list(dict.fromkeys(entries)), notes


def cidr_entries(entries: Iterable[str]) -> list[str]:
    """The entries Go applies to IP-literal hosts only."""
    return [e for e in entries if go_parse_cidr(e) is not None]


# --- lint (used by doctor) -------------------------------------------------------------------

_IP_WILDCARD: Final = re.compile(r"^[0-9.*]+$")
PROBLEM: Final = "problem"
WARNING: Final = "warning"


def lint_no_proxy(value: str) -> list[tuple[str, str]]:
    """(level, message) pairs for a NO_PROXY as a Go consumer reads it; level is problem|warning."""
    out: list[tuple[str, str]] = []
    parts = value.split(",")
    if any(p != p.strip() for p in parts):
        out.append((WARNING, "blanks around entries: Go trims them, curl stops at the first blank"))
    for raw in parts:
        found = _lint_entry(raw.strip()) if raw.strip() else None
        if found:
            out.append(found)
    return out


def _lint_entry(e: str) -> tuple[str, str] | None:
    low = e.lower()
    if low == "*":
        return PROBLEM, "'*': nothing at all goes through fwdproxy"
    if any(c.isspace() for c in e) or "://" in e:
        return PROBLEM, f"{e!r} is not a host name, IP or CIDR, so it never matches"
    if low.startswith("*."):
        return PROBLEM, (
            f"{e!r}: Go reads it as {e[1:]!r} (subdomains only: {e[2:]!r} itself is proxied) "
            f"and curl/wget/Python ignore it; write {e[2:]!r} for the domain and its subdomains"
        )
    if "*" in e:
        what = "an IP wildcard" if _IP_WILDCARD.match(low) else "a wildcard"
        return PROBLEM, f"{e!r} is {what}; Go has none and never matches it (use a CIDR or suffix)"
    if "-" in low and all(go_parse_ip(x) for x in low.split("-", 1)):
        return PROBLEM, f"{e!r} is an address range; Go never matches it (use a CIDR)"
    if "/" in e:
        net = go_parse_cidr(low)
        if net is None:
            return PROBLEM, f"{e!r} is not a valid CIDR; Go reads it as a name that never matches"
        iface = ipaddress.ip_interface(low)
        if iface.ip != iface.network.network_address:
            return WARNING, f"{e!r} has host bits set; Go uses {net}"
        return None
    if low.startswith("[") and low.endswith("]"):
        return (
            PROBLEM,
            f"{e!r}: Go never matches a bracketed IPv6 without a port; write {e[1:-1]!r}",
        )
    hp = go_split_host_port(low)
    if hp is not None and hp[1] and not hp[1].isdigit():
        return PROBLEM, f"{e!r}: port {hp[1]!r} is not a number, so it never matches"
    if low.endswith("."):
        return WARNING, f"{e!r}: with the trailing dot Go only matches hosts written with one"
    return None
