"""Checks 1 and 2: skopeo pulls from the Docker Hub and Quay stand-ins through fwdproxy, over its
HTTP CONNECT side and over its SOCKS5 side; every byte comes through the gateway's tunnel."""

from __future__ import annotations

from pathlib import Path

import pytest
from e2erig.clients import assert_pull_flow, skopeo_copy_to_dir, skopeo_inspect, verify_dir_copy
from e2erig.proxy import RunningProxy
from e2erig.topology import OUT_IP, Rig

pytestmark = pytest.mark.e2e


def test_node_cannot_reach_outside_directly(rig: Rig) -> None:
    """The premise of every other check: without the tunnel the node has no way out."""
    err = rig.node.tcp_probe(OUT_IP, 443)
    assert err is not None, "node reached the outside registry directly"
    assert "unreachable" in err.lower()
    resolved = rig.node.run(["getent", "hosts", "registry-1.docker.io"], check=False)
    assert resolved.returncode != 0, f"node resolved a public name: {resolved.stdout}"
    assert rig.gw.tcp_probe(OUT_IP, 443) is None, "gateway must reach the outside"


@pytest.mark.parametrize("side", ["http", "socks5"], ids=["connect", "socks5"])
@pytest.mark.parametrize("registry", ["hub", "quay"], ids=["dockerhub", "quay"])
def test_skopeo_pull_through_fwdproxy(rig: Rig, proxy: RunningProxy, tmp_path: Path,
                                      side: str, registry: str) -> None:
    ref = rig.image(f"{registry}:skopeo-{'http' if side == 'http' else 'socks'}")
    url = proxy.http_url if side == "http" else proxy.socks5_url
    env = rig.proxy_env(url)
    socks_before = len(rig.socks_text())

    info = skopeo_inspect(rig, ref, env)
    assert info["Digest"] == ref.digest
    assert info["Layers"] == ref.image.layer_digests

    skopeo_copy_to_dir(rig, ref, env, tmp_path / "copy")
    verify_dir_copy(ref, tmp_path / "copy")
    assert_pull_flow(rig, ref)
    seen = rig.socks_text()[socks_before:]
    assert f"{OUT_IP}.443" in seen, "the gateway's SOCKS server did not carry the pull"
