"""Building the tag catalogue: every tag's values in one replace of ``tag_values``.

Each tag type gives a ``(customer_id, value)`` expression (``tags.values``; SQL tags from
``tags.sqltag``, import tags from a checked file); they are unioned and written in one
``replace``, so readers see the old tags or the new ones, never half a build. Then a row per
tag goes to ``tag_runs``: when it was computed, how many customers hold it, how new its
inputs were (newest event, file time, latest manual setting or score) and any note (bad
import rows, "no scores yet").
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import ibis
import ibis.expr.types as ir
import pyarrow as pa

from closedloop.core.clock import Clock
from closedloop.core.definitions.tags import TagDef, TagType
from closedloop.core.engine import Engine
from closedloop.core.errors import DefinitionError, Problem
from closedloop.tags import tables as _tables
from closedloop.tags.imports import check_rows
from closedloop.tags.sqltag import check_select
from closedloop.tags.values import (
    bucket_values,
    counts_together,
    first_last_together,
    first_last_values,
    manual_values,
    model_values,
    profile_bucket_values,
    rfm_values,
    rule_values,
    tag_events,
    top_n_from_counts,
    top_n_values,
    value_key,
    with_default,
)

TS = "timestamp('UTC', 6)"
EVENT_TAGS = (TagType.FIRST, TagType.LAST, TagType.TOP_N)


@dataclass
class TagPlan:
    """One tag's values expression and what its run row will say."""

    values: ir.Table
    inputs_at: datetime | None
    note: str = ""


def _latest(
    engine: Engine, table: str, column: str, where: ir.BooleanValue | None = None
) -> datetime | None:
    if not engine.exists(table):
        return None
    t = engine.table(table)
    v = t[column].max() if where is None else t[column].max(where=where)
    value = v.to_pyarrow().as_py()
    return value if isinstance(value, datetime) else None


def sql_values(engine: Engine, tag: TagDef) -> ir.Table:
    """A SQL tag's rows, after the parser check, run as a subquery; one value per customer."""
    assert tag.sql is not None  # noqa: S101 - checked by check_tag
    check_select(tag.sql, tag.dialect)
    t = engine.con.sql(tag.sql, dialect=tag.dialect)
    missing = [c for c in ("customer_id", "value") if c not in t.columns]
    if missing:
        raise DefinitionError(
            [
                Problem(
                    f"tags/{tag.name}.yaml",
                    f"the query returns {', '.join(t.columns)}; missing {', '.join(missing)}",
                    key="sql",
                )
            ]
        )
    t = t.select(customer_id=t.customer_id.cast("string"), value=t.value.cast("string"))
    # Several rows for one customer: the smallest value, so every engine keeps the same one.
    return t.group_by("customer_id").aggregate(value=t.value.min())


def per_customer(tag: TagDef) -> bool:
    """Whether a tag's value for a customer reads only that customer's rows.

    Rules, ranges, first/last, top-N and RFM read the customer's profile, traits or events
    (RFM ranks are in the profile row already). Percentile buckets compare everyone; SQL,
    import, manual and model tags read tables or files a refresh does not follow — those
    are recomputed whole (``tags.incremental``).
    """
    if tag.type is TagType.BUCKET:
        return bool(tag.ranges)
    return tag.type in (TagType.RULE, TagType.RFM, *EVENT_TAGS)


def shared_events(
    engine: Engine,
    tags: dict[str, TagDef],
    now: datetime,
    customers: ir.Table | None = None,
) -> dict[str, tuple[ir.Table, str]]:
    """Per event tag, the materialised events it shares with other tags on the same event.

    Event tags (first, last, top-N) each joined the events they read with
    ``event_customers``; tags on the same event (or on all track events) now read one
    scratch table made once (``values.tag_events``). A tag alone on its event keeps its own
    narrower query (nothing to share).
    """
    groups: dict[str | None, list[TagDef]] = {}
    for tag in tags.values():
        if tag.type in EVENT_TAGS:
            groups.setdefault(tag.event, []).append(tag)
    out: dict[str, tuple[ir.Table, str]] = {}
    for i, (event, group) in enumerate(sorted(groups.items(), key=lambda kv: kv[0] or "")):
        if len(group) < 2:
            continue
        keys = sorted({value_key(t) for t in group})
        table = engine.scratch(f"tag_events_{i}", tag_events(engine, event, keys, now, customers))
        for t in group:
            out[t.name] = (table, f"v{keys.index(value_key(t))}")
    return out


def edges_together(
    engine: Engine, tags: dict[str, TagDef], shared: dict[str, tuple[ir.Table, str]], now: datetime
) -> dict[str, ir.Table]:
    """On DuckDB, the values of first/last tags that share events, one grouped pass per table.

    Per tag name, its ``(customer_id, value)`` (value null for customers without one) from
    one materialised aggregate over the shared events (``values.first_last_together``)
    instead of a pass per tag. Elsewhere (and for a table only one such tag reads) nothing:
    those tags are planned one by one (``plan_tag``).
    """
    if engine.backend != "duckdb":
        return {}
    groups: dict[str, list[tuple[str, TagDef, ir.Table, str]]] = {}
    for name, tag in tags.items():
        if name in shared and tag.type in (TagType.FIRST, TagType.LAST):
            table, column = shared[name]
            groups.setdefault(table.get_name(), []).append((name, tag, table, column))
    out: dict[str, ir.Table] = {}
    for i, group in enumerate(groups.values()):
        if len(group) < 2:
            continue
        table = group[0][2]
        edges = first_last_together([g[1] for g in group], table, [g[3] for g in group], now)
        edges = engine.scratch(f"tag_edges_{i}", edges)
        for k, (name, _, _, _) in enumerate(group):
            out[name] = edges.select("customer_id", value=edges[f"f{k}"])
    return out


def top_n_together(
    engine: Engine, tags: dict[str, TagDef], shared: dict[str, tuple[ir.Table, str]], now: datetime
) -> dict[str, ir.Table]:
    """On DuckDB, top-N tags on the same shared value column rank one materialised count.

    Per tag name its ``(customer_id, value)``: the counts per customer and value (one
    column per window, ``values.counts_together``) are made once for all the tags reading
    that column (e.g. "top 3 channels" and "top 2 channels in 90 days"), not once per tag.
    Elsewhere, and for a column only one such tag reads, nothing (``plan_tag`` then).
    """
    if engine.backend != "duckdb":
        return {}
    groups: dict[tuple[str, str], list[tuple[str, TagDef, ir.Table]]] = {}
    for name, tag in tags.items():
        if name in shared and tag.type is TagType.TOP_N:
            table, column = shared[name]
            groups.setdefault((table.get_name(), column), []).append((name, tag, table))
    out: dict[str, ir.Table] = {}
    for i, ((_, column), group) in enumerate(groups.items()):
        if len(group) < 2:
            continue
        counts = counts_together([g[1] for g in group], group[0][2], column, now)
        counts = engine.scratch(f"tag_counts_{i}", counts)
        for name, tag, _ in group:
            out[name] = top_n_from_counts(tag, counts, duckdb=True)
    return out


def plan_tag(
    engine: Engine,
    tag: TagDef,
    now: datetime,
    root: Path,
    stack: ExitStack,
    events_at: datetime | None,
    shared: tuple[ir.Table, str] | None = None,
    customers: ir.Table | None = None,
) -> TagPlan:
    """``shared``: the tag's events from ``shared_events`` (event tags only).

    ``customers``: only these customers' values (``per_customer`` tags only).
    """
    t = tag.type
    c = customers
    if c is not None and not per_customer(tag):
        raise ValueError(f"tag {tag.name}: a {t.value} tag is computed for everyone")
    if t is TagType.RULE:
        return TagPlan(rule_values(engine, tag, c), events_at)
    if t is TagType.BUCKET:
        direct = profile_bucket_values(engine, tag, c)
        if direct is not None:
            return TagPlan(direct, events_at)
        v = bucket_values(engine, tag, c)
        return TagPlan(with_default(engine, v, tag.default, c), events_at)
    if t in (TagType.FIRST, TagType.LAST):
        v = first_last_values(engine, tag, now, shared, c)
        return TagPlan(with_default(engine, v, tag.default, c), events_at)
    if t is TagType.TOP_N:
        return TagPlan(top_n_values(engine, tag, now, shared, c), events_at)
    if t is TagType.RFM:
        return TagPlan(rfm_values(engine, tag, c), events_at)
    if t is TagType.SQL:
        return TagPlan(sql_values(engine, tag), events_at)
    if t is TagType.IMPORT:
        assert tag.path is not None  # noqa: S101 - checked by check_tag
        path = Path(tag.path) if Path(tag.path).is_absolute() else root / tag.path
        imported = check_rows(engine, path, tag)
        values = stack.enter_context(engine.temporary(imported.rows))
        return TagPlan(values, imported.modified_at, imported.note())
    if t is TagType.MANUAL:
        m = engine.table("tag_manual")
        return TagPlan(
            manual_values(engine, tag), _latest(engine, "tag_manual", "set_at", m.tag == tag.name)
        )
    # MODEL
    if not engine.exists("model_scores"):
        return TagPlan(
            _empty(engine), None, f"no scores yet: no model_scores table (model {tag.model!r})"
        )
    s = engine.table("model_scores")
    at = _latest(engine, "model_scores", "scored_at", s.model == tag.model)
    if int(s.filter(s.model == tag.model).count().execute()) == 0:
        return TagPlan(_empty(engine), None, f"no scores yet for model {tag.model!r}")
    return TagPlan(model_values(engine, tag), at)


def _empty(engine: Engine) -> ir.Table:
    tv = engine.table("tag_values")
    return tv.select("customer_id", "value").limit(0)


def tag_rows(plans: dict[str, TagPlan], computed_at: ir.TimestampValue) -> ir.Table | None:
    """The plans' values as ``tag_values`` rows (null values left out), one union; None if none."""
    parts = []
    for name, plan in plans.items():
        v = plan.values
        parts.append(
            v.filter(v.value.notnull()).select(
                "customer_id",
                tag=ibis.literal(name),
                value=v.value.cast("string"),
                computed_at=computed_at,
            )
        )
    if not parts:
        return None
    union = parts[0]
    for p in parts[1:]:
        union = union.union(p, distinct=False)
    return union


def record_runs(
    engine: Engine, tags: dict[str, TagDef], plans: dict[str, TagPlan], now: datetime
) -> dict[str, int]:
    """Count each tag's holders in ``tag_values`` and append a ``tag_runs`` row per tag."""
    tv = engine.table("tag_values")
    counts = tv.group_by("tag").aggregate(n=tv.count()).to_pyarrow().to_pylist()
    got = {str(r["tag"]): int(r["n"]) for r in counts}
    result = {name: got.get(name, 0) for name in tags}
    if tags:
        runs = pa.table(
            {
                "tag": list(tags),
                "computed_at": [now] * len(tags),
                "customers": [result[n] for n in tags],
                "inputs_at": [plans[n].inputs_at for n in tags],
                "note": [plans[n].note or None for n in tags],
            },
            schema=pa.schema(
                [
                    ("tag", pa.string()),
                    ("computed_at", pa.timestamp("us", tz="UTC")),
                    ("customers", pa.int64()),
                    ("inputs_at", pa.timestamp("us", tz="UTC")),
                    ("note", pa.string()),
                ]
            ),
        )
        engine.append(_tables.TAG_RUNS.name, runs)
    return result


def build_tags(
    engine: Engine,
    tags: dict[str, TagDef],
    clock: Clock | None = None,
    *,
    root: Path | None = None,
) -> dict[str, int]:
    """Recompute every tag; returns the number of customers holding a value, per tag.

    ``root`` is the project folder import tags' paths are relative to.
    """
    now = (clock or Clock()).now()
    root = root or Path()
    computed_at = ibis.literal(now).cast(TS)
    events_at = _latest(engine, "events", "received_at")
    shared = shared_events(engine, tags, now)
    together = edges_together(engine, tags, shared, now) | top_n_together(engine, tags, shared, now)
    with ExitStack() as stack:
        plans = {
            name: TagPlan(
                together[name]
                if tag.type is TagType.TOP_N
                else with_default(engine, together[name], tag.default),
                events_at,
            )
            if name in together
            else plan_tag(engine, tag, now, root, stack, events_at, shared.get(name))
            for name, tag in tags.items()
        }
        union = tag_rows(plans, computed_at)
        # ZSTD alone (``Engine.zstd_writes``): DuckDB's default compression analysis of 7.4M
        # rows of random customer ids cost more than computing every tag.
        with engine.zstd_writes():
            if union is not None:
                engine.replace("tag_values", union)
            else:
                engine.replace("tag_values", engine.table("tag_values").limit(0))
    return record_runs(engine, tags, plans, now)
