"""The governed tag catalogue: every tag with its place, coverage, freshness and use.

"Chaotic tag systems" come from tags nobody checks. For every tag this answers: where it sits
in the tree and who owns it; how many customers hold it and how its values spread; when it
was last computed and how old its inputs were then; which segments and campaigns read it
(found by scanning the definitions) and when one of them last ran (``tag_uses``, recorded
when segments are evaluated or a campaign runs). A tag is flagged *stale* when it was never
computed, or last computed (or fed) longer ago than its ``stale_after_days``; *unused* when no
segment or campaign reads it and none ever has.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from datetime import datetime
from typing import Any

import ibis
import pyarrow as pa

from closedloop.core.clock import Clock
from closedloop.core.conditions import FieldCondition, SegmentRef, leaves
from closedloop.core.definitions import Project
from closedloop.core.engine import Engine
from closedloop.tags import tables as _tables

TOP_VALUES = 10


@dataclass
class TagInfo:
    name: str
    type: str
    parent: str | None
    path: list[str]  # root first, ending with this tag
    owner: str
    description: str
    customers: int = 0
    coverage: float = 0.0
    values: dict[str, int] = field(default_factory=dict)  # the TOP_VALUES most common
    other_values: int = 0  # customers holding any other value
    computed_at: datetime | None = None
    inputs_at: datetime | None = None
    note: str | None = None
    used_by: list[str] = field(default_factory=list)  # segment:NAME / campaign:NAME
    last_used_at: datetime | None = None
    stale: bool = False
    unused: bool = False
    flags: list[str] = field(default_factory=list)

    def as_json(self) -> dict[str, Any]:
        d = asdict(self)
        for k in ("computed_at", "inputs_at", "last_used_at"):
            d[k] = d[k].isoformat() if d[k] is not None else None
        return d


def tag_references(project: Project) -> dict[str, set[str]]:
    """Per tag, the segments and campaigns whose conditions read it (through ``in_segment`` too)."""
    direct: dict[str, set[str]] = {}
    deps: dict[str, set[str]] = {}
    for name, definition in project.segments.items():
        direct[name] = set()
        deps[name] = set()
        for leaf in leaves(definition.where):
            if isinstance(leaf, FieldCondition) and leaf.trait in project.tags:
                direct[name].add(leaf.trait)
            elif isinstance(leaf, SegmentRef):
                deps[name].add(leaf.in_segment)

    def reads(seg: str, seen: frozenset[str] = frozenset()) -> set[str]:
        out = set(direct.get(seg, set()))
        for d in deps.get(seg, set()) - seen - {seg}:
            out |= reads(d, seen | {seg})
        return out

    refs: dict[str, set[str]] = {t: set() for t in project.tags}
    for seg in project.segments:
        for t in reads(seg):
            refs[t].add(f"segment:{seg}")
    for name, c in project.campaigns.items():
        for t in reads(c.audience):
            refs[t].add(f"campaign:{name}")
    return refs


def record_tag_uses(
    engine: Engine, project: Project, used_by: Iterable[str], clock: Clock | None = None
) -> int:
    """Record that these users (``segment:NAME`` / ``campaign:NAME``) ran now; rows written."""
    now = (clock or Clock()).now()
    wanted = set(used_by)
    rows = [
        (tag, user)
        for tag, users in sorted(tag_references(project).items())
        for user in sorted(users & wanted)
    ]
    if rows:
        engine.append(
            _tables.TAG_USES.name,
            pa.table(
                {
                    "tag": [r[0] for r in rows],
                    "used_by": [r[1] for r in rows],
                    "used_at": pa.array([now] * len(rows), pa.timestamp("us", tz="UTC")),
                }
            ),
        )
    return len(rows)


def _tree_path(project: Project, name: str) -> list[str]:
    path = [name]
    seen = {name}
    parent = project.tags[name].parent
    while parent is not None and parent in project.tags and parent not in seen:
        path.insert(0, parent)
        seen.add(parent)
        parent = project.tags[parent].parent
    return path


def catalogue(
    engine: Engine, project: Project, clock: Clock | None = None, names: Iterable[str] | None = None
) -> list[TagInfo]:
    """Every tag (or the named ones) with coverage, distribution, freshness, use and flags."""
    now = (clock or Clock()).now()
    wanted = (
        list(names)
        if names is not None
        else sorted(project.tags, key=lambda n: _tree_path(project, n))
    )
    total = engine.count("profiles")
    tv = engine.table("tag_values")
    tv = tv.filter(tv.tag.isin(wanted)) if wanted else tv.limit(0)
    dist = tv.group_by("tag", "value").aggregate(n=tv.count())
    by_tag: dict[str, dict[str, int]] = {}
    for r in dist.to_pyarrow().to_pylist():
        by_tag.setdefault(str(r["tag"]), {})[str(r["value"])] = int(r["n"])
    runs = engine.table("tag_runs")
    rank = ibis.row_number().over(group_by=runs.tag, order_by=ibis.desc(runs.computed_at))
    latest = runs.mutate(rank=rank).filter(lambda t: t.rank == 0)
    last_run = {str(r["tag"]): r for r in latest.to_pyarrow().to_pylist()}
    uses = engine.table("tag_uses")
    used = uses.group_by("tag").aggregate(at=uses.used_at.max())
    last_use = {str(r["tag"]): r["at"] for r in used.to_pyarrow().to_pylist()}
    refs = tag_references(project)
    out = []
    for name in wanted:
        tag = project.tags[name]
        counts = by_tag.get(name, {})
        ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
        customers = sum(counts.values())
        run = last_run.get(name)
        info = TagInfo(
            name=name,
            type=tag.type.value,
            parent=tag.parent,
            path=_tree_path(project, name),
            owner=tag.owner,
            description=tag.description,
            customers=customers,
            coverage=customers / total if total else 0.0,
            values=dict(ranked[:TOP_VALUES]),
            other_values=sum(n for _, n in ranked[TOP_VALUES:]),
            computed_at=run["computed_at"] if run else None,
            inputs_at=run["inputs_at"] if run else None,
            note=run["note"] if run else None,
            used_by=sorted(refs.get(name, set())),
            last_used_at=last_use.get(name),
        )
        limit = tag.stale_after_days * 86400
        if info.computed_at is None:
            info.flags.append("never computed")
        elif (now - info.computed_at).total_seconds() > limit:
            info.flags.append(f"computed more than {tag.stale_after_days} days ago")
        if info.inputs_at is not None and (now - info.inputs_at).total_seconds() > limit:
            info.flags.append(f"inputs older than {tag.stale_after_days} days")
        info.stale = bool(info.flags)
        if not info.used_by and info.last_used_at is None:
            info.unused = True
            info.flags.append("unused: no segment or campaign reads it")
        if run and run["note"]:
            info.flags.append(str(run["note"]))
        out.append(info)
    return out
