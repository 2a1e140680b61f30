"""Tags for the customers whose inputs changed: the tag step of a live refresh.

A full ``build_tags`` recomputes every tag for every customer; after a load of a few events
that is almost all wasted. :func:`refresh_tags` is given the customers whose portrait or
traits changed since the last tag run (``serving.changes`` finds them) and recomputes

* per-customer tags (``build.per_customer``: rules, ranges, first/last, top-N, RFM) only for
  those customers and for those with an event the clock moved across the edge of an event
  tag's window or into view (:func:`crossed`); every other customer's rows stay;
* tags whose value depends on everyone or on inputs a refresh does not follow (percentile
  buckets, SQL, import, manual, model) whole, as ``build_tags`` does.

It also returns who may now hold different tags — the customers recomputed and those whose
rows of a whole tag changed — so segments re-evaluate only them. The result equals a full
``build_tags`` at the same clock, row for row (``tests/tags/test_incremental.py``), except
``computed_at``, which keeps when each kept row was computed.

The write is one transaction (rows of the recomputed customers and whole tags deleted, new
rows inserted) where the engine has them, a whole-table replace elsewhere: a crash leaves
the old tags or the new ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path

import ibis
import ibis.expr.types as ir

from closedloop.core.clock import Clock
from closedloop.core.definitions.tags import TagDef
from closedloop.core.engine import Engine
from closedloop.tags.build import (
    EVENT_TAGS,
    TS,
    _latest,
    per_customer,
    plan_tag,
    record_runs,
    tag_rows,
)

TAG_VALUES = "tag_values"


@dataclass(frozen=True)
class TagRefresh:
    counts: dict[str, int]  # customers holding a value, per tag (as ``build_tags`` returns)
    recomputed: ir.Table  # customer_id: whose per-customer tags were recomputed (scratch)
    changed: ir.Table  # customer_id: whose tags may differ from before (a scratch table)


def crossed(
    engine: Engine, since: datetime, as_of: datetime, windows: Iterable[timedelta]
) -> ir.Table:
    """Customers with an event the clock moved from ``since`` to ``as_of`` (``customer_id``).

    An event timestamped in (since, as_of] came into view; one in (since - w, as_of - w]
    left a window of length ``w``. Only their customers' windowed values can have changed
    by the clock alone.
    """
    e = engine.table("events")

    def between(lo: datetime, hi: datetime) -> ir.BooleanValue:
        return (e.timestamp > ibis.literal(lo).cast(TS)) & (
            e.timestamp <= ibis.literal(hi).cast(TS)
        )

    moved = between(since, as_of)
    for w in sorted(set(windows)):
        moved |= between(since - w, as_of - w)
    ids = e.filter(moved).select("message_id")
    ec = engine.table("event_customers")
    return ec.semi_join(ids, "message_id").select("customer_id").distinct()


def row_digest(
    engine: Engine, values: Mapping[str, ir.Value], *, portable: bool = False
) -> ir.IntegerValue:
    """A 64-bit (Spark: 32-bit) digest of a row's ``values``, equal exactly when they are.

    How a refresh tells whose row changed since the last one, on any engine: keep each
    customer's digest, compare it with this moment's. DuckDB hashes the row as a struct
    (``row_hash``: the fastest). Elsewhere, or with ``portable``, each value is cast to text
    and written as ``LENGTH:TEXT`` (a null as ``~``) — so ``("ab", "c")`` and ``("a", "bc")``,
    or ``""`` and null, never read the same — and the whole string is hashed
    (PostgreSQL ``hashtextextended``, Spark ``hash``). Digests from the two forms differ:
    keep to one per warehouse (``portable`` is for tests and measurements).
    """
    if engine.can("row_hash") and not portable:
        return ibis.struct(dict(values)).hash()
    text: ir.StringValue | None = None
    for v in values.values():
        s = v.cast("string")
        part = s.isnull().ifelse(ibis.literal("~"), s.length().cast("string") + ":" + s)
        text = part if text is None else text + part
    if text is None:
        raise ValueError("row_digest needs at least one value")
    return text.hash()


def refresh_tags(
    engine: Engine,
    tags: dict[str, TagDef],
    clock: Clock,
    *,
    changed: ir.Table,
    since: datetime,
    root: Path | None = None,
) -> TagRefresh:
    """Bring ``tag_values`` up to the clock, recomputing per-customer tags only where needed.

    ``changed``: customers (``customer_id``) whose profile row, traits or attributed events
    changed since the tag run at ``since``, including customers who are gone (their rows go).

    Few queries, since at small sizes each costs more than the rows it reads: who to
    recompute, the new rows, who changed, then one delete and one insert.
    """
    now = clock.now()
    root = root or Path()
    per = {n: t for n, t in tags.items() if per_customer(t)}
    whole = {n: t for n, t in tags.items() if n not in per}
    todo = changed.select("customer_id")
    events = {n: t for n, t in per.items() if t.type in EVENT_TAGS}
    if events:
        windows = [timedelta(days=t.window_days) for t in events.values() if t.window_days]
        todo = todo.union(crossed(engine, since, now, windows))
    todo = engine.scratch("tags_todo", todo.distinct())
    computed_at = ibis.literal(now).cast(TS)
    events_at = _latest(engine, "events", "received_at")
    old = engine.table(TAG_VALUES)
    cols = ["customer_id", "tag", "value"]
    with ExitStack() as stack:
        plans = {
            n: plan_tag(engine, t, now, root, stack, events_at, None, todo) for n, t in per.items()
        }
        plans |= {n: plan_tag(engine, t, now, root, stack, events_at) for n, t in whole.items()}
        fresh = tag_rows(plans, computed_at)
        new = (
            None if fresh is None else engine.scratch("tags_new", engine.conform(TAG_VALUES, fresh))
        )
        out = todo
        if new is not None and whole:
            names = list(whole)
            was = old.filter(old.tag.isin(names)).select(*cols)
            is_ = new.filter(new.tag.isin(names)).select(*cols)
            moved = is_.anti_join(was, cols).union(was.anti_join(is_, cols))
            out = out.union(moved.select("customer_id"))
        changed_out = engine.scratch("tags_changed", out.distinct())
        _write(engine, old, list(per), todo, new)
    counts = record_runs(engine, tags, plans, now)
    return TagRefresh(counts, todo, changed_out)


def _write(
    engine: Engine, old: ir.Table, per: list[str], todo: ir.Table, new: ir.Table | None
) -> None:
    """Rows of per-customer tags for ``todo`` and every row of other tags out; new rows in.

    Rows of tags no longer defined go too (as a full build drops them).
    """
    mine = old.tag.isin(per) if per else ibis.literal(False)
    if not engine.can("temp_tables"):  # no DELETE (Spark): the table replaced whole
        union = old.filter(mine).anti_join(todo, "customer_id")
        if new is not None:
            union = union.union(new, distinct=False)
        engine.replace(TAG_VALUES, engine.scratch("tags_all", union))
        return
    inside = old.customer_id.isin(todo.customer_id)
    going = old.filter(~mine | inside).select("customer_id", "tag")
    with engine.transaction():
        engine.delete_keys(TAG_VALUES, going)
        if new is not None:
            engine.append(TAG_VALUES, new)
