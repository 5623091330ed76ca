"""Range requests (RFC 9110 §14) for blobs: what clients send, we answer, upstreams say."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwdproxy.proto.byterange import (
    ByteRange,
    ContentRange,
    ContentRangeError,
    RangeNotSatisfiable,
    check_content_range,
    content_range,
    parse_content_range,
    parse_range,
)
from fwdproxy.proto.oci import OCIError, error_body

SIZE = 1000


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("bytes=0-499", (0, 499)),
        ("bytes=500-", (500, 999)),  # Docker / containerd resume
        ("bytes=500-99999", (500, 999)),  # clipped to the end
        ("bytes=999-999", (999, 999)),
        ("bytes=-100", (900, 999)),  # suffix
        ("bytes=-5000", (0, 999)),  # suffix longer than the blob: all of it
        ("Bytes=0-0", (0, 0)),  # the unit is case-insensitive
        ("bytes= 10-20 ", (10, 20)),
        ("bytes=10-20,", (10, 20)),  # empty list elements are ignored
        ("bytes=,10-20", (10, 20)),
    ],
)
def test_satisfiable_single_ranges(header: str, expected: tuple[int, int]) -> None:
    got = parse_range(header, SIZE)
    assert got == ByteRange(*expected, SIZE)
    assert got.length == expected[1] - expected[0] + 1
    assert got.content_range() == f"bytes {expected[0]}-{expected[1]}/{SIZE}"


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "items=0-1",  # another unit
        "bytes=0-1,5-6",  # multi-range (podman zstd:chunked): whole body
        "bytes=0-1, 900-",
        "bytes=5-1",  # last < first: invalid, ignore
        "bytes=-",
        "bytes=a-b",
        "bytes 0-1",
        "bytes=0x10-",
        "bytes=+1-2",
        "bytes=\u0661-2",  # Arabic-Indic digit
        "bytes=" + "9" * 30 + "-",
        "bytes=",
        "bytes=" + "0-1," * 400,
    ],
)
def test_ignored_ranges_mean_full_body(header: str | None) -> None:
    assert parse_range(header, SIZE) is None


@pytest.mark.parametrize(
    ("header", "size"),
    [("bytes=1000-", 1000), ("bytes=5000-6000", 1000), ("bytes=-0", 1000), ("bytes=0-", 0)],
)
def test_unsatisfiable_ranges_are_416(header: str, size: int) -> None:
    with pytest.raises(RangeNotSatisfiable) as info:
        parse_range(header, size)
    err = info.value
    assert isinstance(err, OCIError)
    assert (err.code, err.status, err.size) == ("RANGE_INVALID", 416, size)
    assert ("Content-Range", f"bytes */{size}") in err.headers
    assert b"RANGE_INVALID" in error_body(err)


def test_suffix_on_empty_blob_is_the_empty_body() -> None:
    assert parse_range("bytes=-10", 0) is None


@given(st.text(max_size=60), st.integers(0, 2**40))
def test_parse_range_raises_only_range_not_satisfiable(header: str, size: int) -> None:
    try:
        got = parse_range(header, size)
    except RangeNotSatisfiable:
        return
    if got is not None:
        assert 0 <= got.start <= got.end < size == got.size


@given(st.integers(1, 2**62), st.data())
def test_range_header_round_trips_through_content_range(size: int, data: st.DataObject) -> None:
    start = data.draw(st.integers(0, size - 1))
    end = data.draw(st.integers(start, size - 1))
    got = parse_range(f"bytes={start}-{end}", size)
    assert got == ByteRange(start, end, size)
    assert parse_content_range(got.content_range()) == ContentRange(start, end, size)
    assert parse_range(f"bytes={start}-", size) == ByteRange(start, size - 1, size)
    assert check_content_range(content_range(start, end, size), start, size).length == got.length


@pytest.mark.parametrize(("start", "end", "size"), [(-1, 0, 1), (2, 1, 5), (0, 5, 5), (0, 0, 0)])
def test_content_range_refuses_ranges_outside(start: int, end: int, size: int) -> None:
    with pytest.raises(ValueError, match="not inside"):
        content_range(start, end, size)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("bytes 0-499/1000", ContentRange(0, 499, 1000)),
        ("bytes 500-999/1000", ContentRange(500, 999, 1000)),
        ("bytes 500-999/*", ContentRange(500, 999, None)),
        ("BYTES 0-0/1", ContentRange(0, 0, 1)),
        (" bytes 1-2/3 ", ContentRange(1, 2, 3)),
    ],
)
def test_parse_content_range(value: str, expected: ContentRange) -> None:
    assert parse_content_range(value) == expected


@pytest.mark.parametrize(
    "value",
    [
        "",
        "bytes */1000",  # a 416's answer, not a range
        "bytes 0-1000/1000",  # end past the size
        "bytes 5-1/1000",
        "bytes  0-1/2",
        "bytes=0-1/2",
        "bytes 0-1",
        "items 0-1/2",
        "bytes -1-2/3",
        "bytes 0-1/2, bytes 3-4/5",
        "bytes 0-" + "9" * 25 + "/*",
        "bytes \u0661-2/3",
        "x" * 500,
    ],
)
def test_parse_content_range_is_strict(value: str) -> None:
    with pytest.raises(ContentRangeError):
        parse_content_range(value)


def test_check_content_range_insists_on_the_offset_asked_for() -> None:
    assert check_content_range("bytes 500-999/1000", 500, 1000) == ContentRange(500, 999, 1000)
    assert check_content_range("bytes 500-999/*", 500, 1000).size is None
    with pytest.raises(ContentRangeError, match="asked for bytes from 500"):
        check_content_range("bytes 0-999/1000", 500, 1000)  # a proxy answered from 0
    with pytest.raises(ContentRangeError, match="expected a 1000-byte blob"):
        check_content_range("bytes 500-1999/2000", 500, 1000)


@given(st.text(max_size=60))
def test_parse_content_range_raises_only_content_range_error(value: str) -> None:
    try:
        got = parse_content_range(value)
    except ContentRangeError:
        return
    assert 0 <= got.start <= got.end and (got.size is None or got.end < got.size)
