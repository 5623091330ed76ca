"""addr: host normalisation, host:port splitting, IDNA, loopback detection (pure)."""

from __future__ import annotations

import ipaddress

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwdproxy.core.addr import (
    AddressError,
    format_host_port,
    ip_of,
    is_loopback,
    normalise_host,
    parse_port,
    split_host_port,
)

LABEL = st.text("abcxyz0189-", min_size=1, max_size=12).filter(
    lambda s: s[0] != "-" and s[-1] != "-"
)
# Host names proper: the last label starts with a letter (an all-numeric or 0x last label is
# an IPv4 spelling, handled separately below).
NAME = (
    st.lists(LABEL, min_size=1, max_size=5)
    .map(".".join)
    .filter(lambda h: h.rsplit(".", 1)[-1][0].isalpha())
)
IPV4 = st.ip_addresses(v=4).map(str)
IPV6 = st.ip_addresses(v=6).map(str)


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("Registry-1.Docker.IO", "registry-1.docker.io"),
        ("docker.io.", "docker.io"),
        ("  ghcr.io ", "ghcr.io"),
        ("[::1]", "::1"),
        ("[0:0:0:0:0:0:0:1]", "::1"),
        ("2001:DB8::0001", "2001:db8::1"),
        ("fe80::1%eth0", "fe80::1"),
        ("127.0.0.1", "127.0.0.1"),
        ("bücher.de", "xn--bcher-kva.de"),
        ("BÜCHER.DE.", "xn--bcher-kva.de"),
        ("_dmarc.example.com", "_dmarc.example.com"),
        ("xn--bcher-kva.de", "xn--bcher-kva.de"),
        ("a" * 63 + ".io", "a" * 63 + ".io"),
    ],
    ids=lambda v: v if len(v) < 30 else v[:27] + "...",
)
def test_normalise_host_examples(raw: str, expected: str) -> None:
    assert normalise_host(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "  ",
        "[]",
        "a..b",
        "-a.com",
        "a-.com",
        "a b.com",
        "a/b",
        "a:b:c:g::",
        "[::g]",
        "a" * 64 + ".io",
        ".".join(["abcdefghi"] * 26),
        "exa mple",
        "ex@mple.com",
        "\u2603\udcff",
    ],
    ids=lambda v: repr(v)[:30],
)
def test_normalise_host_rejects(raw: str) -> None:
    with pytest.raises(AddressError):
        normalise_host(raw)


@given(NAME)
def test_normalise_host_is_idempotent_and_ignores_case_and_trailing_dot(host: str) -> None:
    n = normalise_host(host)
    assert normalise_host(n) == n
    assert normalise_host(host.upper()) == n
    assert normalise_host(host + ".") == n
    assert normalise_host(host.upper() + ".") == n


@given(st.one_of(IPV4, IPV6))
def test_normalise_host_canonicalises_ip_literals(ip: str) -> None:
    addr = ipaddress.ip_address(ip)
    mapped = getattr(addr, "ipv4_mapped", None)
    canonical = str(mapped if mapped is not None else addr)  # ::ffff:a.b.c.d is IPv4
    assert normalise_host(ip) == canonical
    assert normalise_host(ip.upper()) == canonical
    if ":" in ip:
        assert normalise_host(f"[{ip}]") == canonical
        exploded = ipaddress.IPv6Address(ip).exploded
        assert normalise_host(exploded) == canonical


@given(st.text(max_size=80))
def test_normalise_host_returns_a_name_or_raises_address_error(raw: str) -> None:
    try:
        out = normalise_host(raw)
    except AddressError:
        return
    assert out and out == out.strip() and not out.endswith(".")
    assert out.isascii() and out == out.lower()


@pytest.mark.parametrize(
    "raw, canonical",
    [
        ("2130706433", "127.0.0.1"),
        ("127.1", "127.0.0.1"),
        ("0177.0.0.1", "127.0.0.1"),
        ("0x7f000001", "127.0.0.1"),
        ("2852039166", "169.254.169.254"),
    ],
    ids=["integer", "short", "octal", "hex", "metadata-integer"],
)
def test_normalise_host_ipv4_lookalikes_become_ips_or_are_refused(raw: str, canonical: str) -> None:
    try:
        got = normalise_host(raw)
    except AddressError:
        return
    assert got == canonical


# -- host:port -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "authority, default, expected",
    [
        ("example.com:443", None, ("example.com", 443)),
        ("Example.COM.:8080", None, ("example.com", 8080)),
        ("[::1]:8080", None, ("::1", 8080)),
        ("[2001:db8::1]:1", None, ("2001:db8::1", 1)),
        ("[::1]", 443, ("::1", 443)),
        ("::1", 80, ("::1", 80)),
        ("example.com", 80, ("example.com", 80)),
        ("10.1.2.3:65535", None, ("10.1.2.3", 65535)),
        ("bücher.de:443", None, ("xn--bcher-kva.de", 443)),
    ],
)
def test_split_host_port(authority: str, default: int | None, expected: tuple[str, int]) -> None:
    assert split_host_port(authority, default) == expected


@pytest.mark.parametrize(
    "authority",
    [
        "example.com",
        "example.com:",
        "example.com:0",
        "example.com:65536",
        "example.com:abc",
        "example.com:-1",
        "[::1",
        "[::1]x",
        "[::1]:",
        "::1",
        ":443",
        "a:b:c",
        "[::1]:99999",
        "example.com:123456",
    ],
)
def test_split_host_port_rejects(authority: str) -> None:
    with pytest.raises(AddressError):
        split_host_port(authority)


@given(st.one_of(NAME, IPV4, IPV6), st.integers(1, 65535))
def test_format_and_split_round_trip(host: str, port: int) -> None:
    h = normalise_host(host)
    text = format_host_port(h, port)
    assert split_host_port(text) == (h, port)
    assert text.startswith("[") == (":" in h)


@pytest.mark.parametrize("text", ["1", "80", "65535"])
def test_parse_port_valid(text: str) -> None:
    assert parse_port(text) == int(text)


@pytest.mark.parametrize("text", ["", "0", "65536", "+80", " 80", "1e3", "000000080", "0x50"])
def test_parse_port_invalid(text: str) -> None:
    with pytest.raises(AddressError):
        parse_port(text)


@pytest.mark.parametrize("text", ["\uff18\uff10", "\u0668\u0660"], ids=["fullwidth", "arabic"])
def test_parse_port_rejects_non_ascii_digits(text: str) -> None:
    with pytest.raises(AddressError):
        parse_port(text)


# -- classification ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host, loopback",
    [
        ("127.0.0.1", True),
        ("127.255.0.9", True),
        ("::1", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("registry.localhost", True),
        ("localhost.com", False),
        ("notlocalhost", False),
        ("10.0.0.1", False),
        ("::2", False),
        ("example.com", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize(
    "host, is_ip",
    [
        ("1.2.3.4", True),
        ("::1", True),
        ("fe80::1", True),
        ("cafe", False),
        ("beef.io", False),
        ("1.2.3", False),
        ("", False),
        ("example.com", False),
        ("[::1]", False),
    ],
)
def test_ip_of(host: str, is_ip: bool) -> None:
    assert (ip_of(host) is not None) is is_ip


@given(st.lists(st.integers(0, 999).map(str), min_size=1, max_size=7), st.sampled_from(["", "."]))
def test_numeric_last_label_is_an_address_or_an_error_never_a_name(
    labels: list[str], dot: str
) -> None:
    """`1.2.3.4.5` and friends: every resolver reads a numeric last label as IPv4, so such a
    host is either a valid address (canonicalised) or refused; never a name for the rules."""
    host = ".".join(labels) + dot
    try:
        out = normalise_host(host)
    except AddressError:
        return
    assert ipaddress.ip_address(out).version == 4


@given(NAME, st.integers(0, 99999))
def test_name_with_a_numeric_last_label_is_refused(name: str, n: int) -> None:
    with pytest.raises(AddressError):
        normalise_host(f"{name}.{n}")
