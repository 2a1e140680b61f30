"""The warehouse opened read-only for one request, or a clear "busy" when it cannot be.

DuckDB lets one process write a database file, or any number of processes read it, never
both: while ``closedloop build`` or ``serve`` holds the file, a read-only open fails with a
lock error. The API must never turn that into a 500, so the failure becomes
``WarehouseBusy`` (answered 503 with Retry-After). Other backends (PostgreSQL) have no such
lock; they are opened as they are.

Profiles have a second place to come from: the serving store the last build wrote beside
the warehouse (``portrait.lookup``; a SQLite file nobody holds a lock on). While a writer
holds the warehouse, ``serving_profile`` answers from it alone — as of the time the store
was written, which the answer states, since the store's freshness check needs the warehouse.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import duckdb
import ibis.expr.types as ir
import pyarrow as pa

from closedloop.core.catalogue import TableSpec
from closedloop.core.definitions import IdentityConfig
from closedloop.core.engine import Engine
from closedloop.portrait.lookup import SUFFIX, ProfileLookup

READ_ONLY = "read_only=true"


class ReadOnlyEngine(Engine):
    """An Engine on a read-only DuckDB file: a declared table never written reads as empty.

    ``Engine.table`` creates such a table on first read; a read-only file refuses that, so
    it is created as a temporary table of this connection instead (DuckDB keeps temporary
    tables apart from the attached file), which is the same empty table for every reader.
    """

    def ensure(self, spec: TableSpec) -> None:
        if not self.exists(spec.name):
            self.con.create_table(spec.name, schema=spec.schema, temp=True)

    def replace(self, name: str, data: ir.Table | pa.Table) -> None:
        """Kept in a temporary table of this connection, which hides the file's table.

        Readers record nothing: ``measure_campaign`` keeps its result in
        ``campaign_results`` as it measures, and through the API that record lives only as
        long as the request (``closedloop report campaign`` is the one that keeps it).
        """
        if isinstance(data, pa.Table):
            with self.temporary(data) as t:
                self.con.create_table(name, self.conform(name, t), temp=True, overwrite=True)
        else:
            self.con.create_table(name, self.conform(name, data), temp=True, overwrite=True)


class WarehouseBusy(Exception):
    """The warehouse cannot be opened for reading now (a writer holds it, or it is missing)."""


@contextmanager
def read_only(url: str) -> Iterator[Engine]:
    """An Engine over ``url`` that cannot write; its ``url`` stays the plain one.

    The plain ``url`` matters: the profile lookup store is found beside the warehouse file
    by that url (``portrait.lookup.serving_path``), and a query string would hide it.
    """
    is_file = url.startswith("duckdb://") and url[len("duckdb://") :] not in ("", "/", "/:memory:")
    if not is_file:
        with Engine(url) as engine:
            yield engine
        return
    sep = "&" if "?" in url else "?"
    try:
        engine = ReadOnlyEngine(url + sep + READ_ONLY)
    except duckdb.IOException as e:
        raise WarehouseBusy(f"the warehouse cannot be opened for reading: {e}") from None
    except duckdb.Error as e:
        raise WarehouseBusy(f"the warehouse cannot be opened read-only: {e}") from None
    engine.url = url
    with engine:
        yield engine


def store_path(url: str) -> Path | None:
    """The serving store beside a DuckDB warehouse file (as ``portrait.lookup.serving_path``
    finds it, without opening the warehouse), or None for other engines."""
    if not url.startswith("duckdb://"):
        return None
    path = url[len("duckdb://") :].split("?", 1)[0]
    if path in ("", "/", "/:memory:", ":memory:"):
        return None
    p = Path(path).expanduser()
    return p.with_name(p.name + SUFFIX)


class StoreOnlyLookup(ProfileLookup):
    """A ``ProfileLookup`` that answers from the serving store without the warehouse.

    The store's fingerprint cannot be compared with a warehouse nobody can read, so it is
    trusted as it is: its answers are those of the build that wrote it (``written_at``).
    Its engine (in memory, empty) is never asked: a missing store raises ``WarehouseBusy``.
    """

    written_at: str | None = None

    @classmethod
    def open_store(cls, engine: Engine, identity: IdentityConfig, path: Path) -> StoreOnlyLookup:
        lookup = cls(engine, identity, path)
        lookup._attach()
        return lookup

    def _attach(self) -> None:
        self.close()
        self._stat = self._file_stat()
        if self._stat is None or self.path is None:
            raise WarehouseBusy("the warehouse is busy and there is no profile serving store")
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, check_same_thread=False)
        try:
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
            columns = json.loads(meta["columns"])
        except (sqlite3.DatabaseError, KeyError, ValueError):
            db.close()
            raise WarehouseBusy(
                "the warehouse is busy and the profile serving store cannot be read"
            ) from None
        self._columns = [(str(n), str(k)) for n, k in columns]
        self.written_at = meta.get("written_at")
        self._db = db


def serving_profile(
    url: str, identity: IdentityConfig, identifier: str, id_type: str | None, busy: WarehouseBusy
) -> tuple[dict[str, Any] | None, str | None]:
    """The customer ``identifier`` names, from the serving store alone (the warehouse being
    ``busy``), as ``profile_document`` shapes it plus where it came from; and when the store
    was written.

    The document is None when the store has no such customer under a given identifier type.
    Without a type the identifier might name an account, which only the warehouse knows, so
    an unmatched one is still ``busy``; so is a missing store.
    """
    path = store_path(url)
    if path is None:
        raise busy
    with Engine("duckdb://") as empty:
        lookup = StoreOnlyLookup.open_store(empty, identity, path)
        try:
            match = lookup.find(identifier, id_type)
        finally:
            lookup.close()
    written_at = lookup.written_at
    if match is None:
        if id_type is None:
            raise WarehouseBusy(
                f"{busy}; the serving store (written {written_at}) has no customer with the "
                f"identifier {identifier!r}, and accounts are only in the warehouse"
            )
        return None, written_at
    return {
        "kind": "customer",
        "customer_id": match.customer_id,
        "matched": {"type": match.matched[0], "value": match.matched[1]},
        "source": "serving",
        "profile": match.profile,
        "accounts": None,  # only in the warehouse
        "served_from": {
            "store": "serving",
            "written_at": written_at,
            "why": f"the warehouse is busy ({busy}); the profile is as of the last build, "
            "and its accounts are left out",
        },
    }, written_at
