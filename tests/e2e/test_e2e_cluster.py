"""Cluster scale: three container hosts behind one gateway share a parent mirror.

Three node namespaces (e2erig.cluster), each with containerd and its own fwdproxy mirror on
127.0.0.1:5000 that ctr pulls through (the `_default/hosts.toml` of `fwdproxy gen
containerd-mirror`); the gateway runs the parent mirror (`mirror.parent` of every node) and a
danted, each node's own route. "The tunnel" is the gateway's link to the registries: iptables
counts every byte between the gateway and the registry front (OUT_IP:443), whoever sends it —
the parent's fetches and danted's (the nodes' own routes) both cross it.

1. With the parent, three nodes pulling one image at once cost the tunnel one copy of it.
2. Without it, the same pull costs three copies (both numbers are printed).
3. With the parent down, the nodes pull through their own routes and say why; a parent that
   dies in the middle of a layer is replaced by the node's own route from where it stopped.
4. Two nodes that name each other as parent: the loop is refused with a clear error and the
   pull still succeeds.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator

import pytest
from e2erig.clients import FLOW, access_entries
from e2erig.cluster import (
    LOOP_IPS,
    MIRROR_PORT,
    Bytes,
    Cluster,
    Fwdproxy,
    Node,
    build_cluster,
)
from e2erig.images import bulk_layers, make_image
from e2erig.mirror import gen_mirror, shaped
from e2erig.prereq import require_tools
from e2erig.procs import wait_for
from e2erig.topology import ImageRef, Rig

pytestmark = pytest.mark.e2e

MiB = 1024 * 1024
SMALL_BOUND = 64 * 1024  # bytes a pull may cost beyond its blobs: tokens, HEADs, TLS, manifests
CTR_NS = "e2e-cluster"
# Filled by the tests that measure the tunnel, so the second can compare with the first.
MEASURED: dict[str, Bytes] = {}


def _image(name: str, layers: int, size: int) -> ImageRef:
    return ImageRef("hub", f"library/e2e-{name}", "v1",
                    make_image(name, extra_layers=bulk_layers(layers, size, name)))


@pytest.fixture(scope="module")
def images(rig: Rig) -> dict[str, ImageRef]:
    """One image per test, so no pull is answered from another test's caches; the two the
    tunnel is measured with have the same shape (two 2 MiB layers and a small one)."""
    todo = {
        "hub:cluster-parent": _image("cluster-parent", 2, 2 * MiB),
        "hub:cluster-alone": _image("cluster-alone", 2, 2 * MiB),
        "hub:cluster-before": _image("cluster-before", 0, 0),
        "hub:cluster-down": _image("cluster-down", 1, MiB),
        "hub:cluster-cut": _image("cluster-cut", 1, 8 * MiB),
        "hub:cluster-loop": _image("cluster-loop", 1, MiB),
    }
    rig.publish(todo)
    return todo


@pytest.fixture(scope="module")
def cluster(rig: Rig) -> Iterator[Cluster]:
    require_tools({"containerd": "containerd", "ctr": "containerd", "iptables": "iptables"})
    root = rig.tmp / "gen-cluster-containerd-mirror"
    written = gen_mirror(rig, "containerd-mirror", root)
    assert list(written) == ["etc/containerd/certs.d/_default/hosts.toml"], written
    built = build_cluster(rig, root / "etc/containerd/certs.d")
    try:
        yield built
    finally:
        problems = built.close()
        assert not problems, "cluster teardown: " + "; ".join(problems)


@pytest.fixture(autouse=True)
def mirrors_stopped(cluster: Cluster) -> Iterator[None]:
    """Every test starts the mirrors it needs; none outlives it."""
    try:
        yield
    finally:
        for fp in list(cluster.started):
            cluster.stop(fp)
        for node in cluster.nodes:
            node.mirror = None


# -- helpers --------------------------------------------------------------------------------------


def ctr_argv(node: Node, *args: str) -> list[str]:
    assert node.containerd is not None
    return ["ctr", "-a", str(node.containerd.socket), "-n", CTR_NS, *args]


def pull(rig: Rig, cluster: Cluster, nodes: list[Node], ref: ImageRef) -> int:
    """ctr pulls `ref` on every node at once, each through its own mirror; then each node's
    image, manifest and blobs are checked against the pushed digests. Returns the bytes of
    the image as the registry serves it: the manifest (Docker schema 2, as pushed; not the
    OCI one we built) and the blobs."""
    env = rig.client_env()  # no proxy: ctr reaches only its node's mirror on loopback
    jobs: dict[str, subprocess.Popen[str]] = {}
    try:
        for node in nodes:
            argv = ctr_argv(node, "images", "pull", "--snapshotter", "native", "--hosts-dir",
                            str(cluster.hosts_dir), ref.reference)
            jobs[node.name] = subprocess.Popen(node.ns.argv(argv), env=env, text=True,
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        failures = []
        for name, job in jobs.items():
            out, err = job.communicate(timeout=90)
            if job.returncode != 0:
                failures.append(f"{name}: ctr pull exit {job.returncode}: {err}{out[-2000:]}")
        assert not failures, "\n".join(failures)
    finally:
        for job in jobs.values():
            if job.poll() is None:
                job.kill()
                job.wait()
    sizes = {verify_pulled(rig, node, ref) for node in nodes}
    assert len(sizes) == 1, sizes
    return sizes.pop()


def verify_pulled(rig: Rig, node: Node, ref: ImageRef) -> int:
    """The node's containerd has `ref` with the pushed manifest and blobs, each matching its
    digest; returns their bytes."""
    env = rig.client_env()
    listing = node.ns.run(ctr_argv(node, "images", "ls"), env=env).stdout
    line = next((ln for ln in listing.splitlines() if ln.startswith(ref.reference + " ")), "")
    assert ref.digest in line, f"{node.name}: {listing}"
    total = 0
    for digest in [ref.digest, *blob_digests(ref)]:
        blob = node.ns.run(ctr_argv(node, "content", "get", digest), env=env,
                           text=False).stdout
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == digest, (node.name, digest)
        total += len(blob)
    return total


def blob_digests(ref: ImageRef) -> list[str]:
    return [ref.image.config_digest, *ref.image.layer_digests]


def blob_bytes(ref: ImageRef) -> int:
    return len(ref.image.config) + sum(len(layer.blob) for layer in ref.image.layers)


def cdn_gets(rig: Rig, digest: str) -> list[dict[str, str]]:
    """Downloads of `digest` from the Docker Hub CDN stand-in, as nginx logged them."""
    hexd = digest.split(":", 1)[1]
    return [e for e in access_entries(rig) if e["host"] == FLOW["hub"]["cdn_host"]
            and e["method"] == "GET" and hexd in e["path"] and e["status"] in ("200", "206")]


def wait_cdn_gets(rig: Rig, ref: ImageRef, n: int) -> dict[str, int]:
    """CDN downloads per blob of `ref` once each has `n` (nginx logs a request when it has
    ended), or what there is after 5 s."""
    def counts() -> dict[str, int]:
        return {d: len(cdn_gets(rig, d)) for d in blob_digests(ref)}

    end = time.monotonic() + 5
    got = counts()
    while any(v < n for v in got.values()) and time.monotonic() < end:
        time.sleep(0.05)
        got = counts()
    return got


def fetched_routes(fp: Fwdproxy, registry: str = "docker.io") -> dict[str, int]:
    """The mirror's upstream bytes by route (`parent host:port` or its own route's name)."""
    regs = fp.api_mirror()["registries"]
    return dict(regs.get(registry, {}).get("bytes_fetched", {}))


def blob_states(fp: Fwdproxy, ref: ImageRef) -> dict[str, list[str]]:
    """Cache states of the GETs of each of `ref`'s blobs, as the mirror logged them."""
    out: dict[str, list[str]] = {d: [] for d in blob_digests(ref)}
    for s in fp.states():
        if s["kind"] == "blob" and s["method"] == "GET" and ref.repo in s["what"]:
            digest = s["what"].rsplit("@", 1)[1]
            if digest in out:
                out[digest].append(s["state"])
    return out


def describe(spent: Bytes, nodes: int) -> str:
    parts = [f"tunnel down {spent['tunnel_down']} up {spent['tunnel_up']}"]
    for i in range(1, nodes + 1):
        parts.append(f"node{i}: from parent {spent[f'parent{i}_down']}, own route "
                     f"{spent[f'own{i}_down']}")
    return "; ".join(parts)


# -- 1. with the parent: one copy over the tunnel for the whole cluster ---------------------------


def test_three_nodes_pull_through_the_parent_once(rig: Rig, images: dict[str, ImageRef],
                                                  cluster: Cluster) -> None:
    ref = images["hub:cluster-parent"]
    parent = cluster.start_parent("shared")
    cluster.start_nodes("shared", {n.index: cluster.node_config(n, "shared", parent=n.parent_url)
                                   for n in cluster.nodes})
    before = cluster.bytes()
    size = pull(rig, cluster, cluster.nodes, ref)
    spent = cluster.bytes() - before
    MEASURED["with parent"] = spent
    report = f"3 nodes WITH the parent, image {size} B: {describe(spent, 3)}"
    print(report)
    assert size <= spent["tunnel_down"] <= size * 1.10 + SMALL_BOUND, report
    # Each blob left the registry once, and the parent logged one miss for it.
    assert wait_cdn_gets(rig, ref, 1) == dict.fromkeys(blob_digests(ref), 1)
    states = blob_states(parent, ref)
    for digest, seen in states.items():
        assert seen.count("miss") == 1, (digest, states)
        assert set(seen) <= {"miss", "coalesced", "hit"} and len(seen) == 3, (digest, states)
    for node in cluster.nodes:
        assert node.mirror is not None
        i = node.index
        # Everything came from the parent; the node's own route was never used.
        assert spent[f"parent{i}_down"] >= size, report
        assert spent.total(f"own{i}") == 0, report
        # Its mirror's upstream bytes: the manifest and each blob once, all from the parent.
        routes = fetched_routes(node.mirror)
        assert routes == {f"parent {node.gw_ip}:{MIRROR_PORT}": size}, (node.name, routes)
    # The parent fetched each blob once through its own route (direct, over the tunnel); its
    # manifest answers are not shared between concurrent misses, so up to three of those.
    own = fetched_routes(parent)
    manifest = size - blob_bytes(ref)
    assert not any(r.startswith("parent") for r in own), own
    assert size <= sum(own.values()) <= size + 2 * manifest, own


# -- 2. without the parent: one copy per node -----------------------------------------------------


def test_three_nodes_without_parent_fetch_three_copies(rig: Rig, images: dict[str, ImageRef],
                                                       cluster: Cluster) -> None:
    ref = images["hub:cluster-alone"]
    cluster.start_nodes("alone", {n.index: cluster.node_config(n, "alone")
                                  for n in cluster.nodes})
    before = cluster.bytes()
    size = pull(rig, cluster, cluster.nodes, ref)
    spent = cluster.bytes() - before
    MEASURED["without parent"] = spent
    report = f"3 nodes WITHOUT a parent, image {size} B: {describe(spent, 3)}"
    print(report)
    if "with parent" in MEASURED:
        print(f"tunnel bytes down for 3 nodes: with the parent "
              f"{MEASURED['with parent']['tunnel_down']}, without "
              f"{spent['tunnel_down']} (image {size} B)")
    assert 3 * size <= spent["tunnel_down"] <= 3 * (size * 1.10 + SMALL_BOUND), report
    assert wait_cdn_gets(rig, ref, 3) == dict.fromkeys(blob_digests(ref), 3)
    for node in cluster.nodes:
        assert node.mirror is not None
        i = node.index
        assert size <= spent[f"own{i}_down"] <= size * 1.10 + SMALL_BOUND, report
        assert spent.total(f"parent{i}") == 0, report
        routes = fetched_routes(node.mirror)
        assert sum(routes.values()) == size, routes
        assert not any(r.startswith("parent") for r in routes), routes
    if "with parent" in MEASURED:  # the shapes are the same: the parent saves two copies
        assert spent["tunnel_down"] > 2.5 * MEASURED["with parent"]["tunnel_down"]


# -- 3. the parent down: each node's own route ----------------------------------------------------


def test_parent_down_nodes_fall_back_to_their_own_route(rig: Rig, images: dict[str, ImageRef],
                                                        cluster: Cluster) -> None:
    before_ref, ref = images["hub:cluster-before"], images["hub:cluster-down"]
    parent = cluster.start_parent("down")
    cluster.start_nodes("down", {n.index: cluster.node_config(n, "down", parent=n.parent_url)
                                 for n in cluster.nodes})
    warm = pull(rig, cluster, cluster.nodes, before_ref)  # the cluster uses its parent ...
    for node in cluster.nodes:
        assert node.mirror is not None
        assert fetched_routes(node.mirror) == {f"parent {node.gw_ip}:{MIRROR_PORT}": warm}
    cluster.stop(parent)  # ... until it goes away
    for node in cluster.nodes:
        refused = node.ns.tcp_probe(node.gw_ip, MIRROR_PORT)
        assert refused is not None and "refused" in refused.lower(), refused
    before = cluster.bytes()
    size = pull(rig, cluster, cluster.nodes, ref)
    spent = cluster.bytes() - before
    report = f"parent down, 3 nodes, image {size} B: {describe(spent, 3)}"
    print(report)
    assert 3 * size <= spent["tunnel_down"] <= 3 * (size * 1.10 + SMALL_BOUND), report
    for node in cluster.nodes:
        assert node.mirror is not None
        i = node.index
        log = node.mirror.log_text()
        failed = [ln for ln in log.splitlines() if f"parent {node.parent_url} failed" in ln]
        print("\n".join(failed))
        assert failed, log
        assert "Connection refused" in failed[0] and "using the next source" in failed[0], failed
        assert size <= spent[f"own{i}_down"] <= size * 1.10 + SMALL_BOUND, report
        routes = fetched_routes(node.mirror)
        own = {r: n for r, n in routes.items() if not r.startswith("parent")}
        assert sum(own.values()) == size, routes
        assert routes[f"parent {node.gw_ip}:{MIRROR_PORT}"] == warm, routes


def test_parent_dies_mid_layer_node_resumes_through_its_own_route(
        rig: Rig, images: dict[str, ImageRef], cluster: Cluster) -> None:
    """The parent is killed while it streams a layer to a node (its link slowed so the layer
    is still in flight): the node continues the same layer from where it stopped through its
    own route (a Range request), and the pull succeeds."""
    ref = images["hub:cluster-cut"]
    layer = ref.image.layer_digests[1]
    layer_size = len(ref.image.layers[1].blob)
    node = cluster.nodes[0]
    parent = cluster.start_parent("cut")
    cluster.start_nodes("cut", {1: cluster.node_config(node, "cut", parent=node.parent_url)})
    assert node.mirror is not None
    tmp = node.mirror.cache_dir / "tmp"
    env = rig.client_env()
    argv = ctr_argv(node, "images", "pull", "--snapshotter", "native", "--hosts-dir",
                    str(cluster.hosts_dir), ref.reference)
    before = cluster.bytes()
    # 8 Mbit/s from the gateway to the node: the 8 MiB layer would take ~8 s to reach it.
    with shaped(rig.gw, f"to-{node.name}", "8mbit") as link:
        job = subprocess.Popen(node.ns.argv(argv), env=env, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            def past_2m() -> bool:
                return tmp.is_dir() and any(f.stat().st_size >= 2 * MiB for f in tmp.iterdir())

            wait_for("2 MiB of the layer in the node's cache tmp file", past_2m,
                     deadline_s=30, alive=node.mirror.proc.dead)
            os.killpg(parent.proc.pid, signal.SIGKILL)  # the parent dies, no goodbye
            parent.proc.popen.wait(timeout=10)
            cluster.stop(parent)
            link.lift()
            _, err = job.communicate(timeout=90)
            assert job.returncode == 0, f"ctr pull: exit {job.returncode}: {err}"
        finally:
            if job.poll() is None:
                job.kill()
                job.wait()
    size = verify_pulled(rig, node, ref)
    spent = cluster.bytes() - before
    log = node.mirror.log_text()
    failed = [ln for ln in log.splitlines() if f"parent {node.parent_url} failed" in ln]
    routes = fetched_routes(node.mirror)
    from_parent = routes.pop(f"parent {node.gw_ip}:{MIRROR_PORT}", 0)
    own = sum(routes.values())
    # (The gateway->node counter on the parent's port is not shown: under tbf it counts every
    # retransmission of what the shaper dropped.)
    print(f"parent killed mid-layer, image {size} B: node got {from_parent} B from the parent "
          f"and {own} B through its own route ({spent['own1_down']} IP bytes); tunnel down "
          f"{spent['tunnel_down']} (the parent's full copy and the node's rest)\n"
          + "\n".join(failed))
    assert failed, log
    assert "closed the connection before the end of the body" in failed[0], failed
    # The rest of the layer came over the node's own route as one ranged download, and no
    # byte was fetched twice.
    assert from_parent + own == size, (routes, from_parent, size)
    assert 0 < own < layer_size, (routes, from_parent)
    ranged = [e for e in cdn_gets(rig, layer) if e["status"] == "206"]
    assert len(ranged) == 1, cdn_gets(rig, layer)
    assert own <= spent["own1_down"] <= own * 1.10 + SMALL_BOUND
    assert spent["tunnel_down"] <= (size + own) * 1.10 + SMALL_BOUND


# -- 4. a loop of parents is refused, clearly, and the pull still works ---------------------------


def test_parent_loop_is_refused_and_the_pull_succeeds(rig: Rig, images: dict[str, ImageRef],
                                                      cluster: Cluster) -> None:
    ref = images["hub:cluster-loop"]
    a, b = cluster.nodes[0], cluster.nodes[1]
    url_a, url_b = (f"http://{ip}:{MIRROR_PORT}" for ip in LOOP_IPS)
    cluster.start_nodes("loop", {
        1: cluster.node_config(a, "loop", parent=url_b, extra_listen=LOOP_IPS[0]),
        2: cluster.node_config(b, "loop", parent=url_a, extra_listen=LOOP_IPS[1]),
    })
    assert a.mirror is not None and b.mirror is not None
    before = cluster.bytes()
    size = pull(rig, cluster, [a], ref)
    spent = cluster.bytes() - before
    log_a, log_b = a.mirror.log_text(), b.mirror.log_text()
    refused = [ln for ln in log_a.splitlines() if "refused a loop of mirrors" in ln]
    b_failed = [ln for ln in log_b.splitlines() if f"parent {url_a} failed" in ln]
    print("\n".join(refused + b_failed))
    # A asked B, B asked A with both in the via chain: A refused, B fetched through its own
    # route and answered A. The registry was asked once.
    assert refused, f"a:\n{log_a}\nb:\n{log_b}"
    assert "check mirror.parent" in refused[0], refused
    assert b_failed and "answered 508" in b_failed[0], log_b
    assert fetched_routes(a.mirror) == {f"parent {LOOP_IPS[1]}:{MIRROR_PORT}": size}
    routes_b = fetched_routes(b.mirror)
    assert sum(routes_b.values()) == size, routes_b
    assert not any(r.startswith("parent") for r in routes_b), routes_b
    assert spent.total("own1") == 0, describe(spent, 2)
    assert size <= spent["own2_down"] <= size * 1.10 + SMALL_BOUND, describe(spent, 2)
    assert size <= spent["tunnel_down"] <= size * 1.10 + SMALL_BOUND, describe(spent, 2)

    # What a client of a looping mirror sees: a via chain as long as the hop limit is a loop
    # the mirror cannot name, answered like one (its own id cannot be known from outside).
    chain = ", ".join(f"m{i}" for i in range(8))
    got = b.ns.run(["curl", "-sS", "--max-time", "10", "-H", f"X-Fwdproxy-Via: {chain}",
                    "-w", "\n%{http_code}",
                    f"{url_a}/v2/{ref.repo}/manifests/{ref.tag}?ns=docker.io"],
                   env=rig.client_env(), timeout_s=20).stdout
    body, _, code = got.rpartition("\n")
    assert code == "508", got
    message = json.loads(body)["errors"][0]["message"]
    assert message.startswith("mirror loop: this request already passed through 8 mirrors"), \
        message
    assert "check the mirror.parent settings" in message, message
    wait_for("a's log line for the refused chain",
             lambda: f"(via {chain})" in a.mirror.log_text() if a.mirror else False,
             deadline_s=5)
