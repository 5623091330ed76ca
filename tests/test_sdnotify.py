"""sd_notify: the datagrams a real AF_UNIX socket receives, and silence outside systemd."""

from __future__ import annotations

import os
import socket
import tempfile
import time
from collections.abc import Iterator

import pytest

from fwdproxy import sdnotify


@pytest.fixture
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """A bound SOCK_DGRAM socket at a short path (sun_path is limited to 108 bytes)."""
    d = tempfile.mkdtemp(prefix="sdn", dir="/tmp")
    path = os.path.join(d, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sock.bind(path)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        yield sock
    finally:
        sock.close()
        os.unlink(path)
        os.rmdir(d)


def recv(sock: socket.socket) -> str:
    return sock.recv(4096).decode("utf-8")


def test_ready_with_status(notify_socket: socket.socket) -> None:
    assert sdnotify.ready("listening on 127.0.0.1:3128") is True
    assert recv(notify_socket) == "READY=1\nSTATUS=listening on 127.0.0.1:3128"


def test_ready_without_status(notify_socket: socket.socket) -> None:
    assert sdnotify.ready() is True
    assert recv(notify_socket) == "READY=1"


def test_reloading_carries_monotonic_usec(notify_socket: socket.socket) -> None:
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert sdnotify.reloading() is True
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = recv(notify_socket).split("\n")
    assert first == "RELOADING=1"
    key, _, value = second.partition("=")
    assert key == "MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_stopping_and_status(notify_socket: socket.socket) -> None:
    assert sdnotify.stopping() is True
    assert recv(notify_socket) == "STOPPING=1"
    assert sdnotify.status("draining 3 connections\nsecond line") is True
    assert recv(notify_socket) == "STATUS=draining 3 connections second line"


def test_sequence_arrives_in_order(notify_socket: socket.socket) -> None:
    sdnotify.ready("up")
    sdnotify.reloading()
    sdnotify.ready("rules reloaded")
    sdnotify.stopping()
    got = [recv(notify_socket).split("\n")[0] for _ in range(4)]
    assert got == ["READY=1", "RELOADING=1", "READY=1", "STOPPING=1"]


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"fwdproxy-test-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert sdnotify.notify("READY=1", "STATUS=abstract") is True
        assert recv(sock) == "READY=1\nSTATUS=abstract"


@pytest.mark.parametrize(
    "value", [None, "", "vsock:2:1234", "relative/path"], ids=["unset", "empty", "vsock", "rel"]
)
def test_noop_outside_systemd(monkeypatch: pytest.MonkeyPatch, value: str | None) -> None:
    if value is None:
        monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    else:
        monkeypatch.setenv("NOTIFY_SOCKET", value)
    assert sdnotify.ready("x") is False
    assert sdnotify.stopping() is False


def test_missing_socket_returns_false(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", "/nonexistent/fwdproxy/notify")
    assert sdnotify.notify("READY=1") is False
