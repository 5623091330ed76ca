"""The package's layers, checked on the source: imports point down only, no cycles, no IO in the
pure layers, no private names across modules.

Every import counts: module level, inside functions, and under TYPE_CHECKING, since each is a
dependency a reader has to hold in mind. The order, lowest first:

    core -> proto -> routing -> config -> net -> cache -> proxy -> server -> mirror -> admin -> cli
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "fwdproxy"
LAYERS = [
    "root",
    "core",
    "proto",
    "routing",
    "config",
    "net",
    "cache",
    "proxy",
    "server",
    "mirror",
    "admin",
    "cli",
]
# Modules that sit directly in the package, by layer.
TOP_LEVEL = {
    "fwdproxy": "root",
    "fwdproxy.routing.rules": "routing",
    "fwdproxy.config": "config",
    "fwdproxy.config.yamlsrc": "config",
    "fwdproxy.server": "server",
    "fwdproxy.sdnotify": "server",
    "fwdproxy.__main__": "cli",
}
PURE = ("core", "proto", "routing", "config")  # no event loop, no HTTP framework
IO_MODULES = ("asyncio", "aiohttp", "uvloop", "socket", "selectors")


def module_name(path: Path) -> str:
    rel = path.relative_to(PKG.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PKG.rglob("*.py"))}


def layer(mod: str) -> str:
    if mod in TOP_LEVEL:
        return TOP_LEVEL[mod]
    parts = mod.split(".")
    if len(parts) >= 2 and parts[1] in LAYERS:
        return parts[1]
    raise AssertionError(f"{mod}: not in any layer; add it to test_layers.TOP_LEVEL or a layer")


def imports(mod: str, path: Path) -> Iterator[tuple[str, list[str], int]]:
    """(imported module, imported names, line) for every import statement in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, [], node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            yield target, [a.name for a in node.names], node.lineno


def internal_deps(mod: str, path: Path, known: dict[str, Path]) -> Iterator[tuple[str, int]]:
    """The fwdproxy modules `mod` depends on (`from pkg import submodule` resolved)."""
    for target, names, line in imports(mod, path):
        if not (target == "fwdproxy" or target.startswith("fwdproxy.")):
            continue
        subs = [f"{target}.{n}" for n in names if f"{target}.{n}" in known]
        if subs:
            yield from ((s, line) for s in subs)
        if (target in known and len(subs) < len(names)) or (target in known and not names):
            yield target, line


ALL = modules()


def test_every_module_is_in_a_layer() -> None:
    for mod in ALL:
        layer(mod)


def test_imports_point_down_only() -> None:
    bad = []
    for mod, path in ALL.items():
        mine = LAYERS.index(layer(mod))
        for dep, line in internal_deps(mod, path, ALL):
            if LAYERS.index(layer(dep)) > mine:
                bad.append(f"{path.relative_to(PKG.parent)}:{line}: {mod} ({layer(mod)}) "
                           f"imports {dep} ({layer(dep)})")
    assert not bad, "imports pointing up a layer:\n" + "\n".join(bad)


def test_no_import_cycles() -> None:
    graph = {m: {d for d, _ in internal_deps(m, p, ALL) if d != m} for m, p in ALL.items()}
    # A package's __init__ importing its own submodules is how re-exports work; the
    # submodules importing the package is the cycle.
    state: dict[str, int] = {}
    cycles: list[list[str]] = []

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph[m]):
            if state.get(d) == 1:
                cycles.append([*stack[stack.index(d):], d])
            elif d not in state:
                visit(d, stack)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])
    assert not cycles, "import cycles:\n" + "\n".join(" -> ".join(c) for c in cycles)


@pytest.mark.parametrize("pure", PURE)
def test_pure_layers_do_no_io(pure: str) -> None:
    bad = []
    for mod, path in ALL.items():
        if layer(mod) != pure:
            continue
        for target, _, line in imports(mod, path):
            if target.split(".")[0] in IO_MODULES:
                bad.append(f"{path.relative_to(PKG.parent)}:{line}: imports {target}")
    assert not bad, f"{pure} must stay sans-IO:\n" + "\n".join(bad)


def test_no_private_names_across_modules() -> None:
    bad = []
    for mod, path in ALL.items():
        for target, names, line in imports(mod, path):
            if not target.startswith("fwdproxy"):
                continue
            for n in names:
                if n.startswith("_") and not n.startswith("__"):
                    bad.append(f"{path.relative_to(PKG.parent)}:{line}: from {target} import {n}")
            private = [p for p in target.split(".") if p.startswith("_") and p != "__init__"]
            if private and target.rpartition(".")[0] != mod.rpartition(".")[0]:
                bad.append(f"{path.relative_to(PKG.parent)}:{line}: private module {target}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


def test_the_cli_is_a_leaf() -> None:
    users = [
        f"{m} -> {d}"
        for m, p in ALL.items()
        if layer(m) != "cli"
        for d, _ in internal_deps(m, p, ALL)
        if layer(d) == "cli"
    ]
    assert not users, users
