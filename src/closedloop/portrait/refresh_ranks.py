"""RFM ranks that stand: a refresh that moved a few buyers' orders, revenue or recency need
not re-rank every buyer when no one else's score can have crossed a quintile boundary.

``build.finish`` scores a buyer 1–5 from the percent rank of a key among all buyers:
``score(L) = min(floor(L / (N - 1) * 5), 4) + 1`` where ``L`` is the number of buyers with a
smaller key and ``N`` the number of buyers (keys: recency, descending; orders; revenue).
On the last run's clock date, with no buyer come or gone (``N`` the same) and only the
affected customers' keys changed, another buyer's ``L`` moves only if its key lies between
the old and new key of a mover — in ``(lo, hi]`` over all movers of that key — and then by
at most the number of movers ``m``. For every such buyer ``L`` was at least the count of
keys ``<= lo`` and at most the count ``< hi``; if ``score`` is constant on that range
widened by ``m`` on each side, nobody else's score moved, and only the affected rows are
rewritten: their scores counted exactly (keys smaller than theirs among the others' stored
keys and the affected customers' new ones), the rest of ``finish`` on their own rows.
Otherwise (a boundary may be crossed, a buyer came or went, too many customers) the caller
re-ranks everyone. The arithmetic is DuckDB's own (IEEE double), so scores agree exactly.
"""

from __future__ import annotations

import math
from datetime import datetime

import ibis
import ibis.expr.types as ir
import pyarrow as pa

from closedloop.core.engine import Engine
from closedloop.portrait.build import fill_relationships, finish
from closedloop.portrait.extras import RELATIONSHIP_COLUMNS
from closedloop.portrait.lifecycle import rfm_group
from closedloop.portrait.tables import PROFILES

MAX_AFFECTED = 200  # beyond this many customers, re-ranking everyone is the simpler work
DIMS = ("r", "f", "m")  # recency (descending), frequency (orders), monetary (revenue)


def score(smaller: int, buyers: int) -> int:
    """``lifecycle.score`` of a buyer with ``smaller`` buyers' keys below its own."""
    rank = smaller / (buyers - 1) if buyers > 1 else 0.0
    return min(math.floor(rank * 5), 4) + 1


def stands(c1: int, c2: int, movers: int, buyers: int) -> bool:
    """Whether ``score`` is one value for every ``L`` in ``[c1 - movers, c2 + movers]``."""
    lo, hi = max(0, c1 - movers), min(max(buyers - 1, 0), c2 + movers)
    return lo > hi or score(lo, buyers) == score(hi, buyers)


def _keys(t: ir.Table, recency: ir.IntegerValue) -> dict[str, ir.Value]:
    return {"r": -recency, "f": t.orders, "m": t.revenue}


def rescored_rows(
    engine: Engine, as_of: datetime, fresh: ir.Table, affected: ir.Table
) -> ir.Table | None:
    """The affected customers' full profile rows (materialised) when every other buyer's
    RFM scores stand; None when they may not (re-rank everyone then).

    ``fresh`` holds the affected customers' base columns; the stored rows hold everyone
    else's derived values as of the last run, on the same clock date, with the network
    standing (the caller checks both, and that no buyer is gone).
    """
    old = engine.table(PROFILES.name)
    mine = old.semi_join(affected, "customer_id")
    stored = mine.select(
        old_id=mine.customer_id,
        old_orders=mine.orders,
        old_revenue=mine.revenue,
        old_recency=mine.recency_days,
    )
    j = fresh.left_join(stored, fresh.customer_id == stored.old_id)
    recency = ibis.literal(as_of.date()).delta(j.last_order_at.date(), unit="day").cast("int32")
    info = j.select(
        "customer_id",
        "old_id",
        "old_orders",
        "old_revenue",
        "old_recency",
        orders=j.orders,
        revenue=j.revenue,
        recency=recency,
    )
    rows = info.limit(MAX_AFFECTED + 1).to_pyarrow().to_pylist()
    if len(rows) > MAX_AFFECTED:
        return None
    new_keys: dict[str, dict[str, float]] = {}
    movers: dict[str, list[tuple[float, float]]] = {d: [] for d in DIMS}
    for r in rows:
        buyer = (r["orders"] or 0) > 0
        was = r["old_id"] is not None and (r["old_orders"] or 0) > 0
        if buyer != was:
            return None  # a buyer came or went: every rank moves
        if not buyer:
            continue
        new = {"r": r["recency"], "f": r["orders"], "m": r["revenue"]}
        before = {"r": r["old_recency"], "f": r["old_orders"], "m": r["old_revenue"]}
        if None in new.values() or None in before.values():
            return None
        new["r"], before["r"] = -new["r"], -before["r"]
        new_keys[r["customer_id"]] = new
        for d in DIMS:
            if new[d] != before[d]:
                movers[d].append((before[d], new[d]))
    # One pass over the stored buyers: their number, and per key the counts bounding the
    # rank of everyone whose key lies between a mover's old and new one.
    buyer = old.orders.fill_null(0) > 0
    keys = _keys(old, old.recency_days)
    agg: dict[str, ir.Value] = {
        "n": buyer.sum(),
        "nulls": (buyer & (old.recency_days.isnull() | old.revenue.isnull())).sum(),
    }
    for d in DIMS:
        if movers[d]:
            lo = min(min(a, b) for a, b in movers[d])
            hi = max(max(a, b) for a, b in movers[d])
            agg[f"c1_{d}"] = (buyer & (keys[d] <= lo)).sum()
            agg[f"c2_{d}"] = (buyer & (keys[d] < hi)).sum()
    got = old.aggregate(**agg).to_pyarrow().to_pylist()[0]
    n = int(got["n"] or 0)
    if got["nulls"]:
        return None
    for d in DIMS:
        if not movers[d]:
            continue
        c1, c2 = int(got[f"c1_{d}"] or 0), int(got[f"c2_{d}"] or 0)
        if stands(c1, c2, len(movers[d]), n):
            continue
        # The bound is loose: count exactly whose score the moves would change.
        others = old.filter(buyer).select("customer_id", key=keys[d])
        mine_ids = affected.select("customer_id")
        with engine.temporary(_movers_table(movers[d])) as mv:
            if int(crossings(others, mine_ids, mv, c1, n).execute()):
                return None
    return _rows(engine, as_of, fresh, affected, new_keys, n)


def _movers_table(moves: list[tuple[float, float]]) -> pa.Table:
    return pa.table(
        {"a": [float(a) for a, _ in moves], "b": [float(b) for _, b in moves]},
        schema=pa.schema([("a", pa.float64()), ("b", pa.float64())]),
    )


def crossings(
    buyers: ir.Table, affected: ir.Table, movers: ir.Table, c1: int, n: int
) -> ir.IntegerScalar:
    """How many buyers not ``affected`` would change score when ``movers`` (old key ``a``,
    new key ``b``) move: ``buyers`` (customer_id, key) holds every buyer's stored key.

    Only keys in ``(lo, hi]`` of the moves can change; for each such distinct key ``v``,
    ``L(v)`` is ``c1`` (the keys ``<= lo``) plus the keys in the interval below ``v``, and
    the moves shift it by those now below ``v`` less those that were. Sorts only the
    buyers inside the interval.
    """
    bounds = movers.aggregate(
        lo=ibis.least(movers.a, movers.b).min(), hi=ibis.greatest(movers.a, movers.b).max()
    )
    inside = buyers.cross_join(bounds)
    inside = inside.filter(inside.key > inside.lo, inside.key <= inside.hi)
    mine = affected.select(mine=affected.customer_id)
    flagged = inside.left_join(mine, inside.customer_id == mine.mine)
    per_key = flagged.group_by("key").aggregate(
        all_=flagged.count(), others=flagged.mine.isnull().sum()
    )
    below = (
        per_key.all_.sum().over(ibis.window(order_by=per_key.key, preceding=None, following=0))
        - per_key.all_
    )
    per_key = per_key.mutate(l_old=below + c1)
    moved = per_key.cross_join(movers)
    shift = (moved.b < moved.key).cast("int64") - (moved.a < moved.key).cast("int64")
    delta = moved.group_by("key", "others", "l_old").aggregate(d=shift.sum())
    denom = max(n - 1, 1)

    def s(smaller: ir.IntegerValue) -> ir.IntegerValue:
        rank = smaller.cast("float64") / denom if n > 1 else ibis.literal(0.0)
        return ibis.least((rank * 5).floor().cast("int32"), 4) + 1

    changed = delta.filter((delta.others > 0) & (s(delta.l_old) != s(delta.l_old + delta.d)))
    return changed.others.sum().fill_null(0)


def _rows(
    engine: Engine,
    as_of: datetime,
    fresh: ir.Table,
    affected: ir.Table,
    new_keys: dict[str, dict[str, float]],
    n: int,
) -> ir.Table:
    """The affected rows: ``finish`` on their own rows, the scores counted among all."""
    old = engine.table(PROFILES.name)
    scores: dict[str, list[object]] = {"customer_id": [], "r_new": [], "f_new": [], "m_new": []}
    if new_keys:
        ids = list(new_keys)
        keyed = pa.table({"customer_id": ids, **{d: [new_keys[c][d] for c in ids] for d in DIMS}})
        others = old.anti_join(affected, "customer_id").filter(old.orders.fill_null(0) > 0)
        ok = _keys(others, others.recency_days)
        with engine.temporary(keyed) as k:
            pairs = k.cross_join(others.select(ok_r=ok["r"], ok_f=ok["f"], ok_m=ok["m"]))
            counts = pairs.group_by("customer_id").aggregate(
                **{f"l_{d}": (pairs[f"ok_{d}"] < pairs[d]).sum() for d in DIMS}
            )
            smaller = {r["customer_id"]: r for r in counts.to_pyarrow().to_pylist()}
        for c in ids:
            scores["customer_id"].append(c)
            for d in DIMS:
                among = sum(1 for o in ids if new_keys[o][d] < new_keys[c][d])
                row = smaller.get(c)
                below = int(row[f"l_{d}"] or 0) if row is not None else 0
                scores[f"{d}_new"].append(score(below + among, n))
    schema = pa.schema([("customer_id", pa.string()), *[(f"{d}_new", pa.int32()) for d in DIMS]])
    rel = old.semi_join(affected, "customer_id").select(
        rel_id=old.customer_id, **{c: old[c] for c in RELATIONSHIP_COLUMNS}
    )
    base = fresh.left_join(rel, fresh.customer_id == rel.rel_id).drop("rel_id")
    done = finish(fill_relationships(base), as_of)
    with engine.temporary(pa.table(scores, schema=schema)) as s:
        t = done.left_join(s, done.customer_id == s.customer_id).drop("customer_id_right")
        t = t.mutate(r_score=t.r_new, f_score=t.f_new, m_score=t.m_new)
        t = t.mutate(rfm_group=rfm_group(t.r_score, t.f_score)).drop("r_new", "f_new", "m_new")
        return engine.scratch("refresh_rows", engine.conform(PROFILES.name, t))
