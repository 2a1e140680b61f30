"""What a portrait refresh reads of the last run and of identity before it starts.

The run record (``portrait_runs``) says the clock and trait definitions the last build or
refresh used; its marks (``portrait_marks``) the identity run it had read and the signature
of the snapshot it left, without which the next refresh compares the whole snapshot
(``portrait.refresh_diff``). See ``portrait.refresh`` for the whole design.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import UTC, datetime

import ibis
import ibis.expr.types as ir

from closedloop.core.definitions.traits import TraitDef
from closedloop.core.engine import Engine
from closedloop.portrait.tables import PORTRAIT_MARKS, PORTRAIT_RUNS, PORTRAIT_SEEN, PROFILES

TS = "timestamp('UTC', 6)"


@dataclass(frozen=True)
class Marks:
    """What a run left for the next one's shortcut (``portrait_marks``)."""

    identity_seq: int  # the identity run event_customers was read after
    received: datetime | None  # that run's watermark (latest received_at it read)
    pairs: int  # the snapshot's (message, customer) pairs after the run
    pairs_xor: int  # XOR of their 64-bit hashes (unsigned)


@dataclass(frozen=True)
class LastRun:
    as_of: datetime
    traits_digest: str
    customers: int = -1  # profile rows the run left (-1: unknown)
    marks: Marks | None = None  # None: the next refresh compares the whole snapshot


def traits_digest(traits: dict[str, TraitDef]) -> str:
    """A fingerprint of the trait definitions: a changed definition needs a full trait build."""
    text = json.dumps(
        [t.model_dump(mode="json") for _, t in sorted(traits.items())], sort_keys=True
    )
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def last_run(engine: Engine) -> LastRun | None:
    """The last recorded build or refresh; None when a full build is needed.

    A snapshot without the parsed facts (written before they were kept) needs one too.
    """
    if not engine.exists(PORTRAIT_RUNS.name) or not engine.exists(PROFILES.name):
        return None
    if not engine.exists(PORTRAIT_SEEN.name):
        return None
    if set(PORTRAIT_SEEN.columns) - set(engine.table(PORTRAIT_SEEN.name).columns):
        return None
    runs = engine.table(PORTRAIT_RUNS.name)
    rows = runs.order_by(ibis.desc(runs.finished_at)).limit(1).to_pyarrow().to_pylist()
    if not rows:
        return None
    as_of = rows[0]["as_of"]
    customers = rows[0]["customers"]
    return LastRun(
        as_of.astimezone(UTC),
        str(rows[0]["traits_digest"]),
        -1 if customers is None else int(customers),
        stored_marks(engine, rows[0]["finished_at"]),
    )


def stored_marks(engine: Engine, finished_at: datetime) -> Marks | None:
    """The marks written with the run that finished at ``finished_at`` (None: none)."""
    if not engine.exists(PORTRAIT_MARKS.name):
        return None
    t = engine.table(PORTRAIT_MARKS.name)
    at = ibis.literal(finished_at).cast(TS)
    rows = t.filter(t.finished_at == at).limit(1).to_pyarrow().to_pylist()
    if not rows or None in (rows[0]["identity_seq"], rows[0]["pairs"], rows[0]["pairs_xor"]):
        return None
    r = rows[0]
    received = r["received"].astimezone(UTC) if r["received"] is not None else None
    return Marks(int(r["identity_seq"]), received, int(r["pairs"]), int(r["pairs_xor"]) % 2**64)


def identity_now(engine: Engine) -> tuple[int, datetime | None] | None:
    """(seq, watermark) of the latest identity run: read before ``event_customers``, so
    every later change to it comes from a later run. None: no run recorded."""
    if not engine.exists("identity_runs"):
        return None
    runs = engine.table("identity_runs")
    if "watermark" not in runs.columns:
        return None
    rows = runs.order_by(ibis.desc(runs.seq)).limit(1).to_pyarrow().to_pylist()
    if not rows or rows[0]["seq"] is None:
        return None
    mark = rows[0]["watermark"]
    return int(rows[0]["seq"]), None if mark is None else mark.astimezone(UTC)


def changed_customers(engine: Engine, since_seq: int) -> ir.Table | None:
    """Customers identity recorded as changed (merged, split, grown...) by runs after
    ``since_seq``, materialised; None when identity keeps no such record."""
    if not engine.exists("identity_changes"):
        return None
    runs = engine.table("identity_runs")
    later = runs.filter(runs.seq > since_seq).select("run_id")
    ch = engine.table("identity_changes")
    return engine.scratch(
        "refresh_id_changed", ch.semi_join(later, "run_id").select("customer_id").distinct()
    )


def marks_now(
    engine: Engine, identity: tuple[int, datetime | None] | None, pairs: tuple[int, int] | None
) -> Marks | None:
    """The marks to record: the identity run read before event_customers, and the
    signature of event_customers as read (the snapshot's once the run is written)."""
    if identity is None or pairs is None:
        return None
    return Marks(identity[0], identity[1], pairs[0], pairs[1])


def shortcuts_possible(engine: Engine) -> bool:
    """Whether the engine has what the shortcuts need: deletes and DuckDB's hash."""
    return engine.backend == "duckdb" and engine.can("temp_tables")
