"""Real clients run in the node namespace, and checks of what they fetched and what they left
in the stand-in registry's access log."""

from __future__ import annotations

import hashlib
import io
import json
import re
import subprocess
import tarfile
import time
from pathlib import Path
from urllib.parse import unquote

from e2erig.netns import Netns
from e2erig.topology import ImageRef, Rig

# What each stand-in registry's pull flow looks like in nginx's access log.
FLOW = {
    "hub": {
        "token_host": "auth.docker.io", "token_path": "/token",
        "api_host": "registry-1.docker.io", "cdn_host": "production.cloudflare.docker.com",
        "cdn_path": "/registry-v2/docker/registry/v2/blobs/sha256/{h2}/{hex}/data",
    },
    "quay": {
        "token_host": "quay.io", "token_path": "/v2/auth",
        "api_host": "quay.io", "cdn_host": "cdn01.quay.io",
        "cdn_path": "/quayio-production-s3/sha256/{h2}/{hex}",
    },
}
LINE_RE = re.compile(r'^(?P<host>\S+) "(?P<method>\S+) (?P<path>\S+) [^"]*" (?P<status>\d{3}) ')


def skopeo(rig: Rig, args: list[str], env: dict[str, str], *, ns: Netns | None = None,
           timeout_s: float = 30.0, check: bool = True) -> subprocess.CompletedProcess[str]:
    """skopeo with the rig's policy file; its own deadline fires before ours."""
    argv = ["skopeo", "--policy", str(rig.tmp / "policy.json"),
            "--command-timeout", f"{int(timeout_s)}s", *args]
    return (ns or rig.node).run(argv, env=env, timeout_s=timeout_s + 10, check=check)


def skopeo_inspect(rig: Rig, ref: ImageRef, env: dict[str, str]) -> dict[str, object]:
    proc = skopeo(rig, ["inspect", "--cert-dir", str(rig.cert_dir),
                        f"docker://{ref.reference}"], env)
    return json.loads(proc.stdout)


def skopeo_copy_to_dir(rig: Rig, ref: ImageRef, env: dict[str, str], dest: Path) -> None:
    skopeo(rig, ["copy", "--quiet", "--src-cert-dir", str(rig.cert_dir),
                 f"docker://{ref.reference}", f"dir:{dest}"], env)


def verify_dir_copy(ref: ImageRef, dest: Path) -> None:
    """A `dir:` copy holds exactly the pushed manifest and blobs, each matching its digest."""
    manifest_bytes = (dest / "manifest.json").read_bytes()
    got = "sha256:" + hashlib.sha256(manifest_bytes).hexdigest()
    assert got == ref.digest, f"manifest digest {got} != pushed {ref.digest}"
    manifest = json.loads(manifest_bytes)
    layers = [layer["digest"] for layer in manifest["layers"]]
    assert layers == ref.image.layer_digests
    assert manifest["config"]["digest"] == ref.image.config_digest
    for digest in [*layers, manifest["config"]["digest"]]:
        blob = (dest / digest.split(":", 1)[1]).read_bytes()
        assert "sha256:" + hashlib.sha256(blob).hexdigest() == digest, f"blob {digest} corrupt"
    assert ref.image.marker in layer_file(dest / layers[0].split(":", 1)[1], "etc/e2e-image")


def layer_file(blob_path: Path, member: str) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(blob_path.read_bytes()), mode="r:*") as tar:
        fh = tar.extractfile(member)
        assert fh is not None, f"{member} missing from {blob_path}"
        return fh.read()


def access_entries(rig: Rig) -> list[dict[str, str]]:
    entries = []
    for line in rig.access_lines():
        m = LINE_RE.match(line)
        if m:
            entry = m.groupdict()
            entry["path"] = unquote(entry["path"])
            entry["line"] = line
            entries.append(entry)
    return entries


def pull_flow_problems(rig: Rig, ref: ImageRef) -> list[str]:
    """What is missing from the access log for a full pull of `ref`: token, 307 and CDN GET."""
    flow = FLOW[ref.registry]
    repo = ref.repo
    layer = ref.image.layer_digests[0]
    hexd = layer.split(":", 1)[1]
    entries = access_entries(rig)
    missing = []
    if not any(e["host"] == flow["token_host"] and e["path"].startswith(flow["token_path"])
               and f"repository:{repo}:pull" in e["path"] and e["status"] == "200"
               for e in entries):
        missing.append(f"token fetch for {repo} on {flow['token_host']}")
    if not any(e["host"] == flow["api_host"] and e["method"] == "GET"
               and e["path"] == f"/v2/{repo}/blobs/{layer}" and e["status"] == "307"
               and f'loc="https://{flow["cdn_host"]}/' in e["line"] for e in entries):
        missing.append(f"307 for {repo} blob {layer} on {flow['api_host']}")
    cdn_path = flow["cdn_path"].format(h2=hexd[:2], hex=hexd)
    if not any(e["host"] == flow["cdn_host"] and e["method"] == "GET"
               and e["path"].split("?", 1)[0] == cdn_path and e["status"] in ("200", "206")
               for e in entries):
        missing.append(f"CDN download of {layer} on {flow['cdn_host']}")
    return missing


def assert_pull_flow(rig: Rig, ref: ImageRef, deadline_s: float = 5.0) -> None:
    """nginx logs after the response is sent, so give the last line a moment to land."""
    end = time.monotonic() + deadline_s
    missing = pull_flow_problems(rig, ref)
    while missing and time.monotonic() < end:
        time.sleep(0.05)
        missing = pull_flow_problems(rig, ref)
    relevant = [line for line in rig.access_lines() if ref.repo in line
                or ref.image.layer_digests[0].split(":", 1)[1] in line]
    assert not missing, f"missing from nginx access log: {missing}\nrelevant lines:\n" + \
        "\n".join(relevant)


def curl(ns: Netns, args: list[str], env: dict[str, str], *, timeout_s: float = 60.0,
         check: bool = True) -> subprocess.CompletedProcess[str]:
    return ns.run(["curl", "-sS", "--max-time", str(int(timeout_s)), *args], env=env,
                  timeout_s=timeout_s + 10, check=check)
