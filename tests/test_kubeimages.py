"""Images named by Kubernetes manifests and kubectl output, for `cache warm --from`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from fwdproxy.cli.kubeimages import ManifestError, images_in, images_in_text
from fwdproxy.cli.main import main

MANIFEST = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: web}
spec:
  template:
    spec:
      initContainers: [{name: init, image: busybox:1.36}]
      containers:
        - {name: app, image: ghcr.io/org/app:1.2}
        - {name: side, image: "quay.io/org/sidecar@sha256:%s"}
---
apiVersion: batch/v1
kind: CronJob
spec:
  jobTemplate:
    spec:
      template:
        spec:
          containers: [{name: job, image: ghcr.io/org/app:1.2}]
---
kind: ConfigMap
data: {containers: "not a list of containers"}
""" % ("a" * 64)


def test_images_in_multi_document_yaml() -> None:
    assert images_in_text(MANIFEST) == [
        "busybox:1.36",
        "ghcr.io/org/app:1.2",
        f"quay.io/org/sidecar@sha256:{'a' * 64}",
    ]


def test_images_in_kubectl_pod_list_json() -> None:
    pods = {"kind": "List", "items": [
        {"kind": "Pod", "spec": {"containers": [{"image": "nginx:1.27"}],
                                 "ephemeralContainers": [{"image": "busybox"}]},
         "status": {"containerStatuses": [{"image": "docker.io/library/nginx:1.27"}]}},
        {"kind": "Pod", "spec": {"containers": [{"image": "nginx:1.27"}, {"name": "noimage"}]}},
    ]}
    assert images_in_text(json.dumps(pods)) == ["nginx:1.27", "busybox"]


def test_garbage_is_a_manifest_error() -> None:
    with pytest.raises(ManifestError):
        images_in_text("key: [unclosed")


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(st.sampled_from(["containers", "image", "spec", "x"]),
                                      kids, max_size=4), max_leaves=30))
def test_any_shape_gives_a_list_of_strings(doc: object) -> None:
    out = images_in(doc)
    assert all(isinstance(i, str) and i for i in out)
    assert len(out) == len(set(out))


def test_warm_from_file_needs_images(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "empty.yaml"
    f.write_text("kind: ConfigMap\n")
    assert main(["cache", "warm", "--from", str(f), "--mirror", "http://127.0.0.1:9"]) == 2
    assert "nothing to warm" in capsys.readouterr().err
