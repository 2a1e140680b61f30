"""Identity resolution: identifiers → graph → components → customers with stable ids.

Steps, with their cost:

1. find identifier occurrences in the event log (one scan per declared path);
2. normalise each *distinct* raw value once, refusing invalid and blocked values;
3. link identifiers seen in the same message (pairs within a message: messages carry a
   handful of ids, so this is O(messages));
4. quarantine identifiers seen with more strong identifiers than their type allows (a
   family tablet, a clerk's phone): they keep their own customer but link nobody;
5. connected components over the remaining links (in-process union-find where the engine
   declares ``local_arrow``, portable Ibis label propagation elsewhere);
6. give each component a customer id that is *stable*: a component keeps the id its
   identifiers had before; when components merge, the customer with most identifiers
   survives (then the oldest, then the smallest id) and the others become aliases, recorded
   in the merge ledger with the link that joined them.
"""

from __future__ import annotations

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
from closedloop.identity import tables  # noqa: F401  (declares the identity tables)
from closedloop.identity.components import components_ibis, components_local
from closedloop.identity.extract import identifier_occurrences
from closedloop.identity.normalise import BlockList, normalise

SEP = "\x1f"


@dataclass(frozen=True)
class ResolveResult:
    identifiers: int
    customers: int
    quarantined: int
    refused: int
    merges: int
    links: int


def _normalised_values(engine: Engine, occ: ir.Table, config: IdentityConfig) -> ir.Table:
    """(id_type, raw_value, value, reason) for every distinct raw value, normalised in Python."""
    distinct = occ.select("id_type", "raw_value").distinct().to_pyarrow()
    types = {t.name: t for t in config.types}
    blocks = BlockList(config)
    values: list[str | None] = []
    reasons: list[str | None] = []
    for id_type, raw in zip(
        distinct["id_type"].to_pylist(), distinct["raw_value"].to_pylist(), strict=True
    ):
        t = types[id_type]
        n = normalise(raw, t.normaliser, config.default_region)
        if n.value is not None and blocks.blocked(raw, n.value):
            values.append(None)
            reasons.append("blocked value")
        else:
            values.append(n.value)
            reasons.append(n.reason)
    mapping = pa.table(
        {
            "id_type": distinct["id_type"],
            "raw_value": distinct["raw_value"],
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


def resolve(engine: Engine, config: IdentityConfig, clock: Clock | None = None) -> ResolveResult:
    """Resolve every identifier in the event log to a customer; write the identity tables."""
    clock = clock or Clock()
    now = clock.now()
    occ = engine.scratch("id_occ", identifier_occurrences(engine, config))
    mapping = _normalised_values(engine, occ, config)

    refused = mapping.filter(mapping.value.isnull())
    refused_counts = (
        occ.join(refused, ["id_type", "raw_value"])
        .group_by("id_type", "raw_value", "reason")
        .aggregate(messages=lambda t: t.message_id.nunique())
    )

    good = occ.join(mapping.filter(mapping.value.notnull()), ["id_type", "raw_value"])
    node_occ = good.select(
        "message_id", "id_type", "value", "ts", node=good.id_type + ibis.literal(SEP) + good.value
    ).distinct()
    node_occ = engine.scratch("id_node_occ", node_occ)

    # Pairs of nodes seen in the same message (the evidence for links).
    left = node_occ.select(message_id="message_id", a="node", a_type="id_type")
    right = node_occ.select(message_id="message_id", b="node", b_type="id_type")
    joined = left.join(right, "message_id").filter(lambda t: t.a < t.b)
    pairs = engine.scratch(
        "id_pairs",
        joined.group_by("a", "a_type", "b", "b_type").aggregate(
            messages=joined.message_id.nunique(), message_id=joined.message_id.min()
        ),
    )
    quarantine = engine.scratch("id_quarantine", _quarantined(pairs, config))
    q_nodes = quarantine.node
    used = pairs.filter(~pairs.a.isin(q_nodes) & ~pairs.b.isin(q_nodes))

    # Integer node ids, ordered, so both component algorithms label identically.
    nodes = node_occ.group_by("node", "id_type", "value").aggregate(
        first_seen=node_occ.ts.min(),
        last_seen=node_occ.ts.max(),
        messages=node_occ.message_id.nunique(),
    )
    nodes = nodes.mutate(node_id=ibis.row_number().over(order_by="node"))
    nodes = engine.scratch("id_nodes", nodes)
    e = used.join(nodes.select(a="node", src="node_id"), "a").join(
        nodes.select(b="node", dst="node_id"), "b"
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

    labelled = nodes.join(comp_t, "node_id").mutate(quarantined=nodes.node.isin(q_nodes))
    frame = labelled.to_pandas()
    previous = engine.table("identity_map").to_pandas()
    prev_customers = engine.table("customers").to_pandas()
    assignment, aliases, ledger = _stable_ids(frame, previous, prev_customers, pairs, now)

    frame["customer_id"] = frame["component"].map(assignment)
    identity_map = pa.Table.from_pandas(
        frame.rename(columns={"id_type": "id_type", "value": "id_value"})[
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

    customers = _customers(frame, prev_customers, now)
    engine.replace("identity_map", identity_map)
    engine.replace("customers", customers)
    if len(aliases):
        old_aliases = engine.table("customer_aliases").to_pandas()
        all_aliases = pd.concat([old_aliases, aliases], ignore_index=True)
        # Aliases of a merged id now resolve to its survivor too.
        final = dict(zip(aliases["alias_id"], aliases["customer_id"], strict=True))
        all_aliases["customer_id"] = all_aliases["customer_id"].map(lambda c: final.get(c, c))
        all_aliases = all_aliases.drop_duplicates("alias_id", keep="last")
        engine.replace("customer_aliases", pa.Table.from_pandas(all_aliases, preserve_index=False))
        engine.append("merge_ledger", pa.Table.from_pandas(ledger, preserve_index=False))

    pairs_out = pairs.mutate(
        a_type=pairs.a_type,
        a_value=pairs.a.split(SEP)[1],
        b_value=pairs.b.split(SEP)[1],
        used=~pairs.a.isin(q_nodes) & ~pairs.b.isin(q_nodes),
    )
    engine.replace("identity_edges", pairs_out)
    quarantined_issues = nodes.filter(nodes.node.isin(q_nodes)).select(
        id_type="id_type",
        raw_value="value",
        reason=ibis.literal("quarantined: seen with too many strong identifiers"),
        messages="messages",
    )
    engine.replace("identifier_issues", refused_counts.union(quarantined_issues, distinct=False))
    engine.replace("event_customers", _event_customers(engine, node_occ, config))

    return ResolveResult(
        identifiers=len(frame),
        customers=int(frame["customer_id"].nunique()),
        quarantined=int(frame["quarantined"].sum()),
        refused=int(refused.count().execute()),
        merges=len(ledger),
        links=int(used.count().execute()),
    )


def _event_customers(engine: Engine, node_occ: ir.Table, config: IdentityConfig) -> ir.Table:
    """Each message's customer: that of its highest-priority non-quarantined identifier."""
    imap = engine.table("identity_map")
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


def _customers(frame: pd.DataFrame, prev: pd.DataFrame, now: datetime) -> pa.Table:
    agg = frame.groupby("customer_id").agg(
        created_at=("first_seen", "min"), identifiers=("node", "count")
    )
    agg = agg.reset_index()
    if len(prev):
        old = dict(zip(prev["customer_id"], prev["created_at"], strict=True))
        agg["created_at"] = [
            min(old[c], t) if c in old and pd.notna(old[c]) else t
            for c, t in zip(agg["customer_id"], agg["created_at"], strict=True)
        ]
    agg["updated_at"] = pd.Timestamp(now)
    return pa.Table.from_pandas(agg, preserve_index=False)


def _stable_ids(
    frame: pd.DataFrame,
    previous: pd.DataFrame,
    prev_customers: pd.DataFrame,
    pairs: ir.Table,
    now: datetime,
) -> tuple[dict[int, str], pd.DataFrame, pd.DataFrame]:
    """Map component → customer id, keeping earlier ids; return (assignment, aliases, ledger)."""
    alias_cols = ["alias_id", "customer_id", "merged_at"]
    ledger_cols = ["merge_id", "survivor_id", "merged_id", "evidence", "merged_at"]
    assignment: dict[int, str] = {}
    taken: set[str] = set()
    aliases: list[tuple[str, str, datetime]] = []
    ledger: list[tuple[str, str, str, str, datetime]] = []

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
    previous_ids = set(previous["customer_id"]) if len(previous) else set()
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
            while survivor in taken or survivor in previous_ids:
                survivor = customer_id_for(f"{anchor}#{n}")
                n += 1
        assignment[comp] = survivor
        taken.add(survivor)

    if merged_pairs:
        evidence = _merge_evidence(frame, previous, pairs, merged_pairs)
        for survivor, other in merged_pairs:
            merge_id = format(stable_hash64("merge", survivor, other, now.isoformat()), "016x")
            ledger.append((merge_id, survivor, other, evidence.get((survivor, other), ""), now))
    return (
        assignment,
        pd.DataFrame(aliases, columns=alias_cols),
        pd.DataFrame(ledger, columns=ledger_cols),
    )


def _merge_evidence(
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
    nodes = [n for n, c in owner.items() if c in involved]
    p = pairs.filter(pairs.a.isin(nodes) | pairs.b.isin(nodes)).to_pandas()
    out: dict[tuple[str, str], str] = {}
    for a, b, mid in zip(p["a"], p["b"], p["message_id"], strict=True):
        ca, cb = owner.get(a), owner.get(b)
        # A new identifier can bridge two customers: attribute it via its component.
        if ca is None or cb is None or ca == cb:
            continue
        key = frozenset((ca, cb))
        if key in wanted:
            s, o = next((x, y) for x, y in merged if {x, y} == {ca, cb})
            out.setdefault((s, o), f"{a.replace(SEP, ':')} ~ {b.replace(SEP, ':')} (message {mid})")
    for s, o in merged:
        if (s, o) not in out:
            bridge = frame[frame["node"].map(owner).isna()]
            out[(s, o)] = f"joined through new identifiers ({len(bridge)} new in this run)"
    return out


def resolve_customer(engine: Engine, customer_id: str) -> str:
    """The current id of a customer, following aliases left by merges."""
    a = engine.table("customer_aliases")
    hit = a.filter(a.alias_id == customer_id).select("customer_id").to_pyarrow()
    return str(hit["customer_id"][0]) if hit.num_rows else customer_id


__all__ = ["ResolveResult", "resolve", "resolve_customer"]
