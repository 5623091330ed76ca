"""patterns: literal affixes are sound and the literal glob matcher agrees with fnmatch."""

from __future__ import annotations

import fnmatch
import re

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from fwdproxy.routing.patterns import (
    GlobMatcher,
    glob_affixes,
    glob_runs,
    label_key,
    regex_affixes,
    regex_runs,
)
from fwdproxy.routing.rules import compile_regex

# -- globs -------------------------------------------------------------------------------------

GLOB_ATOMS = st.sampled_from(["a", "b", ".", "-", "*", "?", "ab", "b.a", "[ab]", "[!a]", "x"])
GLOBS = st.lists(GLOB_ATOMS, min_size=0, max_size=7).map("".join)
HOSTS = st.text(alphabet="abx.-", max_size=10)


def fnmatches(pattern: str, host: str) -> bool:
    return re.fullmatch(fnmatch.translate(pattern), host, re.IGNORECASE) is not None


@given(GLOBS.filter(lambda g: "[" not in g), HOSTS)
def test_glob_matcher_agrees_with_fnmatch(pattern: str, host: str) -> None:
    assert GlobMatcher(pattern)(host) is fnmatches(pattern, host)


@given(GLOBS, HOSTS)
def test_glob_affixes_are_sound(pattern: str, host: str) -> None:
    prefix, suffix = glob_affixes(pattern)
    if fnmatches(pattern, host):
        assert host.startswith(prefix) and host.endswith(suffix)
        assert all(run in host for run in glob_runs(pattern))


@pytest.mark.parametrize(
    "pattern, affixes",
    [
        ("edge7-*.cdn.example", ("edge7-", ".cdn.example")),
        ("*-node3.cdn.example", ("", "-node3.cdn.example")),
        ("cdn0?.quay.io", ("cdn0", ".quay.io")),
        ("a[.]b.c", ("a", "b.c")),
        ("docker.io", ("docker.io", "docker.io")),
        ("*", ("", "")),
        ("Reg*.IO", ("reg", ".io")),
    ],
    ids=["head", "tail", "question", "class", "literal", "star", "case"],
)
def test_glob_affixes(pattern: str, affixes: tuple[str, str]) -> None:
    assert glob_affixes(pattern) == affixes


# -- regexes -----------------------------------------------------------------------------------

REGEX_ATOMS = st.sampled_from(
    [
        "a",
        "b",
        "-",
        r"\.",
        "[a-c]",
        r"\d",
        ".",
        "(a|b)",
        r"(.+\.)?",
        r"\x61",
        r"\u0062",
        r"\141",
        r"\\",
        "x{1,2}",
        "z?",
        "q*",
        "c+",
        "|",
        "(?:ab)",
        "{2}",
        r"\N{LATIN SMALL LETTER A}",
        "[^.]+",
        "[]a]",
        "[^]b]",
        r"[\]|]",
    ]
)
REGEXES = st.tuples(
    st.sampled_from(["", "^", r"\A"]),
    st.lists(REGEX_ATOMS, min_size=1, max_size=6).map("".join),
    st.sampled_from(["", "$", r"\Z"]),
).map("".join)


@given(st.data())
def test_regex_affixes_are_sound(data: st.DataObject) -> None:
    pattern = data.draw(REGEXES)
    try:
        rx = compile_regex(pattern)
    except re.error:
        assume(False)
    host = data.draw(st.from_regex(rx, fullmatch=True)).lower()
    assume(host.isascii() and rx.fullmatch(host))
    prefix, suffix = regex_affixes(pattern)
    assert host.startswith(prefix)
    assert host.endswith(suffix)
    assert all(run in host for run in regex_runs(pattern))


@pytest.mark.parametrize(
    "pattern, affixes",
    [
        (r"^(.+\.)?ads12\d*\.zone5\.com$", ("", ".zone5.com")),
        (r"^ads5\.[a-z]+\.(com|net)$", ("ads5.", "")),
        (r"cdn\d+\.quay\.io", ("cdn", ".quay.io")),
        (r"a|b\.com", ("", "")),
        (r"ab?c", ("a", "c")),
        (r"a{2}b", ("", "b")),
        (r"x\x41", ("x", "")),
        (r"z\x4142", ("z", "42")),
        (r"(?x) a b", ("", "")),
        (r"Docker\.IO\Z", ("docker.io", "docker.io")),
    ],
    ids=[
        "geosite-tail",
        "geosite-head",
        "quay",
        "alternation",
        "optional",
        "counted",
        "hex-escape",
        "hex-then-digits",
        "verbose",
        "case-and-anchor",
    ],
)
def test_regex_affixes(pattern: str, affixes: tuple[str, str]) -> None:
    assert regex_affixes(pattern) == affixes


@pytest.mark.parametrize(
    "prefix, suffix, key",
    [
        ("", ".cdn.example", ("suffix", "cdn.example")),
        ("edge", "-node.cdn.example", ("suffix", "cdn.example")),
        ("ads.", "", ("first", "ads")),
        ("ads", "x", ("", "")),
        ("", "io.", ("", "")),
    ],
    ids=["parent", "parent-inside-label", "first-label", "loose", "trailing-dot"],
)
def test_label_key(prefix: str, suffix: str, key: tuple[str, str]) -> None:
    assert label_key(prefix, suffix) == key


@pytest.mark.parametrize(
    "pattern, runs",
    [
        (r"^[a-z]+-ads5\.[a-z0-9]+\.net$", ["-ads5.", ".net"]),
        (r"^(.+\.)?ads12\d*\.zone5\.com$", ["ads12", ".zone5.com"]),
        (r"a{2}bc", ["bc"]),
        (r"x\x41yz", ["x", "yz"]),
        (r"(ab)?cd+e", ["c", "e"]),
        (r"a|b", []),
        (r"ab\N{LATIN SMALL LETTER A}cd", ["ab", "cd"]),
    ],
    ids=["inner", "head-and-tail", "counted", "hex", "group", "alternation", "named-escape"],
)
def test_regex_runs(pattern: str, runs: list[str]) -> None:
    assert regex_runs(pattern) == runs
