"""Check 7: when the tunnel's SOCKS server is down, a pull fails fast with a clear error from
fwdproxy instead of hanging, and intranet traffic carries on untouched."""

from __future__ import annotations

import time

import pytest
from e2erig.clients import curl, skopeo
from e2erig.procs import wait_for
from e2erig.proxy import RunningProxy
from e2erig.topology import INTRA_WEB, Rig

pytestmark = pytest.mark.e2e

FAIL_FAST_S = 20.0


def test_upstream_down_fails_fast_and_intranet_survives(rig: Rig, proxy: RunningProxy) -> None:
    hub = rig.image("hub:failure")
    intra = rig.image("intra:failure")
    env = rig.proxy_env(proxy.http_url)
    rig.stop_socks()
    try:
        started = time.monotonic()
        pull = skopeo(rig, ["inspect", "--cert-dir", str(rig.cert_dir),
                            f"docker://{hub.reference}"], env, timeout_s=45, check=False)
        elapsed = time.monotonic() - started
        assert pull.returncode != 0, f"pull succeeded with the tunnel down: {pull.stdout}"
        assert elapsed < FAIL_FAST_S, f"pull took {elapsed:.1f}s to fail: {pull.stderr}"
        # Go reports a failed CONNECT by the status line's reason phrase alone.
        assert "Bad Gateway" in pull.stderr, f"no 502 in skopeo's error: {pull.stderr}"

        started = time.monotonic()
        raw = curl(rig.node, ["--proxy", proxy.http_url, "--cacert", str(rig.ca.cert),
                              "https://registry-1.docker.io/v2/"], rig.client_env(),
                   timeout_s=40, check=False)
        assert time.monotonic() - started < FAIL_FAST_S
        assert raw.returncode == 56, f"curl: {raw.returncode} {raw.stderr}"
        assert "502" in raw.stderr, raw.stderr

        started = time.monotonic()
        socks = curl(rig.node, ["--proxy", f"socks5h://127.0.0.1:{proxy.port}", "--cacert",
                                str(rig.ca.cert), "https://registry-1.docker.io/v2/"],
                     rig.client_env(), timeout_s=40, check=False)
        assert time.monotonic() - started < FAIL_FAST_S
        assert socks.returncode == 97, f"curl over SOCKS5: {socks.returncode} {socks.stderr}"

        web = curl(rig.node, ["-f", "--proxy", proxy.http_url, f"http://{INTRA_WEB}/index.txt"],
                   rig.client_env(), timeout_s=15)
        assert web.stdout == "intranet says hello\n"
        reg = skopeo(rig, ["inspect", "--cert-dir", str(rig.cert_dir),
                           f"docker://{intra.reference}"], env)
        assert intra.digest in reg.stdout
    finally:
        rig.start_socks()

    def pull_works_again() -> bool:
        again = skopeo(rig, ["inspect", "--cert-dir", str(rig.cert_dir),
                             f"docker://{hub.reference}"], env, timeout_s=10, check=False)
        return again.returncode == 0 and hub.digest in again.stdout

    wait_for("pulls through the restarted tunnel", pull_works_again, deadline_s=20, step_s=0.5)
