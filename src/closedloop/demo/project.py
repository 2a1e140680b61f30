"""Scaffolding a project folder from the example project (``closedloop init`` and the demo).

The example is the synthetic brand's project: sources for every touchpoint, identity rules,
a trait, a tag, two segments and a win-back campaign. Each source gets a fresh write key.
"""

from __future__ import annotations

import os
import secrets
from importlib import resources
from pathlib import Path
from string import Template

from closedloop.core.errors import ClosedloopError

TEMPLATE_PACKAGE = "closedloop.demo"
TEMPLATE_FOLDER = "project_template"


def init_project(
    target: Path, *, data_dir: str = "data", key_suffix: str | None = None
) -> list[Path]:
    """Write the example project into ``target``; refuse to overwrite an existing project."""
    target = Path(target)
    if (target / "closedloop.yaml").exists():
        raise ClosedloopError(
            f"{target} already holds a closedloop project (closedloop.yaml exists)"
        )
    suffix = key_suffix or secrets.token_hex(8)
    root = resources.files(TEMPLATE_PACKAGE).joinpath(TEMPLATE_FOLDER)
    written: list[Path] = []

    def copy(node: resources.abc.Traversable, rel: Path) -> None:
        for child in sorted(node.iterdir(), key=lambda c: c.name):
            if child.is_dir():
                copy(child, rel / child.name)
            elif child.name.endswith((".yaml", ".yml")):
                text = child.read_text(encoding="utf-8")
                if child.name == "closedloop.yaml":
                    text = Template(text).safe_substitute(data_dir=data_dir, key_suffix=suffix)
                dest = target / rel / child.name
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_text(text, encoding="utf-8")
                written.append(dest)

    copy(root, Path())
    return written


def relative_data_dir(project: Path, data: Path) -> str:
    return os.path.relpath(data.resolve(), project.resolve())
