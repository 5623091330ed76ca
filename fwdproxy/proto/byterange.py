"""Byte ranges for blob requests (pure): the client's `Range`, our `Content-Range`, the upstream's.

Clients resume blobs with `Range: bytes=N-` and need `206` with `Content-Range: bytes N-M/SIZE`,
or they restart from byte 0 (Docker's `ErrWrongCodeForByteRange`); containerd 2.1+ splits blobs
into several open-ended ranges. podman's zstd:chunked sends multi-range requests and accepts a
`200` with the whole body, which is what we answer them (RFC 9110 §14.2: a server MAY ignore
Range). The mirror's own resume against an upstream must check that the `Content-Range` it gets
starts where it asked, since a proxy or CDN may answer from 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

from fwdproxy.proto.oci import OCIError

__all__ = [
    "ByteRange",
    "ContentRange",
    "ContentRangeError",
    "RangeNotSatisfiable",
    "check_content_range",
    "content_range",
    "parse_content_range",
    "parse_range",
]

MAX_RANGE_HEADER: Final = 1024
_DIGITS: Final = r"[0-9]{1,19}"  # int64 positions; longer numbers are not sizes, just attacks
_SPEC_RE: Final = re.compile(rf"(?P<first>{_DIGITS})?-(?P<last>{_DIGITS})?")
_CONTENT_RANGE_RE: Final = re.compile(
    rf"[Bb][Yy][Tt][Ee][Ss] (?P<first>{_DIGITS})-(?P<last>{_DIGITS})/(?P<size>{_DIGITS}|\*)"
)


@dataclass(frozen=True, slots=True)
class ByteRange:
    """An inclusive, satisfiable byte range `start..end` of a representation of `size` bytes."""

    start: int
    end: int
    size: int

    @property
    def length(self) -> int:
        return self.end - self.start + 1

    def content_range(self) -> str:
        return content_range(self.start, self.end, self.size)


class RangeNotSatisfiable(OCIError):
    """416 (RFC 9110 §15.5.17) with `Content-Range: bytes */size`, as a RANGE_INVALID error."""

    def __init__(self, size: int, header: str) -> None:
        super().__init__(
            "RANGE_INVALID",
            f"range {header[:80]!r} is not satisfiable for a {size}-byte blob",
            416,
            headers=(("Content-Range", f"bytes */{size}"),),
        )
        self.size = size


def parse_range(header: str | None, size: int) -> ByteRange | None:
    """A `Range` header resolved against `size`: a ByteRange to answer 206, or None for 200.

    None for: no header, another unit, a syntax error (RFC 9110 §14.2 lets us ignore it), or more
    than one range (answered with the whole body). RangeNotSatisfiable when the one range starts
    at or past the end, or is a zero-length suffix (§14.1.1). Positions past the end are clipped.
    """
    if not header or len(header) > MAX_RANGE_HEADER:
        return None
    unit, eq, range_set = header.partition("=")
    if not eq or unit.strip().lower() != "bytes":
        return None
    specs = [s.strip(" \t") for s in range_set.split(",")]
    specs = [s for s in specs if s]  # the list rule (RFC 9110 §5.6.1) ignores empty elements
    if len(specs) != 1:
        return None
    match = _SPEC_RE.fullmatch(specs[0])
    if match is None or (match["first"] is None and match["last"] is None):
        return None
    if match["first"] is None:  # suffix-range: the last N bytes
        suffix = int(match["last"])
        if suffix == 0:
            raise RangeNotSatisfiable(size, header)
        if size == 0:
            return None
        return ByteRange(max(0, size - suffix), size - 1, size)
    first = int(match["first"])
    last = None if match["last"] is None else int(match["last"])
    if last is not None and last < first:
        return None  # invalid range-spec: ignore the header
    if first >= size:
        raise RangeNotSatisfiable(size, header)
    return ByteRange(first, size - 1 if last is None else min(last, size - 1), size)


def content_range(start: int, end: int, size: int) -> str:
    """`bytes start-end/size` (RFC 9110 §14.4) for a 206; ValueError if the range is not inside."""
    if not 0 <= start <= end < size:
        raise ValueError(f"range {start}-{end} is not inside a {size}-byte representation")
    return f"bytes {start}-{end}/{size}"


class ContentRangeError(ValueError):
    """An upstream's Content-Range is malformed or does not answer the range we asked for."""


@dataclass(frozen=True, slots=True)
class ContentRange:
    """A parsed `Content-Range: bytes start-end/size`; `size` None for `/*`."""

    start: int
    end: int
    size: int | None

    @property
    def length(self) -> int:
        return self.end - self.start + 1


def parse_content_range(value: str) -> ContentRange:
    """Strict RFC 9110 §14.4 range-resp; `bytes */N` (a 416's) is refused here too."""
    match = _CONTENT_RANGE_RE.fullmatch(value.strip(" \t")) if len(value) <= 128 else None
    if match is None:
        raise ContentRangeError(f"malformed Content-Range {value[:80]!r}")
    start, end = int(match["first"]), int(match["last"])
    size = None if match["size"] == "*" else int(match["size"])
    if end < start or (size is not None and end >= size):
        raise ContentRangeError(f"invalid Content-Range {value!r}: range not inside the size")
    return ContentRange(start, end, size)


def check_content_range(value: str, start: int, size: int | None = None) -> ContentRange:
    """Parse an upstream's 206 Content-Range and insist it starts at `start` (and has `size`).

    The resume logic appends the body at offset `start`; a range from anywhere else would
    corrupt the blob, and only the final digest check would notice.
    """
    got = parse_content_range(value)
    if got.start != start:
        raise ContentRangeError(f"asked for bytes from {start}, upstream sent {value!r}")
    if size is not None and got.size is not None and got.size != size:
        raise ContentRangeError(f"expected a {size}-byte blob, upstream sent {value!r}")
    return got
