"""Rule tags: the first rule whose condition holds on the profile gives the tag's value.

Conditions are the shared condition language (``core.conditions``) compiled to Ibis, so a tag
is one ``CASE`` expression over ``profiles`` on any engine.
"""

from __future__ import annotations

import ibis
import ibis.expr.types as ir

from closedloop.core.clock import Clock
from closedloop.core.conditions import FieldCondition, compile_condition, fields_used, leaves
from closedloop.core.definitions import TagDef
from closedloop.core.engine import Engine
from closedloop.core.errors import Problem
from closedloop.portrait import tables as _portrait_tables
from closedloop.tags import tables as _tag_tables  # noqa: F401  (declares `tag_values`)

PROFILE_COLUMNS = set(_portrait_tables.PROFILES.columns)


def check_tag(tag: TagDef, profile_columns: set[str]) -> list[Problem]:
    """Problems with a tag definition against the profile schema (unknown fields, name clash)."""
    problems: list[Problem] = []
    where = f"tags/{tag.name}.yaml"
    if tag.name in profile_columns:
        problems.append(
            Problem(where, f"tag name {tag.name!r} clashes with a profile field", key="name")
        )
    for i, rule in enumerate(tag.rules):
        if any(not isinstance(leaf, FieldCondition) for leaf in leaves(rule.when)):
            problems.append(
                Problem(
                    where,
                    "tag rules read profile fields only (use a segment for event or segment conditions)",
                    key=f"rules.{i}.when",
                )
            )
        for f in sorted(fields_used(rule.when) - profile_columns):
            problems.append(Problem(where, f"unknown profile field {f!r}", key=f"rules.{i}.when"))
    return problems


def tag_value_expr(tag: TagDef, profiles: ir.Table) -> ir.StringValue:
    cases = [(compile_condition(r.when, profiles), r.value) for r in tag.rules]
    return ibis.cases(*cases, else_=tag.default)


def build_tags(
    engine: Engine, tags: dict[str, TagDef], clock: Clock | None = None
) -> dict[str, int]:
    """Recompute every rule tag; returns the number of customers holding a value, per tag."""
    now = (clock or Clock()).now()
    profiles = engine.table("profiles")
    parts = []
    for tag in tags.values():
        v = tag_value_expr(tag, profiles)
        parts.append(
            profiles.select(
                "customer_id",
                tag=ibis.literal(tag.name),
                value=v.cast("string"),
                computed_at=ibis.literal(now).cast("timestamp('UTC', 6)"),
            ).filter(lambda t: t.value.notnull())
        )
    if not parts:
        engine.replace("tag_values", engine.table("tag_values").limit(0))
        return {}
    union = parts[0]
    for p in parts[1:]:
        union = union.union(p, distinct=False)
    engine.replace("tag_values", union)
    tv = engine.table("tag_values")
    counts = tv.group_by("tag").aggregate(n=tv.count()).to_pyarrow().to_pylist()
    got = {str(r["tag"]): int(r["n"]) for r in counts}
    return {name: got.get(name, 0) for name in tags}
