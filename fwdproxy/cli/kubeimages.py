"""The images a Kubernetes manifest or `kubectl get ... -o json|yaml` output names.

`fwdproxy cache warm --from FILE` uses it, so a new node or a rollout can have every image of
a cluster in the cache before anyone pulls. Any object shape works (Pod, Deployment,
DaemonSet, StatefulSet, Job, CronJob, a `List`, several YAML documents): every `containers`,
`initContainers` and `ephemeralContainers` list found anywhere is read, so templates nested
at any depth are covered without a list of kinds to keep current.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Final

__all__ = ["ManifestError", "images_in", "images_in_text"]

_CONTAINER_LISTS: Final = ("containers", "initContainers", "ephemeralContainers")
MAX_DEPTH: Final = 64


class ManifestError(ValueError):
    """The text is neither JSON nor YAML documents."""


def images_in(doc: Any) -> list[str]:
    """Image references in one parsed document, in order of appearance, without repeats."""
    seen: dict[str, None] = {}
    for image in _walk(doc, 0):
        seen.setdefault(image, None)
    return list(seen)


def _walk(node: Any, depth: int) -> Iterator[str]:
    if depth > MAX_DEPTH:
        return
    if isinstance(node, dict):
        for key, value in node.items():
            if key in _CONTAINER_LISTS and isinstance(value, list):
                for c in value:
                    if isinstance(c, dict) and isinstance(c.get("image"), str) and c["image"]:
                        yield c["image"].strip()
            yield from _walk(value, depth + 1)
    elif isinstance(node, list):
        for item in node:
            yield from _walk(item, depth + 1)


def images_in_text(text: str) -> list[str]:
    """Images named in JSON or (multi-document) YAML text."""
    import json

    import yaml

    try:
        docs: list[Any] = [json.loads(text)]
    except ValueError:
        try:
            docs = list(yaml.safe_load_all(text))
        except yaml.YAMLError as e:
            raise ManifestError(f"neither JSON nor YAML: {e}") from None
    seen: dict[str, None] = {}
    for doc in docs:
        for image in images_in(doc):
            seen.setdefault(image, None)
    return list(seen)
