"""The rule engine (pure): compiled once per config load, first match wins, explains itself.

Rules are compiled into lookup tables instead of being scanned, so a decision costs about the
same with 10 or 100,000 rules: exact names and suffixes are dict lookups per parent name of the
host (a host has few labels), CIDRs are one dict per prefix length, and globs and regexes are
indexed by their literal text (see patterns.py) so that only the few that could match a host
are run. Each table holds, per key, entries in rule order; the lowest rule index whose port
filter accepts the port wins, which is exactly "first match wins" over the original list.

`Router.decide` is total over strings: hosts not in normalised form go through
addr.normalise_host first, and anything that is not a host name or an IP literal raises
AddressError (a ValueError), never anything else.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Final

from fwdproxy.core.addr import MAX_HOST_LEN, AddressError, normalise_host
from fwdproxy.routing.patterns import (
    Item,
    PatternSet,
    compile_glob,
    glob_affixes,
    glob_runs,
    label_key,
    longest,
    regex_affixes,
    regex_runs,
)

ACTIONS: Final = ("direct", "reject", "via")
HOST_KINDS: Final = ("domain", "suffix", "glob", "regex", "cidr", "registries")
_INF: Final = 1 << 62
# A name already in normalise_host's output form whose last label starts with a letter, so it
# can be neither a dotted quad nor an inet_aton spelling (`0x7f.1`): routed without re-checking.
_PLAIN_NAME: Final = re.compile(r"(?:[a-z0-9_*-]+\.)*[a-z][a-z0-9_*-]*")

__all__ = [
    "ACTIONS",
    "HOST_KINDS",
    "AddressError",
    "Decision",
    "Router",
    "RuleSpec",
    "compile_regex",
]


def compile_regex(pattern: str) -> re.Pattern[str]:
    """A rule regex as the router runs it (full match, case-insensitive); raises re.error.

    ASCII mode: hosts are ASCII by the time they are matched (IDNA), and Unicode case folding
    makes compiling a pattern with a class such as `[a-z]` several times slower.
    """
    return re.compile(pattern, re.IGNORECASE | re.ASCII)


@dataclass(frozen=True, slots=True)
class RuleSpec:
    """One rule as written in the config, validated. `ports` is a tuple of inclusive ranges."""

    index: int
    action: str
    upstream: str | None = None
    name: str | None = None
    line: int | None = None
    domain: tuple[str, ...] = ()
    suffix: tuple[str, ...] = ()
    glob: tuple[str, ...] = ()
    regex: tuple[str, ...] = ()
    cidr: tuple[str, ...] = ()
    registries: tuple[str, ...] = ()
    ports: tuple[tuple[int, int], ...] = ()

    @property
    def label(self) -> str:
        """How logs and `route` name this rule."""
        return self.name if self.name else f"rules[{self.index}]"

    @property
    def has_host_matcher(self) -> bool:
        return bool(
            self.domain or self.suffix or self.glob or self.regex or self.cidr or self.registries
        )


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a connection goes, and why."""

    action: str
    upstream: str | None
    rule: str
    line: int | None = None
    matched: str = ""
    registry: str | None = None
    role: str | None = None

    @property
    def route(self) -> str:
        """`direct`, `reject` or the upstream's name: the label used in logs and metrics."""
        return self.upstream if self.action == "via" and self.upstream else self.action

    def describe(self) -> str:
        """One line for `fwdproxy route` and logs."""
        where = f" (line {self.line})" if self.line else ""
        what = f" {self.matched}" if self.matched else ""
        reg = f" [registry {self.registry}/{self.role}]" if self.registry else ""
        target = f"via {self.upstream}" if self.action == "via" else self.action
        return f"{target} <- {self.rule}{where}{what}{reg}"


class _Entry:
    """One matcher of one rule, with the decision it makes prebuilt (no allocation per lookup)."""

    __slots__ = ("decision", "index", "ports")

    def __init__(
        self, rule: RuleSpec, matched: str, registry: str | None = None, role: str | None = None
    ) -> None:
        self.index = rule.index
        self.ports = rule.ports
        self.decision = Decision(
            rule.action, rule.upstream, rule.label, rule.line, matched, registry, role
        )


Table = dict[str, "tuple[_Entry, ...]"]
PatternKey = tuple[str, str]


class _Builder:
    """Collects entries per key; rules are added in index order, so every list stays sorted."""

    def __init__(self, catalog: Mapping[str, Any], compiled: Mapping[str, re.Pattern[str]]):
        self.catalog = catalog
        self.compiled = compiled
        # Tuples from the start: lists converted afterwards would leave 100k freed lists
        # scattered between the live tables. Keys rarely repeat, so `+=` stays cheap.
        self.exact: Table = {}
        self.suffix: Table = {}
        self.subdomain: Table = {}
        self.patterns: dict[PatternKey, list[tuple[Item, str, str, str]]] = {}
        self.cidr: dict[int, dict[int, dict[int, tuple[_Entry, ...]]]] = {4: {}, 6: {}}
        self.any_host: list[_Entry] = []

    def add(self, rule: RuleSpec) -> None:
        for d in rule.domain:
            ip = _ip_value(d)
            if ip is None:
                _put(self.exact, d, _Entry(rule, f"domain {d}"))
            else:  # an address written as a domain: a host route, so any spelling matches
                _put(
                    self.cidr[ip[0]].setdefault(32 if ip[0] == 4 else 128, {}),
                    ip[1],
                    _Entry(rule, f"domain {d}"),
                )
        for s in rule.suffix:
            self.add_suffix(s, _Entry(rule, f"suffix {s}"))
        for g in rule.glob:
            self.add_glob(g, _Entry(rule, f"glob {g}"))
        for r in rule.regex:
            self.add_regex(r, _Entry(rule, f"regex {r}"))
        for c in rule.cidr:
            version, plen, value, text = _network(c)
            _put(self.cidr[version].setdefault(plen, {}), value, _Entry(rule, f"cidr {text}"))
        for name in rule.registries:
            # Catalog order: user registries come first, so they win over built-in ones.
            for reg_name in list(self.catalog) if name == "all" else [name]:
                self.add_registry(rule, reg_name)
        if not rule.has_host_matcher:
            self.any_host.append(_Entry(rule, "any host"))

    def add_suffix(self, s: str, entry: _Entry) -> None:
        if s.startswith("*."):
            s = s[1:]
        if s.startswith("."):
            _put(self.subdomain, s[1:], entry)
        else:
            _put(self.suffix, s, entry)

    def add_glob(self, g: str, entry: _Entry) -> None:
        prefix, suffix = glob_affixes(g)
        self._add_pattern((entry, compile_glob(g)), prefix, suffix, longest(glob_runs(g)))

    def add_regex(self, r: str, entry: _Entry) -> None:
        rx = self.compiled.get(r) or compile_regex(r)
        prefix, suffix = regex_affixes(r)
        self._add_pattern((entry, rx.fullmatch), prefix, suffix, longest(regex_runs(r)))

    def _add_pattern(self, item: Item, prefix: str, suffix: str, inner: str) -> None:
        key = label_key(prefix, suffix)
        self.patterns.setdefault(key, []).append((item, prefix, suffix, inner))

    def add_registry(self, rule: RuleSpec, reg_name: str) -> None:
        reg = self.catalog.get(reg_name)
        if reg is None:
            return
        for h in reg.hosts:
            entry = _Entry(rule, f"{h.kind} {h.pattern}", reg.name, h.role)
            if h.kind == "domain":
                _put(self.exact, h.pattern, entry)
            elif h.kind == "suffix":
                self.add_suffix(h.pattern, entry)
            elif h.kind == "glob":
                self.add_glob(h.pattern, entry)
            elif h.kind == "regex":
                self.add_regex(h.pattern, entry)


def _put(table: dict[Any, tuple[_Entry, ...]], key: Any, entry: _Entry) -> None:
    old = table.get(key)
    table[key] = (entry,) if old is None else (*old, entry)


_OCTET: Final = r"(25[0-5]|2[0-4][0-9]|1[0-9][0-9]|[1-9]?[0-9])"
_DOTTED_QUAD: Final = re.compile(rf"{_OCTET}\.{_OCTET}\.{_OCTET}\.{_OCTET}")


def _network(cidr: str) -> tuple[int, int, int, str]:
    """(version, prefix length, network as an int, canonical text) of a CIDR string."""
    addr, _, bits = cidr.partition("/")
    canonical_bits = bits.isdigit() and (bits == "0" or bits[0] != "0")
    ip = _ip_value(addr) if canonical_bits and ":" not in addr else None
    if ip is not None and int(bits) <= 32 and ip[1] & ((1 << (32 - int(bits))) - 1) == 0:
        return 4, int(bits), ip[1], cidr  # the config's canonical IPv4 form: parsed directly
    net = ipaddress.ip_network(cidr, strict=False)
    return net.version, net.prefixlen, int(net.network_address), str(net)


def _ip_value(host: str) -> tuple[int, int] | None:
    """(4 or 6, the address as an int) for a dotted quad as normalise_host writes it, or for
    any IPv6 literal (by value: its spelling and zone do not matter, a mapped IPv4 address
    is that IPv4 address). Other IPv4 spellings (`0x7f.1`, `010.0.0.1`) need normalise_host.
    """
    if ":" in host:
        try:
            ip = ipaddress.IPv6Address(host)
        except ValueError:
            return None
        mapped = ip.ipv4_mapped
        return (6, int(ip)) if mapped is None else (4, int(mapped))
    m = _DOTTED_QUAD.fullmatch(host)
    if m is None:
        return None
    a, b, c, d = m.groups()
    return 4, (int(a) << 24) | (int(b) << 16) | (int(c) << 8) | int(d)


class Router:
    """Compiled rules; `decide(host, port)` is pure and cached. A reload builds a new Router."""

    def __init__(
        self,
        rules: Iterable[RuleSpec],
        default: Decision,
        catalog: Mapping[str, Any] | None = None,
        cache_size: int = 8192,
        compiled: Mapping[str, re.Pattern[str]] | None = None,
    ) -> None:
        """`compiled`: regexes already compiled by compile_regex (config validation), by text."""
        self.rules: tuple[RuleSpec, ...] = tuple(rules)
        self.default = default
        b = _Builder(dict(catalog or {}), compiled or {})
        for rule in sorted(self.rules, key=lambda r: r.index):
            b.add(rule)
        self._exact, self._suffix, self._subdomain = b.exact, b.suffix, b.subdomain
        sets = {key: PatternSet(items) for key, items in b.patterns.items()}
        self._parent_patterns = {k: ps for (kind, k), ps in sets.items() if kind == "suffix"}
        self._first_label_patterns = {k: ps for (kind, k), ps in sets.items() if kind == "first"}
        self._loose_patterns = sets.get(("", ""))
        self._cidr = {v: sorted(t.items(), reverse=True) for v, t in b.cidr.items()}
        self._any_host = tuple(b.any_host)
        self.decide = lru_cache(maxsize=cache_size)(self.decide_uncached)  # type: ignore[method-assign]

    # -- matching ----------------------------------------------------------------------------
    # The hot path: plain loops and local names, no allocation (entries carry their Decision).

    @staticmethod
    def _first(entries: Iterable[_Entry], port: int, best: _Entry | None) -> _Entry | None:
        limit = best.index if best is not None else _INF
        for e in entries:
            if e.index >= limit:
                break
            if not e.ports or any(lo <= port <= hi for lo, hi in e.ports):
                return e
        return best

    def _match_name(self, host: str, port: int) -> _Entry | None:
        first = self._first
        suffix, subdomain, parents = self._suffix, self._subdomain, self._parent_patterns
        best = None
        lst = self._exact.get(host)
        if lst:
            best = first(lst, port, best)
        lst = suffix.get(host)
        if lst:
            best = first(lst, port, best)
        dot = s_dot = host.find(".")
        s = host
        while s_dot >= 0:  # every parent on a label boundary: a.b.c -> b.c -> c
            s = s[s_dot + 1 :]
            lst = suffix.get(s)
            if lst:
                best = first(lst, port, best)
            if subdomain:
                lst = subdomain.get(s)
                if lst:
                    best = first(lst, port, best)
            if parents:
                ps = parents.get(s)
                if ps is not None:
                    best = ps.first(host, port, best)
            s_dot = s.find(".")
        if dot > 0 and self._first_label_patterns:
            ps = self._first_label_patterns.get(host[:dot])
            if ps is not None:
                best = ps.first(host, port, best)
        if self._loose_patterns is not None:
            best = self._loose_patterns.first(host, port, best)
        return best

    def _match_ip(self, version: int, value: int, port: int) -> _Entry | None:
        best = None
        first, bits = self._first, 32 if version == 4 else 128
        for plen, nets in self._cidr[version]:
            shift = bits - plen
            lst = nets.get((value >> shift) << shift)
            if lst:
                best = first(lst, port, best)
        return best

    def _match(self, host: str, port: int) -> _Entry | None:
        colon = ":" in host
        if colon or host[-1:].isdigit():
            ip = _ip_value(host)
            if ip is not None:
                return self._match_ip(ip[0], ip[1], port)
        if not colon and len(host) <= MAX_HOST_LEN and _PLAIN_NAME.fullmatch(host):
            return self._match_name(host, port)
        host = normalise_host(host)  # AddressError for text that is not a host at all
        ip = _ip_value(host)
        if ip is None:
            return self._match_name(host, port)
        return self._match_ip(ip[0], ip[1], port)

    def decide_uncached(self, host: str, port: int) -> Decision:
        """The decision for host:port; raises AddressError (only) if host is not a host.

        Hosts are expected normalised (addr.normalise_host) and take the fast path; any other
        string is normalised here first, so `Docker.IO.`, `::ffff:10.1.2.3` or `0x7f.1` route
        exactly like `docker.io`, `10.1.2.3` and `127.0.0.1`.
        """
        best = self._match(host, port)
        if self._any_host:
            best = self._first(self._any_host, port, best)
        return self.default if best is None else best.decision

    def decide(self, host: str, port: int) -> Decision:  # replaced by a cached wrapper
        return self.decide_uncached(host, port)
