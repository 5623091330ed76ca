"""Check 5: a docker-registry pull-through cache for Docker Hub on the node, whose only way out
is fwdproxy (HTTPS_PROXY); clients pull from the cache and get the Hub image."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from e2erig.clients import assert_pull_flow, skopeo, verify_dir_copy
from e2erig.proxy import RunningProxy
from e2erig.topology import Rig, render

pytestmark = pytest.mark.e2e

CACHE_ADDR = "127.0.0.1:5001"


@pytest.fixture
def hub_cache(rig: Rig, proxy: RunningProxy) -> Iterator[str]:
    storage = rig.tmp / "cache-storage"
    storage.mkdir()
    conf = render("registry.yml", rig.tmp / "cache.yml", STORAGE=str(storage), ADDR=CACHE_ADDR,
                  EXTRA="proxy:\n  remoteurl: https://registry-1.docker.io\n")
    proc = rig.sup.start("registry-cache", rig.node, ["docker-registry", "serve", str(conf)],
                         env=rig.proxy_env(proxy.http_url))
    try:
        rig.node.wait_tcp("127.0.0.1", 5001, alive=proc.dead)
        yield CACHE_ADDR
    finally:
        rig.sup.stop(proc)


def test_pull_through_cache_reaches_hub_via_fwdproxy(rig: Rig, hub_cache: str,
                                                     tmp_path: Path) -> None:
    ref = rig.image("hub:cache")
    env = rig.client_env()  # the client talks to the cache on loopback, no proxy
    src = f"docker://{hub_cache}/{ref.repo}:{ref.tag}"
    got = skopeo(rig, ["inspect", "--tls-verify=false", src], env)
    assert ref.digest in got.stdout
    skopeo(rig, ["copy", "--quiet", "--src-tls-verify=false", src, f"dir:{tmp_path / 'c'}"], env)
    verify_dir_copy(ref, tmp_path / "c")
    assert_pull_flow(rig, ref)
