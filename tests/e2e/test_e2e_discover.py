"""Check 6: `fwdproxy discover` walks real pulls of the catalog's probe repositories through the
tunnel and reports every host met (token, API, CDN) and whether the rules tunnel it; when the
CDN host is missing from the rules it says so and exits non-zero.

Written against the documented interface: `fwdproxy discover [REGISTRY...] [-c FILE]`, exit 1
when some host met would not be tunnelled.
"""

from __future__ import annotations

import subprocess

import pytest
from e2erig.proxy import SOCKS_UPSTREAM, fwdproxy_argv, fwdproxy_env
from e2erig.topology import PROBE_KEYS, Rig, render

pytestmark = pytest.mark.e2e

HUB_HOSTS = ["registry-1.docker.io", "auth.docker.io", "production.cloudflare.docker.com"]
QUAY_HOSTS = ["quay.io", "cdn01.quay.io"]
CDN = "production.cloudflare.docker.com"


def discover(rig: Rig, hosts: list[str], name: str) -> subprocess.CompletedProcess[str]:
    conf = render("fwdproxy-explicit.yaml", rig.tmp / f"{name}.yaml", PORT="3199",
                  UPSTREAM=SOCKS_UPSTREAM, TUNNELLED=", ".join(hosts))
    got = rig.node.run(
        fwdproxy_argv("discover", "-c", str(conf), "--ca-file", str(rig.ca.cert),
                      *PROBE_KEYS.values()),
        env=fwdproxy_env(rig), timeout_s=60, check=False,
    )
    print(got.stdout, got.stderr)  # shown by pytest on failure
    return got


def host_line(report: str, host: str) -> str:
    """The report's table row for `host` (columns: registry, role, host, route, rule)."""
    rows = [line for line in report.splitlines() if line.split()[2:3] == [host]]
    assert len(rows) == 1, f"{host}: expected one row in\n{report}"
    return rows[0]


def test_discover_reports_all_hosts_covered(rig: Rig) -> None:
    assert "hub:probe" in rig.images and "quay:probe" in rig.images, "catalog has no probes"
    before = len(rig.socks_text())
    got = discover(rig, HUB_HOSTS + QUAY_HOSTS, "discover-all")
    out = got.stdout + got.stderr
    assert got.returncode == 0, out
    for host in HUB_HOSTS + QUAY_HOSTS:
        assert "via tunnel" in host_line(got.stdout, host), out
    assert rig.socks_text()[before:], "discover did not go through the tunnel"


def test_discover_flags_the_missing_cdn_host(rig: Rig) -> None:
    got = discover(rig, [h for h in HUB_HOSTS if h != CDN] + QUAY_HOSTS, "discover-no-cdn")
    out = got.stdout + got.stderr
    assert got.returncode == 1, out
    assert "direct" in host_line(got.stdout, CDN), out
    for host in [h for h in HUB_HOSTS + QUAY_HOSTS if h != CDN]:
        assert "via tunnel" in host_line(got.stdout, host), out
    assert f"domain: [{CDN}]" in got.stdout, "no rule suggested for the CDN host"
