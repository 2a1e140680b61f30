"""Tags for the customers whose inputs changed: the tag step of a live refresh.

A full ``build_tags`` recomputes every tag for every customer; after a load of a few events
that is almost all wasted. :func:`refresh_tags` is given the customers whose portrait or
traits changed since the last tag run (``serving.changes`` finds them) and recomputes

* per-customer tags (``build.per_customer``: rules, ranges, first/last, top-N, RFM) only for
  those customers and for those with an event the clock moved across the edge of an event
  tag's window or into view (:func:`crossed`); every other customer's rows stay;
* tags whose value depends on everyone or on inputs a refresh does not follow (percentile
  buckets, SQL, import, manual, model) whole, as ``build_tags`` does.

It also returns who may now hold different tags — the customers given and those with a row
that differs — so segments re-evaluate only them. The result equals a full ``build_tags``
at the same clock, row for row (``tests/tags/test_incremental.py``), except
``computed_at``, which keeps when each kept row was computed.

The write is one transaction where the engine has them: of the rows recomputed (the
per-customer tags of those customers, every row of the whole tags) only those that differ
are deleted and inserted — a whole tag recomputed after a small load moves few of its
values. Elsewhere (Spark) the table is replaced whole. A crash leaves the old tags or the
new ones.
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
    shared_events,
    tag_rows,
)

TAG_VALUES = "tag_values"
# More customers to recompute than this share of all: per-customer tags are computed for
# everyone, as a build does (one pass over the events, no narrowing), and still only the
# rows that differ are written. At 100,000 customers, recomputing 10% of them one by one
# cost more than everyone at once (bench/refresh.py, the 1% new events case).
WIDE = 0.05


@dataclass(frozen=True)
class Narrowing:
    """Per-customer tables narrowed to some customers' rows (``narrowed``), kept for reuse.

    The segment step of a live refresh reads the same ``events``, ``event_customers``,
    ``profiles`` and ``computed_traits`` the tag step read (only ``tag_values`` moves in
    between): when its customers are among these, it reads these tables instead of
    scanning the whole ones again (~0.45 CPU-s a refresh at 100,000 customers).
    """

    customers: ir.Table  # customer_id: whose rows the tables hold (materialised)
    tables: dict[str, ir.Table]  # name -> those rows of the table (events: theirs)


@dataclass(frozen=True)
class TagRefresh:
    counts: dict[str, int]  # customers holding a value, per tag (as ``build_tags`` returns)
    recomputed: ir.Table  # customer_id: whose per-customer tags were recomputed (scratch)
    changed: ir.Table  # customer_id: whose tags may differ from before (a scratch table)
    narrowing: Narrowing | None = None  # what the tags read narrowed, if they did


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


# Tables whose rows belong to one customer each (events through event_customers): what a
# reader of per-customer values may be given narrowed to the customers it evaluates.
PER_CUSTOMER_TABLES = ("profiles", "computed_traits", "tag_values", "event_customers", "events")
UNREAD_EVENT_COLUMNS = ("traits", "context")  # read by identity and the portrait, not here


def narrowed(
    engine: Engine,
    customers: ir.Table,
    name: str,
    tables: Iterable[str] = PER_CUSTOMER_TABLES,
    reuse: Narrowing | None = None,
) -> Engine:
    """``engine`` as seen by code that reads only ``customers``' rows: ``tables`` hold just
    their rows (events: those attributed to them), each materialised once.

    Why: a refresh evaluates fifty tags and twenty segments for a few customers. Each
    expression narrows its inputs to them (``tags.values.only``), but each still scans the
    whole ``tag_values``, ``events`` and ``profiles`` to do it — a cost that grows with the
    warehouse, not with the change, paid once per tag or segment. Read through this view,
    they scan a few rows; the whole tables are scanned once, here. Only for values that read
    nothing but the customer's own rows (per-customer tags, conditions without account
    leaves), evaluated for a subset of ``customers``. The view shares the connection;
    writes go through ``engine``.

    ``reuse``: tables narrowed before to a superset of ``customers`` (``narrowing``) and
    not written since: those are read as they are — holding more customers' rows than
    asked is harmless, as the whole table holds more still. Only the others are narrowed.
    """
    return engine.reading(narrowing(engine, customers, name, tables, reuse).tables)


def narrowing(
    engine: Engine,
    customers: ir.Table,
    name: str,
    tables: Iterable[str] = PER_CUSTOMER_TABLES,
    reuse: Narrowing | None = None,
) -> Narrowing:
    """The tables of :func:`narrowed`, kept for a later step to reuse."""
    over: dict[str, ir.Table] = {}
    ids = customers.select("customer_id").distinct()
    wanted = set(tables)
    if reuse is not None and wanted & set(reuse.tables):
        outside = ids.anti_join(reuse.customers, "customer_id").count()
        if int(outside.to_pyarrow().as_py()) == 0:  # all among those narrowed before
            over = {t: reuse.tables[t] for t in wanted & set(reuse.tables)}
            wanted -= set(over)
    ec = engine.table("event_customers").semi_join(ids, "customer_id")
    if wanted & {"event_customers", "events"}:
        kept = over.get("event_customers")
        ec = kept if kept is not None else engine.scratch(f"{name}_event_customers", ec)
        over["event_customers"] = ec
    if "events" in wanted:
        e = engine.table("events")
        # Without the identify traits and the context (JSON no tag or condition reads: they
        # read the promoted columns and ``properties``): a quarter of this scan's CPU. A
        # reader that wanted them fails loudly here instead of reading nulls.
        e = e.drop(*[c for c in UNREAD_EVENT_COLUMNS if c in e.columns])
        e = e.semi_join(ec.select("message_id"), "message_id")
        over["events"] = engine.scratch(f"{name}_events", e)
    for t in sorted(wanted - {"event_customers", "events"}):
        part = engine.table(t).semi_join(ids, "customer_id")
        over[t] = engine.scratch(f"{name}_{t}", part)
    return Narrowing(ids, over)


def tag_windows(tags: dict[str, TagDef]) -> list[timedelta] | None:
    """The windows the clock moves per-customer event tags across (``crossed``); None: no
    such tags (the clock alone moves none of their values)."""
    events = [t for t in tags.values() if per_customer(t) and t.type in EVENT_TAGS]
    if not events:
        return None
    return [timedelta(days=t.window_days) for t in events if t.window_days]


def refresh_tags(
    engine: Engine,
    tags: dict[str, TagDef],
    clock: Clock,
    *,
    changed: ir.Table,
    since: datetime,
    root: Path | None = None,
    widen: ir.Table | None = None,
    moved: ir.Table | None = None,
    population: int | None = None,
) -> TagRefresh:
    """Bring ``tag_values`` up to the clock, recomputing per-customer tags only where needed.

    ``changed``: customers (``customer_id``) whose profile row, traits or attributed events
    changed since the tag run at ``since``, including customers who are gone (their rows go).
    ``widen``: customers a later step will read too (the segments' clock-moved ones): the
    narrowed tables (``TagRefresh.narrowing``) hold their rows as well, for it to reuse.
    ``moved``: the customers ``crossed`` finds across these tags' windows (``tag_windows``)
    and maybe more, found by the caller (one scan of the events for tags and segments);
    None: found here. ``population``: the number of profiles, if the caller knows it.

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
        found = moved if moved is not None else crossed(engine, since, now, windows)
        todo = todo.union(found.select("customer_id"))
    todo = engine.scratch("tags_todo", todo.distinct())
    computed_at = ibis.literal(now).cast(TS)
    events_at = _latest(engine, "events", "received_at")
    old = engine.table(TAG_VALUES)
    if population is None:
        population = engine.count("profiles")
    wide = bool(per) and int(todo.count().to_pyarrow().as_py()) > WIDE * max(population, 1)
    scope: ir.Table | None = None if wide else todo
    reader = engine
    kept = None
    if per and scope is not None:
        over = scope if widen is None else scope.union(widen.select("customer_id"))
        kept = narrowing(engine, over, "tags", ("profiles", "computed_traits", "events"))
        reader = engine.reading(kept.tables)
    with ExitStack() as stack:
        shared = shared_events(reader, events, now, scope)  # each event group's rows once
        plans = {
            n: plan_tag(reader, t, now, root, stack, events_at, shared.get(n), scope)
            for n, t in per.items()
        }
        plans |= {n: plan_tag(engine, t, now, root, stack, events_at) for n, t in whole.items()}
        fresh = tag_rows(plans, computed_at)
        new = (
            None if fresh is None else engine.scratch("tags_new", engine.conform(TAG_VALUES, fresh))
        )
        if engine.can("temp_tables"):
            changed_out = _write_differences(engine, old, list(per), scope, new, changed)
        else:
            changed_out = _replace(engine, old, list(per), scope, todo, new, changed)
    counts = record_runs(engine, tags, plans, now)
    return TagRefresh(counts, todo, changed_out, kept)


def _replaced(old: ir.Table, per: list[str], todo: ir.Table | None) -> ir.Table:
    """The rows of ``old`` a refresh recomputes: per-customer tags' rows of ``todo`` (None:
    everyone's), every row of the other tags (and of tags no longer defined: a full build
    drops them)."""
    if todo is None:
        return old
    mine = old.tag.isin(per) if per else ibis.literal(False)
    return old.filter(~mine | old.customer_id.isin(todo.customer_id))


def _write_differences(
    engine: Engine,
    old: ir.Table,
    per: list[str],
    todo: ir.Table | None,
    new: ir.Table | None,
    changed: ir.Table,
) -> ir.Table:
    """Only the rows that differ written, in one transaction; who may now hold other tags.

    A whole tag (a percentile bucket over everyone, say) is recomputed for all customers,
    but few of its values move after a small load: deleting and inserting all of its rows
    was most of a live refresh's tag step at 100,000 customers. Rows whose value is the same
    stay (with their ``computed_at``); a row whose value moved is deleted and inserted anew.
    """
    b = _replaced(old, per, todo)
    b = b.select(was_id=b.customer_id, was_tag=b.tag, was=b.value)
    if new is None:
        gone = engine.scratch("tags_gone", b).rename(customer_id="was_id", tag="was_tag")
        came = None
    else:  # one pass over both: rows only on one side, or with another value
        j = b.outer_join(new, [b.was_id == new.customer_id, b.was_tag == new.tag])
        diff = engine.scratch("tags_diff", j.filter(~j.was.identical_to(j.value)))
        # The keys to delete as a table of their own: DuckDB decorrelated a DELETE whose
        # keys were a filter of the differences by grouping every row of tag_values (1.2 s
        # at 100,000 customers for 34 rows); from a plain table it is one semi-join.
        gone = diff.filter(diff.was_id.notnull()).select(customer_id=diff.was_id, tag=diff.was_tag)
        gone = engine.scratch("tags_gone", gone)
        came = diff.filter(diff.customer_id.notnull()).select(*new.columns)
    who = changed.select("customer_id").union(gone.select("customer_id"))
    if came is not None:
        who = who.union(came.select("customer_id"))
    changed_out = engine.scratch("tags_changed", who.distinct())
    with engine.transaction():
        engine.delete_keys(TAG_VALUES, gone.select("customer_id", "tag"))
        if came is not None:
            engine.append(TAG_VALUES, came)
    return changed_out


def _replace(
    engine: Engine,
    old: ir.Table,
    per: list[str],
    scope: ir.Table | None,
    todo: ir.Table,
    new: ir.Table | None,
    changed: ir.Table,
) -> ir.Table:
    """No DELETE (Spark): the table replaced whole; who may now hold other tags (the
    customers given, those recomputed, and those whose rows of a whole tag differ).
    ``scope``: whose per-customer rows were recomputed (None: everyone's)."""
    if scope is None:
        per = []  # every row recomputed: compared as whole tags' are
    cols = ["customer_id", "tag", "value"]
    mine = old.tag.isin(per) if per else ibis.literal(False)
    out = changed.select("customer_id").union(todo)
    if new is not None:
        was = old.filter(~mine).select(*cols)
        is_ = new.filter(~new.tag.isin(per) if per else ibis.literal(True)).select(*cols)
        moved = is_.anti_join(was, cols).union(was.anti_join(is_, cols))
        out = out.union(moved.select("customer_id"))
    changed_out = engine.scratch("tags_changed", out.distinct())
    union = old.filter(mine).anti_join(todo, "customer_id")
    if new is not None:
        union = union.union(new, distinct=False)
    engine.replace(TAG_VALUES, engine.scratch("tags_all", union))
    return changed_out
