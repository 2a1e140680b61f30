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

The lookup store also follows identifiers: an identifier quarantined, lifted or moved
without any event moving must reach the served profile too. Identity records every such
customer (``identity_changes``: identifiers gained, lost, quarantined or lifted), so the
customers of the identity runs after the one the last live refresh saw (its ``seq``, kept
in ``live_state``) are served anew — one small query. A digest of each customer's
identifiers (type, value, quarantine) is kept beside the profile digest in
``live_digests``: it is updated by key, only the served customers' rows, and compared
whole (grouping all of ``identity_map``: ~0.25 s a refresh at 100,000 customers) only when
the state cannot say which identity runs came since — a state written by an older version.

This is only sound when the tags, segments and store are those the last live refresh left,
at the clock it recorded, after the portrait run it followed. ``live_state`` says which
refresh that was; anything else — the first refresh, a build or a crashed refresh between
the two, changed definitions, a full portrait build — and
:func:`plan_changes` answers None and why: the refresh recomputes everything, then records
the state the next one starts from (:func:`save_state`: the digests whole, the state row
last). After a refresh that carried only changed customers, only their digest rows are
rewritten (:func:`save_state` with the changes). A crash between the two writes leaves the
state of the refresh before, which names a portrait run that is no longer the one before
the next: that refresh recomputes everything and writes the digests whole.
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
    # How they were found: 'by key' (identity's record of changed customers, the portrait's
    # rewritten rows) or 'digests' (this moment's digests compared whole with the last).
    how: str = "digests"
    now: ir.Table | None = None  # this moment's digests, when computed whole (save them)


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


def digests(engine: Engine, profiles: bool = True, of: ir.Table | None = None) -> ir.Table:
    """(customer_id, profile, identity): this moment's digests, one row per customer.

    ``profiles=False`` leaves the profile digest null (the portrait said which rows it
    rewrote): a later refresh that needs it finds every row differing and recomputes all.
    ``of``: only these customers' (``customer_id``) rows — a by-key update of the digests.
    """
    p = engine.table(PROFILES.name)
    m = engine.table("identity_map")
    if of is not None:
        ids = of.select("customer_id").distinct()
        p, m = p.semi_join(ids, "customer_id"), m.semi_join(ids, "customer_id")
    cols = [c for c in p.columns if c != "computed_at"]
    digest = row_digest(engine, {c: p[c] for c in cols}) if profiles else ibis.null("int64")
    prof = p.select("customer_id", profile=digest)
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


def _identity_seq(engine: Engine) -> int | None:
    """The ``seq`` of the latest identity run (None: identity keeps no runs)."""
    if not engine.exists("identity_runs"):
        return None
    seq = engine.table("identity_runs").seq.max().to_pyarrow().as_py()
    return None if seq is None else int(seq)


def _identity_changed(engine: Engine, since_seq: int) -> ir.Table:
    """Customers identity recorded as changed by its runs after ``since_seq``: identifiers
    gained, lost, quarantined or lifted (``identity.resolve._changes``)."""
    runs = engine.table("identity_runs")
    if not engine.exists("identity_changes"):  # identity never recorded a change
        return runs.select(customer_id=ibis.null("string")).filter(ibis.literal(False))
    later = runs.filter(runs.seq > since_seq).select("run_id")
    ch = engine.table("identity_changes")
    return ch.semi_join(later, "run_id").select("customer_id")


def plan_changes(
    engine: Engine,
    project: Project,
    portrait: RefreshResult,
    as_of: datetime,
    now: ir.Table | None = None,
) -> tuple[Changes | None, str]:
    """The customers to carry forward after ``portrait``, and how they were found; (None,
    why) when it cannot tell: recompute everyone.

    By key when it can: the portrait's affected customers and rewritten rows, and the
    customers identity recorded as changed since the last live refresh. Otherwise (a state
    without the identity run it saw, a portrait that rewrote every row, an engine without
    DELETE, or ``now`` given) this moment's digests — ``now``, or computed here — against
    those in ``live_digests``.
    """
    if portrait.mode != "incremental":
        return None, "everyone: a full portrait build"
    state = _state(engine)
    if state is None:
        return None, "everyone: no live state"
    if state["definitions"] != definitions_digest(project):
        return None, "everyone: definitions changed"
    since = state["as_of"]
    runs = _portrait_runs(engine, 2)
    if not isinstance(since, datetime) or len(runs) < 2 or as_of < since:
        return None, "everyone: no earlier live refresh at an earlier clock"
    if state["portrait_run"] != runs[1]:  # not the refresh before this portrait run
        return None, "everyone: a build or a crashed refresh since the last live refresh"
    if portrait.affected is None:
        return None, "everyone: the portrait did not say whom it recomputed"
    affected = portrait.affected.select("customer_id")
    seq = state.get("identity_seq")
    if (
        now is None
        and portrait.changed is not None
        and isinstance(seq, int)
        and engine.can("temp_tables")
        and engine.exists("identity_runs")
    ):
        customers = engine.scratch(
            "live_changed", affected.union(portrait.changed.select("customer_id")).distinct()
        )
        served = customers.union(_identity_changed(engine, seq)).distinct()
        served = engine.scratch("live_served", served)
        stamp = runs[1].isoformat()
        return Changes(since.astimezone(UTC), customers, served, stamp, "by key"), "by key"
    if now is None:
        profiles = portrait.changed is None
        now = engine.scratch("live_digests_now", digests(engine, profiles=profiles))
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
    stamp = runs[1].isoformat()
    return Changes(since.astimezone(UTC), customers, served, stamp, "digests", now), "digests"


def save_state(
    engine: Engine,
    project: Project,
    as_of: datetime,
    now: ir.Table | None = None,
    *,
    changes: Changes | None = None,
    profiles: bool = False,
) -> None:
    """Record the digests and the state the next refresh starts from (the state row last).

    ``changes`` found by key (``plan_changes``): only the served customers' digest rows are
    rewritten, in one transaction. Otherwise the digests whole: ``now`` (or ``changes.now``)
    or computed here (``profiles``: with the profile digests, for a portrait that says not
    which rows it rewrote).
    """
    if changes is not None and changes.now is None:
        fresh = digests(engine, profiles=False, of=changes.served)
        with engine.transaction():
            engine.delete_keys(LIVE_DIGESTS.name, changes.served.select("customer_id"))
            engine.append(LIVE_DIGESTS.name, fresh)
    else:
        if now is None:
            now = changes.now if changes is not None else None
        engine.replace(LIVE_DIGESTS.name, now if now is not None else digests(engine, profiles))
    runs = _portrait_runs(engine, 1)
    row = {
        "as_of": [as_of],
        "portrait_run": [runs[0] if runs else None],
        "definitions": [definitions_digest(project)],
        "identity_seq": [_identity_seq(engine)],
    }
    schema = pa.schema(
        [
            ("as_of", pa.timestamp("us", tz="UTC")),
            ("portrait_run", pa.timestamp("us", tz="UTC")),
            ("definitions", pa.string()),
            ("identity_seq", pa.int64()),
        ]
    )
    engine.replace(LIVE_STATE.name, pa.table(row, schema=schema))
