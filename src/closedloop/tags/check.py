"""Checking a tag definition against the schemas it reads, with the key of each problem.

The YAML model (``core.definitions.tags``) keeps type-specific fields optional so one model
reads every tag type; here each type is checked for what it needs (a bucket needs a numeric
field and ranges or percentiles, a SQL tag one read-only SELECT, ...) and for fields it
would silently ignore. ``pipeline._with_line`` adds the line of the key.
"""

from __future__ import annotations

from collections.abc import Callable

from closedloop.collect.tables import EVENTS
from closedloop.core.conditions import FieldCondition, fields_used, leaves
from closedloop.core.definitions.tags import RfmPart, TagDef, TagType
from closedloop.core.errors import Problem
from closedloop.portrait.tables import PROFILES
from closedloop.tags.sqltag import SqlTagError, check_select

NUMERIC_TYPES = ("int32", "int64", "float64")
NUMERIC_PROFILE = {c for c, t in PROFILES.columns.items() if t in NUMERIC_TYPES}
EVENT_COLUMNS = set(EVENTS.columns) - {"properties", "traits", "context"}

# The fields each type reads; any other type-specific field set on a tag is a mistake.
_USES: dict[TagType, set[str]] = {
    TagType.RULE: {"rules", "default"},
    TagType.BUCKET: {"field", "ranges", "percentiles", "labels", "default"},
    TagType.FIRST: {"event", "column", "property", "window_days", "default"},
    TagType.LAST: {"event", "column", "property", "window_days", "default"},
    TagType.TOP_N: {"event", "column", "property", "window_days", "n"},
    TagType.RFM: {"rfm"},
    TagType.SQL: {"sql", "dialect"},
    TagType.IMPORT: {"path", "id_column", "value_column"},
    TagType.MANUAL: {"values"},
    TagType.MODEL: {"model", "ranges"},
}
_SPECIFIC = set().union(*_USES.values())
_Report = Callable[[str, str], None]
_DEFAULTS = TagDef(name="x", type=TagType.MANUAL).model_dump()  # every optional field unset


def check_tag(
    tag: TagDef, profile_columns: set[str], traits: dict[str, str] | None = None
) -> list[Problem]:
    """Every problem of one tag: name clash, missing or stray fields, unknown columns, bad SQL.

    ``traits`` maps computed-trait names to their dtype (``float64`` or ``string``).
    """
    traits = traits or {}
    where = f"tags/{tag.name}.yaml"
    out: list[Problem] = []

    def problem(message: str, key: str) -> None:
        out.append(Problem(where, message, key=key))

    if tag.name in profile_columns:
        problem(f"tag name {tag.name!r} clashes with a profile field", "name")
    if tag.parent == tag.name:
        problem("a tag cannot be its own parent", "parent")
    dumped = tag.model_dump()
    for key in sorted(_SPECIFIC - _USES[tag.type]):
        if dumped[key] != _DEFAULTS[key]:
            problem(f"{key!r} does not apply to a {tag.type.value} tag", key)
    t = tag.type
    if t is TagType.RULE:
        _check_rules(tag, profile_columns, problem)
    elif t is TagType.BUCKET:
        if tag.field is None:
            problem("a bucket tag needs `field` (a numeric profile field or trait)", "field")
        elif tag.field not in NUMERIC_PROFILE and traits.get(tag.field) != "float64":
            known = ", ".join(
                sorted(NUMERIC_PROFILE | {n for n, d in traits.items() if d == "float64"})
            )
            problem(
                f"{tag.field!r} is not a numeric profile field or trait; known: {known}", "field"
            )
        _check_cuts(tag, problem)
    elif t in (TagType.FIRST, TagType.LAST, TagType.TOP_N):
        if (tag.column is None) == (tag.property is None):
            problem("give exactly one of `column` (an events column) or `property`", "column")
        elif tag.column is not None and tag.column not in EVENT_COLUMNS:
            problem(
                f"unknown events column {tag.column!r}; known: {', '.join(sorted(EVENT_COLUMNS))}",
                "column",
            )
    elif t is TagType.RFM:
        assert tag.rfm in (RfmPart.GROUP, RfmPart.SCORES)  # noqa: S101 - the enum says so
    elif t is TagType.SQL:
        if not tag.sql:
            problem("a sql tag needs `sql`: one SELECT returning customer_id and value", "sql")
        else:
            try:
                check_select(tag.sql, tag.dialect)
            except SqlTagError as e:
                problem(str(e), "sql")
    elif t is TagType.IMPORT:
        if not tag.path:
            problem("an import tag needs `path` (a CSV or Parquet file)", "path")
        elif not tag.path.lower().endswith((".csv", ".parquet")):
            problem(f"{tag.path!r}: expected a .csv or .parquet file", "path")
    elif t is TagType.MODEL:
        if not tag.model:
            problem("a model tag needs `model` (its name in the model_scores table)", "model")
        _check_ranges(tag, problem)
    return out


def _check_rules(tag: TagDef, profile_columns: set[str], problem: _Report) -> None:
    if not tag.rules:
        problem("a rule tag needs at least one rule", "rules")
    for i, rule in enumerate(tag.rules):
        if any(not isinstance(leaf, FieldCondition) for leaf in leaves(rule.when)):
            problem(
                "tag rules read profile fields only (use a segment for event or segment conditions)",
                f"rules.{i}.when",
            )
        for f in sorted(fields_used(rule.when) - profile_columns):
            problem(f"unknown profile field {f!r}", f"rules.{i}.when")


def _check_cuts(tag: TagDef, problem: _Report) -> None:
    if bool(tag.ranges) == bool(tag.percentiles):
        problem("give either `ranges` or `percentiles` (not both, not neither)", "ranges")
        return
    if tag.percentiles:
        if tag.labels and len(tag.labels) != len(tag.percentiles) + 1:
            problem(
                f"{len(tag.percentiles)} cut points make {len(tag.percentiles) + 1} buckets: "
                f"give that many labels (got {len(tag.labels)})",
                "labels",
            )
    elif tag.labels:
        problem("`labels` name percentile buckets; ranges carry their own `value`", "labels")
    _check_ranges(tag, problem)


def _check_ranges(tag: TagDef, problem: _Report) -> None:
    for i, r in enumerate(tag.ranges):
        if r.min is None and r.max is None:
            problem("a range needs `min`, `max` or both", f"ranges.{i}")
        elif r.min is not None and r.max is not None and r.min >= r.max:
            problem(f"min {r.min} is not below max {r.max}", f"ranges.{i}")


def check_tree(tags: dict[str, TagDef]) -> list[Problem]:
    """Parents must form a tree: a tag that is its own ancestor is reported once per cycle."""
    out: list[Problem] = []
    reported: set[str] = set()
    for name in sorted(tags):
        chain = [name]
        parent = tags[name].parent
        while parent is not None and parent in tags and parent not in chain:
            chain.append(parent)
            parent = tags[parent].parent
        if parent is not None and parent in chain and parent != name:
            continue  # the cycle is above this tag: reported from a tag on it
        if parent == name and len(chain) > 1 and not reported & set(chain):
            reported |= set(chain)
            out.append(
                Problem(
                    f"tags/{name}.yaml",
                    f"parents form a cycle: {' -> '.join([*chain, name])}",
                    key="parent",
                )
            )
    return out
