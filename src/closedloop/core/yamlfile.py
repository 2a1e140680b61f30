"""Reading YAML while remembering where each key and item came from.

Pydantic reports errors by *path* (``where.all.0.op``); users need *lines*. We compose the
YAML node tree once, build the Python value from it, and keep a map from path to line so any
validation error can be pointed at ``file:line``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from closedloop.core.errors import DefinitionError, Problem

PathKey = tuple[str | int, ...]


def _walk(node: yaml.Node, path: PathKey, lines: dict[PathKey, int]) -> Any:
    lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        out: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            key = yaml.safe_load(yaml.serialize(key_node)) if key_node.tag else key_node.value
            if isinstance(key, bool):  # YAML 1.1 reads a bare `on`/`off`/`yes` key as a bool
                key = key_node.value
            lines[(*path, key)] = key_node.start_mark.line + 1
            out[key] = _walk(value_node, (*path, key), lines)
            lines[(*path, key)] = key_node.start_mark.line + 1
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_walk(item, (*path, i), lines) for i, item in enumerate(node.value)]
    return yaml.safe_load(yaml.serialize(node))


def load_yaml(path: Path, *, display: str | None = None) -> tuple[Any, dict[PathKey, int]]:
    """Parse ``path``; return the value and a map from key path to 1-based line number."""
    name = display or str(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise DefinitionError([Problem(name, "file not found")]) from None
    except UnicodeDecodeError as e:
        raise DefinitionError([Problem(name, f"not UTF-8 text ({e.reason})")]) from None
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as e:
        line = e.problem_mark.line + 1 if e.problem_mark else None
        raise DefinitionError([Problem(name, f"not valid YAML: {e.problem}", line=line)]) from None
    if node is None:
        return None, {(): 1}
    lines: dict[PathKey, int] = {}
    return _walk(node, (), lines), lines


def locate(lines: dict[PathKey, int], loc: tuple[Any, ...]) -> tuple[int | None, PathKey]:
    """The line and key path in the file of a validation error at ``loc``.

    Pydantic inserts union tags into locations (``('where', 'all', 'all_of', 0, ...)``);
    elements that are not keys of the file are skipped, except a last one, which names a key
    that is missing (``required`` errors) and is kept in the path.
    """
    best: int | None = lines.get(())
    path: PathKey = ()
    for i, part in enumerate(loc):
        candidate = (*path, part)
        if candidate in lines:
            path = candidate
            best = lines[candidate]
        elif i == len(loc) - 1:
            path = candidate
    return best, path
