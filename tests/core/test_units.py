"""Sizes and durations: one grammar for the config and the CLI."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwdproxy.core.units import format_size, parse_duration, parse_size


@pytest.mark.parametrize(
    ("text", "want"),
    [("50GiB", 50 * 1024**3), ("500MB", 500 * 1000**2), ("1.5G", 1_500_000_000), ("1024", 1024),
     (" 2 KiB ", 2048), ("0", 0), (7, 7), ("1TiB", 1024**4)],
)
def test_parse_size(text: object, want: int) -> None:
    assert parse_size(text) == want


@pytest.mark.parametrize("bad", ["", "GiB", "1XB", "-1", "1.2.3G", True, -5, "1 G B"])
def test_parse_size_refuses(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_size(bad)


@pytest.mark.parametrize(
    ("text", "want"),
    [("90", 90), ("90s", 90), ("10m", 600), ("12h", 43200), ("7d", 604800), ("1w", 604800),
     ("1h30m", 5400), ("250ms", 0.25), (3, 3.0), (1.5, 1.5)],
)
def test_parse_duration(text: object, want: float) -> None:
    assert parse_duration(text) == pytest.approx(want)


@pytest.mark.parametrize("bad", ["", "m", "10x", "-1s", "1h-", "h1", False, -1])
def test_parse_duration_refuses(bad: object) -> None:
    with pytest.raises(ValueError):
        parse_duration(bad)


@given(st.text(max_size=20))
def test_parsers_fail_only_with_value_error(text: str) -> None:
    for parse in (parse_size, parse_duration):
        try:
            value = parse(text)
        except ValueError:
            continue
        assert value >= 0


@given(st.integers(min_value=0, max_value=10**6), st.sampled_from(["s", "m", "h", "d"]))
def test_duration_round_trip(n: int, unit: str) -> None:
    assert parse_duration(f"{n}{unit}") == n * {"s": 1, "m": 60, "h": 3600, "d": 86400}[unit]


def test_format_size() -> None:
    assert format_size(512) == "512 B"
    assert format_size(1536) == "1.5 KiB"
    assert format_size(50 * 1024**3) == "50.0 GiB"
