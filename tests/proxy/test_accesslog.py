"""The access log's two paths render the same fields; the direct path buffers and flushes."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from fwdproxy.cli.logsetup import JsonFormatter, TextFormatter
from fwdproxy.core.outcome import Outcome
from fwdproxy.proxy.accesslog import AccessLog, fields_of, quote
from fwdproxy.proxy.state import ConnInfo


def info(outcome: Outcome = Outcome.OK, **kw: object) -> ConnInfo:
    i = ConnInfo(client="127.0.0.1:5000", listener="127.0.0.1:3128")
    i.protocol = "connect"
    i.target = "registry-1.docker.io:443"
    i.outcome = outcome
    for k, v in kw.items():
        setattr(i, k, v)
    return i


def via_logging(i: ConnInfo, formatter: logging.Formatter) -> str:
    level = logging.WARNING if i.outcome.is_error else logging.INFO
    rec = logging.LogRecord("fwdproxy.access", level, __file__, 1, "", None, None)
    rec.fields = fields_of(i)
    return formatter.format(rec)


def test_text_line_matches_the_logging_formatter() -> None:
    out = io.StringIO()
    log = AccessLog()
    log.direct(out)
    i = info(error='with "quotes" and = sign', user="alice")
    log.write(i)
    log.flush()
    line = out.getvalue().rstrip("\n")
    expected = via_logging(i, TextFormatter())
    assert line.split(" ", 1)[1] == expected.split(" ", 1)[1]  # all but the timestamp
    assert 'error="with \\"quotes\\" and = sign"' in line


def test_json_line_matches_the_logging_formatter() -> None:
    out = io.StringIO()
    log = AccessLog()
    log.direct(out, "json")
    i = info(Outcome.DIAL_REFUSED, error="refused")
    log.write(i)
    log.flush()
    got = json.loads(out.getvalue())
    want = json.loads(via_logging(i, JsonFormatter()))
    got.pop("ts"), want.pop("ts")
    assert got == want
    assert got["level"] == "warning" and got["outcome"] == "dial-refused"


def test_level_filters_info_lines() -> None:
    out = io.StringIO()
    log = AccessLog()
    log.direct(out, "text", "warning")
    log.write(info())
    log.write(info(Outcome.REJECTED))
    log.flush()
    lines = out.getvalue().splitlines()
    assert len(lines) == 1 and "outcome=rejected" in lines[0]


async def test_lines_are_buffered_then_flushed_by_the_timer() -> None:
    flushed = asyncio.Event()

    class Stream(io.StringIO):
        def flush(self) -> None:
            flushed.set()

    out = Stream()
    log = AccessLog()
    log.direct(out)
    for _ in range(3):
        log.write(info())
    assert out.getvalue() == ""  # nothing written per line
    await asyncio.wait_for(flushed.wait(), 5)
    assert len(out.getvalue().splitlines()) == 3


def test_without_direct_lines_go_through_logging(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="fwdproxy.access")
    log = AccessLog()
    log.write(info(Outcome.CLIENT_RESET))
    (rec,) = [r for r in caplog.records if r.name == "fwdproxy.access"]
    assert rec.levelno == logging.INFO and rec.fields["outcome"] == "client-reset"  # type: ignore[attr-defined]


def test_a_broken_stream_does_not_raise() -> None:
    out = io.StringIO()
    log = AccessLog()
    log.direct(out)
    log.write(info())
    out.close()
    log.flush()  # ValueError from the closed stream is swallowed


@pytest.mark.parametrize(
    ("value", "text"), [("a", "a"), ("", '""'), ("a b", '"a b"'), ("k=v", '"k=v"'), (3, "3")]
)
def test_quote(value: object, text: str) -> None:
    assert quote(value) == text
