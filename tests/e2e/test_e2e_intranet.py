"""Check 3: intranet traffic goes direct from the node, never through the tunnel; with one
blanket upstream for everything (the usual HTTPS_PROXY setup) the same requests fail."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from e2erig.clients import curl, skopeo
from e2erig.proxy import RunningProxy
from e2erig.topology import INTRA_IP, INTRA_OVERRIDE, INTRA_WEB, Rig

pytestmark = pytest.mark.e2e

INTRANET_MARKS = (INTRA_IP, "intranet")


def intranet_urls() -> list[str]:
    return [f"http://{INTRA_WEB}/index.txt", f"http://{INTRA_OVERRIDE}/index.txt",
            f"http://{INTRA_IP}/index.txt"]


def assert_socks_never_saw_intranet(text: str) -> None:
    hits = [line for line in text.splitlines() if any(m in line for m in INTRANET_MARKS)]
    assert not hits, "the tunnel carried intranet traffic:\n" + "\n".join(hits)


@pytest.mark.parametrize("url", intranet_urls(), ids=["name", "hosts-override", "ip"])
@pytest.mark.parametrize("side", ["http", "socks5h", "socks4a"],
                         ids=["http-proxy", "socks5", "socks4a"])
def test_intranet_http_goes_direct(rig: Rig, proxy: RunningProxy, url: str, side: str) -> None:
    before = len(rig.socks_text())
    proxy_url = f"{side}://127.0.0.1:{proxy.port}"
    got = curl(rig.node, ["-f", "--proxy", proxy_url, url], rig.client_env(), timeout_s=15)
    assert got.stdout == "intranet says hello\n"
    assert_socks_never_saw_intranet(rig.socks_text()[before:])
    host = url.split("/")[2]
    assert_direct(proxy, f"{host}:80")


def assert_direct(proxy: RunningProxy, target: str) -> None:
    """fwdproxy's access log shows the intranet target routed direct, never to the tunnel."""
    if proxy.kind != "fwdproxy":
        return
    routes = proxy.routes_for(target)
    assert routes, f"no access line for {target}: the client bypassed fwdproxy?"
    assert {route for _, route in routes} == {"direct"}, f"{target}: {routes}"


def test_intranet_registry_goes_direct(rig: Rig, proxy: RunningProxy) -> None:
    ref = rig.image("intra:skopeo")
    before = len(rig.socks_text())
    env = rig.proxy_env(proxy.http_url)
    got = skopeo(rig, ["inspect", "--cert-dir", str(rig.cert_dir), f"docker://{ref.reference}"],
                 env)
    assert f'"Digest": "{ref.digest}"' in got.stdout
    assert_socks_never_saw_intranet(rig.socks_text()[before:])
    assert_direct(proxy, "registry.intranet.test:5000")


def test_blanket_tunnel_breaks_the_intranet(
    rig: Rig, make_proxy: Callable[..., RunningProxy]
) -> None:
    """What fwdproxy exists to fix: send everything to the tunnel and the intranet is gone."""
    blanket = make_proxy("fwdproxy-blanket", "fwdproxy-blanket.yaml")
    web = curl(rig.node, ["-f", "--proxy", blanket.http_url, f"http://{INTRA_WEB}/index.txt"],
               rig.client_env(), timeout_s=15, check=False)
    assert web.returncode != 0, f"intranet web answered through the tunnel: {web.stdout}"
    assert "intranet says hello" not in web.stdout
    if blanket.kind == "fwdproxy":
        assert "502" in web.stderr, web.stderr  # the tunnel cannot reach or resolve it
    ref = rig.image("intra:blanket")
    reg = skopeo(rig, ["inspect", "--cert-dir", str(rig.cert_dir), f"docker://{ref.reference}"],
                 rig.proxy_env(blanket.http_url), timeout_s=20, check=False)
    assert reg.returncode != 0, f"intranet registry answered through the tunnel: {reg.stdout}"
    # ...while the registries still work through the same blanket proxy.
    hub = rig.image("hub:skopeo-http")
    ok = skopeo(rig, ["inspect", "--cert-dir", str(rig.cert_dir), f"docker://{hub.reference}"],
                rig.proxy_env(blanket.http_url))
    assert hub.digest in ok.stdout
