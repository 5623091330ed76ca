"""Value forms several config sections share: client CIDR lists, secrets given as
`{env: VAR}` / `{file: PATH}`, and files that must exist. One implementation, so every section
accepts the same spellings and reports problems the same way (`add(line, where, message)`)."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fwdproxy.config.yamlsrc import line_of

__all__ = ["Add", "Net", "existing_file", "parse_nets", "secret_ref"]

Add = Callable[[int | None, str, str], None]
Net = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_nets(raw: Any, where: str, line: int | None, add: Add) -> tuple[Net, ...]:
    """A CIDR or a list of them (`allow:`); each bad entry is one problem."""
    nets = []
    items = [] if raw is None else list(raw) if isinstance(raw, (list, tuple)) else [raw]
    for c in items:
        try:
            nets.append(ipaddress.ip_network(str(c), strict=False))
        except ValueError as e:
            add(line_of(raw) or line, where, str(e))
    return tuple(nets)


def secret_ref(raw: Mapping[str, Any], where: str, line: int | None, env: Mapping[str, str],
               base: Path, add: Add) -> str | None:
    """The secret `{env: VAR}` or `{file: PATH}` names (env first); None, with a problem
    added, when it cannot be read. A file's trailing newline is not part of the secret."""
    if "env" in raw:
        value = env.get(str(raw["env"]))
        if value is None:
            add(line, where, f"environment variable {raw['env']} is not set")
        return value
    path = (base / str(raw["file"])).expanduser()
    try:
        return path.read_text().strip("\r\n")
    except OSError as e:
        add(line, where, f"cannot read password file {path}: {e.strerror}")
        return None


def existing_file(raw: Any, where: str, line: int | None, base: Path, add: Add) -> str | None:
    """A path relative to the config's directory, resolved; a problem if no such file."""
    if raw is None:
        return None
    path = (base / str(raw)).expanduser()
    if not path.is_file():
        add(line, where, f"no such file: {path}")
    return str(path)
