"""Hostile input on the wire: request smuggling, slow-drip handshakes, impossible host names,
password guessing on plain forwarding. Each case is a regression test for a defect found by
real clients or an attacker's inputs; all go through real sockets to an in-process proxy."""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from typing import Any

import pytest
from helpers import (
    DIRECT_NAME,
    CaptureOrigin,
    RunningProxy,
    curl,
    http_exchange,
    read_response,
    socks4_request_bytes,
    socks5_request,
)

pytestmark = pytest.mark.timeout(60)


async def read_all(r: asyncio.StreamReader, timeout_s: float = 10.0) -> bytes:
    """Everything the proxy sends until it closes (bounded: the test fails if it never does)."""
    return await asyncio.wait_for(r.read(), timeout_s)


def access_fields(caplog: pytest.LogCaptureFixture) -> list[dict[str, Any]]:
    return [r.fields for r in caplog.records if r.name == "fwdproxy.access"]  # type: ignore[attr-defined]


async def closed_conns(proxy: RunningProxy) -> None:
    """Wait (bounded) until the proxy has no live connection left."""
    deadline = time.monotonic() + 10
    while proxy.server.state.connections:
        assert time.monotonic() < deadline, "connection still open"
        await asyncio.sleep(0.01)


# -- 1. request smuggling through plain forwarding (RFC 9112 §6.1, §6.3) -----------------------

SMUGGLE_CASES = {
    "cl-and-te": (
        "Content-Length: 4\r\nTransfer-Encoding: chunked\r\n",
        b"0\r\n\r\n",
    ),
    "te-and-cl": (
        "Transfer-Encoding: chunked\r\nContent-Length: 4\r\n",
        b"0\r\n\r\n",
    ),
    "two-content-lengths": ("Content-Length: 4\r\nContent-Length: 5\r\n", b"abcd"),
    "te-not-final-chunked": ("Transfer-Encoding: chunked, gzip\r\n", b"0\r\n\r\n"),
    "te-unknown": ("Transfer-Encoding: gzip\r\n", b"0\r\n\r\n"),
}


@pytest.mark.parametrize("case", sorted(SMUGGLE_CASES), ids=sorted(SMUGGLE_CASES))
async def test_ambiguous_framing_gets_400_and_close_and_nothing_is_forwarded(
    proxy: RunningProxy, case: str
) -> None:
    headers, body = SMUGGLE_CASES[case]
    async with CaptureOrigin() as cap:
        authority = f"{DIRECT_NAME}:{cap.port}"
        smuggled = f"GET http://{authority}/smuggled HTTP/1.1\r\nHost: {authority}\r\n\r\n"
        raw = (
            f"POST http://{authority}/a HTTP/1.1\r\nHost: {authority}\r\n{headers}\r\n".encode()
            + body
            + smuggled.encode()
        )
        r, w = await proxy.open()
        try:
            w.write(raw)
            data = await read_all(r)
        finally:
            w.close()
        assert data.startswith(b"HTTP/1.1 400"), data[:200]
        assert data.count(b"HTTP/1.1 ") == 1, "a second response: the connection stayed open"
        assert cap.requests == [], "an ambiguous request reached the origin"


async def test_smuggling_with_curl_style_keepalive_is_closed(proxy: RunningProxy) -> None:
    """The reproduction from the report: one request, one 400, the connection closed."""
    async with CaptureOrigin() as cap:
        authority = f"{DIRECT_NAME}:{cap.port}"
        r, w = await proxy.open()
        try:
            w.write(
                (
                    f"POST http://{authority}/a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\n"
                    "Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
                ).encode()
            )
            resp = await read_response(r)
            assert resp.status == 400
            assert b"Transfer-Encoding and Content-Length" in resp.body
            assert await read_all(r) == b""
        finally:
            w.close()
        assert cap.requests == []


async def test_response_with_both_framings_reaches_the_client_with_one(
    proxy: RunningProxy,
) -> None:
    """An origin that sends both framings: the client must see only the one h11 used."""
    bad = (
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"2\r\nok\r\n0\r\n\r\n"
    )
    async with CaptureOrigin(bad) as cap:
        authority = f"{DIRECT_NAME}:{cap.port}"
        resp = await http_exchange(
            proxy, f"GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode()
        )
    assert resp.status == 200 and resp.body == b"ok"
    assert resp.header("content-length") is None


# -- 3. slow-drip handshakes: handshake_timeout_s bounds the whole handshake -------------------

HANDSHAKE_S = 1.0


async def drip(w: asyncio.StreamWriter, r: asyncio.StreamReader, data: bytes) -> bytes:
    """Send one byte every 0.2 s (traffic pacing) until the proxy closes; return what it said.

    Bounded: the drip lasts at most 5x the handshake timeout, so a proxy that never times the
    client out fails the test instead of hanging it.
    """
    said = b""
    deadline = time.monotonic() + 5 * HANDSHAKE_S
    for i in range(len(data)):
        if time.monotonic() > deadline:
            break
        try:
            w.write(data[i : i + 1])
            await w.drain()
        except ConnectionError:
            return said
        try:
            got = await asyncio.wait_for(r.read(4096), 0.2)
        except asyncio.TimeoutError:
            continue
        except ConnectionError:
            return said
        if not got:
            return said  # the proxy closed: what it said before is the answer
        said += got
    raise AssertionError("the proxy kept a dripping client past its handshake timeout")


def _long(prefix: bytes) -> bytes:
    """A handshake that, dripped at 5 bytes/s, would take far longer than the timeout."""
    return prefix + b"X" * 200


DRIPS = {
    "connect": _long(b"CONNECT a.test:443 HTTP/1.1\r\nX-Pad: "),
    "plain-http": _long(b"GET http://a.test/ HTTP/1.1\r\nX-Pad: "),
    "socks5": b"\x05\x01\x00" + b"\x05\x01\x00\x03\xff" + b"a" * 255,
    "socks4": b"\x04\x01\x01\xbb\x00\x00\x00\x01" + b"u" * 200,
}


@pytest.mark.parametrize("proto", sorted(DRIPS), ids=sorted(DRIPS))
async def test_slow_drip_handshake_is_cut_at_the_deadline(
    make_proxy: Any, proto: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fwdproxy.access")
    proxy = await make_proxy(limits={"handshake_timeout_s": HANDSHAKE_S})
    r, w = await proxy.open()
    try:
        said = await drip(w, r, DRIPS[proto])
    finally:
        w.close()
    if proto in ("connect", "plain-http"):
        assert said.startswith(b"HTTP/1.1 408"), said[:100]
    await closed_conns(proxy)
    outcomes = [f["outcome"] for f in access_fields(caplog)]
    assert outcomes == ["handshake-timeout"], outcomes


async def test_slow_drip_of_a_keepalive_request_head_gets_408(
    make_proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """Each request head on a kept-alive forwarding connection has the same deadline."""
    caplog.set_level(logging.INFO, logger="fwdproxy.access")
    proxy = await make_proxy(limits={"handshake_timeout_s": HANDSHAKE_S})
    async with CaptureOrigin() as cap:
        authority = f"{DIRECT_NAME}:{cap.port}"
        r, w = await proxy.open()
        try:
            w.write(f"GET http://{authority}/1 HTTP/1.1\r\nHost: {authority}\r\n\r\n".encode())
            assert (await read_response(r)).status == 200
            said = await drip(w, r, _long(f"GET http://{authority}/2 HTTP/1.1\r\nX: ".encode()))
        finally:
            w.close()
    assert said.startswith(b"HTTP/1.1 408"), said[:100]
    assert len(cap.requests) == 1
    await closed_conns(proxy)
    assert [f["outcome"] for f in access_fields(caplog)] == ["handshake-timeout"]


# -- 4. a five-number "host" is refused with a reason, never an internal error -----------------

BAD_HOSTS = ["1.2.3.4.5", "1.2.3.256", "a.0x1f", "example.123"]


@pytest.mark.parametrize("host", BAD_HOSTS)
async def test_impossible_ipv4_host_gets_400_on_http(
    proxy: RunningProxy, host: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    head = f"GET http://{host}/ HTTP/1.1\r\nHost: {host}\r\n\r\n"
    resp = await http_exchange(proxy, head.encode())
    assert resp.status == 400 and host.encode() in resp.body, resp
    resp = await http_exchange(
        proxy, f"CONNECT {host}:443 HTTP/1.1\r\nHost: {host}:443\r\n\r\n".encode(), method="CONNECT"
    )
    assert resp.status == 400 and host.encode() in resp.body, resp
    await closed_conns(proxy)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert {f["outcome"] for f in access_fields(caplog)} == {"bad-request"}


@pytest.mark.parametrize("host", BAD_HOSTS)
async def test_impossible_ipv4_host_gets_socks5_host_unreachable(
    proxy: RunningProxy, host: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    reply, _, w = await socks5_request(proxy, host, 443)
    w.close()
    assert reply.code == 0x04
    r, w = await proxy.open()
    try:
        w.write(socks4_request_bytes(host, 443))
        data = await read_all(r)
    finally:
        w.close()
    assert data[:2] == b"\x00\x5b"  # SOCKS4 "rejected or failed"
    await closed_conns(proxy)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_impossible_ipv4_host_with_curl(proxy: RunningProxy) -> None:
    res = await curl("-x", proxy.url, "-w", "%{http_code}", "-o", "/dev/null", "http://1.2.3.4.5/")
    assert res.text == "400"


# -- 6. password guessing on plain forwarding leaves a trace -----------------------------------


async def test_wrong_password_on_plain_forwarding_is_logged_as_auth_failed(
    make_proxy: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="fwdproxy.access")
    proxy = await make_proxy(auth={"users": {"alice": "secret"}})
    async with CaptureOrigin() as cap:
        url = f"http://{DIRECT_NAME}:{cap.port}/"
        res = await curl(
            "-x", f"http://alice:wrong@{proxy.addr}", "-w", "%{http_code}", "-o", "/dev/null", url
        )
        assert res.text == "407"
        res = await curl("-x", proxy.url, "-w", "%{http_code}", "-o", "/dev/null", url)
        assert res.text == "407"  # no credentials at all: a challenge, also a failure here
        await closed_conns(proxy)
        assert cap.requests == []
    fields = access_fields(caplog)
    assert [f["outcome"] for f in fields] == ["auth-failed", "auth-failed"], fields
    assert [r.levelname for r in caplog.records if r.name == "fwdproxy.access"] == [
        "WARNING",
        "WARNING",
    ]


async def test_wrong_password_closes_the_forwarding_connection(make_proxy: Any) -> None:
    """One guess per connection, as on CONNECT and SOCKS5."""
    proxy = await make_proxy(auth={"users": {"alice": "secret"}})
    bad = base64.b64encode(b"alice:wrong").decode()
    async with CaptureOrigin() as cap:
        authority = f"{DIRECT_NAME}:{cap.port}"
        head = (
            f"GET http://{authority}/ HTTP/1.1\r\nHost: {authority}\r\n"
            f"Proxy-Authorization: Basic {bad}\r\n\r\n"
        ).encode()
        r, w = await proxy.open()
        try:
            w.write(head + head)
            data = await read_all(r)
        finally:
            w.close()
    assert data.startswith(b"HTTP/1.1 407") and data.count(b"HTTP/1.1 ") == 1
