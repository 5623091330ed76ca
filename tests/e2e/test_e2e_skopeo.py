"""Checks 1 and 2: skopeo pulls from the Docker Hub and Quay stand-ins through fwdproxy, over its
HTTP CONNECT side and over its SOCKS5 side; every byte comes through the gateway's tunnel."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from e2erig.clients import (
    FLOW,
    assert_pull_flow,
    curl,
    skopeo_copy_to_dir,
    skopeo_inspect,
    verify_dir_copy,
)
from e2erig.proxy import HTTP_UPSTREAM, RunningProxy
from e2erig.topology import INTRA_IP, INTRA_REGISTRY_PORT, OUT_IP, Rig

pytestmark = pytest.mark.e2e


def assert_tunnelled(proxy: RunningProxy, registry: str) -> None:
    """fwdproxy's own access log names the rule and the tunnel for every host of the pull."""
    if proxy.kind != "fwdproxy":
        return
    flow = FLOW[registry]
    for host in {flow["token_host"], flow["api_host"], flow["cdn_host"]}:
        assert_tunnelled_host(proxy, host)


def assert_tunnelled_host(proxy: RunningProxy, host: str) -> None:
    if proxy.kind != "fwdproxy":
        return
    routes = proxy.routes_for(f"{host}:443")
    assert routes == {("registries", "tunnel")}, f"{host}: logged routes {routes}"


def test_node_cannot_reach_outside_directly(rig: Rig) -> None:
    """The premise of every other check: without the tunnel the node has no way out."""
    err = rig.node.tcp_probe(OUT_IP, 443)
    assert err is not None, "node reached the outside registry directly"
    assert "unreachable" in err.lower()
    resolved = rig.node.run(["getent", "hosts", "registry-1.docker.io"], check=False)
    assert resolved.returncode != 0, f"node resolved a public name: {resolved.stdout}"
    assert rig.gw.tcp_probe(OUT_IP, 443) is None, "gateway must reach the outside"
    assert rig.gw.tcp_probe(INTRA_IP, INTRA_REGISTRY_PORT) is not None, "gateway reached intranet"
    assert rig.node.tcp_probe(INTRA_IP, INTRA_REGISTRY_PORT) is None, "node must reach intranet"


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
    assert_tunnelled(proxy, registry)


def test_skopeo_pull_via_http_connect_upstream(
    rig: Rig, make_proxy: Callable[..., RunningProxy], tmp_path: Path
) -> None:
    """Same pull with the tunnel being an HTTP CONNECT proxy (tinyproxy on the gateway)."""
    via_http = make_proxy("fwdproxy-http-upstream", "fwdproxy-split.yaml", upstream=HTTP_UPSTREAM)
    ref = rig.image("hub:skopeo-upstream-http")
    log = rig.logs / "tinyproxy-gw-access.log"
    before = log.stat().st_size
    skopeo_copy_to_dir(rig, ref, rig.proxy_env(via_http.http_url), tmp_path / "copy")
    verify_dir_copy(ref, tmp_path / "copy")
    assert_pull_flow(rig, ref)
    with log.open("rb") as fh:
        fh.seek(before)
        carried = fh.read().decode(errors="replace")
    assert "production.cloudflare.docker.com" in carried, carried[-2000:]


@pytest.mark.parametrize("proxy_scheme", ["http", "socks5h", "socks4a"])
def test_every_listener_protocol_reaches_the_hub(rig: Rig, proxy: RunningProxy,
                                                 proxy_scheme: str) -> None:
    """One port, three protocols: curl gets Docker Hub's 401 challenge through each."""
    got = curl(rig.node, ["-D", "-", "-o", "/dev/null", "-w", "code=%{http_code}\n",
                          "--proxy", f"{proxy_scheme}://127.0.0.1:{proxy.port}",
                          "--cacert", str(rig.ca.cert), "https://registry-1.docker.io/v2/"],
               rig.client_env(), timeout_s=15)
    assert got.stdout.rstrip().endswith("code=401"), got.stdout
    assert 'bearer realm="https://auth.docker.io/token"' in got.stdout.lower(), got.stdout
    assert_tunnelled_host(proxy, "registry-1.docker.io")
