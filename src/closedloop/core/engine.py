"""The engine: one Ibis connection, made from a URL, that every stage reads and writes through.

``duckdb:///path/to/warehouse.duckdb`` (the default), ``duckdb://`` (in memory, for tests),
``postgres://user:pass@host/db``, ``pyspark://`` or any other Ibis backend URL. Stages write
only catalogue-declared tables, and every write is cast to the declared schema so the same
definition produces the same table on every backend.

Capabilities that differ between backends are *declared* here (not detected with
``isinstance`` in the stages): e.g. ``local_arrow`` means results can be pulled into this
process cheaply, so a single-machine algorithm (union-find for connected components) may be
used instead of the portable iterative Ibis path.

``pyspark://`` starts (or joins) an in-process Spark session in local mode — ``local[2]``,
few shuffle partitions, no UI, ``PYSPARK_PYTHON`` set to this interpreter — and works in a
database of its own, dropped on ``close``: Spark's catalogue here lives in memory, so the
tables last as long as the engine (tests, benchmarks, comparing backends). Two Ibis 12 gaps
are closed here rather than in every stage: temporary tables (``scratch``) and unwrapping
JSON strings, edit distance (``_spark_compat``).
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
import uuid
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
        self._spark_dir: str | None = None
        self._spark_db: str | None = None
        self._scratch_frames: dict[str, Any] = {}
        if scheme == "pyspark":
            self.con: Any = self._connect_spark(url)
        else:
            self.con = ibis.connect(url)
        self.backend = self.con.name
        self.capabilities = CAPABILITIES.get(self.backend, frozenset())

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _connect_spark(self, url: str) -> Any:
        """An Ibis connection to a local Spark session, in a fresh database of this engine."""
        if urlparse(url).path not in ("", "/"):
            raise ValueError(
                f"{url}: a Spark engine keeps its tables for its own lifetime only; "
                "use pyspark:// (no path)"
            )
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        os.environ.setdefault("PYSPARK_DRIVER_PYTHON", sys.executable)
        from pyspark.sql import SparkSession

        self._spark_dir = tempfile.mkdtemp(prefix="closedloop-spark-")
        builder: Any = SparkSession.builder
        session = (
            builder.master(os.environ.get("CLOSEDLOOP_SPARK_MASTER", "local[2]"))
            .appName("closedloop")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.shuffle.partitions", "4")
            .config("spark.default.parallelism", "4")
            .config("spark.sql.session.timeZone", "UTC")
            .config("spark.sql.warehouse.dir", str(Path(self._spark_dir) / "warehouse"))
            .config("spark.driver.memory", os.environ.get("CLOSEDLOOP_SPARK_MEMORY", "2g"))
            .getOrCreate()
        )
        session.sparkContext.setLogLevel("ERROR")
        session.sparkContext.setCheckpointDir(str(Path(self._spark_dir) / "checkpoints"))
        _spark_compat()
        con = ibis.pyspark.connect(session)
        # Spark turns a null float in a memtable into NaN unless told otherwise.
        ibis.options.pyspark.treat_nan_as_null = True
        self._spark_db = "closedloop_" + uuid.uuid4().hex[:12]
        location = Path(self._spark_dir) / self._spark_db
        session.sql(f"CREATE DATABASE {self._spark_db} LOCATION '{location}'")
        session.catalog.setCurrentDatabase(self._spark_db)
        return con

    def close(self) -> None:
        if self._spark_db is not None:
            # The session outlives the engine (starting Spark costs seconds): drop only
            # what this engine made.
            session = self.con._session
            for frame in self._scratch_frames.values():
                frame.unpersist()
            self._scratch_frames.clear()
            for view in session.catalog.listTables():
                if view.isTemporary:
                    session.catalog.dropTempView(view.name)
            session.sql(f"DROP DATABASE IF EXISTS {self._spark_db} CASCADE")
            session.catalog.setCurrentDatabase("default")
            self._spark_db = None
            if self._spark_dir is not None:
                shutil.rmtree(self._spark_dir, ignore_errors=True)
            return
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
        if self._spark_db is not None:
            with self._spark_temporary(data) as t:
                yield t
            return
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
        tmp = f"_scratch_{name}"
        if not self.can("temp_tables"):
            return self._spark_scratch(tmp, expr)
        self.con.create_table(tmp, expr, temp=True, overwrite=True)
        return self.con.table(tmp)

    @contextmanager
    def _spark_temporary(self, data: pa.Table) -> Iterator[ir.Table]:
        """Arrow data as a Spark temporary view, made from Arrow directly.

        Ibis 12 goes through pandas, where a missing string can become NaN and reach Spark
        as the text ``"NaN"`` — an identifier nobody sent. Spark 4 takes Arrow as it is.
        """
        session = self.con._session
        name = "_tmp_" + uuid.uuid4().hex
        session.createDataFrame(data).createOrReplaceTempView(name)
        try:
            yield self.con.table(name)
        finally:
            session.catalog.dropTempView(name)

    def _spark_scratch(self, tmp: str, expr: ir.Table) -> ir.Table:
        """Spark's scratch table: the result computed now, lineage cut, as a temporary view.

        Ibis 12's ``cache()`` on Spark compiles the expression without registering the
        memtables and functions it uses (they would go to another backend's registry or be
        missing), and a cached DataFrame keeps its whole lineage — iterative steps (label
        propagation) would re-plan every earlier round. A local checkpoint computes the
        rows once, keeps them in the executors and forgets how they were made.
        """
        con = self.con
        con._run_pre_execute_hooks(expr)
        frame = con._session.sql(con.compile(expr)).localCheckpoint(eager=True)
        frame.createOrReplaceTempView(tmp)
        old = self._scratch_frames.pop(tmp, None)
        self._scratch_frames[tmp] = frame
        if old is not None:
            old.unpersist()
        return con.table(tmp)


def _spark_compat() -> None:
    """Make Spark compute what DuckDB computes where Ibis 12 leaves them apart.

    JSON: Ibis's unwrapping must read what Spark's ``get_json_object`` returns.
    Ibis compiles ``json[key].unwrap_as(...)`` on Spark to ``get_json_object`` followed by a
    pandas UDF that ``json.loads`` the result. But ``get_json_object`` returns a string
    value *unquoted* (``{"a": "x"}`` → ``x``), so every string fails to parse and the query
    dies. The replacement keeps an unparsable result as the string it is; a value that parses
    as JSON keeps Ibis's type check, except that a string-typed unwrap keeps numbers as their
    text (``"138..."`` and ``138...`` cannot be told apart after ``get_json_object``).
    """
    import pandas as pd
    import pyspark.sql.functions as F
    from ibis.backends import pyspark as ibis_spark
    from pyspark.sql.types import BooleanType, DoubleType, LongType, StringType

    if getattr(ibis_spark, "_closedloop_patched", False):
        return
    returns: dict[type, Any] = {
        str: StringType(),
        int: LongType(),
        bool: BooleanType(),
        float: DoubleType(),
    }

    def unwrap_json(typ: type) -> Any:
        def one(raw: Any) -> Any:
            import json

            if raw is None or (isinstance(raw, float) and raw != raw):
                return None
            try:
                value = json.loads(raw)
            except ValueError:
                return raw if typ is str else None
            if typ is str:
                if isinstance(value, str):
                    return value
                return None if isinstance(value, (dict, list)) or value is None else raw
            if typ is float:
                return float(value) if type(value) in (float, int) else None
            return value if type(value) is typ else None

        def unwrap(s: pd.Series) -> pd.Series:
            return s.map(one)

        # Spark reads the hints to pick the UDF kind; resolve them (this module's
        # annotations are strings, and ``pd`` is imported here, not at module level).
        unwrap.__annotations__ = {"s": pd.Series, "return": pd.Series}
        pandas_udf: Any = getattr(F, "pandas_udf")  # noqa: B009 - untyped in pyspark stubs
        return pandas_udf(unwrap, returnType=returns[typ])

    ibis_spark.unwrap_json = unwrap_json
    # Strings need no Python at all: ``get_json_object`` already returns a string value
    # unquoted; only objects and arrays (returned as JSON text) must read as null. Compiling
    # it natively saves a Python worker round trip per row (48 s → 3 s for the identifier
    # scan of a 200-person sample).
    from ibis.backends.sql.compilers.base import NULL
    from ibis.backends.sql.compilers.pyspark import PySparkCompiler

    def visit_unwrap_string(compiler: Any, op: Any, *, arg: Any) -> Any:
        first = compiler.f.substring(arg, 1, 1)
        return compiler.if_(first.isin("{", "["), NULL, arg)

    setattr(PySparkCompiler, "visit_UnwrapJSONString", visit_unwrap_string)  # noqa: B010

    # DuckDB's ``levenshtein`` counts edits in UTF-8 bytes, Spark's in characters, so a
    # one-character typo in a Chinese name is 3 on one and 1 on the other, and matching
    # (tuned on DuckDB) would link different pairs. Spark is made to count bytes: each byte
    # re-read as one Latin-1 character.
    def bytes_of(compiler: Any, arg: Any) -> Any:
        return compiler.f.decode(compiler.f.encode(arg, "UTF-8"), "ISO-8859-1")

    def visit_levenshtein(compiler: Any, op: Any, *, left: Any, right: Any) -> Any:
        return compiler.f.levenshtein(bytes_of(compiler, left), bytes_of(compiler, right))

    setattr(PySparkCompiler, "visit_Levenshtein", visit_levenshtein)  # noqa: B010

    # Ibis strips ``string.whitespace``, written into the SQL with the escapes for VT and FF; Spark
    # reads the unknown escapes as the letters v and f, so " female "
    # became "emale". Strip the whitespace Spark's literals can spell.
    spaces = " \t\n\r"

    def visit_strip(compiler: Any, op: Any, *, arg: Any) -> Any:
        return compiler.f.trim(arg, spaces)

    def visit_lstrip(compiler: Any, op: Any, *, arg: Any) -> Any:
        return compiler.f.ltrim(arg, spaces)

    def visit_rstrip(compiler: Any, op: Any, *, arg: Any) -> Any:
        return compiler.f.rtrim(arg, spaces)

    setattr(PySparkCompiler, "visit_Strip", visit_strip)  # noqa: B010
    setattr(PySparkCompiler, "visit_LStrip", visit_lstrip)  # noqa: B010
    setattr(PySparkCompiler, "visit_RStrip", visit_rstrip)  # noqa: B010
    ibis_spark.unwrap_json_float = unwrap_json(float)
    setattr(ibis_spark, "_closedloop_patched", True)  # noqa: B010 - a marker Ibis lacks
