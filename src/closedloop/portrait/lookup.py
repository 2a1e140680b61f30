"""Profile lookup by identifier: open once, answer many point queries in well under 20 ms.

Why a serving store: the warehouse is columnar. DuckDB answers ``identity_map`` →
``profiles`` point queries with filtered scans (its ART indexes were not used for bound or
literal values, and indexes on stage-owned tables would get in the way of their rewrites),
so one lookup cost 8–30 ms at 100,000 customers and grows with the data. At the end of each
build (:func:`materialise`, called by ``pipeline.build``) the identifiers, aliases and
profile rows are copied into a SQLite file beside the warehouse (``WAREHOUSE.lookup.sqlite``)
whose B-tree keys answer a lookup in tens of microseconds whatever the size. The file is
written under a temporary name and renamed into place, so a reader never sees half of it.

A live refresh (``closedloop serve``) does not rewrite the file: :func:`update_store`
replaces, in one SQLite transaction, only the rows of the customers whose profile or
identifiers changed (``serving.changes`` finds them), and the aliases. It does so only when
the store is the one the previous refresh left (its ``stamp``, the portrait run it matches)
and the latest portrait run's clock is known (kept once in ``meta`` as every profile's
``computed_at`` when later than the row's own, so unchanged rows need no rewrite);
otherwise the file is written whole. A crash in the middle rolls back: the
store is old or new, never half.

Why it cannot go stale: the store records a fingerprint of the warehouse tables it copied
(a hash over every row of ``identity_map``, ``customer_aliases`` and ``profiles``).
:class:`ProfileLookup` compares it with the warehouse when it opens and whenever the file
is replaced; on a mismatch (e.g. ``identity split --no-downstream``, or an engine that is not
a DuckDB file) it answers from the warehouse itself, through Ibis — slower, never wrong.
"""

from __future__ import annotations

import json
import os
import sqlite3
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import ibis
import ibis.expr.datatypes as dt

from closedloop.core.definitions import IdentityConfig
from closedloop.core.engine import Engine
from closedloop.core.errors import InputError
from closedloop.identity.normalise import normalise

SUFFIX = ".lookup.sqlite"
CUSTOMER_ID = "customer_id"  # the pseudo identifier type: a customer id or a retired alias
MAX_ALIAS_HOPS = 32  # aliases point at survivors; a longer chain is a cycle
BATCH = 50_000
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
NAIVE_EPOCH = datetime(1970, 1, 1)  # for a timestamp column without a time zone
HASH_MOD = 1_000_000_007  # hashes are summed modulo this, so the sum cannot overflow
VERSION = "2"  # 2: identifiers indexed by customer, stamp and computed_at in meta
INCREMENTAL_SHARE = 0.2  # more customers changed than this share: write the file whole


def serving_path(engine: Engine) -> Path | None:
    """Where the serving store of a DuckDB warehouse file lives (None: no file to sit beside)."""
    if engine.backend != "duckdb" or not engine.url.startswith("duckdb://"):
        return None
    path = engine.url[len("duckdb://") :]
    if path in ("", "/", "/:memory:", ":memory:"):
        return None
    p = Path(path).expanduser()
    return p.with_name(p.name + SUFFIX)


def fingerprint(engine: Engine) -> str:
    """A digest of every row the store copies; equal digests mean the store is current.

    Row hashes are summed (order-free), counted and taken per table: about 0.1 s at
    1,000,000 customers. Only table names and DuckDB functions go into the SQL.
    """
    con = engine.con.con
    parts: list[str] = []
    for table, where in (
        ("identity_map", "WHERE NOT coalesce(t.quarantined, false)"),
        ("customer_aliases", ""),
        ("profiles", ""),
    ):
        if not engine.exists(table):
            parts.append(f"{table}:-")
            continue
        n, h = con.execute(
            f"SELECT count(*), coalesce(sum(hash(t) % {HASH_MOD}), 0) FROM {table} t {where}"  # noqa: S608 - fixed names
        ).fetchone()
        parts.append(f"{table}:{n}:{h}")
    return "|".join(parts)


def _columns(engine: Engine) -> list[tuple[str, str]]:
    schema = engine.table("profiles").schema()
    return [(name, _kind(dtype)) for name, dtype in schema.items()]


def _kind(dtype: dt.DataType) -> str:
    """How a profile column is carried in the store's JSON rows and read back."""
    if isinstance(dtype, dt.Timestamp):
        return "timestamp" if dtype.timezone else "naive_timestamp"
    if isinstance(dtype, dt.Date):
        return "date"
    return "plain"


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


@dataclass(frozen=True)
class MaterialiseResult:
    path: Path
    identifiers: int
    aliases: int
    profiles: int
    bytes: int


def stamp(engine: Engine) -> str:
    """Which portrait run the warehouse's profiles come from ('' when none is recorded)."""
    if not engine.exists("portrait_runs"):
        return ""
    row = engine.con.con.execute("SELECT max(finished_at) FROM portrait_runs").fetchone()
    return "" if row is None or row[0] is None else row[0].astimezone(UTC).isoformat()


def profiles_clock(engine: Engine) -> datetime | None:
    """The clock every profile is current as of: the latest portrait run's (None: no run).

    A refresh rewrites only the rows that change, each with its clock in ``computed_at``;
    the rows it leaves are current as of its clock too, which only its run record says
    (stamping every row was a whole-table write per refresh). So a profile's
    ``computed_at`` as shown is the later of its own and this (``shown_computed_at``).
    """
    if not engine.exists("portrait_runs"):
        return None
    runs = engine.table("portrait_runs")
    rows = runs.order_by(ibis.desc(runs.finished_at)).limit(1).select("as_of")
    found = rows.to_pyarrow().to_pylist()
    at = found[0]["as_of"] if found else None
    return at.astimezone(UTC) if isinstance(at, datetime) else None


def shown_computed_at(own: datetime | None, clock: datetime | None) -> datetime | None:
    """A profile's ``computed_at`` as readers see it: its row's, or the latest run's clock
    when later (the row was current then too, see ``profiles_clock``)."""
    if own is None or clock is None:
        return own if clock is None else clock
    return max(own, clock)


def _computed_at(engine: Engine) -> str:
    """The ``computed_at`` the store keeps once (microseconds): the latest portrait run's
    clock, or without runs the one every profile shares ('' if they do not share one)."""
    if "computed_at" not in engine.table("profiles").columns:
        return ""
    clock = profiles_clock(engine)
    if clock is not None:
        return str((clock - EPOCH) // timedelta(microseconds=1))
    n, us = engine.con.con.execute(
        "SELECT count(DISTINCT computed_at), max(epoch_us(computed_at)) FROM profiles"
    ).fetchone()
    return str(us) if n == 1 and us is not None else ""


def _meta(engine: Engine, columns: list[tuple[str, str]]) -> dict[str, str]:
    return {
        "fingerprint": fingerprint(engine),
        "columns": json.dumps(columns),
        "written_at": datetime.now(UTC).isoformat(),
        "version": VERSION,
        "stamp": stamp(engine),
        "computed_at": _computed_at(engine),
    }


def materialise(engine: Engine, path: Path | None = None) -> MaterialiseResult | None:
    """Write the serving store for ``engine`` atomically; None when it has no place for one.

    Called at the end of every build so the store always matches what the build wrote.
    """
    path = path or serving_path(engine)
    if path is None or engine.backend != "duckdb" or not engine.exists("profiles"):
        return None
    con = engine.con.con
    columns = _columns(engine)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    out = sqlite3.connect(tmp, isolation_level=None)
    try:
        out.executescript(
            """
            PRAGMA page_size = 16384;
            PRAGMA journal_mode = OFF;
            PRAGMA synchronous = OFF;
            PRAGMA locking_mode = EXCLUSIVE;
            PRAGMA cache_size = -262144;
            CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL) WITHOUT ROWID;
            CREATE TABLE identifiers (
              id_value TEXT NOT NULL, id_type TEXT NOT NULL, customer_id TEXT NOT NULL,
              PRIMARY KEY (id_value, id_type)) WITHOUT ROWID;
            CREATE TABLE aliases (alias_id TEXT PRIMARY KEY, customer_id TEXT NOT NULL)
              WITHOUT ROWID;
            CREATE TABLE profiles (customer_id TEXT PRIMARY KEY, doc TEXT NOT NULL)
              WITHOUT ROWID;
            BEGIN;
            """
        )
        ids = _copy(
            con,
            out,
            "SELECT id_value, id_type, customer_id FROM identity_map "
            "WHERE NOT coalesce(quarantined, false) AND customer_id IS NOT NULL "
            "ORDER BY id_value, id_type",
            "INSERT OR REPLACE INTO identifiers VALUES (?, ?, ?)",
        )
        aliases = 0
        if engine.exists("customer_aliases"):
            aliases = _copy(
                con,
                out,
                "SELECT alias_id, customer_id FROM customer_aliases ORDER BY alias_id",
                "INSERT OR REPLACE INTO aliases VALUES (?, ?)",
            )
        values = ", ".join(_as_json_value(n, k) for n, k in columns)
        profiles = _copy(
            con,
            out,
            f"SELECT customer_id, CAST(json_array({values}) AS VARCHAR) FROM profiles "  # noqa: S608 - schema names
            "WHERE customer_id IS NOT NULL ORDER BY customer_id",
            "INSERT OR REPLACE INTO profiles VALUES (?, ?)",
        )
        out.execute("CREATE INDEX identifiers_customer ON identifiers (customer_id)")
        meta = _meta(engine, columns)
        out.executemany("INSERT INTO meta VALUES (?, ?)", list(meta.items()))
        out.execute("COMMIT")
        out.close()
        with open(tmp, "rb+") as f:  # journal off: make the bytes durable before the rename
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        out.close()  # closing twice is harmless; a failed write leaves no temporary file
        tmp.unlink(missing_ok=True)
    return MaterialiseResult(path, ids, aliases, profiles, path.stat().st_size)


def update_store(
    engine: Engine, customers: list[str], previous: str, path: Path | None = None
) -> MaterialiseResult | None:
    """Rewrite only ``customers``' identifiers and profile rows (and all aliases) in place.

    ``previous``: the ``stamp`` the store must carry — the portrait run of the refresh that
    last wrote it, whose state ``customers`` were found against. None (nothing written)
    when the store is not that one, is of another version or shape, when the profiles do
    have no run clock (nor one shared ``computed_at``), or when so many changed that a whole write is cheaper:
    then call :func:`materialise`.
    """
    path = path or serving_path(engine)
    if path is None or engine.backend != "duckdb" or not path.exists():
        return None
    columns = _columns(engine)
    con = engine.con.con
    total = con.execute("SELECT count(*) FROM profiles").fetchone()[0]
    if len(customers) > INCREMENTAL_SHARE * max(total, 1):
        return None
    out = sqlite3.connect(path, timeout=30, isolation_level=None)
    try:
        try:
            meta = dict(out.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError:
            return None
        now = _meta(engine, columns)
        if (
            meta.get("version") != VERSION
            or meta.get("stamp") != previous
            or meta.get("columns") != now["columns"]
            or not now["computed_at"]
        ):
            return None
        keys = [(c,) for c in customers]
        out.execute("BEGIN IMMEDIATE")
        try:
            out.executemany("DELETE FROM identifiers WHERE customer_id = ?", keys)
            out.executemany("DELETE FROM profiles WHERE customer_id = ?", keys)
            out.execute("DELETE FROM aliases")
            ids = aliases = profiles = 0
            if customers:
                ids = _copy(
                    con,
                    out,
                    "SELECT id_value, id_type, customer_id FROM identity_map "
                    "WHERE NOT coalesce(quarantined, false) AND list_contains(?, customer_id)",
                    "INSERT OR REPLACE INTO identifiers VALUES (?, ?, ?)",
                    [customers],
                )
                values = ", ".join(_as_json_value(n, k) for n, k in columns)
                profiles = _copy(
                    con,
                    out,
                    f"SELECT customer_id, CAST(json_array({values}) AS VARCHAR) FROM profiles "  # noqa: S608 - schema names
                    "WHERE list_contains(?, customer_id)",
                    "INSERT OR REPLACE INTO profiles VALUES (?, ?)",
                    [customers],
                )
            if engine.exists("customer_aliases"):
                aliases = _copy(
                    con,
                    out,
                    "SELECT alias_id, customer_id FROM customer_aliases",
                    "INSERT OR REPLACE INTO aliases VALUES (?, ?)",
                )
            out.executemany("INSERT OR REPLACE INTO meta VALUES (?, ?)", list(now.items()))
            out.execute("COMMIT")
        except BaseException:
            out.execute("ROLLBACK")
            raise
    finally:
        out.close()
    return MaterialiseResult(path, ids, aliases, profiles, path.stat().st_size)


def _as_json_value(name: str, kind: str) -> str:
    q = _quote(name)
    if kind in ("timestamp", "naive_timestamp"):
        return f"epoch_us({q})"
    if kind == "date":
        return f"CAST({q} AS VARCHAR)"
    return q


def _copy(
    con: Any,
    out: sqlite3.Connection,
    select: str,
    insert: str,
    params: list[Any] | None = None,
) -> int:
    """Rows of ``select`` (DuckDB) into ``insert`` (SQLite), a batch of Arrow columns at once.

    Arrow batches turned into Python lists column by column cost less than DuckDB's
    row-by-row ``fetchmany`` tuples; with the rows in key order, a large page and a cache
    that holds the B-tree's right edge, SQLite's inserts are appends.
    """
    cur = con.cursor()
    reader = cur.execute(select, params).to_arrow_reader(BATCH)
    n = 0
    for batch in reader:
        columns = [c.to_pylist() for c in batch.columns]
        out.executemany(insert, zip(*columns, strict=True))
        n += batch.num_rows
    cur.close()
    return n


def _decode(
    doc: str, columns: list[tuple[str, str]], computed_at: int | None = None
) -> dict[str, Any]:
    """A stored row; ``computed_at`` (microseconds), when the store keeps it in ``meta``, is
    the latest run's clock, shown when later than the row's own (``shown_computed_at``)."""
    row: dict[str, Any] = {}
    for (name, kind), v in zip(columns, json.loads(doc), strict=True):
        if name == "computed_at" and computed_at is not None:
            v = computed_at if v is None else max(int(v), computed_at)
        if v is not None and kind == "timestamp":
            v = EPOCH + timedelta(microseconds=v)
        elif v is not None and kind == "naive_timestamp":
            v = NAIVE_EPOCH + timedelta(microseconds=v)
        elif v is not None and kind == "date":
            v = date.fromisoformat(v)
        row[name] = v
    return row


@dataclass(frozen=True)
class Match:
    """What an identifier resolved to: the customer (aliases followed) and its profile row."""

    customer_id: str
    matched: tuple[str, str]  # (id_type, normalised value) that matched
    profile: dict[str, Any] | None  # None: resolved, but the customer has no profile yet
    source: str = "serving"  # 'serving' (the SQLite store) or 'warehouse'


@dataclass
class ProfileLookup:
    """Identifier → customer → profile row; open once (:meth:`open`), look up many times."""

    engine: Engine
    identity: IdentityConfig
    path: Path | None = None
    _db: sqlite3.Connection | None = field(default=None, init=False, repr=False)
    _stat: tuple[int, int] | None = field(default=None, init=False, repr=False)
    _columns: list[tuple[str, str]] = field(default_factory=list, init=False, repr=False)
    _computed_at: int | None = field(default=None, init=False, repr=False)

    @classmethod
    def open(
        cls, engine: Engine, identity: IdentityConfig, path: Path | None = None
    ) -> ProfileLookup:
        lookup = cls(engine, identity, path or serving_path(engine))
        lookup._attach()
        return lookup

    def __enter__(self) -> ProfileLookup:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
        self._db, self._stat = None, None

    @property
    def source(self) -> str:
        """Where answers come from now: 'serving' or 'warehouse'."""
        return "serving" if self._db is not None else "warehouse"

    def _file_stat(self) -> tuple[int, int] | None:
        if self.path is None:
            return None
        try:
            s = os.stat(self.path)
        except FileNotFoundError:
            return None
        return (s.st_ino, s.st_mtime_ns)

    def _attach(self) -> None:
        """Use the store if it exists and matches the warehouse; otherwise the warehouse."""
        self.close()
        stat = self._file_stat()
        self._stat = stat
        if stat is None or self.path is None:
            return
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        try:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError:
            db.close()
            return
        if meta.get("fingerprint") != fingerprint(self.engine):
            db.close()  # stale: the warehouse changed after the store was written
            return
        self._columns = [(n, k) for n, k in json.loads(meta["columns"])]
        self._computed_at = int(meta["computed_at"]) if meta.get("computed_at") else None
        self._db = db

    def _current(self) -> None:
        """Re-attach when the store file was replaced (a build finished) since we opened it."""
        if self._file_stat() != self._stat:
            self._attach()

    def candidates(self, value: str, id_type: str | None = None) -> list[tuple[str, str]]:
        """(type, normalised value) pairs ``value`` may be; a bad value of a given type raises."""
        types = {t.name: t for t in self.identity.types}
        if id_type is not None and id_type != CUSTOMER_ID and id_type not in types:
            known = ", ".join([CUSTOMER_ID, *sorted(types)])
            raise InputError(f"unknown identifier type {id_type!r}; the project has: {known}")
        out: list[tuple[str, str]] = []
        for t in self.identity.types:
            if id_type not in (None, t.name):
                continue
            n = normalise(value, t.normaliser, self.identity.default_region)
            if n.value is None:
                if id_type is not None:
                    raise InputError(f"{value!r} is not a valid {t.name}: {n.reason}")
                continue
            out.append((t.name, n.value))
        if id_type in (None, CUSTOMER_ID) and value.strip():
            out.append((CUSTOMER_ID, value.strip()))
        return out

    def find(self, value: str, id_type: str | None = None) -> Match | None:
        """The customer and profile ``value`` identifies; None if nothing matches.

        Without ``id_type`` every identifier type (and customer ids) is tried; an identifier
        that names two different customers under two types is an error asking for the type.
        """
        cands = self.candidates(value, id_type)
        self._current()
        hits: dict[str, tuple[str, str]] = {}
        for ident, cid in self._resolve(cands):
            hits.setdefault(cid, ident)
        if not hits:
            return None
        if len(hits) > 1:
            found = ", ".join(f"{t}:{v} → {c}" for c, (t, v) in sorted(hits.items()))
            raise InputError(f"{value!r} identifies several customers ({found}); give its type")
        cid, ident = next(iter(hits.items()))
        return Match(cid, ident, self._profile(cid), self.source)

    def profile(self, value: str, id_type: str | None = None) -> dict[str, Any] | None:
        """The profile row (a dict) of the customer ``value`` identifies, or None."""
        m = self.find(value, id_type)
        return None if m is None else m.profile

    # --- the two ways of answering -------------------------------------------------------

    def _resolve(self, cands: list[tuple[str, str]]) -> Iterator[tuple[tuple[str, str], str]]:
        ids = [c for c in cands if c[0] != CUSTOMER_ID]
        direct = [v for t, v in cands if t == CUSTOMER_ID]
        if self._db is not None:
            for t, v in ids:
                row = self._db.execute(
                    "SELECT customer_id FROM identifiers WHERE id_value = ? AND id_type = ?",
                    (v, t),
                ).fetchone()
                if row is not None:
                    yield (t, v), self._follow(row[0])
        elif ids:
            m = self.engine.table("identity_map")
            values = sorted({v for _, v in ids})
            rows = (
                m.filter(m.id_value.isin(values) & ~m.quarantined.fill_null(False))
                .select("id_type", "id_value", "customer_id")
                .to_pyarrow()
                .to_pylist()
            )
            wanted = set(ids)
            for r in rows:
                if (r["id_type"], r["id_value"]) in wanted and r["customer_id"] is not None:
                    yield (r["id_type"], r["id_value"]), self._follow(r["customer_id"])
        for v in direct:
            cid = self._follow(v)
            if cid != v or self._is_customer(v):
                yield (CUSTOMER_ID, v), cid

    def _alias_of(self, cid: str) -> str | None:
        if self._db is not None:
            row = self._db.execute(
                "SELECT customer_id FROM aliases WHERE alias_id = ?", (cid,)
            ).fetchone()
            return None if row is None else str(row[0])
        if not self.engine.exists("customer_aliases"):
            return None
        a = self.engine.table("customer_aliases")
        rows = a.filter(a.alias_id == cid).select("customer_id").to_pyarrow().to_pylist()
        return str(rows[0]["customer_id"]) if rows else None

    def _follow(self, cid: str) -> str:
        seen = {cid}
        for _ in range(MAX_ALIAS_HOPS):
            nxt = self._alias_of(cid)
            if nxt is None or nxt in seen:
                return cid
            seen.add(nxt)
            cid = nxt
        return cid

    def _is_customer(self, cid: str) -> bool:
        if self._db is not None:
            hit = self._db.execute("SELECT 1 FROM profiles WHERE customer_id = ?", (cid,))
            return hit.fetchone() is not None
        c = self.engine.table("customers")
        return bool(c.filter(c.customer_id == cid).count().execute())

    def _profile(self, cid: str) -> dict[str, Any] | None:
        if self._db is not None:
            row = self._db.execute(
                "SELECT doc FROM profiles WHERE customer_id = ?", (cid,)
            ).fetchone()
            if row is None:
                return None
            clock = self._computed_at
            if clock is None:  # a subclass's attach may not have read it: from meta
                kept = self._db.execute("SELECT value FROM meta WHERE key = 'computed_at'")
                value = kept.fetchone()
                clock = int(value[0]) if value is not None and value[0] else None
            return _decode(row[0], self._columns, clock)
        if not self.engine.exists("profiles"):
            return None
        p = self.engine.table("profiles")
        rows: list[dict[str, Any]] = p.filter(p.customer_id == cid).to_pyarrow().to_pylist()
        if not rows:
            return None
        if "computed_at" in rows[0]:
            rows[0]["computed_at"] = shown_computed_at(
                rows[0]["computed_at"], profiles_clock(self.engine)
            )
        return rows[0]
