"""Data quality: identifiers that look like fakes, surfaced for a person to look at.

Why: a clerk who types the shop's phone for every walk-in customer, or a form that defaults
to one number, puts one phone on many unrelated people. Quarantine keeps such values from
merging anybody; this module says *which* values and why, so someone can fix the source.
A strong identifier seen in records under more different names than its type's
``max_names`` is quarantined (it links nobody) and listed; without ``max_names`` it is only
listed, above ``DEFAULT_NAMES`` names (a person has one name, perhaps spelt two ways). Invalid and blocked values, with
their reason, are already in ``identifier_issues``; ``report`` puts both together.
"""

from __future__ import annotations

from dataclasses import dataclass

import ibis
import ibis.expr.types as ir
import pyarrow as pa

from closedloop.core.definitions import IdentityConfig
from closedloop.core.engine import Engine
from closedloop.identity.extract import json_string, prepare

DEFAULT_NAMES = 3  # listed (not quarantined) above this many names when a type sets no limit


def _unrelated(names: list[str]) -> int:
    """How many unrelated names: spellings with the same letters (a transposition) are one."""
    return len({"".join(sorted(n.replace(" ", ""))) for n in names})


def suspects(
    engine: Engine, config: IdentityConfig, node_occ: ir.Table, names: ir.Table | None = None
) -> ir.Table:
    """(id_type, id_value, node, names, messages, reason) for strong identifiers on too many
    unrelated names: more than the type's ``max_names``, or ``DEFAULT_NAMES`` when unset.

    Distinct names are counted in the warehouse; only identifiers with two or more (a small
    share) are pulled to tell typos from unrelated names.

    ``names``: (message_id, name) of the messages with a name, already read (the matching
    records keep them: same path, trimmed and lower-cased, empty names left out). Without
    it, only the events of ``node_occ``'s messages have their JSON read — an incremental
    run's region, not the whole log.
    """
    strong = [t.name for t in config.types if t.strong]
    occ = node_occ.filter(node_occ.id_type.isin(strong))
    if names is None:
        names = named_messages(engine, config, occ.select("message_id").distinct())
    else:
        names = names.semi_join(occ, "message_id")
    j = prepare(engine, occ.join(names.select("message_id", "name"), "message_id"))
    per = j.group_by(id_type=j.id_type, id_value=j.value, node=j.node).aggregate(
        names=j.name.nunique(), messages=j.message_id.nunique()
    )
    many = per.filter(per.names > 1)
    rows = (
        j.semi_join(many, [j.node == many.node])
        .select("node", "name")
        .distinct()
        .to_pyarrow()
        .to_pylist()
    )
    grouped: dict[str, list[str]] = {}
    for r in rows:
        grouped.setdefault(r["node"], []).append(r["name"])
    counts = pa.table(
        {
            "node": pa.array(list(grouped), pa.string()),
            "unrelated": pa.array([_unrelated(v) for v in grouped.values()], pa.int64()),
        }
    )
    limit = ibis.cases(
        *[(many.id_type == t.name, t.max_names or DEFAULT_NAMES) for t in config.types if t.strong],
        else_=DEFAULT_NAMES,
    )
    with engine.temporary(counts) as c:
        g = many.mutate(allowed=limit).join(c, "node")
        g = g.filter(g.unrelated > g.allowed)
        out = g.select(
            "id_type",
            "id_value",
            "node",
            names=g.unrelated,
            messages=g.messages,
            reason=ibis.literal("seen with ") + g.unrelated.cast("string") + " unrelated names",
        )
        return engine.scratch("id_suspects", out)


def named_messages(
    engine: Engine, config: IdentityConfig, messages: ir.Table, events: ir.Table | None = None
) -> ir.Table:
    """(message_id, name) of those of ``messages`` (a message_id column) with a name.

    The events (``events``: the rows of the log to look in, all by default) are narrowed to
    ``messages`` before any JSON is read.
    """
    path = config.matching.name if config.matching is not None else "traits.name"
    log = engine.table("events") if events is None else events
    events = log.semi_join(messages, "message_id")
    events = events.filter(events.traits.notnull())
    name = json_string(engine, events.traits, path.split(".")[1:])
    named = events.select("message_id", name=name.strip().lower())
    return named.filter(named.name.notnull() & (named.name != ""))


@dataclass(frozen=True)
class QualityReport:
    """Refused identifiers by reason, and suspect identifiers (most names first)."""

    issues: pa.Table  # reason, identifiers, messages
    suspects: pa.Table  # id_type, id_value, names, messages, reason


def report(engine: Engine, limit: int = 20) -> QualityReport:
    i = engine.table("identifier_issues")
    # "invalid phone: (1) The string supplied did not seem to be a phone number" → grouped
    # by its kind before the first colon's detail, so the report stays short.
    kind = i.reason.split(":")[0]
    issues = (
        i.group_by(id_type=i.id_type, reason=kind)
        .aggregate(identifiers=i.count(), messages=i.messages.sum())
        .order_by([ibis.desc("messages"), "id_type", "reason"])
    )
    s = engine.table("identity_suspects")
    top = s.order_by([ibis.desc(s.names), s.id_type, s.id_value]).limit(limit)
    return QualityReport(issues=issues.to_pyarrow(), suspects=top.to_pyarrow())
