"""Check 8: eight concurrent 4 MiB blob downloads through the tunnel (Docker Hub token, 307,
CDN) alongside eight intranet downloads, all through one fwdproxy, every byte checked."""

from __future__ import annotations

import hashlib
import json
import subprocess
import time
from pathlib import Path

import pytest
from e2erig.clients import access_entries, curl
from e2erig.proxy import RunningProxy
from e2erig.topology import BULK_COUNT, INTRA_WEB, Rig

pytestmark = pytest.mark.e2e

DEADLINE_S = 90.0


def test_parallel_blobs_and_intranet(rig: Rig, proxy: RunningProxy, tmp_path: Path) -> None:
    bulk = rig.image("hub:bulk")
    env = rig.client_env()
    token = json.loads(curl(
        rig.node,
        ["--proxy", proxy.http_url, "--cacert", str(rig.ca.cert), "-G",
         "https://auth.docker.io/token", "--data-urlencode", "service=registry.docker.io",
         "--data-urlencode", f"scope=repository:{bulk.repo}:pull"], env).stdout)["token"]
    blobs = bulk.image.layers[1:]
    assert len(blobs) == BULK_COUNT and all(len(b.blob) > 4 * 1024 * 1024 for b in blobs)
    web_bytes = rig.intranet_blob.read_bytes()

    jobs: list[tuple[subprocess.Popen[bytes], Path, str]] = []
    for i, layer in enumerate(blobs):
        out = tmp_path / f"blob{i}"
        argv = ["curl", "-sS", "-f", "-L", "--max-time", "60", "--proxy", proxy.http_url,
                "--cacert", str(rig.ca.cert), "-H", f"Authorization: Bearer {token}",
                "-o", str(out), f"https://registry-1.docker.io/v2/{bulk.repo}/blobs/{layer.digest}"]
        jobs.append((subprocess.Popen(rig.node.argv(argv), env=env, stderr=subprocess.PIPE),
                     out, layer.digest))
    for i in range(BULK_COUNT):
        out = tmp_path / f"web{i}"
        argv = ["curl", "-sS", "-f", "--max-time", "60", "--proxy", proxy.http_url,
                "-o", str(out), f"http://{INTRA_WEB}/{rig.intranet_blob.name}"]
        jobs.append((subprocess.Popen(rig.node.argv(argv), env=env, stderr=subprocess.PIPE),
                     out, "sha256:" + hashlib.sha256(web_bytes).hexdigest()))

    end = time.monotonic() + DEADLINE_S
    failures = []
    try:
        for popen, out, digest in jobs:
            _, err = popen.communicate(timeout=max(0.1, end - time.monotonic()))
            if popen.returncode != 0:
                failures.append(f"{out.name}: curl exit {popen.returncode}: {err.decode()}")
                continue
            got = "sha256:" + hashlib.sha256(out.read_bytes()).hexdigest()
            if got != digest:
                failures.append(f"{out.name}: sha256 {got} != {digest}")
    finally:
        for popen, _, _ in jobs:
            if popen.poll() is None:
                popen.kill()
                popen.wait()
    assert not failures, "\n".join(failures)

    cdn = [e for e in access_entries(rig) if e["host"] == "production.cloudflare.docker.com"
           and e["status"] == "200"]
    for layer in blobs:
        hexd = layer.digest.split(":", 1)[1]
        assert any(hexd in e["path"] for e in cdn), f"no CDN download of {layer.digest} logged"
