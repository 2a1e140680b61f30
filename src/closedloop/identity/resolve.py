"""Identity resolution: identifiers → graph → components → customers with stable ids.

Steps, with their cost:

1. find identifier occurrences in the event log (one scan per declared path; on DuckDB the
   JSON text is read by DuckDB's own functions, not cast to JSON, see extract.py);
2. normalise each *distinct* raw value once, refusing invalid and blocked values;
3. link identifiers seen in the same message (pairs within a message: messages carry a
   handful of ids, so this is O(messages));
4. drop links and identifiers a person blocked with ``identity split`` (``identity_blocks``);
5. quarantine identifiers seen with more strong identifiers than their type allows (a
   family tablet, a clerk's phone): they keep their own customer but link nobody;
6. connected components over the remaining links (in-process union-find where the engine
   declares ``local_arrow``, portable Ibis label propagation elsewhere);
7. rebuild the few components that break a rule (``max_per_customer``, ``never_link``)
   strongest link first, dropping and recording the links that would break it (rules.py);
8. give each component a customer id that is *stable*: a component keeps the id its
   identifiers had before; when components merge, the customer with most identifiers
   survives (then the oldest, then the smallest id) and the others become aliases, recorded
   in the merge ledger with the link that joined them. A customer whose identifiers now
   fall in several components (after a split) keeps its id where most of them are; the
   ledger records the split.
9. record which customers changed and how (``identity_changes``, one row per changed
   customer per run; also ``ResolveResult.changed``) so portrait refresh can recompute only
   those customers.

A run is incremental when it can be (``incremental.py`` says exactly when it is not): steps
1–2 read only the events not resolved yet, and steps 3–9 run over the *region* those events
touch, from the evidence kept by earlier runs (``identity_occurrences``,
``identity_records``). Where the engine has transactions (DuckDB, PostgreSQL) each table
then loses the region's old rows and gains its new ones (and the new messages' rows), all in
one transaction, so the writes cost what the region costs, not what the tables hold; on Spark
each table is rewritten whole (``_Writer``). The result is the full run's, row for row
(tests/identity/test_incremental.py); a run cut half way leaves the previous resolution
(tests/identity/test_incremental_crash.py). The path taken is in ``identity_runs`` and
``ResolveResult.path``.

Most runs of a live server go further: their new events only repeat identifiers already
seen together (a known customer ordering), which changes no cluster, link or customer. Those
take the counts-only path (``_counts_only`` says exactly when): the counters of the repeated
identifiers and links move by key, and no region is read back (tests/identity/
test_counts_only.py); ``identity_runs.why`` ends with ``COUNTS_ONLY``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

import ibis
import ibis.expr.types as ir
import pandas as pd
import pyarrow as pa

from closedloop.core.clock import Clock
from closedloop.core.definitions import IdentityConfig
from closedloop.core.engine import Engine
from closedloop.core.ids import customer_id_for, stable_hash64
from closedloop.identity import tables  # declares the identity tables
from closedloop.identity.components import components_ibis, components_local
from closedloop.identity.extract import identifier_occurrences
from closedloop.identity.incremental import (
    INCREMENTAL,
    Plan,
    blocks_digest,
    config_digest,
    full_plan,
    last_run,
    on_region,
    plan,
    region,
    region_occurrences,
    split_node,
)
from closedloop.identity.matching import probabilistic_pairs, record_rows
from closedloop.identity.normalise import BlockList, normalise_many
from closedloop.identity.quality import named_messages, suspects
from closedloop.identity.rules import Link, Rules, refine

SEP = "\x1f"


@dataclass(frozen=True)
class ResolveResult:
    identifiers: int
    customers: int
    quarantined: int
    refused: int
    merges: int
    links: int
    dropped: int = 0  # links not made because they would break a rule
    splits: int = 0  # customers whose identifiers were split apart in this run
    probabilistic: int = 0  # links from scored record pairs (before rules and blocks)
    run_id: str = ""  # this run's rows in ``identity_changes``
    changed: frozenset[str] = frozenset()  # customers whose identifiers changed in this run
    path: str = "full"  # 'full' or 'incremental' (see incremental.py)
    new_messages: int = 0  # messages this run found identifiers in (all of them when full)


def _normalised_values(engine: Engine, occ: ir.Table, config: IdentityConfig) -> ir.Table:
    """(id_type, raw_value, value, reason) for every distinct raw value, normalised in Python.

    One batch per identifier type (``normalise_many``), and the block list run over the
    accepted values of a batch at once.
    """
    distinct = occ.select("id_type", "raw_value").distinct().to_pyarrow()
    types = {t.name: t for t in config.types}
    blocks = BlockList(config)
    by_type: dict[str, list[str]] = {}
    for id_type, raw in zip(
        distinct["id_type"].to_pylist(), distinct["raw_value"].to_pylist(), strict=True
    ):
        by_type.setdefault(id_type, []).append(raw)
    id_types: list[str] = []
    raws: list[str] = []
    values: list[str | None] = []
    reasons: list[str | None] = []
    for id_type, batch in by_type.items():
        vals, why = normalise_many(batch, types[id_type].normaliser, config.default_region)
        ok = [i for i, v in enumerate(vals) if v is not None]
        hits = blocks.blocked_many([batch[i] for i in ok], [vals[i] for i in ok])
        for i, hit in zip(ok, hits, strict=True):
            if hit:
                vals[i], why[i] = None, "blocked value"
        id_types.extend([id_type] * len(batch))
        raws.extend(batch)
        values.extend(vals)
        reasons.extend(why)
    mapping = pa.table(
        {
            "id_type": pa.array(id_types, pa.string()),
            "raw_value": pa.array(raws, pa.string()),
            "value": pa.array(values, pa.string()),
            "reason": pa.array(reasons, pa.string()),
        }
    )
    with engine.temporary(mapping) as t:
        return engine.scratch("id_values", t)


def _quarantined(pairs: ir.Table, config: IdentityConfig) -> ir.Table:
    """Nodes of a limited type seen with more distinct strong ids of one type than allowed."""
    limits = {t.name: t.max_strong_neighbours for t in config.types if t.max_strong_neighbours}
    strong = [t.name for t in config.types if t.strong]
    if not limits or not strong:
        return pairs.select(node=pairs.a).limit(0)
    # Count distinct neighbours per (node, neighbour type) from the symmetric pair list.
    sym = pairs.select(
        node=pairs.a, node_type=pairs.a_type, other=pairs.b, other_type=pairs.b_type
    ).union(
        pairs.select(node=pairs.b, node_type=pairs.b_type, other=pairs.a, other_type=pairs.a_type),
        distinct=False,
    )
    sym = sym.filter(sym.other_type.isin(strong) & (sym.other_type != sym.node_type))
    counts = sym.group_by("node", "node_type", "other_type").aggregate(n=sym.other.nunique())
    limit_col = ibis.cases(*[(counts.node_type == k, v) for k, v in limits.items()], else_=None)
    over = counts.filter(limit_col.notnull() & (counts.n > limit_col))
    return over.select("node").distinct()


def _message_pairs(engine: Engine, node_occ: ir.Table) -> ir.Table:
    """Pairs of nodes seen in the same message (the evidence for links), a < b."""
    left = node_occ.select(message_id="message_id", a="node", a_type="id_type", ts="ts")
    right = node_occ.select(message_id="message_id", b="node", b_type="id_type")
    joined = left.join(right, "message_id").filter(lambda t: t.a < t.b)
    return joined.group_by("a", "a_type", "b", "b_type").aggregate(
        # (message, identifier) is unique in node_occ, so each message counts once.
        messages=joined.count().cast("int64"),
        message_id=joined.message_id.min(),
        last_ts=joined.ts.max(),
        kind=ibis.literal("message"),
        score=ibis.literal(None, type="float64"),
        other_message_id=ibis.literal(None, type="string"),
    )


def _blocked_pairs(engine: Engine, pairs: ir.Table) -> ir.Table:
    """(a, b) of pairs removed by ``identity_blocks``: always, or up to the block's time."""
    blk = engine.table("identity_blocks")
    na = blk.a_type + ibis.literal(SEP) + blk.a_value
    nb = blk.b_type + ibis.literal(SEP) + blk.b_value
    blk = blk.select(na=na, nb=nb, always=blk.scope == "always", blocked_at=blk.blocked_at)
    ident = blk.filter(blk.nb.isnull())
    edge = blk.filter(blk.nb.notnull())
    parts = []
    for side in ("a", "b"):
        j = pairs.join(ident, pairs[side] == ident.na)
        parts.append(j.filter(j.always | (j.last_ts <= j.blocked_at)).select("a", "b"))
    for x, y in (("a", "b"), ("b", "a")):
        j = pairs.join(edge, (pairs[x] == edge.na) & (pairs[y] == edge.nb))
        parts.append(j.filter(j.always | (j.last_ts <= j.blocked_at)).select("a", "b"))
    out = parts[0]
    for p in parts[1:]:
        out = out.union(p)
    return out.distinct()


def _priority(column: ir.StringValue, config: IdentityConfig) -> ir.IntegerValue:
    return ibis.cases(*[(column == t.name, t.priority) for t in config.types], else_=0)


def resolve(
    engine: Engine,
    config: IdentityConfig,
    clock: Clock | None = None,
    *,
    reason: str = "",
    incremental: bool = True,
) -> ResolveResult:
    """Resolve every identifier in the event log to a customer; write the identity tables.

    Incremental when it can be (only events not resolved yet are read, only the clusters
    they touch are recomputed; ``incremental.py`` says exactly when it falls back to a full
    run), with the same result as a full run either way. ``reason`` is written to the
    ledger for any customer this run splits (``identity split`` passes what the person asked
    for); a run with a reason is full.
    """
    clock = clock or Clock()
    now = clock.now()
    _upgrade(engine)
    p = plan(engine, config, reason=reason, allow=incremental)
    if p.path == INCREMENTAL and p.new_messages == 0:
        return _nothing_new(engine, config, now, p)
    if p.path == INCREMENTAL:
        done = _run(engine, config, now, reason, p)
        if done is not None:
            return done
        p = full_plan(engine, "a usable link left the touched region (closure check)")
    done = _run(engine, config, now, reason, p)
    if done is None:  # a full run has no region to leave
        raise RuntimeError("a full resolution reported an open region")
    return done


def _run(
    engine: Engine, config: IdentityConfig, now: datetime, reason: str, p: Plan
) -> ResolveResult | None:
    """One run on the path ``p`` chose; None if an incremental run's region is not closed."""
    inc = p.path == INCREMENTAL
    read = engine.scratch(
        "id_occ",
        identifier_occurrences(engine, config, p.events, few=inc, every_message=True),
    )
    # The messages this run read, with or without identifiers: the next run's watermark
    # check counts every message of the log as read or new (incremental.py).
    seen = engine.scratch("id_seen", read.select("message_id").distinct())
    occ = read.filter(read.id_type.notnull())
    # Those it found a raw identifier in (what ``ResolveResult.new_messages`` counts).
    n_seen = int(occ.select("message_id").distinct().count().execute())
    mapping = _normalised_values(engine, occ, config)

    refused = mapping.filter(mapping.value.isnull())
    refused_counts = (
        occ.join(refused, ["id_type", "raw_value"])
        .group_by("id_type", "raw_value", "reason")
        .aggregate(messages=lambda t: t.message_id.nunique().cast("int64"))
    )
    good = occ.join(mapping.filter(mapping.value.notnull()), ["id_type", "raw_value"])
    new_occ = good.select(
        "message_id", "id_type", "value", "ts", node=good.id_type + ibis.literal(SEP) + good.value
    ).distinct()
    new_occ = engine.scratch("id_new_occ", new_occ)

    # Profile records for matching: the new messages' rows, beside the kept ones.
    mc = config.matching
    rows: ir.Table | None = None
    new_rows: ir.Table | None = None
    if mc is not None:
        new_rows = engine.scratch(
            "id_new_records", record_rows(engine, config, mc, new_occ, p.events)
        )
        rows = new_rows
        if inc:
            # Read once, by the refit (if there is one): not materialised here.
            kept_rows = engine.table("identity_records")
            rows = engine.conform("identity_records", kept_rows).union(
                engine.conform("identity_records", new_rows), distinct=False
            )

    n_rows = int(new_rows.count().execute()) if new_rows is not None else 0
    if inc and not n_rows and engine.can("transactions"):
        done = _counts_only(engine, config, now, p, new_occ, seen, refused_counts, n_seen)
        if done is not None:
            return done

    region_t: ir.Table | None = None
    scored: ir.Table | None = None
    if inc:
        touched = new_occ.select("node")
        if mc is not None and n_rows:
            # The model is refitted over every record; identifiers whose scored pair
            # appeared, vanished or changed are touched too.
            scored, _model = probabilistic_pairs(engine, config, new_occ, rows)
            moved = _moved_scores(engine, scored)
            touched = touched.union(moved.select(node="a")).union(moved.select(node="b"))
        elif mc is not None:
            # No new record: the same records fit the same model and score the same pairs,
            # so the last run's are read back instead of refitting (most live refreshes:
            # orders and page views carry no profile).
            scored = _kept_scores(engine)
        region_t = region(engine, touched.distinct())
        node_occ = region_occurrences(engine, region_t, new_occ)
        if scored is not None:
            scored = _touching(scored, region_t)
    else:
        node_occ = new_occ
        scored, _model = probabilistic_pairs(engine, config, node_occ, rows)

    # Evidence: pairs of identifiers seen in one message, and scored record pairs.
    msg_pairs = _message_pairs(engine, node_occ)
    if region_t is not None:
        msg_pairs = _touching(msg_pairs, region_t)
    pairs = engine.scratch("id_msg_pairs", msg_pairs)
    if scored is not None:
        scored = scored.anti_join(pairs, ["a", "b"])
        schema = pairs.schema()
        same = scored.select(*[scored[c].cast(schema[c]).name(c) for c in pairs.columns])
        pairs = pairs.union(same, distinct=False)
    pairs = engine.scratch("id_pairs", pairs)
    blocked = engine.scratch("id_blocked", _blocked_pairs(engine, pairs))
    unblocked = pairs.anti_join(blocked, ["a", "b"])

    # The region's own identifiers: their evidence is complete in node_occ.
    own_occ = node_occ if region_t is None else node_occ.semi_join(region_t, "node")
    # Quarantined: values over their type's name limit, and values seen with too many
    # strong identifiers (only identifiers seen together count, not scored profile matches).
    # Names come from the matching records when kept (no JSON read again), else from the
    # region's own messages.
    names = rows.select("message_id", "name") if rows is not None else None
    suspect = suspects(engine, config, own_occ, names)
    limited = [t.name for t in config.types if t.max_names is not None]
    on_many_names = suspect.filter(suspect.id_type.isin(limited)).select("node")
    quarantine = _quarantined(unblocked.filter(unblocked.kind == "message"), config).union(
        on_many_names
    )
    if region_t is not None:
        # Verdicts outside the region cannot have changed: they are read back.
        m = engine.table("identity_map").filter(lambda t: t.quarantined)
        kept = m.select(node=m.id_type + ibis.literal(SEP) + m.id_value).anti_join(region_t, "node")
        quarantine = quarantine.semi_join(region_t, "node").union(kept)
    quarantine = engine.scratch("id_quarantine", quarantine.distinct())
    q_nodes = quarantine.node
    used = unblocked.filter(~unblocked.a.isin(q_nodes) & ~unblocked.b.isin(q_nodes))
    if region_t is not None:
        leaving = used.filter(~used.a.isin(region_t.node) | ~used.b.isin(region_t.node))
        if int(leaving.count().execute()):
            return None

    # Integer node ids, ordered, so both component algorithms label identically.
    nodes = own_occ.group_by("node", "id_type", "value").aggregate(
        first_seen=own_occ.ts.min(),
        last_seen=own_occ.ts.max(),
        # (message, identifier) is unique in node_occ: a count is a distinct count.
        messages=own_occ.count(),
    )
    nodes = nodes.mutate(node_id=ibis.row_number().over(order_by="node"))
    nodes = engine.scratch("id_nodes", nodes)
    e = used.join(nodes.select(a="node", src="node_id"), "a").join(
        nodes.select(b="node", dst="node_id"), "b"
    )
    e = engine.scratch(
        "id_used",
        e.mutate(
            priority=ibis.ifelse(
                e.kind == "message",
                ibis.least(_priority(e.a_type, config), _priority(e.b_type, config)),
                config.matching.priority if config.matching else 0,
            ),
        ),
    )
    edges = e.select("src", "dst")

    if engine.can("local_arrow"):
        ea = edges.to_pyarrow()
        na = nodes.select("node_id").to_pyarrow()
        comp = components_local(
            na["node_id"].to_numpy(),
            ea["src"].to_numpy(),
            ea["dst"].to_numpy(),
        )
        with engine.temporary(comp) as t:
            comp_t = engine.scratch("id_components", t)
    else:
        comp_t = components_ibis(engine, nodes.select("node_id"), edges)
    anchor = nodes.select(component="node_id", cluster="node")
    clusters = engine.scratch(
        "id_clusters",
        nodes.join(comp_t, "node_id")
        .join(anchor, "component")
        .select("id_type", id_value="value", cluster="cluster"),
    )

    comp_t, dropped = _enforce_rules(engine, config, nodes, comp_t, e)

    labelled = nodes.join(comp_t, "node_id").mutate(quarantined=nodes.node.isin(q_nodes))
    frame = labelled.to_pandas()
    imap_all = engine.table("identity_map")
    n_previous = int(imap_all.count().execute())
    region_ids = imap_all.select("customer_id").limit(0)
    if region_t is None:
        previous = imap_all.to_pandas()
        prev_customers = engine.table("customers").to_pandas()
        known = set(previous["customer_id"])

        def in_use(ids: list[str]) -> set[str]:
            return known.intersection(ids)

    else:
        in_region = imap_all.semi_join(
            region_t, on_region(imap_all, region_t, "id_type", "id_value")
        )
        previous = in_region.to_pandas()
        region_ids = engine.scratch(
            "id_region_customers", in_region.select("customer_id").distinct()
        )
        prev_customers = engine.table("customers").semi_join(region_ids, "customer_id").to_pandas()

        def in_use(ids: list[str]) -> set[str]:
            # Asked for the few ids new customers would take, not every id in the map.
            with engine.temporary(pa.table({"customer_id": pa.array(ids, pa.string())})) as t:
                hit = imap_all.semi_join(t, "customer_id").select("customer_id").distinct()
                return set(hit.to_pyarrow()["customer_id"].to_pylist())

    assignment, aliases, ledger = _stable_ids(
        engine, frame, previous, prev_customers, pairs, now, reason, in_use
    )

    frame["customer_id"] = frame["component"].map(assignment)
    identity_map = pa.Table.from_pandas(
        frame.rename(columns={"value": "id_value"})[
            [
                "id_type",
                "id_value",
                "customer_id",
                "quarantined",
                "first_seen",
                "last_seen",
                "messages",
            ]
        ],
        preserve_index=False,
    )

    changes = _changes(previous, identity_map.to_pandas(), aliases, "", now)
    customers = _customers(frame, prev_customers, now, set(changes["customer_id"]))
    # The run's id depends on its clock and on what it changed, so two runs at one clock
    # (tests, replays) that change different customers never share an id.
    digest = [f"{c}={k}" for c, k in zip(changes["customer_id"], changes["change"], strict=True)]
    run_id = format(stable_hash64("resolve", now.isoformat(), str(n_previous), *digest), "016x")
    changes["run_id"] = run_id

    with engine.temporary(dropped) as d:
        dropped_t = engine.scratch("id_dropped", d)
    flagged = pairs.left_join(blocked.mutate(is_blocked=ibis.literal(True)), ["a", "b"]).drop(
        "a_right", "b_right"
    )
    flagged = flagged.left_join(dropped_t.select("a", "b", "rule"), ["a", "b"]).drop(
        "a_right", "b_right"
    )
    st = ibis.cases(
        (flagged.is_blocked.fill_null(False), "blocked"),
        (flagged.a.isin(q_nodes) | flagged.b.isin(q_nodes), "quarantined"),
        (flagged.rule.notnull(), "dropped: " + flagged.rule),
        else_="used",
    )
    pairs_out = flagged.mutate(
        a_value=flagged.a.split(SEP)[1],
        b_value=flagged.b.split(SEP)[1],
        status=st,
        used=st == "used",
    )
    dropped_out = dropped_t.mutate(
        a_value=dropped_t.a.split(SEP)[1], b_value=dropped_t.b.split(SEP)[1]
    )
    q = nodes.filter(nodes.node.isin(q_nodes))
    by_name = q.node.isin(on_many_names.node)
    quarantined_issues = q.select(
        id_type="id_type",
        raw_value="value",
        reason=ibis.ifelse(
            by_name,
            "quarantined: seen under too many unrelated names",
            "quarantined: seen with too many strong identifiers",
        ),
        messages="messages",
    )

    # Every table of the resolution changes together or not at all: a crash half way
    # leaves the previous, consistent resolution (and no half-written ledger) in place.
    with engine.transaction():
        w = _Writer(engine, region_t)
        with engine.temporary(customers) as c:
            w.put("customers", c, w.keys(region_ids))
        if len(aliases):
            _write_aliases(engine, w, aliases)
        if len(ledger):
            engine.append("merge_ledger", pa.Table.from_pandas(ledger, preserve_index=False))
        with engine.temporary(identity_map) as im:
            w.put("identity_map", im, w.region_keys())
        if len(changes):
            engine.append("identity_changes", pa.Table.from_pandas(changes, preserve_index=False))
        pair_keys = w.inside(("a_type", "a_value"), ("b_type", "b_value"))
        if region_t is not None:
            pair_keys = w.keys(_old_pair_keys(engine, pairs_out, region_t, mc is not None))
        w.put("identity_edges", pairs_out, pair_keys)
        w.put("identity_dropped_links", dropped_out, pair_keys)
        if region_t is None:
            engine.replace(
                "identifier_issues", refused_counts.union(quarantined_issues, distinct=False)
            )
        elif w.rows_only:
            _swap_issues(engine, refused_counts, quarantined_issues, w)
        else:
            engine.replace(
                "identifier_issues",
                engine.scratch(
                    "w_identifier_issues",
                    _issues(engine, refused_counts, quarantined_issues, w),
                ),
            )
        w.put(
            "event_customers",
            _event_customers(engine, node_occ, config),
            w.keys(node_occ.select("message_id").distinct()),
        )
        w.put("identity_suspects", suspect, w.region_keys())
        w.put("identity_clusters", clusters, w.region_keys())
        occ_rows = new_occ.select("message_id", "id_type", id_value="value", ts="ts")
        if region_t is None:
            engine.replace("identity_occurrences", occ_rows)
            engine.replace("identity_messages", seen)
            if new_rows is not None:
                engine.replace("identity_records", new_rows)
        else:
            engine.append("identity_occurrences", occ_rows)
            engine.append("identity_messages", seen)
            if new_rows is not None:
                engine.append("identity_records", new_rows)
        _record_run(engine, config, p, run_id, len(frame), n_seen, now)

    return _result(engine, ledger, changes, run_id, p, n_seen)


COUNTS_ONLY = "; counts only: no identifier, link or name new"


def _counts_only(
    engine: Engine,
    config: IdentityConfig,
    now: datetime,
    p: Plan,
    new_occ: ir.Table,
    seen: ir.Table,
    refused_counts: ir.Table,
    n_seen: int,
) -> ResolveResult | None:
    """An incremental run whose new events only repeat what is known; None if they do not.

    Why: most events a live server loads are known customers doing things (orders, page
    views) with identifiers already seen together. Such events change no cluster, link,
    verdict or customer — only the counters of the identifiers and links they repeat — yet
    the region path reads every message of the clusters they touch back from
    ``identity_occurrences``, a scan of the whole table.

    The new events are of that kind, and the result is the full run's, exactly when:

    * every identifier in them is in ``identity_map``, not quarantined, and first seen no
      later than their timestamps (so ``first_seen``, which windowed limits and customers'
      ``created_at`` read, stays);
    * every pair of identifiers seen in one of them is a ``used`` message link of
      ``identity_edges`` (so no link appears, and none blocked "up to" a time is freed);
    * none of them carries a name (matching's records and the name counts of quarantine
      and ``identity_suspects`` stay) — the caller has checked matching's records;
    * no link was dropped by a rule in the clusters they touch: rules pick links strongest
      (most messages) first, so more messages could change a choice made there. (Where no
      link was dropped, the cluster breaks no rule, whatever order links are taken in.)

    Then: the identifiers' ``messages`` and ``last_seen`` and the links' ``messages``,
    ``message_id`` (the least) and ``last_ts`` move; the new messages get their customer
    (``event_customers``), occurrences and listing; refused values their counts. Nothing
    else changes — no customer, so nothing in ``identity_changes``.
    """
    imap = engine.table("identity_map")
    got = new_occ.group_by(id_type="id_type", id_value="value").aggregate(
        first=new_occ.ts.min(), last=new_occ.ts.max(), n=new_occ.count()
    )
    got = engine.scratch("id_counts_nodes", got)
    n_nodes = int(got.count().execute())
    old = imap.join(got, ["id_type", "id_value"])
    ok = old.filter(~old.quarantined & (old.first >= old.first_seen))
    nodes = engine.scratch(
        "id_counts_map",
        ok.select(
            "id_type",
            "id_value",
            "customer_id",
            "quarantined",
            "first_seen",
            last_seen=_latest(ok.last_seen, ok.last),
            messages=ok.messages + ok.n,
        ),
    )
    if int(nodes.count().execute()) != n_nodes:
        return None
    pairs = _message_pairs(engine, new_occ)
    a_type, a_value = split_node(pairs.a)
    b_type, b_value = split_node(pairs.b)
    pairs = engine.scratch(
        "id_counts_pairs",
        pairs.select(
            a_type=a_type,
            a_value=a_value,
            b_type=b_type,
            b_value=b_value,
            n="messages",
            first_id="message_id",
            last="last_ts",
        ),
    )
    n_pairs = int(pairs.count().execute())
    edge_keys = ["a_type", "a_value", "b_type", "b_value"]
    edges: ir.Table | None = None
    if n_pairs:
        e = engine.table("identity_edges")
        e = e.filter((e.kind == "message") & (e.status == "used"))
        j = e.join(pairs, edge_keys)
        edges = engine.scratch(
            "id_counts_edges",
            j.mutate(
                messages=j.messages + j.n,
                message_id=ibis.ifelse(j.first_id < j.message_id, j.first_id, j.message_id),
                last_ts=_latest(j.last_ts, j.last),
            ).select(*e.columns),
        )
        if int(edges.count().execute()) != n_pairs:
            return None
    if config.matching is None and int(
        named_messages(engine, config, seen.select("message_id"), p.events).count().execute()
    ):
        return None
    if not Rules.of(config).empty and int(engine.table("identity_dropped_links").count().execute()):
        # One read of the clusters: the cluster of each new event's identifier and of one
        # end of each dropped link (both ends of a dropped link lie in one cluster).
        d = engine.table("identity_dropped_links")
        ends = d.select(id_type=d.a_type, id_value=d.a_value, dropped=ibis.literal(True)).union(
            got.select("id_type", "id_value", dropped=ibis.literal(False))
        )
        cl = engine.table("identity_clusters")
        hit = cl.join(ends, ["id_type", "id_value"])
        per = hit.group_by("cluster").aggregate(
            dropped=hit.dropped.any(), touched=(~hit.dropped).any()
        )
        if int(per.filter(per.dropped & per.touched).count().execute()):
            return None

    n_previous = int(imap.count().execute())
    run_id = format(stable_hash64("resolve", now.isoformat(), str(n_previous)), "016x")
    counted = Plan(p.path, p.why + COUNTS_ONLY, p.events, p.new_messages, p.watermark)
    touched = got.select(
        node=got.id_type + ibis.literal(SEP) + got.id_value, id_type="id_type", id_value="id_value"
    )
    with engine.transaction():
        w = _Writer(engine, touched)
        w.put("identity_map", nodes, w.region_keys())
        if edges is not None:
            w.put("identity_edges", edges, w.keys(pairs.select(*edge_keys)))
        if int(refused_counts.count().execute()):
            _swap_issues(engine, refused_counts, refused_counts.limit(0), w)
        # The new events' identifiers are all in ``nodes``, with their customers.
        engine.append("event_customers", _event_customers(engine, new_occ, config, nodes))
        occ_rows = new_occ.select("message_id", "id_type", id_value="value", ts="ts")
        engine.append("identity_occurrences", occ_rows)
        engine.append("identity_messages", seen)
        _record_run(engine, config, counted, run_id, n_nodes, n_seen, now)
    none = pd.DataFrame({"customer_id": pd.Series([], dtype=str)})
    return _result(engine, pd.DataFrame(), none, run_id, counted, n_seen)


def _latest(a: ir.TimestampValue, b: ir.TimestampValue) -> ir.TimestampValue:
    """The later of two instants, either of which may be null (null only if both are)."""
    return ibis.cases((a.isnull(), b), (b.isnull(), a), (b > a, b), else_=a)


def _record_run(
    engine: Engine,
    config: IdentityConfig,
    p: Plan,
    run_id: str,
    region_size: int,
    read: int,
    now: datetime,
) -> None:
    """Append this run's row to ``identity_runs`` (inside the run's transaction)."""
    last = last_run(engine)
    row = {
        "seq": int(str(last["seq"])) + 1 if last is not None else 1,
        "run_id": run_id,
        "path": p.path,
        "why": p.why,
        "config_digest": config_digest(config),
        "blocks_digest": blocks_digest(engine),
        "messages": int(engine.table("identity_messages").count().execute()),
        "new_messages": read,
        "region_identifiers": region_size,
        "ran_at": now,
        "watermark": p.watermark,
    }
    engine.append("identity_runs", pa.Table.from_pylist([row]))
    # A run that changed nobody still leaves ``identity_changes`` in place: its readers (the
    # portrait refresh's shortcut, serving) then tell "no change since" from "no record".
    engine.ensure(tables.IDENTITY_CHANGES)


def _nothing_new(engine: Engine, config: IdentityConfig, now: datetime, p: Plan) -> ResolveResult:
    """An incremental run without new events: nothing can change; only the run is recorded.

    Its id is what a full run that changes nothing would get.
    """
    n_previous = int(engine.table("identity_map").count().execute())
    run_id = format(stable_hash64("resolve", now.isoformat(), str(n_previous)), "016x")
    with engine.transaction():
        _record_run(engine, config, p, run_id, 0, 0, now)
    none = pd.DataFrame({"customer_id": pd.Series([], dtype=str)})
    return _result(engine, pd.DataFrame(), none, run_id, p, 0)


class _Writer:
    """Writes a table whole (full run), or only the region's rows (incremental run).

    Where the engine has transactions (DuckDB, PostgreSQL) an incremental run deletes the
    region's old rows and inserts its new ones, inside the run's one transaction: the cost
    follows the region, not the table, and a crash half way rolls back to the previous
    resolution. Without transactions (Spark) a row-level delete then insert could be cut in
    between and lose rows, so there the table is rewritten whole — its rows outside the
    region plus the region's — each table swapped in one step as before.
    """

    def __init__(self, engine: Engine, region_t: ir.Table | None) -> None:
        self.engine = engine
        self.region = region_t
        self.rows_only = region_t is not None and engine.can("transactions")

    def inside(self, *sides: tuple[str, str]) -> Callable[[ir.Table], ir.Table]:
        """The rows of a table with an identifier (type and value columns) in the region."""
        region_t = self.region

        def rows(t: ir.Table) -> ir.Table:
            if region_t is None:
                return t
            parts = [t.semi_join(region_t, on_region(t, region_t, ty, va)) for ty, va in sides]
            out = parts[0]
            for more in parts[1:]:
                out = out.union(more, distinct=False)
            return out

        return rows

    def keys(self, keys: ir.Table) -> Callable[[ir.Table], ir.Table]:
        """The rows to replace named by their keys, without reading the table.

        Why: picking a table's region rows by a join reads the whole table once, and the
        delete reads it again; keys the run already holds (the region's identifiers, its
        customers, its messages) cost neither. A key with no row deletes nothing.
        """
        return lambda _table: keys

    def region_keys(self) -> Callable[[ir.Table], ir.Table]:
        """Keys (id_type, id_value) of the region's identifiers, for tables keyed by them."""
        region_t = self.region

        def rows(t: ir.Table) -> ir.Table:
            if region_t is None:
                return t
            return region_t.select("id_type", "id_value")

        return rows

    def put(self, name: str, rows: ir.Table, inside: Callable[[ir.Table], ir.Table]) -> None:
        """Write ``rows`` in place of the table's rows ``inside`` picks (all of them when full).

        Rows are picked by key (the rows ``inside`` returns, by the table's declared key).
        """
        if self.region is None:
            self.engine.replace(name, rows)
            return
        old = self.engine.table(name)
        key = list(self.engine.catalogue.get(name).key)
        gone = inside(old).select(*key)
        if self.rows_only:
            self.swap(name, gone, rows)
            return
        merged = self.engine.conform(name, old.anti_join(gone, key)).union(
            self.engine.conform(name, rows), distinct=False
        )
        # Materialised first: the new contents read the table they replace.
        self.engine.replace(name, self.engine.scratch(f"w_{name}", merged))

    def swap(self, name: str, gone: ir.Table, rows: ir.Table) -> None:
        """Delete the rows keyed as in ``gone``, insert ``rows`` (computed before the delete,
        since they may read the table)."""
        new = self.engine.scratch(f"w_{name}", self.engine.conform(name, rows))
        self.engine.delete_keys(name, gone)
        # The table exists (its rows were just read): insert without asking the catalogue.
        self.engine.con.insert(name, new)


def _write_aliases(engine: Engine, w: _Writer, aliases: pd.DataFrame) -> None:
    """Add this run's aliases; aliases of an id merged now resolve to its survivor too.

    Only rows naming a merged id change, so only those are read and rewritten (the whole
    table when it is rewritten whole).
    """
    old = engine.table("customer_aliases")
    merged = [str(a) for a in aliases["alias_id"]]
    if w.rows_only:
        old = old.filter(old.alias_id.isin(merged) | old.customer_id.isin(merged))
    old_aliases = old.to_pandas()
    all_aliases = pd.concat([old_aliases, aliases], ignore_index=True)
    final = dict(zip(aliases["alias_id"], aliases["customer_id"], strict=True))
    all_aliases["customer_id"] = all_aliases["customer_id"].map(lambda c: final.get(c, c))
    all_aliases = all_aliases.drop_duplicates("alias_id", keep="last")
    rows = pa.Table.from_pandas(all_aliases, preserve_index=False)
    if not w.rows_only:
        engine.replace("customer_aliases", rows)
        return
    with engine.temporary(rows) as t:
        w.swap("customer_aliases", t.select("alias_id"), t)


def _swap_issues(
    engine: Engine, refused_counts: ir.Table, quarantined_issues: ir.Table, w: _Writer
) -> None:
    """Row-level ``identifier_issues``: refused values seen again get the new messages' counts
    added; the region's quarantine verdicts are replaced. Other rows are left alone."""
    old = engine.table("identifier_issues")
    is_q = old.reason.startswith("quarantined")
    key = ["id_type", "raw_value", "reason"]
    new_refused = engine.conform("identifier_issues", refused_counts)
    again = old.filter(~is_q).semi_join(new_refused, key)
    refused = engine.conform("identifier_issues", again).union(new_refused, distinct=False)
    refused = refused.group_by(*key).aggregate(messages=refused.messages.sum())
    gone_q = w.inside(("id_type", "raw_value"))(old.filter(is_q))
    gone = again.select(*key).union(gone_q.select(*key), distinct=False)
    rows = engine.conform("identifier_issues", refused).union(
        engine.conform("identifier_issues", quarantined_issues), distinct=False
    )
    w.swap("identifier_issues", gone, rows)


def _issues(
    engine: Engine, refused_counts: ir.Table, quarantined_issues: ir.Table, w: _Writer
) -> ir.Table:
    """Refused values with the new messages' counts added; quarantine verdicts of the region
    replaced. (A message is resolved once, so message counts of old and new runs add up.)"""
    old = engine.table("identifier_issues")
    is_q = old.reason.startswith("quarantined")
    cols = ["id_type", "raw_value", "reason", "messages"]
    refused_all = (
        old.filter(~is_q)
        .select(*cols)
        .union(engine.conform("identifier_issues", refused_counts), distinct=False)
    )
    refused_all = refused_all.group_by("id_type", "raw_value", "reason").aggregate(
        messages=refused_all.messages.sum()
    )
    old_q = old.filter(is_q)
    key = ["id_type", "raw_value", "reason"]
    old_q = old_q.anti_join(w.inside(("id_type", "raw_value"))(old_q).select(*key), key)
    old_q = old_q.select(*cols)
    return (
        engine.conform("identifier_issues", refused_all)
        .union(engine.conform("identifier_issues", old_q), distinct=False)
        .union(engine.conform("identifier_issues", quarantined_issues), distinct=False)
    )


def _old_pair_keys(
    engine: Engine, pairs_out: ir.Table, region_t: ir.Table, scored: bool
) -> ir.Table:
    """Keys of every row of ``identity_edges`` (and ``identity_dropped_links``) with an end
    in the region, from what the run holds rather than from a join over the whole table.

    Why they are all here: an old message pair with an end in the region has its messages
    among the region's (every message of a region identifier is read whole, and nothing was
    erased: that run is full), so the run's own pairs hold it; a dropped link is one of
    those pairs. Only an old scored pair can vanish (a refit), so those — few, and only
    when matching is configured — are read from the table.
    """
    cols = ["a_type", "a_value", "b_type", "b_value"]
    keys = pairs_out.select(*cols)
    if not scored:
        return engine.scratch("id_pair_keys", keys)
    e = engine.table("identity_edges")
    e = e.filter(e.kind == "probabilistic")
    old = e.semi_join(region_t, on_region(e, region_t, "a_type", "a_value")).union(
        e.semi_join(region_t, on_region(e, region_t, "b_type", "b_value")), distinct=False
    )
    return engine.scratch("id_pair_keys", keys.union(old.select(*cols), distinct=False))


def _touching(pairs: ir.Table, region_t: ir.Table) -> ir.Table:
    """Pairs with an end in the region (their evidence is complete in the region's messages)."""
    return pairs.filter(pairs.a.isin(region_t.node) | pairs.b.isin(region_t.node))


PAIR_COLUMNS = (
    "a",
    "a_type",
    "b",
    "b_type",
    "messages",
    "message_id",
    "last_ts",
    "kind",
    "score",
    "other_message_id",
)


def _moved_scores(engine: Engine, scored: ir.Table | None) -> ir.Table:
    """(a, b) of scored record pairs that differ from those the last run kept, either way.

    The last run's are the ``probabilistic`` rows of ``identity_edges``; pairs that are also
    message pairs were not kept as scored pairs, so they are left out of the new ones too.
    """
    e = engine.table("identity_edges")
    e = e.mutate(
        a=e.a_type + ibis.literal(SEP) + e.a_value, b=e.b_type + ibis.literal(SEP) + e.b_value
    )
    old = _pair_columns(e.filter(e.kind == "probabilistic"))
    if scored is None:
        return engine.scratch("id_moved_scores", old.select("a", "b"))
    new = _pair_columns(scored.anti_join(e.filter(e.kind == "message"), ["a", "b"]))
    moved = new.difference(old).union(old.difference(new))
    return engine.scratch("id_moved_scores", moved.select("a", "b"))


def _kept_scores(engine: Engine) -> ir.Table:
    """The scored record pairs the last run kept (``probabilistic`` rows of ``identity_edges``).

    Pairs that were also message pairs then were not kept, and are message pairs still (the
    evidence of a message only grows until a full run), so they are dropped as before.
    """
    e = engine.table("identity_edges")
    e = e.filter(e.kind == "probabilistic")
    e = e.mutate(
        a=e.a_type + ibis.literal(SEP) + e.a_value, b=e.b_type + ibis.literal(SEP) + e.b_value
    )
    return engine.scratch("id_kept_scores", _pair_columns(e))


def _pair_columns(t: ir.Table) -> ir.Table:
    """The columns of an evidence pair, with the types ``identity_edges`` stores them in."""
    spec = {"messages": "int64", "score": "float64", "last_ts": "timestamp('UTC', 6)"}
    return t.select(*[t[c].cast(spec.get(c, "string")).name(c) for c in PAIR_COLUMNS])


def _result(
    engine: Engine,
    ledger: pd.DataFrame,
    changes: pd.DataFrame,
    run_id: str,
    p: Plan,
    read: int,
) -> ResolveResult:
    """Figures of the resolution as written (the same whichever path wrote it).

    Counted in one statement: a live refresh's identity step is a few dozen statements, and
    each costs its compilation and a round trip whatever it reads.
    """
    imap = engine.table("identity_map")
    issues = engine.table("identifier_issues")
    edges = engine.table("identity_edges")
    dropped = engine.table("identity_dropped_links")

    def tally(cond: ir.BooleanValue) -> ir.IntegerValue:
        return ibis.ifelse(cond, 1, 0).sum().fill_null(0)

    figures = (
        imap.aggregate(identifiers=imap.count(), quarantined=tally(imap.quarantined))
        .cross_join(engine.table("customers").aggregate(customers=lambda t: t.count()))
        .cross_join(issues.aggregate(refused=tally(~issues.reason.startswith("quarantined"))))
        .cross_join(
            edges.aggregate(
                links=tally(edges.status == "used"),
                probabilistic=tally(edges.kind == "probabilistic"),
            )
        )
        .cross_join(dropped.aggregate(dropped=dropped.count()))
    )
    f = {k: int(v or 0) for k, v in figures.to_pyarrow().to_pylist()[0].items()}
    return ResolveResult(
        identifiers=f["identifiers"],
        customers=f["customers"],
        quarantined=f["quarantined"],
        refused=f["refused"],
        merges=int((ledger["action"] == "merge").sum()) if len(ledger) else 0,
        links=f["links"],
        dropped=f["dropped"],
        splits=int((ledger["action"] == "split").sum()) if len(ledger) else 0,
        probabilistic=f["probabilistic"],
        run_id=run_id,
        changed=frozenset(changes["customer_id"]),
        path=p.path,
        new_messages=read,
    )


def _changes(
    previous: pd.DataFrame,
    current: pd.DataFrame,
    aliases: pd.DataFrame,
    run_id: str,
    now: datetime,
) -> pd.DataFrame:
    """Customers whose set of identifiers (or their quarantine) differs from the previous
    run's, and how.

    Portrait refresh reads these (``identity_changes``) to recompute only the customers this
    run touched — including a phone leaving a customer whose events all stayed, which the
    event attribution alone cannot show.
    """
    cols = ["customer_id", "run_id", "change", "changed_at"]

    def owners(f: pd.DataFrame) -> pd.DataFrame:
        if not len(f):
            return pd.DataFrame({"key": pd.Series([], dtype=str), "c": pd.Series([], dtype=str)})
        key = f["id_type"] + SEP + f["id_value"]
        if "quarantined" in f.columns:
            # An identifier quarantined or lifted in place changes its customer too (the
            # served profile shows it; serving.changes reads these records to serve anew).
            held = f["quarantined"].fillna(False).astype(bool)
            key = key + held.map({True: SEP + "q", False: ""})
        return pd.DataFrame({"key": key, "c": f["customer_id"]})

    # Compared by counting, not by building a set per customer: a customer is unchanged when
    # all its old identifiers are still its own and it has no others.
    o, n = owners(previous), owners(current)
    m = o.merge(n, on="key", suffixes=("_old", "_new"))
    kept = {str(k): int(v) for k, v in m[m["c_old"] == m["c_new"]].groupby("c_old").size().items()}
    old_n = {str(k): int(v) for k, v in o.groupby("c").size().items()}
    new_n = {str(k): int(v) for k, v in n.groupby("c").size().items()}
    merged = set(aliases["alias_id"]) if len(aliases) else set()
    rows: list[tuple[str, str, str, datetime]] = []
    for c in sorted(set(old_n) | set(new_n)):
        before, after, same = old_n.get(c), new_n.get(c), kept.get(c, 0)
        if before == after == same:
            continue
        if after is None:
            change = "merged" if c in merged else "gone"
        elif before is None:
            change = "new"
        elif same == before:
            change = "grown"
        elif same == after:
            change = "shrunk"
        else:
            change = "changed"
        rows.append((c, run_id, change, now))
    return pd.DataFrame(rows, columns=cols)


def _upgrade(engine: Engine) -> None:
    """Bring tables written by earlier versions to the current schema: a ledger from before
    splits (action='merge'), runs from before the watermark (null: none known).

    The ledger and the runs are appended to, never rebuilt, so their history must survive
    schema growth.
    """
    if engine.exists("identity_runs"):
        runs = engine.table("identity_runs")
        if "watermark" not in runs.columns:
            # Runs from before the watermark: the next run finds its new events by the
            # whole log, and records one.
            engine.replace("identity_runs", runs.mutate(watermark=ibis.null("timestamp('UTC', 6)")))
    if not engine.exists("merge_ledger"):
        return
    t = engine.table("merge_ledger")
    if "action" not in t.columns:
        engine.replace("merge_ledger", t.mutate(action=ibis.literal("merge")))


def _enforce_rules(
    engine: Engine, config: IdentityConfig, nodes: ir.Table, comp_t: ir.Table, e: ir.Table
) -> tuple[ir.Table, pa.Table]:
    """Rebuild rule-breaking components; return (new labels, dropped links with their rule)."""
    rules = Rules.of(config)
    dropped_schema = pa.schema(
        [
            ("a", pa.string()),
            ("a_type", pa.string()),
            ("b", pa.string()),
            ("b_type", pa.string()),
            ("kind", pa.string()),
            ("message_id", pa.string()),
            ("rule", pa.string()),
        ]
    )
    none = dropped_schema.empty_table()
    if rules.empty:
        return comp_t, none
    lab = nodes.select("node_id", "id_type").join(comp_t, "node_id")
    counts = lab.group_by("component").aggregate(
        **{f"n_{t}": ibis.cases((lab.id_type == t, 1), else_=0).sum() for t in sorted(rules.types)}
    )
    conds = [counts[f"n_{t}"] > k for t, k in rules.limits.items()]
    for a, b in rules.never:
        conds.append(
            counts[f"n_{a}"] > 1 if a == b else (counts[f"n_{a}"] > 0) & (counts[f"n_{b}"] > 0)
        )
    bad = counts.filter(ibis.or_(*conds)).select("component")
    # A windowed limit can only be broken where the plain count is over it too, so the same
    # filter finds the candidates; ``refine`` then applies the windows exactly.
    bad_nodes = (
        lab.join(bad, "component")
        .join(nodes.select("node_id", "first_seen"), "node_id")
        .select("node_id", "id_type", "first_seen")
        .to_pyarrow()
    )
    if bad_nodes.num_rows == 0:
        return comp_t, none
    bad_edges = (
        e.join(lab.join(bad, "component").select(src="node_id"), "src")
        .select(
            "src", "dst", "priority", "messages", "a", "a_type", "b", "b_type", "kind", "message_id"
        )
        .to_pyarrow()
        .to_pylist()
    )
    links = [Link(r["src"], r["dst"], int(r["priority"]), int(r["messages"])) for r in bad_edges]
    labels, dropped = refine(
        bad_nodes["node_id"].to_pylist(),
        bad_nodes["id_type"].to_pylist(),
        links,
        rules,
        bad_nodes["first_seen"].to_pylist(),
    )
    relabel = pa.table(
        {
            "node_id": pa.array(list(labels), pa.int64()),
            "new_component": pa.array(list(labels.values()), pa.int64()),
        }
    )
    with engine.temporary(relabel) as t:
        r = engine.scratch("id_relabel", t)
        j = comp_t.left_join(r, "node_id")
        comp_t = engine.scratch(
            "id_components_ruled",
            j.select("node_id", component=j.new_component.fill_null(j.component)),
        )
    rows = [
        {**{k: bad_edges[i][k] for k in dropped_schema.names if k != "rule"}, "rule": rule}
        for i, rule in dropped
    ]
    return comp_t, pa.Table.from_pylist(rows, schema=dropped_schema)


def _event_customers(
    engine: Engine, node_occ: ir.Table, config: IdentityConfig, imap: ir.Table | None = None
) -> ir.Table:
    """Each message's customer: that of its highest-priority non-quarantined identifier.

    ``imap``: rows of ``identity_map`` holding every identifier of ``node_occ`` (all of it
    by default).
    """
    imap = engine.table("identity_map") if imap is None else imap
    prio = ibis.cases(*[(node_occ.id_type == t.name, t.priority) for t in config.types], else_=0)
    occ = node_occ.mutate(priority=prio)
    j = occ.join(imap, [occ.id_type == imap.id_type, occ.value == imap.id_value])
    # Quarantined identifiers rank below every linked one.
    rank = ibis.row_number().over(
        group_by=j.message_id,
        order_by=[ibis.ifelse(j.quarantined, 1, 0), ibis.desc(j.priority), j.customer_id],
    )
    best = j.mutate(rank=rank).filter(lambda t: t.rank == 0)
    return best.select("message_id", "customer_id")


def _customers(
    frame: pd.DataFrame, prev: pd.DataFrame, now: datetime, changed: set[str]
) -> pa.Table:
    """One row per customer; ``updated_at`` moves only for customers this run changed."""
    agg = frame.groupby("customer_id").agg(
        created_at=("first_seen", "min"), identifiers=("node", "count")
    )
    agg = agg.reset_index()
    stamp = pd.Timestamp(now)
    if len(prev):
        # Column at a time (a row loop over timestamps costs more than the rest of a small
        # run): the earlier creation time is kept, ``updated_at`` moves only when changed.
        by_id = prev.drop_duplicates("customer_id").set_index("customer_id")
        was = agg["customer_id"].map(by_id["created_at"])
        earlier = was.notna() & (was < agg["created_at"])
        agg["created_at"] = agg["created_at"].where(~earlier, was)
        upd = agg["customer_id"].map(by_id["updated_at"])
        moved = agg["customer_id"].isin(changed) | upd.isna()
        agg["updated_at"] = upd.where(~moved, stamp)
    else:
        agg["updated_at"] = stamp
    return pa.Table.from_pandas(agg, preserve_index=False)


def _stable_ids(
    engine: Engine,
    frame: pd.DataFrame,
    previous: pd.DataFrame,
    prev_customers: pd.DataFrame,
    pairs: ir.Table,
    now: datetime,
    reason: str,
    in_use: Callable[[list[str]], set[str]],
) -> tuple[dict[int, str], pd.DataFrame, pd.DataFrame]:
    """Map component → customer id, keeping earlier ids; return (assignment, aliases, ledger)."""
    alias_cols = ["alias_id", "customer_id", "merged_at"]
    ledger_cols = ["merge_id", "survivor_id", "merged_id", "evidence", "merged_at", "action"]
    assignment: dict[int, str] = {}
    taken: set[str] = set()
    aliases: list[tuple[str, str, datetime]] = []
    ledger: list[tuple[str, str, str, str, datetime, str]] = []
    moved: list[tuple[str, int, int]] = []  # (old id, component it partly moved to, count)

    old_of: dict[int, list[str]] = {}
    if len(previous):
        prev_key = previous["id_type"] + SEP + previous["id_value"]
        old_id = dict(zip(prev_key, previous["customer_id"], strict=True))
        frame_old = frame["node"].map(old_id)
        counts = (
            pd.DataFrame({"component": frame["component"], "old": frame_old})
            .dropna()
            .value_counts()
            .reset_index(name="n")
        )
        old_size = previous.groupby("customer_id").size()
        created = (
            dict(zip(prev_customers["customer_id"], prev_customers["created_at"], strict=True))
            if len(prev_customers)
            else {}
        )
        # Each old id goes to the component holding most of its identifiers.
        counts = counts.sort_values(["old", "n", "component"], ascending=[True, False, True])
        home = counts.drop_duplicates("old")
        away = counts[counts.duplicated("old")]
        moved = [
            (str(o), int(str(c)), int(str(n)))
            for o, c, n in zip(away["old"], away["component"], away["n"], strict=True)
        ]
        for comp, group in home.groupby("component")["old"]:
            ranked = sorted(
                (str(c) for c in group),
                key=lambda c: (-int(old_size.get(c, 0)), str(created.get(c, "")), c),
            )
            old_of[int(str(comp))] = ranked

    anchors = (
        frame.sort_values(["component", "node"])
        .drop_duplicates("component")
        .set_index("component")["node"]
    )
    merged_pairs: list[tuple[str, str]] = []
    # Ids in use before this run, in or out of the region, asked for the candidates only:
    # the anchors' ids at once, a retry's id (after a clash) when it comes.
    fresh = [customer_id_for(str(a)) for c, a in anchors.items() if int(str(c)) not in old_of]
    previous_ids = in_use(fresh) if fresh else set()
    asked = set(fresh)

    def was_used(c: str) -> bool:
        if c not in asked:
            asked.add(c)
            previous_ids.update(in_use([c]))
        return c in previous_ids

    for comp_key, anchor_value in anchors.items():
        comp = int(str(comp_key))
        anchor = str(anchor_value)
        olds = old_of.get(comp, [])
        if olds:
            survivor = olds[0]
            for other in olds[1:]:
                aliases.append((other, survivor, now))
                merged_pairs.append((survivor, other))
        else:
            survivor = customer_id_for(anchor)
            n = 1
            while survivor in taken or was_used(survivor):
                survivor = customer_id_for(f"{anchor}#{n}")
                n += 1
        assignment[comp] = survivor
        taken.add(survivor)

    if merged_pairs:
        evidence = _merge_evidence(engine, frame, previous, pairs, merged_pairs)
        for survivor, other in merged_pairs:
            merge_id = format(stable_hash64("merge", survivor, other, now.isoformat()), "016x")
            ledger.append(
                (merge_id, survivor, other, evidence.get((survivor, other), ""), now, "merge")
            )
    for old, comp, n in moved:
        new = assignment[comp]
        merge_id = format(stable_hash64("split", old, new, now.isoformat()), "016x")
        why = f"{n} identifier(s) of {old} now resolve to {new}"
        ledger.append((merge_id, old, new, f"{why}: {reason}" if reason else why, now, "split"))
    return (
        assignment,
        pd.DataFrame(aliases, columns=alias_cols),
        pd.DataFrame(ledger, columns=ledger_cols),
    )


def _merge_evidence(
    engine: Engine,
    frame: pd.DataFrame,
    previous: pd.DataFrame,
    pairs: ir.Table,
    merged: list[tuple[str, str]],
) -> dict[tuple[str, str], str]:
    """For each merge, one link between identifiers of the two old customers, as text."""
    prev_key = previous["id_type"] + SEP + previous["id_value"]
    owner = dict(zip(prev_key, previous["customer_id"], strict=True))
    wanted = {frozenset(p) for p in merged}
    involved = {c for p in merged for c in p}
    nodes = pa.table(
        {"node": pa.array([n for n, c in owner.items() if c in involved], pa.string())}
    )
    # The nodes as a table, not a literal list: a run merging many customers names thousands.
    with engine.temporary(nodes) as t:
        hit = pairs.semi_join(t, pairs.a == t.node).union(
            pairs.semi_join(t, pairs.b == t.node), distinct=True
        )
        p = hit.select("a", "b", "message_id").to_pandas()
    # One fixed order, so the evidence quoted never depends on how rows came back.
    p = p.sort_values(["a", "b", "message_id"], kind="stable")
    by_key = {frozenset(m): m for m in merged}
    out: dict[tuple[str, str], str] = {}
    for a, b, mid in zip(p["a"], p["b"], p["message_id"], strict=True):
        ca, cb = owner.get(a), owner.get(b)
        # A new identifier can bridge two customers: attribute it via its component.
        if ca is None or cb is None or ca == cb:
            continue
        key = frozenset((ca, cb))
        if key in wanted:
            s, o = by_key[key]
            out.setdefault((s, o), f"{a.replace(SEP, ':')} ~ {b.replace(SEP, ':')} (message {mid})")
    if any(m not in out for m in merged):
        bridge = int(frame["node"].map(owner).isna().sum())
        for m in merged:
            if m not in out:
                out[m] = f"joined through new identifiers ({bridge} new in this run)"
    return out


def resolve_customer(engine: Engine, customer_id: str) -> str:
    """The current id of a customer, following aliases left by merges."""
    a = engine.table("customer_aliases")
    hit = a.filter(a.alias_id == customer_id).select("customer_id").to_pyarrow()
    return str(hit["customer_id"][0]) if hit.num_rows else customer_id


__all__ = ["ResolveResult", "resolve", "resolve_customer"]
