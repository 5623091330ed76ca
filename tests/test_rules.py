"""rules: the compiled Router against a naive first-match reference (pure, no I/O)."""

from __future__ import annotations

import fnmatch
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwdproxy.core.addr import AddressError, ip_of, normalise_host
from fwdproxy.routing.rules import Decision, Router, RuleSpec

DEFAULT = Decision("direct", None, "default")


def rule(i: int, action: str = "via", **kw: Any) -> RuleSpec:
    upstream = kw.pop("upstream", "tunnel" if action == "via" else None)
    return RuleSpec(index=i, action=action, upstream=upstream, **kw)


def router(*rules: RuleSpec, default: Decision = DEFAULT, catalog: Any = None) -> Router:
    return Router(rules, default, catalog)


def route_of(r: Router, host: str, port: int = 443) -> str:
    """`rules[i]` / rule name of the decision, or `default`."""
    return r.decide(host, port).rule


# -- the reference: a plain linear scan over the rules as written ------------------------------


def ref_matches(spec: RuleSpec, host: str, port: int) -> bool:
    if spec.ports and not any(lo <= port <= hi for lo, hi in spec.ports):
        return False
    if not spec.has_host_matcher:
        return True
    if host in spec.domain:
        return True
    ip = ip_of(host)
    if ip is not None:
        return any(
            ip.version == n.version and ip in n for n in map(ipaddress.ip_network, spec.cidr)
        )
    for s in spec.suffix:
        if s.startswith("*."):
            s = s[1:]
        if s.startswith("."):
            if host.endswith(s):
                return True
        elif host == s or host.endswith("." + s):
            return True
    if any(re.fullmatch(fnmatch.translate(g), host, re.I) for g in spec.glob):
        return True
    return any(re.fullmatch(rx, host, re.I) for rx in spec.regex)


def ref_decide(rules: Sequence[RuleSpec], host: str, port: int) -> tuple[str, str, str | None]:
    for spec in rules:
        if ref_matches(spec, host, port):
            return spec.label, spec.action, spec.upstream
    return "default", DEFAULT.action, DEFAULT.upstream


def decided(r: Router, host: str, port: int) -> tuple[str, str, str | None]:
    d = r.decide_uncached(host, port)
    return d.rule, d.action, d.upstream


# -- suffix / domain -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "host, matches",
    [
        ("docker.io", True),
        ("x.docker.io", True),
        ("registry-1.docker.io", True),
        ("a.b.c.docker.io", True),
        ("evildocker.io", False),
        ("docker.io.evil.com", False),
        ("ocker.io", False),
        ("io", False),
        ("xdocker.io", False),
    ],
)
def test_suffix_respects_label_boundaries(host: str, matches: bool) -> None:
    r = router(rule(0, suffix=("docker.io",)))
    assert (route_of(r, host) == "rules[0]") is matches


@pytest.mark.parametrize("pattern", [".example.com", "*.example.com"])
@pytest.mark.parametrize(
    "host, matches",
    [
        ("example.com", False),
        ("a.example.com", True),
        ("a.b.example.com", True),
        ("badexample.com", False),
    ],
)
def test_leading_dot_suffix_matches_subdomains_only(pattern: str, host: str, matches: bool) -> None:
    r = router(rule(0, suffix=(pattern,)))
    assert (route_of(r, host) == "rules[0]") is matches


def test_domain_is_exact() -> None:
    r = router(rule(0, domain=("ghcr.io",)))
    assert route_of(r, "ghcr.io") == "rules[0]"
    assert route_of(r, "pkg.ghcr.io") == "default"
    assert route_of(r, "ghcr.io.evil") == "default"


# -- glob / regex --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "pattern, host, matches",
    [
        (
            "prod-*.s3.dualstack.*.amazonaws.com",
            "prod-registry-k8s-io-us-east-1.s3.dualstack.us-east-1.amazonaws.com",
            True,
        ),
        ("prod-*.s3.dualstack.*.amazonaws.com", "prod-x.s3.us-east-1.amazonaws.com", False),
        ("*.docker.com", "production.cloudflare.docker.com", True),
        ("*.docker.com", "docker.com", False),
        ("registry-?.docker.io", "registry-1.docker.io", True),
        ("registry-?.docker.io", "registry-12.docker.io", False),
        ("registry-[0-9].example.com", "registry-7.example.com", True),
        ("registry-[0-9].example.com", "registry-x.example.com", False),
        ("*", "anything.at.all", True),
        ("reg*", "registry.example.com", True),
        ("reg*", "xregistry", False),
        ("docker.io", "docker.io", True),
        ("docker.io", "x.docker.io", False),
        ("*cdn*", "edgecdn7.quay.io", True),
    ],
)
def test_glob(pattern: str, host: str, matches: bool) -> None:
    r = router(rule(0, glob=(pattern,)))
    assert (route_of(r, host) == "rules[0]") is matches


@pytest.mark.parametrize(
    "pattern, host, matches",
    [
        (r"cdn\d+\.quay\.io", "cdn01.quay.io", True),
        (r"cdn\d+\.quay\.io", "CDN01.QUAY.IO", True),
        (r"cdn\d+\.quay\.io", "xcdn01.quay.io", False),
        (r"cdn\d+\.quay\.io", "cdn01.quay.io.evil", False),
        (r".*\.gcr\.io", "eu.gcr.io", True),
        (r"(a|b)\.example", "b.example", True),
    ],
)
def test_regex_is_a_full_match(pattern: str, host: str, matches: bool) -> None:
    r = router(rule(0, regex=(pattern,)))
    assert (route_of(r, host) == "rules[0]") is matches


# -- CIDR ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "cidr, host, matches",
    [
        ("10.0.0.0/8", "10.1.2.3", True),
        ("10.0.0.0/8", "11.0.0.1", False),
        ("192.168.1.0/24", "192.168.1.255", True),
        ("192.168.1.0/24", "192.168.2.0", False),
        ("1.2.3.4/32", "1.2.3.4", True),
        ("1.2.3.4/32", "1.2.3.5", False),
        ("0.0.0.0/0", "8.8.8.8", True),
        ("0.0.0.0/0", "::1", False),
        ("fd00::/8", "fd12:3456::1", True),
        ("fd00::/8", "fe80::1", False),
        ("::1/128", "::1", True),
        ("::/0", "2001:db8::1", True),
        ("::/0", "10.0.0.1", False),
        ("10.0.0.0/8", "ten.example", False),
    ],
)
def test_cidr(cidr: str, host: str, matches: bool) -> None:
    r = router(rule(0, cidr=(cidr,)))
    assert (route_of(r, host) == "rules[0]") is matches


def test_ip_literals_do_not_match_name_matchers() -> None:
    r = router(rule(0, suffix=("3.4",)), rule(1, glob=("1.2.*",)), rule(2, regex=(r"1\..*",)))
    assert route_of(r, "1.2.3.4") == "default"


def test_first_cidr_rule_wins_even_if_less_specific() -> None:
    r = router(
        rule(0, action="direct", cidr=("10.0.0.0/8",)),
        rule(1, action="reject", cidr=("10.1.0.0/16",)),
    )
    assert route_of(r, "10.1.2.3") == "rules[0]"
    r = router(
        rule(0, action="reject", cidr=("10.1.0.0/16",)),
        rule(1, action="direct", cidr=("10.0.0.0/8",)),
    )
    assert route_of(r, "10.1.2.3") == "rules[0]"
    assert route_of(r, "10.2.0.1") == "rules[1]"


# -- ports ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "port, matches",
    [
        (443, True),
        (8000, True),
        (8050, True),
        (8100, True),
        (80, False),
        (7999, False),
        (8101, False),
    ],
)
def test_port_ranges_restrict_host_matchers(port: int, matches: bool) -> None:
    r = router(rule(0, suffix=("example.com",), ports=((443, 443), (8000, 8100))))
    assert (route_of(r, "a.example.com", port) == "rules[0]") is matches
    assert route_of(r, "other.org", port) == "default"


def test_port_only_rule_matches_any_host() -> None:
    r = router(rule(0, action="reject", ports=((25, 25),)), rule(1, suffix=("example.com",)))
    assert route_of(r, "mail.example.com", 25) == "rules[0]"
    assert route_of(r, "10.0.0.1", 25) == "rules[0]"
    assert route_of(r, "mail.example.com", 587) == "rules[1]"


def test_a_port_miss_falls_through_to_a_later_rule_for_the_same_host() -> None:
    r = router(
        rule(0, action="direct", domain=("x.io",), ports=((80, 80),)),
        rule(1, action="reject", suffix=("x.io",)),
    )
    assert route_of(r, "x.io", 80) == "rules[0]"
    assert route_of(r, "x.io", 443) == "rules[1]"


# -- order across kinds, default, decisions ------------------------------------------------

HOST = "cdn7.registry.example.com"
KINDS: dict[str, dict[str, tuple[str, ...]]] = {
    "domain": {"domain": (HOST,)},
    "suffix": {"suffix": ("example.com",)},
    "subdomain": {"suffix": (".registry.example.com",)},
    "glob": {"glob": ("cdn*.registry.*.com",)},
    "loose-glob": {"glob": ("*7*",)},
    "regex": {"regex": (r"cdn\d\..*",)},
    "port-only": {},
}


@given(st.permutations(list(KINDS)))
def test_first_match_wins_across_matcher_kinds(order: list[str]) -> None:
    rules = []
    for i, kind in enumerate(order):
        kw = dict(KINDS[kind])
        ports = ((443, 443),) if kind == "port-only" else ()
        rules.append(rule(i, action="direct", name=kind, ports=ports, **kw))
    r = router(*rules)
    assert r.decide(HOST, 443).rule == order[0]
    # On another port the port-only rule drops out and the next one wins.
    expected = next(k for k in order if k != "port-only")
    assert r.decide(HOST, 80).rule == expected


def test_default_decision_when_nothing_matches() -> None:
    default = Decision("via", "tunnel", "default", 42)
    r = router(rule(0, suffix=("a.io",)), default=default)
    assert r.decide("b.io", 443) is default
    assert r.decide("b.io", 443).route == "tunnel"


def test_decision_fields_and_describe() -> None:
    r = router(rule(0, action="via", upstream="up", name="regs", line=12, suffix=("quay.io",)))
    d = r.decide("cdn.quay.io", 443)
    assert (d.action, d.upstream, d.rule, d.line, d.matched) == (
        "via",
        "up",
        "regs",
        12,
        "suffix quay.io",
    )
    assert d.route == "up"
    assert d.describe() == "via up <- regs (line 12) suffix quay.io"
    r = router(*(rule(i, action="reject", domain=(f"{i}.x.io",)) for i in range(4)))
    reject = r.decide("3.x.io", 1)
    assert reject.route == "reject" and reject.rule == "rules[3]"


def test_decide_is_cached_but_equal_to_uncached() -> None:
    r = router(rule(0, suffix=("a.io",)))
    assert r.decide("x.a.io", 443) is r.decide("x.a.io", 443)
    assert r.decide("x.a.io", 443) == r.decide_uncached("x.a.io", 443)


# -- registries ----------------------------------------------------------------------------


@dataclass(frozen=True)
class FakeHost:
    kind: str
    pattern: str
    role: str


@dataclass(frozen=True)
class FakeRegistry:
    name: str
    hosts: tuple[FakeHost, ...]


CATALOG = {
    "hub": FakeRegistry(
        "hub",
        (
            FakeHost("domain", "registry-1.docker.io", "api"),
            FakeHost("domain", "auth.docker.io", "token"),
            FakeHost("suffix", "docker.com", "blob"),
        ),
    ),
    "quay": FakeRegistry(
        "quay",
        (
            FakeHost("domain", "quay.io", "api"),
            FakeHost("regex", r"cdn\d*\.quay\.io", "blob"),
            FakeHost("glob", "quay-*.s3.amazonaws.com", "blob"),
        ),
    ),
}


@pytest.mark.parametrize(
    "host, registry, role",
    [
        ("registry-1.docker.io", "hub", "api"),
        ("auth.docker.io", "hub", "token"),
        ("production.cloudflare.docker.com", "hub", "blob"),
        ("quay.io", "quay", "api"),
        ("cdn02.quay.io", "quay", "blob"),
        ("quay-registry.s3.amazonaws.com", "quay", "blob"),
    ],
)
def test_registries_all_decisions_carry_registry_and_role(
    host: str, registry: str, role: str
) -> None:
    r = router(rule(0, name="registries", registries=("all",)), catalog=CATALOG)
    d = r.decide(host, 443)
    assert (d.rule, d.action, d.registry, d.role) == ("registries", "via", registry, role)


def test_registries_by_name_and_unknown_hosts() -> None:
    r = router(rule(0, registries=("quay",)), catalog=CATALOG)
    assert r.decide("quay.io", 443).registry == "quay"
    assert r.decide("registry-1.docker.io", 443).rule == "default"
    assert r.decide("example.com", 443).registry is None


def test_an_earlier_plain_rule_beats_a_registry_rule() -> None:
    r = router(
        rule(0, action="direct", name="mirror", domain=("quay.io",)),
        rule(1, name="registries", registries=("all",)),
        catalog=CATALOG,
    )
    d = r.decide("quay.io", 443)
    assert d.rule == "mirror" and d.registry is None
    assert r.decide("cdn.quay.io", 443).rule == "registries"


# -- normalisation invariance --------------------------------------------------------------

LABELS = ["a", "b", "docker", "io", "evildocker", "x", "cdn1", "example"]
HOSTNAME = st.lists(st.sampled_from(LABELS), min_size=1, max_size=4).map(".".join)


def _case_variants(host: str) -> st.SearchStrategy[str]:
    return st.lists(st.booleans(), min_size=len(host), max_size=len(host)).map(
        lambda flips: "".join(c.upper() if f else c for c, f in zip(host, flips, strict=True))
    )


@given(HOSTNAME.flatmap(lambda h: st.tuples(st.just(h), _case_variants(h), st.booleans())))
def test_decisions_are_invariant_under_case_and_trailing_dot(args: tuple[str, str, bool]) -> None:
    host, variant, dot = args
    r = router(
        rule(0, action="reject", suffix=("evildocker.io",)),
        rule(1, suffix=("docker.io",)),
        rule(2, action="direct", glob=("cdn*.example",)),
        rule(3, action="direct", regex=(r"x\.a",)),
    )
    written = variant + ("." if dot else "")
    assert r.decide(normalise_host(written), 443) == r.decide(host, 443)


# -- the compiled router agrees with the reference -----------------------------------------

SUFFIX = st.tuples(
    st.sampled_from(["", ".", "*."]),
    st.lists(st.sampled_from(LABELS), min_size=1, max_size=3).map(".".join),
).map("".join)
GLOB = st.lists(
    st.sampled_from([*LABELS, "*", "?", "d*", "*o", "cdn?"]), min_size=1, max_size=4
).map(".".join)
REGEX = st.sampled_from([r"a\..*", r".*docker\.io", r"(x|b)\.[a-z]+", r"cdn\d\..*", r"[^.]+"])
PORTS = st.lists(st.sampled_from([(443, 443), (80, 80), (1, 1000), (8000, 8100)]), max_size=2).map(
    tuple
)
ACTION = st.sampled_from([("direct", None), ("reject", None), ("via", "t1"), ("via", "t2")])


@st.composite
def rule_lists(draw: st.DrawFn, kinds: tuple[str, ...]) -> list[RuleSpec]:
    n = draw(st.integers(1, 12))
    out = []
    for i in range(n):
        fields: dict[str, Any] = {}
        for kind in draw(st.lists(st.sampled_from(kinds), min_size=0, max_size=2, unique=True)):
            strat = {"suffix": SUFFIX, "domain": HOSTNAME, "glob": GLOB, "regex": REGEX}[kind]
            fields[kind] = tuple(draw(st.lists(strat, min_size=1, max_size=3)))
        ports = draw(PORTS)
        if not fields and not ports:
            fields["suffix"] = (draw(SUFFIX),)
        action, upstream = draw(ACTION)
        out.append(RuleSpec(index=i, action=action, upstream=upstream, ports=ports, **fields))
    return out


PORT = st.sampled_from([80, 443, 8080, 8050, 5000])


@given(rule_lists(("suffix",)), HOSTNAME, PORT)
def test_router_agrees_with_linear_reference_for_suffix_rules(
    rules: list[RuleSpec], host: str, port: int
) -> None:
    assert decided(Router(rules, DEFAULT), host, port) == ref_decide(rules, host, port)


@given(rule_lists(("suffix", "domain", "glob", "regex")), HOSTNAME, PORT)
def test_router_agrees_with_linear_reference_for_mixed_rules(
    rules: list[RuleSpec], host: str, port: int
) -> None:
    assert decided(Router(rules, DEFAULT), host, port) == ref_decide(rules, host, port)


NETS = st.one_of(
    st.tuples(st.sampled_from([0, 8, 16, 24, 30, 32]), st.ip_addresses(v=4)).map(
        lambda t: str(ipaddress.ip_network(f"{t[1]}/{t[0]}", strict=False))
    ),
    st.tuples(st.sampled_from([0, 8, 64, 127, 128]), st.ip_addresses(v=6)).map(
        lambda t: str(ipaddress.ip_network(f"{t[1]}/{t[0]}", strict=False))
    ),
)
# Addresses near each other so that networks match often.
IPS = st.one_of(
    st.tuples(st.sampled_from([10, 127, 192]), st.integers(0, 3), st.integers(0, 255)).map(
        lambda t: f"{t[0]}.{t[1]}.0.{t[2]}"
    ),
    st.sampled_from(["::1", "fd00::1", "fd00::2", "2001:db8::1"]),
)


@st.composite
def cidr_rules(draw: st.DrawFn) -> list[RuleSpec]:
    nets = st.one_of(
        NETS,
        IPS.map(lambda ip: str(ipaddress.ip_network(ip))),
        IPS.map(
            lambda ip: str(ipaddress.ip_network(f"{ip}/{8 if '.' in ip else 16}", strict=False))
        ),
    )
    out = []
    for i in range(draw(st.integers(1, 10))):
        action, upstream = draw(ACTION)
        out.append(
            RuleSpec(
                index=i,
                action=action,
                upstream=upstream,
                cidr=tuple(draw(st.lists(nets, min_size=1, max_size=3))),
                ports=draw(PORTS),
            )
        )
    return out


@given(cidr_rules(), IPS, PORT)
def test_router_agrees_with_linear_reference_for_cidr_rules(
    rules: list[RuleSpec], ip: str, port: int
) -> None:
    assert decided(Router(rules, DEFAULT), ip, port) == ref_decide(rules, ip, port)


# -- the indexes behind globs and regexes agree with the reference too -------------------------

TAILS = ["cdn.example", "docker.io", "io"]
SHARED_GLOB = st.one_of(
    st.tuples(st.sampled_from(["edge", "e", "edge1", "x"]), st.sampled_from(TAILS)).map(
        lambda t: f"{t[0]}*.{t[1]}"
    ),
    st.tuples(st.sampled_from(["-1", "1", "x-1", ""]), st.sampled_from(TAILS)).map(
        lambda t: f"*{t[0]}.{t[1]}"
    ),
    st.tuples(st.sampled_from(["a", "edge", "b"]), st.sampled_from(TAILS)).map(
        lambda t: f"{t[0]}?*.{t[1]}"
    ),
    st.sampled_from(["*", "*.*", "edge*", "*1", "e*1*", "[ex]*.io", "a.b*"]),
)
MIXED_REGEX = st.sampled_from(
    [
        r"^(.+\.)?edge\d*\.cdn\.example$",
        r"^edge1\.[a-z]+\.(io|example)$",
        r"[a-z]+-1\..*",
        r"(x|edge)1?\.docker\.io",
        r".*\.io",
        r"e.*1\.cdn\.example",
        r"edge\x31.cdn.example",
        r"^x\.",
    ]
)
SHARED_HOST = st.one_of(
    HOSTNAME,
    st.tuples(
        st.sampled_from(["edge", "e", "edge1", "x", "a", "x-1", "edge-1", "b1", "edge12"]),
        st.sampled_from(["", ".x", ".edge1"]),
        st.sampled_from(TAILS),
    ).map(lambda t: f"{t[0]}{t[1]}.{t[2]}"),
)


@st.composite
def indexed_rules(draw: st.DrawFn) -> list[RuleSpec]:
    """Rules whose globs/regexes share tails, heads and buckets, with port filters."""
    out = []
    for i in range(draw(st.integers(1, 24))):
        fields: dict[str, Any] = {}
        kinds = draw(st.lists(st.sampled_from(["glob", "regex", "suffix"]), max_size=2))
        for kind in set(kinds) or {"glob"}:
            strat = {"glob": SHARED_GLOB, "regex": MIXED_REGEX, "suffix": SUFFIX}[kind]
            fields[kind] = tuple(draw(st.lists(strat, min_size=1, max_size=3)))
        action, upstream = draw(ACTION)
        out.append(RuleSpec(index=i, action=action, upstream=upstream, ports=draw(PORTS), **fields))
    return out


@given(indexed_rules(), SHARED_HOST, PORT)
def test_router_agrees_with_linear_reference_for_indexed_patterns(
    rules: list[RuleSpec], host: str, port: int
) -> None:
    assert decided(Router(rules, DEFAULT), host, port) == ref_decide(rules, host, port)


@given(st.integers(50, 400), st.integers(0, 399), st.sampled_from([443, 80]))
def test_many_globs_sharing_a_tail_keep_first_match(n: int, k: int, port: int) -> None:
    """Hundreds of globs in one bucket: still the first one in file order that matches."""
    rules = [
        rule(
            i,
            action="direct",
            glob=(f"edge{i}-*.shared.example" if i % 2 else f"*-n{i}.shared.example",),
        )
        for i in range(n)
    ]
    rules.append(rule(n, glob=("*.shared.example",), ports=((443, 443),)))
    r = Router(rules, DEFAULT)
    for host in (f"edge{k}-x.shared.example", f"a-n{k}.shared.example", "zz.shared.example"):
        assert decided(r, host, port) == ref_decide(rules, host, port)


@given(cidr_rules(), IPS.map(lambda ip: f"::ffff:{ip}" if "." in ip else ip.upper()), PORT)
def test_cidr_rules_see_normalised_forms_of_addresses(
    rules: list[RuleSpec], ip: str, port: int
) -> None:
    """A mapped or upper-case address routes like its normalised form (no CIDR bypass)."""
    r = Router(rules, DEFAULT)
    assert decided(r, ip, port) == ref_decide(rules, normalise_host(ip), port)


# -- decide() is total -------------------------------------------------------------------------

TOTAL_ROUTER = Router(
    [
        rule(0, action="reject", cidr=("10.0.0.0/8", "fd00::/8")),
        rule(1, suffix=("docker.io", ".example.com")),
        rule(2, glob=("cdn?.*.quay.io", "[ab]*.x")),
        rule(3, regex=(r"^(.+\.)?ads\d*\.net$",)),
        rule(4, action="reject", ports=((25, 25),)),
        rule(5, domain=("1.2.3.4.5", "localhost")),
    ],
    DEFAULT,
)


@pytest.mark.parametrize(
    "host, expected",
    [
        ("1.2.3.4.5", AddressError),  # a numeric last label: an address or nothing
        ("a..b", AddressError),
        ("x" * 300, AddressError),
        ("a." * 125 + "io", "default"),
        ("", AddressError),
        (".", AddressError),
        ("bücher.docker.io", "rules[1]"),
        ("Registry-1.Docker.IO.", "rules[1]"),
        ("::ffff:10.1.2.3", "rules[0]"),
        ("fd00::1%eth0", "rules[0]"),
        ("[fd00::1]", "rules[0]"),
        ("0x0a.1", "rules[0]"),
        ("167772161", "rules[0]"),
        ("10.1.2.3.", "rules[0]"),
        ("01.2.3.4", "default"),
        ("999.1.1.1", AddressError),
        ("a b", AddressError),
        ("\x00", AddressError),
        ("\udcff.io", AddressError),
        ("::ffff:1.2.3.4.5", AddressError),
    ],
    ids=lambda v: repr(v)[:24] if isinstance(v, str) else getattr(v, "__name__", str(v)),
)
def test_decide_on_hostile_hosts(host: str, expected: Any) -> None:
    if expected is AddressError:
        with pytest.raises(AddressError):
            TOTAL_ROUTER.decide(host, 443)
    else:
        assert TOTAL_ROUTER.decide(host, 443).rule == expected


@given(
    st.one_of(
        st.text(max_size=300),
        st.text(alphabet="0123456789abcdefx.:%[]-_*", max_size=60),
        st.ip_addresses().map(str),
    ),
    st.integers(-1, 70000),
)
def test_decide_over_arbitrary_text_raises_only_address_error(host: str, port: int) -> None:
    try:
        d = TOTAL_ROUTER.decide_uncached(host, port)
    except AddressError:
        with pytest.raises(AddressError):
            normalise_host(host)
        return
    assert isinstance(d, Decision)
    try:
        normal = normalise_host(host)
    except AddressError:
        return  # a name normalise_host refuses but the router could still route (`1.2.3.4.5`)
    assert d == TOTAL_ROUTER.decide_uncached(normal, port)


@given(st.integers(20, 200), st.integers(0, 199), st.sampled_from([443, 80]))
def test_many_regexes_with_only_an_inner_literal_keep_first_match(
    n: int, k: int, port: int
) -> None:
    """Regexes sharing their suffix (`.net`) are found by their inner literal, in order."""
    rules = [
        rule(i, action="direct", regex=(rf"^[a-z]+-ads{i % 50}\.[a-z0-9]+\.net$",))
        for i in range(n)
    ]
    rules.insert(n // 2, rule(n // 2, glob=("*-ads1*.net",), ports=((443, 443),)))
    rules = [
        RuleSpec(**{**{f: getattr(r, f) for f in r.__slots__}, "index": i})
        for i, r in enumerate(rules)
    ]
    r = Router(rules, DEFAULT)
    hosts = [f"{q}-ads{k % 50}.z9.net" for q in ("q", "qq", "qqq")]  # every offset mod 3
    for host in (*hosts, f"q-ads{k}.z9.net", "q-ads1.net", "x.y.net", "node1"):
        assert decided(r, host, port) == ref_decide(rules, host, port)
