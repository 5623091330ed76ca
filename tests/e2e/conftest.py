"""Fixtures for the end-to-end suite: one rig per session, torn down whatever happens."""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2erig.prereq import RIG_TOOLS, require_tools
from e2erig.proxy import RunningProxy, start_proxy
from e2erig.topology import PROXY_PORT, Rig


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture(scope="session")
def rig() -> Iterator[Rig]:
    require_tools(RIG_TOOLS)
    # A SIGTERM (CI timeout, kill) becomes KeyboardInterrupt so the finally below still runs.
    previous = signal.signal(signal.SIGTERM, _interrupt)
    built = Rig()
    try:
        built.build()
        yield built
    finally:
        signal.signal(signal.SIGTERM, previous)
        problems = built.close()
        if problems and not os.environ.get("FWDPROXY_E2E_KEEP"):
            raise RuntimeError("e2e teardown left things behind: " + "; ".join(problems))


@pytest.fixture(scope="session")
def proxy(rig: Rig) -> RunningProxy:
    """fwdproxy with the split config on the default port 127.0.0.1:3128 in the node."""
    return start_proxy(rig, "fwdproxy-split", "fwdproxy-split.yaml", PROXY_PORT)


@pytest.fixture
def make_proxy(rig: Rig) -> Iterator[Callable[..., RunningProxy]]:
    """Extra proxies with other configs, each stopped when the test ends."""
    started: list[RunningProxy] = []
    next_port = [PROXY_PORT + 10]

    def make(name: str, template: str, **kw: str) -> RunningProxy:
        next_port[0] += 1
        running = start_proxy(rig, name, template, next_port[0], **kw)
        started.append(running)
        return running

    try:
        yield make
    finally:
        for running in started:
            rig.sup.stop(running.proc)
