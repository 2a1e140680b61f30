"""The engine: one Ibis connection, made from a URL, that every stage reads and writes through.

``duckdb:///path/to/warehouse.duckdb`` (the default), ``duckdb://`` (in memory, for tests),
``postgres://user:pass@host/db``, ``pyspark://`` or any other Ibis backend URL. Stages write
only catalogue-declared tables, and every write is cast to the declared schema so the same
definition produces the same table on every backend.

Capabilities that differ between backends are *declared* here (not detected with
``isinstance`` in the stages): e.g. ``local_arrow`` means results can be pulled into this
process cheaply, so a single-machine algorithm (union-find for connected components) may be
used instead of the portable iterative Ibis path.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import ibis
import ibis.expr.types as ir
import pyarrow as pa

from closedloop.core.catalogue import CATALOGUE, Catalogue, TableSpec

# What each backend can do beyond the portable Ibis core.
CAPABILITIES: dict[str, frozenset[str]] = {
    "duckdb": frozenset({"local_arrow", "transactions", "temp_tables"}),
    "postgres": frozenset({"transactions", "temp_tables"}),
    "pyspark": frozenset(),
}

DEFAULT_URL = "duckdb:///closedloop.duckdb"


class Engine:
    """The warehouse seen through one Ibis connection, guarded by the catalogue."""

    def __init__(self, url: str = "duckdb://", *, catalogue: Catalogue = CATALOGUE) -> None:
        self.url = url
        self.catalogue = catalogue
        scheme = urlparse(url).scheme
        if scheme == "duckdb":
            path = url[len("duckdb://") :]
            if path not in ("", "/", "/:memory:"):
                Path(path).expanduser().parent.mkdir(parents=True, exist_ok=True)
        self.con: Any = ibis.connect(url)
        if scheme == "pyspark":
            # Spark turns a null float in a memtable into NaN unless told otherwise.
            ibis.options.pyspark.treat_nan_as_null = True
        self.backend = self.con.name
        self.capabilities = CAPABILITIES.get(self.backend, frozenset())

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        disconnect = getattr(self.con, "disconnect", None)
        if disconnect is not None:
            disconnect()

    def can(self, capability: str) -> bool:
        return capability in self.capabilities

    # ---- reading -------------------------------------------------------------------------
    def exists(self, name: str) -> bool:
        return name in self.con.list_tables()

    def table(self, name: str) -> ir.Table:
        """The named table; a declared table that was never written reads as empty."""
        if not self.exists(name):
            spec = self.catalogue.get(name)
            self.ensure(spec)
        return self.con.table(name)

    def to_arrow(self, expr: ir.Expr) -> pa.Table:
        return expr.to_pyarrow()

    def count(self, name: str) -> int:
        return int(self.table(name).count().execute())

    # ---- writing -------------------------------------------------------------------------
    def ensure(self, spec: TableSpec) -> None:
        """Create the table empty, with its declared schema, if it does not exist."""
        if not self.exists(spec.name):
            self.con.create_table(spec.name, schema=spec.schema)

    @contextmanager
    def temporary(self, data: pa.Table) -> Iterator[ir.Table]:
        """``data`` as an Ibis table for the length of a ``with`` block, then released.

        Ibis 12 keeps every memtable registered with the backend until the process exits
        (on DuckDB the registration holds the Arrow data), so code writing many chunks would
        grow without bound. Every Arrow hand-off to the warehouse goes through here.
        """
        table = ibis.memtable(data)
        try:
            yield table
        finally:
            name = table.op().name
            for drop in (self.con.drop_view, self.con.drop_table):
                try:
                    drop(name, force=True)
                except Exception:  # noqa: S112 - not this kind of object here: try the next
                    continue
                break

    def conform(self, name: str, t: ir.Table) -> ir.Table:
        """``t`` with exactly the declared columns, types and order of table ``name``."""
        spec = self.catalogue.get(name)
        missing = [c for c in spec.columns if c not in t.columns]
        if missing:
            raise ValueError(f"writing {name}: missing columns {missing}")
        return t.select(*[t[c].cast(typ).name(c) for c, typ in spec.columns.items()])

    def replace(self, name: str, data: ir.Table | pa.Table) -> None:
        """Replace a table's contents in one step (readers see old or new, never half)."""
        # Ibis builds the new table under a temporary name and swaps it in, so a failing
        # expression leaves the old table untouched.
        if isinstance(data, pa.Table):
            with self.temporary(data) as t:
                self.con.create_table(name, self.conform(name, t), overwrite=True)
        else:
            self.con.create_table(name, self.conform(name, data), overwrite=True)

    def append(self, name: str, data: ir.Table | pa.Table) -> None:
        spec = self.catalogue.get(name)
        self.ensure(spec)
        if isinstance(data, pa.Table):
            with self.temporary(data) as t:
                self.con.insert(name, self.conform(name, t))
        else:
            self.con.insert(name, self.conform(name, data))

    def drop(self, name: str) -> None:
        if self.exists(name):
            self.con.drop_table(name)

    def scratch(self, name: str, expr: ir.Table) -> ir.Table:
        """Materialise an intermediate result as a temporary table for the rest of the run.

        Scratch tables hold no state between runs (so they need no catalogue entry) and save
        recomputing an expensive expression that later steps read several times.
        """
        if not self.can("temp_tables"):
            # Spark: a cached DataFrame plays the part of a session-scoped temporary table.
            return expr.cache()
        tmp = f"_scratch_{name}"
        self.con.create_table(tmp, expr, temp=True, overwrite=True)
        return self.con.table(tmp)
