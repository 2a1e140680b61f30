"""The warehouse opened read-only for one request, or a clear "busy" when it cannot be.

DuckDB lets one process write a database file, or any number of processes read it, never
both: while ``closedloop build`` or ``serve`` holds the file, a read-only open fails with a
lock error. The API must never turn that into a 500, so the failure becomes
``WarehouseBusy`` (answered 503 with Retry-After). Other backends (PostgreSQL) have no such
lock; they are opened as they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import duckdb
import ibis.expr.types as ir
import pyarrow as pa

from closedloop.core.catalogue import TableSpec
from closedloop.core.engine import Engine

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
