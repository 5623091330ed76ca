"""Fixtures for the end-to-end suite: one rig per session, torn down whatever happens.

A missing tool or a non-root run FAILS the tests (naming the Debian package) rather than
skipping them: a silently skipped end-to-end suite is worse than none.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from e2erig.proxy import RunningProxy, start_proxy
from e2erig.topology import PROXY_PORT, Rig

# binary -> Debian package that ships it
RIG_TOOLS = {
    "ip": "iproute2", "unshare": "util-linux", "openssl": "openssl", "curl": "curl",
    "skopeo": "skopeo", "docker-registry": "docker-registry", "danted": "dante-server",
    "tinyproxy": "tinyproxy", "nginx": "nginx-light",
}


def require_tools(tools: dict[str, str]) -> None:
    """Fail (never skip) when the suite cannot run as written."""
    if os.geteuid() != 0:
        pytest.fail("the e2e suite needs root (network namespaces, veth, mounts)", pytrace=False)
    missing = {tool: pkg for tool, pkg in tools.items() if shutil.which(tool) is None}
    if missing:
        pkgs = " ".join(sorted(set(missing.values())))
        pytest.fail(f"missing {', '.join(sorted(missing))}: apt-get install {pkgs}",
                    pytrace=False)


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
