"""A node mirror with a parent (the cluster's gateway cache): one fetch per cluster, fallback
to the node's own route when the parent is down, and loops refused."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import pytest

from tests.helpers import closed_port
from tests.mirror.conftest import running_mirror
from tests.mirror.fakeregistry import FakeRegistry, mirror_config

REPO = "team/app"


def biggest(reg: FakeRegistry) -> str:
    return max(reg.blobs, key=lambda d: len(reg.blobs[d]))


async def test_nodes_share_the_parents_fetch(tmp_path: Path, registry: FakeRegistry) -> None:
    regs = {registry.host: {"plain_http": True}}
    async with running_mirror(mirror_config(str(tmp_path / "gw"), registries=regs)) as gw:
        parent = gw.url
        async with contextlib.AsyncExitStack() as stack:
            nodes = [
                await stack.enter_async_context(running_mirror(mirror_config(
                    str(tmp_path / f"n{i}"), registries=regs, parent=parent)))
                for i in range(3)
            ]
            d = biggest(registry)
            for node in nodes:
                async with await node.get(f"/v2/{REPO}/manifests/v1?ns={registry.host}") as r:
                    assert r.status == 200, await r.text()
                async with await node.get(f"/v2/{REPO}/blobs/{d}?ns={registry.host}") as r:
                    assert r.status == 200
                    assert await r.read() == registry.blobs[d]
                fetched = node.service.stats[registry.host].bytes_fetched
                assert set(fetched) == {f"parent {parent.removeprefix('http://')}"}
        assert registry.blob_gets[d] == 1
        assert registry.manifest_heads["v1"] == 1  # later nodes got the parent's fresh tag
        assert gw.service.stats[registry.host].hits >= 2


async def test_parent_down_falls_back_to_the_own_route(tmp_path: Path,
                                                       registry: FakeRegistry,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    regs = {registry.host: {"plain_http": True}}
    dead = f"http://127.0.0.1:{closed_port()}"
    cfg = mirror_config(str(tmp_path / "n"), registries=regs, parent=[dead])
    async with running_mirror(cfg) as node:
        d = biggest(registry)
        with caplog.at_level(logging.WARNING, "fwdproxy.mirror"):
            async with await node.get(f"/v2/{REPO}/blobs/{d}?ns={registry.host}") as r:
                assert r.status == 200
                assert await r.read() == registry.blobs[d]
        assert f"parent {dead} failed" in caplog.text
        assert registry.blob_gets[d] == 1


async def test_a_loop_of_parents_is_refused(tmp_path: Path, registry: FakeRegistry,
                                            caplog: pytest.LogCaptureFixture) -> None:
    regs = {registry.host: {"plain_http": True}}
    async with running_mirror(mirror_config(str(tmp_path / "a"), registries=regs)) as a:
        async with await a.get(f"/v2/{REPO}/manifests/v1?ns={registry.host}",
                               headers={"X-Fwdproxy-Via": f"x, {a.service.mirror.instance_id}"}
                               ) as r:  # type: ignore[union-attr]
            assert r.status == 508
            assert "mirror loop" in (await r.json())["errors"][0]["message"]
        # b's parent is a, whose parent is b: a request to b comes back to b and is refused
        # there; b then falls back to its own route instead of following the loop.
        cfg_b = mirror_config(str(tmp_path / "b"), registries=regs, parent=a.url)
        async with running_mirror(cfg_b) as b:
            import dataclasses

            from fwdproxy.config.mirror import MirrorParent

            cfg = a.server.state.config
            assert cfg.mirror is not None
            a.server.state.config = dataclasses.replace(
                cfg, mirror=dataclasses.replace(cfg.mirror, parents=(MirrorParent(b.url),)))
            with caplog.at_level(logging.WARNING, "fwdproxy.mirror"):
                async with await b.get(f"/v2/{REPO}/manifests/v1?ns={registry.host}") as r:
                    assert r.status == 200
            assert "refused a loop of mirrors" in caplog.text


async def test_a_chain_over_the_hop_limit_is_refused_as_such(tmp_path: Path,
                                                             registry: FakeRegistry) -> None:
    """A via chain at the hop limit that does not name this mirror is a loop it cannot name
    (or a chain too long): the answer says which, not that it passed this mirror before."""
    regs = {registry.host: {"plain_http": True}}
    async with running_mirror(mirror_config(str(tmp_path / "a"), registries=regs)) as a:
        chain = ", ".join(f"m{i}" for i in range(8))
        async with await a.get(f"/v2/{REPO}/manifests/v1?ns={registry.host}",
                               headers={"X-Fwdproxy-Via": chain}) as r:
            assert r.status == 508
            message = (await r.json())["errors"][0]["message"]
        assert "mirror loop" in message and "check the mirror.parent settings" in message
        assert "passed through 8 mirrors" in message, message
        assert "through this mirror" not in message, message


async def test_parent_over_tls_with_the_childs_ca_bundle(tmp_path: Path,
                                                         registry: FakeRegistry) -> None:
    """mirror.tls on the parent's listener; the child trusts it through parent.ca_file."""
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("localhost")
    cert.private_key_and_cert_chain_pem.write_to_path(str(tmp_path / "gw.pem"))
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    regs = {registry.host: {"plain_http": True}}
    gw_cfg = mirror_config(str(tmp_path / "gw"), registries=regs,
                           tls={"cert": str(tmp_path / "gw.pem"), "key": str(tmp_path / "gw.pem")})
    async with running_mirror(gw_cfg, scheme="https") as gw:
        port = gw.url.rsplit(":", 1)[1]
        d = biggest(registry)
        for ca_file, route in ((str(tmp_path / "ca.pem"), f"parent localhost:{port}"),
                               (None, "direct")):
            parent: dict[str, str] = {"url": f"https://localhost:{port}"}
            if ca_file:
                parent["ca_file"] = ca_file
            cfg = mirror_config(str(tmp_path / f"n{route[:6]}"), registries=regs, parent=[parent])
            async with running_mirror(cfg) as node:
                async with await node.get(f"/v2/{REPO}/blobs/{d}?ns={registry.host}") as r:
                    assert r.status == 200
                    assert await r.read() == registry.blobs[d]
                # Without the CA the parent is untrusted: the node falls back to its own route.
                assert set(node.service.stats[registry.host].bytes_fetched) == {route}
