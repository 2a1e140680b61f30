"""Which customers a live refresh must carry past the portrait: tags, segments, lookup store.

The portrait refresh recomputes the per-customer part of the portrait only for customers
whose events, attribution or trait windows changed (``portrait.refresh``'s affected
customers), but it rewrites recency, RFM ranks, lifecycle and age for everyone: a profile
row can change without its customer being "affected". So the customers the later steps
must recompute are

* the portrait's affected customers (their traits and attributed events changed), and
* those whose profile row the portrait rewrote or deleted (``RefreshResult.changed``: the
  rows whose clock- or population-dependent values moved). Where the portrait cannot say
  (an engine that rewrites the whole table), those whose profile row differs from the one
  the last live refresh saw — found by a digest of each row (every column but
  ``computed_at``) kept in ``live_digests``; customers new or gone differ too. Hashing
  every profile row was most of a live refresh's portrait step at 100,000 persons.

The lookup store also follows identifiers: a digest of each customer's identifiers (type,
value, quarantine) is kept beside it, so an identifier quarantined or moved without any
event moving is seen as well.

This is only sound when the tags, segments and store are those the last live refresh left,
at the clock it recorded, after the portrait run it followed. ``live_state`` says which
refresh that was; anything else — the first refresh, a build or a crashed refresh between
the two, changed definitions, a full portrait build — and
:func:`find_changes` answers None: the refresh recomputes everything, then records the
state the next one starts from (:func:`save_state`, written last).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime

import ibis
import ibis.expr.types as ir
import pyarrow as pa

from closedloop.core.definitions import Project
from closedloop.core.engine import Engine
from closedloop.portrait.refresh import RefreshResult
from closedloop.portrait.tables import PORTRAIT_RUNS, PROFILES
from closedloop.serving.tables import LIVE_DIGESTS, LIVE_STATE
from closedloop.tags.incremental import row_digest


@dataclass(frozen=True)
class Changes:
    since: datetime  # the clock of the refresh whose results the later steps start from
    customers: ir.Table  # customer_id: tags and segments recompute these
    served: ir.Table  # customer_id: the lookup store rewrites these customers' rows
    stamp: str  # the portrait run that refresh followed (the lookup store carries it)


def definitions_digest(project: Project) -> str:
    """A fingerprint of what the later steps compute: traits, tags and segments."""
    parts = {
        kind: [d.model_dump(mode="json") for _, d in sorted(defs.items())]
        for kind, defs in (
            ("traits", project.traits),
            ("tags", project.tags),
            ("segments", project.segments),
        )
    }
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def digests(engine: Engine, profiles: bool = True) -> ir.Table:
    """(customer_id, profile, identity): this moment's digests, one row per customer.

    ``profiles=False`` leaves the profile digest null (the portrait said which rows it
    rewrote): a later refresh that needs it finds every row differing and recomputes all.
    """
    p = engine.table(PROFILES.name)
    cols = [c for c in p.columns if c != "computed_at"]
    digest = row_digest(engine, {c: p[c] for c in cols}) if profiles else ibis.null("int64")
    prof = p.select("customer_id", profile=digest)
    m = engine.table("identity_map")
    m = m.filter(m.customer_id.notnull())
    row = row_digest(engine, {"t": m.id_type, "v": m.id_value, "q": m.quarantined})
    ids = m.group_by("customer_id").aggregate(identity=row.bit_xor())
    j = prof.outer_join(ids, prof.customer_id == ids.customer_id)
    return j.select(
        customer_id=j.customer_id.fill_null(j.customer_id_right),
        profile=j.profile,
        identity=j.identity,
    )


def _state(engine: Engine) -> dict[str, object] | None:
    if not engine.exists(LIVE_STATE.name) or not engine.exists(LIVE_DIGESTS.name):
        return None
    s = engine.table(LIVE_STATE.name)
    rows = s.order_by(ibis.desc(s.as_of)).limit(1).to_pyarrow().to_pylist()
    return rows[0] if rows else None


def _portrait_runs(engine: Engine, n: int) -> list[datetime]:
    """The ``finished_at`` of the last ``n`` portrait runs, newest first."""
    r = engine.table(PORTRAIT_RUNS.name)
    rows = r.order_by(ibis.desc(r.finished_at)).limit(n).to_pyarrow().to_pylist()
    return [x["finished_at"].astimezone(UTC) for x in rows]


def find_changes(
    engine: Engine, project: Project, portrait: RefreshResult, as_of: datetime, now: ir.Table
) -> Changes | None:
    """The customers to carry forward after ``portrait``; None: recompute everyone.

    ``now``: this moment's ``digests`` (materialised by the caller, saved by ``save_state``).
    """
    if portrait.mode != "incremental":
        return None
    state = _state(engine)
    if state is None or state["definitions"] != definitions_digest(project):
        return None
    since = state["as_of"]
    runs = _portrait_runs(engine, 2)
    if not isinstance(since, datetime) or len(runs) < 2 or as_of < since:
        return None
    if state["portrait_run"] != runs[1]:  # not the refresh before this portrait run
        return None
    if portrait.affected is None:
        return None
    affected = portrait.affected.select("customer_id")
    old = engine.table(LIVE_DIGESTS.name)
    old = old.select(old_id=old.customer_id, old_profile=old.profile, old_identity=old.identity)
    j = now.outer_join(old, now.customer_id == old.old_id)
    who = j.customer_id.fill_null(j.old_id)
    if portrait.changed is not None:
        profile = portrait.changed.select("customer_id")
    else:
        profile = j.filter(~j.profile.identical_to(j.old_profile)).select(customer_id=who)
    identity = j.filter(~j.identity.identical_to(j.old_identity)).select(customer_id=who)
    customers = engine.scratch("live_changed", affected.union(profile).distinct())
    served = engine.scratch("live_served", customers.union(identity).distinct())
    return Changes(since.astimezone(UTC), customers, served, runs[1].isoformat())


def save_state(engine: Engine, project: Project, as_of: datetime, now: ir.Table) -> None:
    """Record the digests and the state the next refresh starts from (the state row last)."""
    engine.replace(LIVE_DIGESTS.name, now)
    runs = _portrait_runs(engine, 1)
    row = {
        "as_of": [as_of],
        "portrait_run": [runs[0] if runs else None],
        "definitions": [definitions_digest(project)],
    }
    schema = pa.schema(
        [
            ("as_of", pa.timestamp("us", tz="UTC")),
            ("portrait_run", pa.timestamp("us", tz="UTC")),
            ("definitions", pa.string()),
        ]
    )
    engine.replace(LIVE_STATE.name, pa.table(row, schema=schema))
