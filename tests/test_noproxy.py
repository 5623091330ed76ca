"""NO_PROXY: Go's matcher (vectors from golang.org/x/net's own tests), detection, building, lint."""

from __future__ import annotations

import ipaddress
import json
import random

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwdproxy.cli import noproxy
from fwdproxy.cli.noproxy import NoProxyError, build_no_proxy, go_bypasses

# x/net http/httpproxy proxy_test.go: TestUseProxy (port 80). True = bypass (useProxy false).
GO_NO_PROXY = (
    "foobar.com, .barbaz.net, *.wildcard.io, 192.168.1.1, 192.168.1.2:81, 192.168.1.3:80, "
    "10.0.0.0/30, 2001:db8::52:0:1, [2001:db8::52:0:2]:443, [2001:db8::52:0:3]:80, "
    "2002:db8:a::45/64"
)
GO_USE_PROXY = [
    ("localhost", True),
    ("127.0.0.1", True),
    ("127.0.0.2", True),
    ("[::1]", True),
    ("[::2]", False),
    ("192.168.1.1", True),
    ("192.168.1.2", False),
    ("192.168.1.3", True),
    ("192.168.1.4", False),
    ("10.0.0.2", True),
    ("[2001:db8::52:0:1]", True),
    ("[2001:db8::52:0:2]", False),
    ("[2001:db8::52:0:3]", True),
    ("[2002:db8:a::123]", True),
    ("[fe80::424b:c8be:1643:a1b6]", False),
    ("barbaz.net", False),
    ("www.barbaz.net", True),
    ("foobar.com", True),
    ("www.foobar.com", True),
    ("foofoobar.com", False),
    ("baz.com", False),
    ("localhost.net", False),
    ("local.localhost", False),
    ("barbarbaz.net", False),
    ("wildcard.io", False),
    ("nested.wildcard.io", True),
    ("awildcard.io", False),
]


@pytest.mark.parametrize(("host", "bypass"), GO_USE_PROXY, ids=[h for h, _ in GO_USE_PROXY])
def test_go_bypasses_matches_go_use_proxy_vectors(host: str, bypass: bool) -> None:
    assert go_bypasses(GO_NO_PROXY, host, 80) is bypass


@pytest.mark.parametrize("host", [h for h, _ in GO_USE_PROXY])
def test_go_bypasses_star_matches_everything(host: str) -> None:
    assert go_bypasses("*", host, 80) is True
    assert go_bypasses("a.example, *", host, 80) is True


# x/net proxy_test.go: proxyForURLTests with a NO_PROXY (True = no proxy returned).
GO_PROXY_FOR_URL = [
    ("example.com", "example.com", 80, True),
    (".example.com", "example.com", 80, False),
    ("ample.com", "example.com", 80, False),
    ("example.com", "foo.example.com", 80, True),
    (".foo.com", "example.com", 80, False),
    (".示例.com", "www.示例.com", 80, True),
    ("xn--fsq092h.com", "www.示例.com", 80, True),
    ("示例.com", "www.xn--fsq092h.com", 80, True),
    ("example.com", "1000::%.example.com", 123, False),  # CVE-2025-22870: zone is not a name
]


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "bypass"), GO_PROXY_FOR_URL, ids=[c[1] for c in GO_PROXY_FOR_URL]
)
def test_go_bypasses_matches_go_proxy_for_url_vectors(
    no_proxy: str, host: str, port: int, bypass: bool
) -> None:
    assert go_bypasses(no_proxy, host, port) is bypass


def test_go_bypasses_ignores_malformed_entry() -> None:
    assert go_bypasses(":1", "example.com", 80) is False


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "bypass"),
    [
        ("EXAMPLE.com", "www.Example.COM", 443, True),
        ("example.com:443", "example.com", 443, True),
        ("example.com:443", "example.com", 80, False),
        ("example.com:", "example.com", 8080, True),  # empty port: any port
        ("example.com", "example.com.", 443, False),  # no trailing-dot folding (golang/go#79944)
        ("example.com.", "example.com.", 443, True),
        ("example.com.", "example.com", 443, False),
        (".svc", "svc", 443, False),
        (".svc", "kubernetes.default.svc", 443, True),
        ("*.svc", "a.svc", 443, True),
        ("10.0.0.0/8", "10.1.2.3", 443, True),
        ("10.0.0.0/8", "ten.example", 443, False),  # CIDRs never match names
        ("10.0.0.0/8", "::ffff:10.1.2.3", 443, True),  # IPv4-mapped IPv6 is IPv4 to Go
        ("::ffff:10.0.0.0/104", "10.9.9.9", 443, True),  # so is a mapped CIDR
        ("10.0.0.1/8", "10.200.0.1", 443, True),  # host bits are masked
        ("0.0.1", "10.0.0.1", 443, False),  # a name entry never matches an IP host
        ("fe80::1", "fe80::1%eth0", 443, True),  # zone dropped from the request host
        ("", "LOCALHOST", 80, False),  # the localhost check is case-sensitive in Go
        ("", "::ffff:127.0.0.1", 80, True),  # loopback through the mapped form
        ("10.0.0.0/33", "10.0.0.1", 443, False),  # invalid CIDR becomes a name
        ("[::1]", "::2", 443, False),
    ],
)
def test_go_bypasses_edge_cases(no_proxy: str, host: str, port: int, bypass: bool) -> None:
    assert go_bypasses(no_proxy, host, port) is bypass


# --- a generated value, judged by Go's rules ---

IP_JSON = json.dumps(
    [
        {
            "ifname": "lo",
            "flags": ["LOOPBACK", "UP"],
            "addr_info": [
                {"family": "inet", "local": "127.0.0.1", "prefixlen": 8, "scope": "host"},
                {"family": "inet6", "local": "::1", "prefixlen": 128, "scope": "host"},
            ],
        },
        {
            "ifname": "eth0",
            "flags": ["BROADCAST", "UP"],
            "addr_info": [
                {"family": "inet", "local": "192.168.10.5", "prefixlen": 24, "scope": "global"},
                {"family": "inet6", "local": "2001:db8:1::5", "prefixlen": 64, "scope": "global"},
                {"family": "inet6", "local": "fe80::1", "prefixlen": 64, "scope": "link"},
            ],
        },
        {
            "ifname": "cni0",
            "flags": ["UP"],
            "addr_info": [
                {"family": "inet", "local": "10.42.0.1", "prefixlen": 24, "scope": "global"},
                {"family": "inet", "local": "10.99.0.1", "prefixlen": 32, "scope": "global"},
                {"family": "packet"},
                {"family": "inet", "local": "garbage", "prefixlen": 24},
            ],
        },
        {"ifname": "dummy0", "flags": ["UP"]},
    ]
)


def test_parse_ip_json_skips_loopback_link_local_and_garbage() -> None:
    addrs = noproxy.parse_ip_json(IP_JSON)
    assert [(a.ifname, str(a.ip), str(a.network)) for a in addrs] == [
        ("eth0", "192.168.10.5", "192.168.10.0/24"),
        ("eth0", "2001:db8:1::5", "2001:db8:1::/64"),
        ("cni0", "10.42.0.1", "10.42.0.0/24"),
        ("cni0", "10.99.0.1", "10.99.0.1/32"),
    ]
    assert noproxy.node_entries(addrs) == [
        "192.168.10.5",
        "192.168.10.0/24",
        "2001:db8:1::5",
        "2001:db8:1::/64",
        "10.42.0.1",
        "10.42.0.0/24",
        "10.99.0.1",  # a /32 adds no subnet
    ]


def test_parse_ip_json_empty_output() -> None:
    assert noproxy.parse_ip_json("") == []
    assert noproxy.parse_ip_json("[]") == []


def _k8s_value() -> str:
    node = noproxy.node_entries(noproxy.parse_ip_json(IP_JSON))
    entries, notes = build_no_proxy(
        node=node, cluster_cidrs=["10.42.0.0/16"], service_cidrs=["10.43.0.0/16"]
    )
    assert notes == []
    return ",".join(entries)


MUST_BYPASS = [
    ("192.168.10.5", 6443),  # node IP
    ("192.168.10.77", 10250),  # another node in the subnet
    ("2001:db8:1::9", 443),
    ("10.43.0.1", 443),  # service IP (kubernetes.default)
    ("10.42.3.4", 8443),  # pod IP (webhook)
    ("kubernetes.default.svc", 443),
    ("webhook.ns.svc.cluster.local", 443),
    ("x.cluster.local", 80),
    ("169.254.169.254", 80),
    ("localhost", 5000),
    ("127.0.0.1", 5000),
    ("::1", 5000),
]
MUST_PROXY = [
    ("registry-1.docker.io", 443),
    ("production.cloudfront.docker.com", 443),
    ("ghcr.io", 443),
    ("quay.io", 443),
    ("registry.k8s.io", 443),
    ("8.8.8.8", 443),
    ("2606:4700::1111", 443),
]


@pytest.mark.parametrize(("host", "port"), MUST_BYPASS, ids=[h for h, _ in MUST_BYPASS])
def test_generated_no_proxy_bypasses_cluster_and_node(host: str, port: int) -> None:
    assert go_bypasses(_k8s_value(), host, port) is True


@pytest.mark.parametrize(("host", "port"), MUST_PROXY, ids=[h for h, _ in MUST_PROXY])
def test_generated_no_proxy_keeps_registries_proxied(host: str, port: int) -> None:
    assert go_bypasses(_k8s_value(), host, port) is False


def test_generated_no_proxy_is_clean_and_stable() -> None:
    value = _k8s_value()
    entries = value.split(",")
    assert " " not in value
    assert len(entries) == len(set(entries))
    assert entries[:4] == ["localhost", "127.0.0.1", "127.0.0.0/8", "::1"]
    assert entries[-3:] == [".svc", ".cluster.local", "169.254.169.254"]
    assert value == _k8s_value()
    assert noproxy.lint_no_proxy(value) == []


def test_build_no_proxy_extras_dedup_and_normalise() -> None:
    entries, notes = build_no_proxy(
        cluster_cidrs=["10.42.0.1/16"],
        service_cidrs=["10.42.0.0/16", "fd00:43::/112"],
        extra=[" Registry.Corp.Example , *.corp.example", "10.42.0.0/16,,", "[::2]", ".svc"],
    )
    assert entries == [
        "localhost",
        "127.0.0.1",
        "127.0.0.0/8",
        "::1",
        "10.42.0.0/16",
        "fd00:43::/112",
        ".svc",
        ".cluster.local",
        "169.254.169.254",
        "registry.corp.example",
        ".corp.example",
        "::2",
    ]
    assert len(notes) == 1 and "*.corp.example" in notes[0]


@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"extra": ["*"]}, "nothing through fwdproxy"),
        ({"extra": ["http://x.example"]}, "not a host name"),
        ({"extra": ["a b"]}, "not a host name"),
        ({"extra": ["10.*"]}, "no wildcards"),
        ({"extra": ["10.0.0.0/40"]}, "not a CIDR"),
        ({"cluster_cidrs": ["ten/8"]}, "not a CIDR"),
    ],
    ids=["star", "url", "blank", "wildcard", "bad-prefix", "bad-cidr"],
)
def test_build_no_proxy_rejects_unusable_input(kwargs: dict, fragment: str) -> None:
    with pytest.raises(NoProxyError, match=fragment):
        build_no_proxy(**kwargs)


def test_cidr_entries_are_the_ip_only_ones() -> None:
    assert noproxy.cidr_entries(["localhost", "10.0.0.0/8", "::1", "fd00::/8", ".svc"]) == [
        "10.0.0.0/8",
        "fd00::/8",
    ]


@pytest.mark.parametrize(
    ("value", "level", "fragment"),
    [
        ("*", "problem", "nothing at all"),
        ("*.corp.example", "problem", "write 'corp.example'"),
        ("10.*", "problem", "IP wildcard"),
        ("*example.com", "problem", "a wildcard"),
        ("10.0.0.1-10.0.0.9", "problem", "address range"),
        ("ten.example/8", "problem", "not a valid CIDR"),
        ("http://proxy.example", "problem", "not a host name"),
        ("[::1]", "problem", "bracketed"),
        ("host.example:https", "problem", "not a number"),
        ("10.1.2.3/8", "warning", "host bits"),
        ("corp.example.", "warning", "trailing dot"),
        ("a.example, b.example", "warning", "blanks"),
    ],
)
def test_lint_no_proxy_flags(value: str, level: str, fragment: str) -> None:
    found = noproxy.lint_no_proxy(value)
    assert any(lv == level and fragment in msg for lv, msg in found), found


@pytest.mark.parametrize(
    "value", ["cafe-bad.example", "localhost,10.0.0.0/8,.svc,example.com:443,::1,[::1]:80"]
)
def test_lint_no_proxy_accepts_good_values(value: str) -> None:
    assert noproxy.lint_no_proxy(value) == []


def test_split_host_port_like_go() -> None:
    split = noproxy.go_split_host_port
    assert split("a:80") == ("a", "80")
    assert split("[::1]:80") == ("::1", "80")
    assert split("a:") == ("a", "")
    assert split("a") is None
    assert split("::1") is None  # too many colons
    assert split("[::1]") is None  # missing port
    assert split("[::1]x:80") is None
    assert split("a]:80") is None


# --- properties ---

# Labels start with a letter so a generated name is never an IP literal (Go never matches
# name entries against IP hosts: 0.0.0.0 is not "under" 0).
labels = st.builds(
    str.__add__,
    st.sampled_from("abcdefghijklmnopqrstuvwxyz"),
    st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", max_size=7),
)
domains = st.lists(labels, min_size=1, max_size=4).map(".".join)
ports = st.integers(min_value=1, max_value=65535)


@given(domains, domains, ports)
def test_prop_bare_entry_matches_apex_and_subdomains(d: str, sub: str, port: int) -> None:
    assert go_bypasses(d, d, port)
    assert go_bypasses(d, f"{sub}.{d}", port)
    assert not go_bypasses("." + d, d, port) or d == "localhost"
    assert go_bypasses("." + d, f"{sub}.{d}", port)
    assert go_bypasses("*." + d, f"{sub}.{d}", port) == go_bypasses("." + d, f"{sub}.{d}", port)


@given(domains, labels, ports)
def test_prop_suffix_match_is_on_a_label_boundary(d: str, prefix: str, port: int) -> None:
    host = prefix + d  # e.g. "evil" + "gcr.io"
    assert go_bypasses(d, host, port) == (host == d or host == "localhost")


@given(domains, domains, ports)
def test_prop_case_insensitive(entry: str, host: str, port: int) -> None:
    if host == "localhost":
        return
    assert go_bypasses(entry.upper(), host, port) == go_bypasses(entry, host.upper(), port)
    assert go_bypasses(entry.upper(), host, port) == go_bypasses(entry, host, port)


@given(st.ip_addresses(v=4), st.integers(min_value=0, max_value=32), domains, ports)
def test_prop_cidr_matches_its_addresses_never_names(
    ip: ipaddress.IPv4Address, prefix: int, name: str, port: int
) -> None:
    net = ipaddress.ip_network((ip, prefix), strict=False)
    assert go_bypasses(str(net), str(ip), port)
    assert go_bypasses(str(net), name, port) == (name == "localhost")


@given(
    st.lists(st.one_of(domains, st.ip_addresses().map(str)), min_size=1, max_size=6),
    st.one_of(domains, st.ip_addresses().map(str)),
    ports,
    st.randoms(),
)
def test_prop_entry_order_does_not_matter(
    entries: list[str], host: str, port: int, rnd: random.Random
) -> None:
    shuffled = entries[:]
    rnd.shuffle(shuffled)
    assert go_bypasses(",".join(entries), host, port) == go_bypasses(",".join(shuffled), host, port)


@given(st.text(max_size=40), st.text(max_size=30), ports)
def test_prop_never_crashes(no_proxy: str, host: str, port: int) -> None:
    assert go_bypasses(no_proxy, host, port) in (True, False)
    assert isinstance(noproxy.lint_no_proxy(no_proxy), list)
