"""fwdproxy's registry mirror with its layer cache, pulled through by the real runtimes.

fwdproxy serves the mirror on 127.0.0.1:5000 in the node; its upstream fetches go through a
danted of their own on the gateway, whose bytes iptables counts (e2erig.mirror). Clients talk
to the mirror only, set up with what `fwdproxy gen *-mirror` writes: ctr with a certs.d
`_default` hosts.toml, podman and skopeo with a registries.conf mirror per registry, a second
dockerd with `registry-mirrors`. `tag_ttl: 0s`, so every tag
is asked of the upstream again (a HEAD) and a tag with the tunnel down is answered stale.

What crossed the tunnel is measured three ways: iptables byte counters on the mirror's SOCKS
port in the gateway (every IP byte, both directions), the stand-in's nginx access log (each
CDN download of a blob, with the bytes sent), and the mirror's own log (hit/miss/coalesced/
stale per request, resumes, verification failures).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2erig.clients import FLOW, access_entries, assert_pull_flow, verify_dir_copy
from e2erig.daemons import (
    Containerd,
    Dockerd,
    Podman,
    docker,
    image_inspect,
    podman,
    start_containerd,
    start_dockerd,
)
from e2erig.images import TestImage, bulk_layers, make_image
from e2erig.mirror import (
    MIRROR_URL,
    MirrorTunnel,
    RunningMirror,
    TunnelBytes,
    gen_mirror,
    shaped,
    start_mirror,
)
from e2erig.prereq import require_tools
from e2erig.procs import wait_for
from e2erig.topology import ImageRef, Rig

pytestmark = pytest.mark.e2e

# Where `fwdproxy gen *-mirror --root R` writes, below R.
CONTAINERD_CERTS = "etc/containerd/certs.d"
PODMAN_DROPIN = "etc/containers/registries.conf.d/50-fwdproxy-mirror.conf"
DAEMON_JSON = "etc/docker/daemon.json"

MiB = 1024 * 1024
SMALL_BOUND = 64 * 1024  # tunnel bytes a pull from the cache may still cost: HEADs, tokens
LAYER_8M = 8 * MiB
LAYER_64M = 64 * MiB
OUT_DEV = "to-gw"  # the outside namespace's end of the gateway link: blobs leave through it

CLIENT_IMAGES = {  # one image per client and registry, so each pull is a miss of its own
    "ctr": ("hub", "quay"), "podman": ("hub", "quay"), "skopeo": ("hub", "quay"),
    "docker": ("hub",),
}


def _repo(registry: str, name: str) -> str:
    return f"library/e2e-{name}" if registry == "hub" else f"fwdproxy/e2e-{name}"


def _ref(registry: str, name: str, image: TestImage) -> ImageRef:
    return ImageRef(registry, _repo(registry, name), "v1", image)


@pytest.fixture(scope="module")
def images(rig: Rig) -> dict[str, ImageRef]:
    """This module's images, pushed to the stand-ins once: small ones per client, one with an
    8 MiB layer under both registries (identical digests), one for the concurrent pull, one
    with a 64 MiB layer, and one whose layer the test corrupts in the registry's storage."""
    todo: dict[str, ImageRef] = {}
    for client, registries in CLIENT_IMAGES.items():
        for registry in registries:
            name = f"mirror-{client}"
            todo[f"{registry}:{name}"] = _ref(registry, name,
                                              make_image(f"{registry}-{name}"))
    shared = make_image("mirror-shared", extra_layers=bulk_layers(1, LAYER_8M, "shared"))
    todo["hub:mirror-shared"] = _ref("hub", "mirror-shared", shared)
    todo["quay:mirror-shared"] = _ref("quay", "mirror-shared", shared)
    todo["hub:mirror-flock"] = _ref("hub", "mirror-flock", make_image(
        "mirror-flock", extra_layers=bulk_layers(1, LAYER_8M, "flock")))
    todo["hub:mirror-big"] = _ref("hub", "mirror-big", make_image(
        "mirror-big", extra_layers=bulk_layers(1, LAYER_64M, "big")))
    todo["hub:mirror-corrupt"] = _ref("hub", "mirror-corrupt", make_image(
        "mirror-corrupt", extra_layers=bulk_layers(1, MiB, "corrupt")))
    for registry in ("hub", "quay"):
        todo[f"{registry}:mirror-stale"] = _ref(registry, "mirror-stale",
                                                make_image(f"{registry}-mirror-stale"))
    rig.publish(todo)
    assert todo["hub:mirror-shared"].digest == todo["quay:mirror-shared"].digest
    return todo


@pytest.fixture(scope="module")
def tunnel(rig: Rig) -> Iterator[MirrorTunnel]:
    t = MirrorTunnel(rig)
    try:
        t.start()
        t.count()
        yield t
    finally:
        t.uncount()
        if t.proc is not None:
            rig.sup.stop(t.proc)


@pytest.fixture(scope="module")
def mirror(rig: Rig, tunnel: MirrorTunnel) -> Iterator[RunningMirror]:
    m = start_mirror(rig, tunnel, tag_ttl="0s")
    try:
        yield m
    finally:
        rig.sup.stop(m.proc)


@pytest.fixture(scope="module")
def mirror_env(rig: Rig) -> dict[str, str]:
    """podman's and skopeo's environment: the registries.conf drop-in `gen podman-mirror`
    writes, as the whole registries.conf; no proxy variables, no CA (the mirror is plain HTTP
    on loopback). podman reads $CONTAINERS_REGISTRIES_CONF; skopeo 1.9 ignores it and gets
    --registries-conf."""
    root = rig.tmp / "gen-podman-mirror"
    written = gen_mirror(rig, "podman-mirror", root)
    assert list(written) == [PODMAN_DROPIN], written
    text = written[PODMAN_DROPIN]
    for reg in ("docker.io", "quay.io"):
        assert (f'[[registry.mirror]]\nlocation = "127.0.0.1:5000/{reg}"\ninsecure = true'
                in text), text
    return rig.client_env(CONTAINERS_REGISTRIES_CONF=str(root / PODMAN_DROPIN))


def blob_digests(ref: ImageRef) -> list[str]:
    return [ref.image.config_digest, *ref.image.layer_digests]


def image_bytes(ref: ImageRef) -> int:
    return len(ref.image.config) + len(ref.image.manifest) + sum(
        len(layer.blob) for layer in ref.image.layers)


def cdn_gets(rig: Rig, digest: str) -> list[dict[str, str]]:
    """Blob downloads of `digest` from either CDN stand-in, as nginx logged them."""
    hexd = digest.split(":", 1)[1]
    cdns = {flow["cdn_host"] for flow in FLOW.values()}
    return [e for e in access_entries(rig) if e["host"] in cdns and e["method"] == "GET"
            and hexd in e["path"] and e["status"] in ("200", "206")]


def headers_of(text: str) -> dict[str, str]:
    """The header fields of a `curl -I` / `curl -D -` answer, names lower-cased."""
    assert text.startswith("HTTP/1.1 "), text
    return {k.strip().lower(): v.strip() for k, _, v in
            (ln.partition(":") for ln in text.splitlines()[1:] if ":" in ln)}


def sent_bytes(entry: dict[str, str]) -> int:
    """nginx's $body_bytes_sent, the field after the status."""
    return int(entry["line"].split('" ', 1)[1].split()[1])


def wait_cdn_gets(rig: Rig, digest: str, n: int) -> list[dict[str, str]]:
    """The CDN lines for `digest` once there are `n` (nginx logs a request when it has ended),
    or what there is after 5 s."""
    end = time.monotonic() + 5
    got = cdn_gets(rig, digest)
    while len(got) < n and time.monotonic() < end:
        time.sleep(0.05)
        got = cdn_gets(rig, digest)
    return got


def skopeo_copy_argv(rig: Rig, env: dict[str, str], src: str, dest: Path) -> list[str]:
    return ["skopeo", "--registries-conf", env["CONTAINERS_REGISTRIES_CONF"], "--policy",
            str(rig.tmp / "policy.json"), "--command-timeout", "90s", "copy", "--quiet", src,
            f"dir:{dest}"]


def skopeo_copy(rig: Rig, env: dict[str, str], src: str, dest: Path, *, timeout_s: float = 100,
                check: bool = True) -> subprocess.CompletedProcess[str]:
    return rig.node.run(skopeo_copy_argv(rig, env, src, dest), env=env, timeout_s=timeout_s,
                        check=check)


def assert_no_tmp_left(mirror: RunningMirror) -> None:
    wait_for("the mirror's cache tmp/ to empty", lambda: not mirror.tmp_files(), deadline_s=10,
             alive=mirror.proc.dead)


# -- 1. the runtimes pull through the mirror ---------------------------------------------------


@pytest.fixture(scope="module")
def mirror_containerd(rig: Rig) -> Iterator[Containerd]:
    require_tools({"containerd": "containerd", "ctr": "containerd"})
    cd = start_containerd(rig, "containerd-mirror")
    try:
        yield cd
    finally:
        rig.sup.stop(cd.proc)


@pytest.fixture(scope="module")
def mirror_hosts_dir(rig: Rig) -> Path:
    """The certs.d `gen containerd-mirror` writes: one `_default/hosts.toml` for every
    registry (containerd names the registry with ?ns=)."""
    root = rig.tmp / "gen-containerd-mirror"
    written = gen_mirror(rig, "containerd-mirror", root)
    hosts = f"{CONTAINERD_CERTS}/_default/hosts.toml"
    assert list(written) == [hosts], written
    assert f'[host."{MIRROR_URL}"]\n  capabilities = ["pull", "resolve"]' in written[hosts]
    assert not any(ln.startswith("server") for ln in written[hosts].splitlines())
    return root / CONTAINERD_CERTS


@pytest.mark.parametrize("registry", ["hub", "quay"], ids=["dockerhub", "quay"])
def test_ctr_pulls_through_mirror(rig: Rig, images: dict[str, ImageRef], mirror: RunningMirror,
                                  mirror_containerd: Containerd, mirror_hosts_dir: Path,
                                  tunnel: MirrorTunnel, registry: str) -> None:
    ref = images[f"{registry}:mirror-ctr"]
    env = rig.client_env()  # no proxy: ctr reaches only the mirror on loopback
    mark, before = mirror.log_mark(), tunnel.bytes()
    ctr = ["ctr", "-a", str(mirror_containerd.socket), "-n", "e2e-mirror"]
    rig.node.run([*ctr, "images", "pull", "--snapshotter", "native", "--hosts-dir",
                  str(mirror_hosts_dir), ref.reference], env=env, timeout_s=60)
    listing = rig.node.run([*ctr, "images", "ls"], env=env).stdout
    line = next((ln for ln in listing.splitlines() if ln.startswith(ref.reference + " ")), "")
    assert ref.digest in line, listing
    for digest in blob_digests(ref):
        blob = rig.node.run([*ctr, "content", "get", digest], env=env, text=False).stdout
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == digest
        assert mirror.cached(digest), f"{digest} not in the mirror's cache"
    # containerd names the registry with ?ns=; the mirror fetched it through its tunnel.
    seen = [s for s in mirror.states(mark) if ref.repo in s["what"]]
    assert seen and all(s["status"] == "200" for s in seen), seen
    assert all(s["via"] == "ns" for s in seen), seen
    assert (tunnel.bytes() - before).down > image_bytes(ref)
    assert_pull_flow(rig, ref)


@pytest.mark.parametrize("registry", ["hub", "quay"], ids=["dockerhub", "quay"])
def test_skopeo_pulls_through_mirror(rig: Rig, images: dict[str, ImageRef],
                                     mirror: RunningMirror, mirror_env: dict[str, str],
                                     tmp_path: Path, registry: str) -> None:
    ref = images[f"{registry}:mirror-skopeo"]
    mark = mirror.log_mark()
    skopeo_copy(rig, mirror_env, f"docker://{ref.reference}", tmp_path / "c")
    verify_dir_copy(ref, tmp_path / "c")
    seen = [s for s in mirror.states(mark) if ref.repo in s["what"]]
    assert {s["state"] for s in seen} >= {"miss"}, seen
    assert_pull_flow(rig, ref)


@pytest.fixture(scope="module")
def mirror_podman(rig: Rig) -> Podman:
    require_tools({"podman": "podman"})
    base = rig.tmp / "podman-mirror"
    base.mkdir()
    conf = base / "containers.conf"
    conf.write_text("[engine]\n")  # nothing of the user's: no proxy, the registries.conf mirror
    return Podman(base=base, conf=conf, config_text="")


@pytest.mark.parametrize("registry", ["hub", "quay"], ids=["dockerhub", "quay"])
def test_podman_pulls_through_mirror(rig: Rig, images: dict[str, ImageRef],
                                     mirror: RunningMirror, mirror_podman: Podman,
                                     mirror_env: dict[str, str], registry: str) -> None:
    ref = images[f"{registry}:mirror-podman"]
    conf = mirror_env["CONTAINERS_REGISTRIES_CONF"]
    mark = mirror.log_mark()
    podman(rig, mirror_podman, ["pull", "--quiet", ref.reference],
           CONTAINERS_REGISTRIES_CONF=conf)
    try:
        info = image_inspect(podman(rig, mirror_podman, ["image", "inspect", ref.reference],
                                    CONTAINERS_REGISTRIES_CONF=conf).stdout)
        assert info["Digest"] == ref.digest
        assert info["Labels"]["org.fwdproxy.e2e"] == ref.image.name
    finally:
        podman(rig, mirror_podman, ["rmi", ref.reference], CONTAINERS_REGISTRIES_CONF=conf)
    seen = [s for s in mirror.states(mark) if ref.repo in s["what"]]
    assert any(s["state"] == "miss" for s in seen), seen
    assert_pull_flow(rig, ref)


@pytest.fixture(scope="module")
def mirror_dockerd(rig: Rig, mirror_containerd: Containerd) -> Iterator[Dockerd]:
    """A second dockerd (own data-root, socket, containerd namespace) whose only way to a
    registry is `registry-mirrors`; the rig's proxy-configured dockerd is left alone."""
    require_tools({"dockerd": "docker.io", "docker": "docker.io", "runc": "runc"})
    written = gen_mirror(rig, "docker-mirror", rig.tmp / "gen-docker-mirror")
    daemon_json = json.loads(written[DAEMON_JSON])
    assert daemon_json == {"registry-mirrors": [MIRROR_URL]}, written[DAEMON_JSON]
    d = start_dockerd(rig, mirror_containerd, None, name="docker-mirror",
                      daemon_json=daemon_json)
    try:
        yield d
    finally:
        rig.sup.stop(d.proc)


def test_dockerd_pulls_through_registry_mirrors(rig: Rig, images: dict[str, ImageRef],
                                                mirror: RunningMirror,
                                                mirror_dockerd: Dockerd) -> None:
    ref = images["hub:mirror-docker"]
    mark = mirror.log_mark()
    docker(rig, mirror_dockerd, ["pull", "--quiet", ref.reference])
    info = image_inspect(docker(rig, mirror_dockerd, ["image", "inspect", ref.reference]).stdout)
    assert any(d.endswith("@" + ref.digest) for d in info["RepoDigests"]), info["RepoDigests"]
    assert info["Config"]["Labels"]["org.fwdproxy.e2e"] == ref.image.name
    # dockerd asks the mirror without a registry name: the default registry, docker.io.
    seen = [s for s in mirror.states(mark) if ref.repo in s["what"]]
    assert seen and all(s["what"].startswith("docker.io/") for s in seen), seen
    assert_pull_flow(rig, ref)


# -- 2. a second pull and another registry's copy cost no blob bytes ----------------------------


def test_second_pull_and_other_registry_cost_no_blob_bytes(
        rig: Rig, images: dict[str, ImageRef], mirror: RunningMirror, mirror_podman: Podman,
        mirror_env: dict[str, str], tunnel: MirrorTunnel) -> None:
    hub, quay = images["hub:mirror-shared"], images["quay:mirror-shared"]
    conf = {"CONTAINERS_REGISTRIES_CONF": mirror_env["CONTAINERS_REGISTRIES_CONF"]}
    big = hub.image.layer_digests[1]
    size = image_bytes(hub)

    def pull(ref: ImageRef) -> TunnelBytes:
        before = tunnel.bytes()
        podman(rig, mirror_podman, ["pull", "--quiet", ref.reference], **conf)
        try:
            info = image_inspect(podman(rig, mirror_podman, ["image", "inspect", ref.reference],
                                        **conf).stdout)
            assert info["Digest"] == ref.digest
        finally:  # the next pull starts with no local copy of the image or its layers
            podman(rig, mirror_podman, ["rmi", ref.reference], **conf)
        return tunnel.bytes() - before

    first = pull(hub)
    mark = mirror.log_mark()
    again = pull(hub)
    other = pull(quay)
    report = (f"image {size} B; tunnel bytes first pull {first}, second pull {again}, "
              f"same layers from quay {other}")
    print(report)
    assert size <= first.down <= size * 1.10 + SMALL_BOUND, report
    assert again.total < SMALL_BOUND, report
    assert other.total < SMALL_BOUND, report
    assert len(wait_cdn_gets(rig, big, 1)) == 1, f"{big} fetched {cdn_gets(rig, big)}"
    states = {(s["what"].split("@")[0], s["state"]) for s in mirror.states(mark)
              if s["what"].endswith("@" + big)}
    assert states == {("docker.io/library/e2e-mirror-shared", "hit"),
                      ("quay.io/fwdproxy/e2e-mirror-shared", "hit")}, states
    # The same answer as containerd would get it (?ns=), headers included.
    before = tunnel.bytes()
    head = headers_of(mirror.curl(f"/v2/{quay.repo}/blobs/{big}?ns=quay.io", "-I").stdout)
    assert head["x-fwdproxy-cache"] == "hit", head
    assert head["oci-namespace"] == "quay.io", head
    assert head["docker-content-digest"] == big, head
    assert int(head["content-length"]) == len(hub.image.layers[1].blob), head
    assert (tunnel.bytes() - before).total == 0


# -- 3. concurrent pulls share one upstream fetch ----------------------------------------------


def test_four_concurrent_pulls_fetch_each_blob_once(
        rig: Rig, images: dict[str, ImageRef], mirror: RunningMirror,
        mirror_env: dict[str, str], tunnel: MirrorTunnel, tmp_path: Path) -> None:
    ref = images["hub:mirror-flock"]
    big = ref.image.layer_digests[1]
    mark, before = mirror.log_mark(), tunnel.bytes()
    jobs: list[subprocess.Popen[str]] = []
    # A slow outside link keeps the big layer's one fetch in flight until all four clients
    # are reading it; then the link is freed and they finish together.
    with shaped(rig.out, OUT_DEV, "1mbit") as link:
        try:
            for i in range(4):
                argv = skopeo_copy_argv(rig, mirror_env, f"docker://{ref.reference}",
                                        tmp_path / f"c{i}")
                jobs.append(subprocess.Popen(rig.node.argv(argv), env=mirror_env, text=True,
                                             stdout=subprocess.PIPE, stderr=subprocess.PIPE))

            def four_readers() -> bool:
                return any(mirror.tmp_readers(t) >= 6 for t in mirror.tmp_files())

            wait_for("four clients reading the layer in flight", four_readers, deadline_s=30,
                     alive=mirror.proc.dead)
            link.lift()
            failures = []
            for i, job in enumerate(jobs):
                _, err = job.communicate(timeout=90)
                if job.returncode != 0:
                    failures.append(f"copy {i}: exit {job.returncode}: {err}")
            assert not failures, "\n".join(failures)
        finally:
            for job in jobs:
                if job.poll() is None:
                    job.kill()
                    job.wait()
    for i in range(4):
        verify_dir_copy(ref, tmp_path / f"c{i}")
    spent = tunnel.bytes() - before
    size = image_bytes(ref)
    assert size <= spent.down <= size * 1.10 + SMALL_BOUND, f"{spent} for {size} B image"
    for digest in blob_digests(ref):
        assert len(wait_cdn_gets(rig, digest, 1)) == 1, f"{digest}: {cdn_gets(rig, digest)}"
    states = sorted(s["state"] for s in mirror.states(mark) if s["what"].endswith("@" + big)
                    and s["method"] == "GET")
    assert states == ["coalesced"] * 3 + ["miss"], states


# -- 4. a tunnel cut in the middle of a layer is resumed ----------------------------------------


def test_tunnel_cut_mid_layer_is_resumed(rig: Rig, images: dict[str, ImageRef],
                                         mirror: RunningMirror, mirror_env: dict[str, str],
                                         tunnel: MirrorTunnel, tmp_path: Path) -> None:
    ref = images["hub:mirror-big"]
    big = ref.image.layer_digests[1]
    size = len(ref.image.layers[1].blob)
    mark, before = mirror.log_mark(), tunnel.bytes()
    dest = tmp_path / "c"
    argv = skopeo_copy_argv(rig, mirror_env, f"docker://{ref.reference}", dest)
    # 80 Mbit/s: the 64 MiB layer would take ~7 s, long enough to cut it part way.
    with shaped(rig.out, OUT_DEV, "80mbit") as link:
        job = subprocess.Popen(rig.node.argv(argv), env=mirror_env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            def past_16m() -> bool:
                return any(t.stat().st_size >= 16 * MiB for t in mirror.tmp_files())

            wait_for("16 MiB of the 64 MiB layer in the cache's tmp file", past_16m,
                     deadline_s=45, alive=mirror.proc.dead)
            tunnel.cut()  # danted and every tunnel through it are gone, then danted is back
            link.lift()
            _, err = job.communicate(timeout=90)
            assert job.returncode == 0, f"skopeo copy: exit {job.returncode}: {err}"
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
    verify_dir_copy(ref, dest)
    assert mirror.cached(big)
    log = "\n".join(mirror.log_lines(mark))
    broke = re.search(rf"{big} broke at byte (\d+) \(upstream closed the connection before the "
                      r"end of the body .*\); resuming", log)
    assert broke, log
    cut_at = int(broke.group(1))
    assert 16 * MiB <= cut_at < size, cut_at
    # The rest came with one ranged request: exactly the bytes after the cut.
    ranged = [e for e in cdn_gets(rig, big) if e["status"] == "206"]
    assert [sent_bytes(e) for e in ranged] == [size - cut_at], cdn_gets(rig, big)
    spent = tunnel.bytes() - before
    assert spent.down < size * 1.10 + SMALL_BOUND, f"{spent}: more than one copy of {size} B"


# -- 5. corrupted upstream bytes are refused and never cached -----------------------------------


def test_corrupt_upstream_blob_fails_and_is_not_cached(rig: Rig, images: dict[str, ImageRef],
                                                       mirror: RunningMirror,
                                                       mirror_env: dict[str, str],
                                                       tmp_path: Path) -> None:
    ref = images["hub:mirror-corrupt"]
    bad = ref.image.layer_digests[1]
    hexd = bad.split(":", 1)[1]
    stored = (rig.outside_storage / "docker" / "registry" / "v2" / "blobs" / "sha256" /
              hexd[:2] / hexd / "data")
    original = stored.read_bytes()
    mark = mirror.log_mark()
    try:
        flipped = bytearray(original)
        mid = len(flipped) // 2
        flipped[mid:mid + 16] = bytes(b ^ 0xFF for b in flipped[mid:mid + 16])
        stored.write_bytes(bytes(flipped))  # same size: only the digest can tell
        pull = skopeo_copy(rig, mirror_env, f"docker://{ref.reference}", tmp_path / "c",
                           check=False)
        assert pull.returncode != 0, f"pull of a corrupt layer succeeded: {pull.stdout}"
        got = mirror.curl(f"/v2/{ref.repo}/blobs/{bad}", "-D", "-", "-o",
                          str(tmp_path / "blob"), check=False)
    finally:
        stored.write_bytes(original)
    log = "\n".join(mirror.log_lines(mark))
    print(f"skopeo: {pull.stderr.strip()}\ncurl exit {got.returncode}: {got.stdout}{got.stderr}")
    assert f"{bad} from docker.io failed verification, not cached" in log, log
    # curl was promised the layer's length and got less: an error, never a wrong blob.
    assert got.returncode == 18, (got.returncode, got.stdout, got.stderr)
    assert (tmp_path / "blob").stat().st_size < len(original)
    assert not mirror.blob_file(bad).exists()
    assert_no_tmp_left(mirror)
    assert bad in pull.stderr or "unexpected EOF" in pull.stderr, pull.stderr
    # Nothing was poisoned: with the registry's bytes right again the pull just works.
    skopeo_copy(rig, mirror_env, f"docker://{ref.reference}", tmp_path / "again")
    verify_dir_copy(ref, tmp_path / "again")
    assert mirror.cached(bad)


# -- 6. the gateway down: cached images still pull, tags answered stale --------------------------


def test_gateway_down_serves_cached_image_stale(rig: Rig, images: dict[str, ImageRef],
                                                mirror: RunningMirror,
                                                mirror_env: dict[str, str],
                                                tunnel: MirrorTunnel, tmp_path: Path) -> None:
    ref = images["hub:mirror-stale"]
    never = images["quay:mirror-stale"]  # never pulled: nothing to fall back on
    skopeo_copy(rig, mirror_env, f"docker://{ref.reference}", tmp_path / "warm")
    accept = ("application/vnd.docker.distribution.manifest.v2+json,"
              "application/vnd.oci.image.manifest.v1+json")
    with tunnel.down():
        mark = mirror.log_mark()
        head = mirror.curl(f"/v2/{ref.repo}/manifests/{ref.tag}", "-I", "-H",
                           f"Accept: {accept}").stdout
        headers = headers_of(head)
        assert head.startswith("HTTP/1.1 200"), head
        assert headers.get("x-fwdproxy-cache") == "stale", head
        assert headers.get("warning", "").startswith("110 "), head
        assert headers.get("docker-content-digest") == ref.digest, head

        skopeo_copy(rig, mirror_env, f"docker://{ref.reference}", tmp_path / "tag")
        verify_dir_copy(ref, tmp_path / "tag")
        by_digest = f"docker://docker.io/{ref.repo}@{ref.digest}"
        skopeo_copy(rig, mirror_env, by_digest, tmp_path / "digest")
        verify_dir_copy(ref, tmp_path / "digest")
        states = [s for s in mirror.states(mark) if ref.repo in s["what"]]
        tag_states = {s["state"] for s in states if s["what"].endswith(":v1")}
        assert tag_states == {"stale"}, states

        missing = mirror.curl(f"/v2/quay.io/{never.repo}/manifests/{never.tag}", "-H",
                              f"Accept: {accept}", "-w", "\n%{http_code}", check=False)
        body, _, code = missing.stdout.rpartition("\n")
        assert code in ("502", "503"), missing.stdout
        assert json.loads(body)["errors"][0]["message"].startswith("upstream quay.io"), body
