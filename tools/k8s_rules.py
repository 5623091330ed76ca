"""Write the rules.yaml files under deploy/kubernetes from `fwdproxy.cli.genkube.deploy_files`.

    python tools/k8s_rules.py        # after changing genkube's renderers

tests/test_deploy.py fails while the files and the renderers disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from fwdproxy.cli.genkube import deploy_files  # noqa: E402


def main() -> int:
    root = REPO / "deploy" / "kubernetes"
    for rel, content in deploy_files().items():
        path = root / rel
        old = path.read_text() if path.exists() else None
        if old != content:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
            print(f"{path.relative_to(REPO)}: {'created' if old is None else 'updated'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
