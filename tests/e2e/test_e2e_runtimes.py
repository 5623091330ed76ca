"""Check 4: real container runtimes, configured as users configure them, pull from the Docker
Hub stand-in, from Quay and from the intranet registry through fwdproxy."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import pytest
from e2erig.clients import assert_pull_flow
from e2erig.daemons import (
    Containerd,
    Dockerd,
    Podman,
    ctr,
    docker,
    image_inspect,
    podman,
    setup_podman,
    start_containerd,
    start_dockerd,
)
from e2erig.prereq import require_tools
from e2erig.proxy import RunningProxy
from e2erig.topology import ImageRef, Rig

pytestmark = pytest.mark.e2e

REGISTRIES = pytest.mark.parametrize("registry", ["hub", "quay", "intra"],
                                     ids=["dockerhub", "quay", "intranet"])


@pytest.fixture(scope="module")
def containerd(rig: Rig) -> Iterator[Containerd]:
    require_tools({"containerd": "containerd", "ctr": "containerd"})
    cd = start_containerd(rig)
    try:
        yield cd
    finally:
        rig.sup.stop(cd.proc)


@pytest.fixture(scope="module")
def dockerd(rig: Rig, proxy: RunningProxy, containerd: Containerd) -> Iterator[Dockerd]:
    require_tools({"dockerd": "docker.io", "docker": "docker.io", "runc": "runc"})
    d = start_dockerd(rig, containerd, proxy.http_url)
    try:
        yield d
    finally:
        rig.sup.stop(d.proc)


@pytest.fixture(scope="module")
def podman_setup(rig: Rig, proxy: RunningProxy) -> Podman:
    require_tools({"podman": "podman"})
    return setup_podman(rig, proxy.http_url)


def image_for(rig: Rig, registry: str, client: str) -> ImageRef:
    return rig.image(f"{registry}:{client}")


def check_flow(rig: Rig, ref: ImageRef, socks_before: int) -> None:
    """Public pulls went token -> 307 -> CDN through the tunnel; intranet ones never touched it."""
    seen = rig.socks_text()[socks_before:]
    if ref.registry == "intra":
        assert "10.77.2." not in seen and "intranet" not in seen, seen
    else:
        assert_pull_flow(rig, ref)


@REGISTRIES
def test_dockerd_pulls_with_generated_dropin(rig: Rig, dockerd: Dockerd, registry: str) -> None:
    ref = image_for(rig, registry, "docker")
    before = len(rig.socks_text())
    docker(rig, dockerd, ["pull", "--quiet", ref.reference])
    info = image_inspect(docker(rig, dockerd, ["image", "inspect", ref.reference]).stdout)
    assert any(d.endswith("@" + ref.digest) for d in info["RepoDigests"]), info["RepoDigests"]
    assert info["Config"]["Labels"]["org.fwdproxy.e2e"] == ref.image.name
    check_flow(rig, ref, before)


def test_dockerd_env_came_from_the_dropin(dockerd: Dockerd, proxy: RunningProxy) -> None:
    assert dockerd.env["HTTPS_PROXY"] == proxy.http_url
    assert dockerd.env["HTTP_PROXY"] == proxy.http_url
    assert "NO_PROXY" in dockerd.env


@REGISTRIES
def test_ctr_pulls_with_proxy_env(rig: Rig, proxy: RunningProxy, containerd: Containerd,
                                  registry: str) -> None:
    ref = image_for(rig, registry, "containerd")
    before = len(rig.socks_text())
    env = rig.client_env(HTTPS_PROXY=proxy.http_url, HTTP_PROXY=proxy.http_url, NO_PROXY="")
    ctr(rig, containerd, ["images", "pull", "--snapshotter", "native",
                          "--hosts-dir", str(containerd.hosts_dir), ref.reference], env)
    listing = ctr(rig, containerd, ["images", "ls"], env).stdout
    line = next((ln for ln in listing.splitlines() if ln.startswith(ref.reference + " ")), "")
    assert ref.digest in line, listing
    layer = ref.image.layer_digests[0]
    blob = rig.node.run(["ctr", "-a", str(containerd.socket), "-n", "e2e", "content", "get",
                         layer], env=env, text=False).stdout
    assert "sha256:" + hashlib.sha256(blob).hexdigest() == layer
    check_flow(rig, ref, before)


@REGISTRIES
def test_podman_pulls_with_generated_conf(rig: Rig, podman_setup: Podman, registry: str) -> None:
    ref = image_for(rig, registry, "podman")
    before = len(rig.socks_text())
    podman(rig, podman_setup, ["pull", "--quiet", "--cert-dir", str(rig.cert_dir), ref.reference])
    info = image_inspect(podman(rig, podman_setup, ["image", "inspect", ref.reference]).stdout)
    assert info["Digest"] == ref.digest
    assert info["Labels"]["org.fwdproxy.e2e"] == ref.image.name
    check_flow(rig, ref, before)
    assert "HTTPS_PROXY" in podman_setup.config_text
