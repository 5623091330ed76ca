"""Prerequisites: a missing tool or a non-root run fails the tests and names the Debian package.

Failing rather than skipping is deliberate: a silently skipped end-to-end suite is worse than none.
"""

from __future__ import annotations

import os
import shutil

import pytest

# binary -> Debian package that ships it
RIG_TOOLS = {
    "ip": "iproute2", "unshare": "util-linux", "nsenter": "util-linux", "openssl": "openssl",
    "curl": "curl", "getent": "libc-bin", "skopeo": "skopeo",
    "docker-registry": "docker-registry", "danted": "dante-server", "tinyproxy": "tinyproxy",
    "nginx": "nginx-light",
}


def require_tools(tools: dict[str, str]) -> None:
    if os.geteuid() != 0:
        pytest.fail("the e2e suite needs root (network namespaces, veth, mounts)", pytrace=False)
    missing = {tool: pkg for tool, pkg in tools.items() if shutil.which(tool) is None}
    if missing:
        pkgs = " ".join(sorted(set(missing.values())))
        pytest.fail(f"missing {', '.join(sorted(missing))}: apt-get install {pkgs}",
                    pytrace=False)
