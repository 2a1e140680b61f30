"""Compiled once per process: the SQL of a refresh step whose Ibis expression is the same
from one refresh to the next.

A live refresh recomputes a handful of customers, but building ``build.base_expr`` and
compiling it to SQL cost as much as running it (0.15–0.5 CPU-s at 100,000 persons, most of a
five-event refresh). The expression reads only tables of fixed names — the affected
customers and their facts as scratch tables, the offsets of their time zones as another,
the warehouse's own tables — so its SQL is a function of those tables' schemas and of the
few values the expression takes as literals (the zones, the default zone): the customers
come in through the scratch table, never as values pasted into SQL. The cache is keyed on
those values; an entry also records every table the expression read with its schema, and
is used only while they all still have it (a warehouse migrated, or another warehouse in
the same process, compiles again). An expression holding in-memory data (a memtable: its
name is per process and per registration) is never cached.

DuckDB only (the scratch table is written as ``Engine.scratch`` writes it there); other
engines build and materialise the expression every time.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

import ibis.expr.types as ir
from ibis.expr import operations as ops
from ibis.expr import schema as sch

from closedloop.core.engine import Engine


@dataclass(frozen=True)
class Compiled:
    select: str  # the expression's SELECT in the engine's dialect
    schema: sch.Schema  # its result
    reads: tuple[tuple[str, sch.Schema], ...]  # the tables it reads, with their schemas


_CACHE: dict[tuple[Hashable, ...], Compiled] = {}
MAX_ENTRIES = 64  # distinct keys kept (zone sets, mostly); the oldest goes first
# How often a statement was taken from the cache or compiled (what the tests look at).
STATS = {"hits": 0, "compiles": 0}


def cached_scratch(
    engine: Engine, name: str, key: tuple[Hashable, ...], build: Callable[[], ir.Table]
) -> ir.Table:
    """``engine.scratch(name, build())``, compiling ``build()`` only when no entry for
    ``key`` (with ``name`` and the backend) matches the tables as they are now."""
    if engine.backend != "duckdb" or not engine.can("temp_tables"):
        return engine.scratch(name, build())
    full_key = (engine.backend, name, *key)
    hit = _CACHE.get(full_key)
    if hit is not None and _still_valid(engine, hit):
        STATS["hits"] += 1
        return _run(engine, name, hit)
    expr = build()
    compiled = _compile(engine, expr)
    if compiled is None or expr.schema().null_fields:
        return engine.scratch(name, expr)
    if len(_CACHE) >= MAX_ENTRIES:
        _CACHE.pop(next(iter(_CACHE)))
    _CACHE[full_key] = compiled
    STATS["compiles"] += 1
    return _run(engine, name, compiled)


def clear() -> None:
    """Forget every compiled statement (tests)."""
    _CACHE.clear()


def _compile(engine: Engine, expr: ir.Table) -> Compiled | None:
    """The expression's SQL and what it reads; None when it holds in-memory data."""
    node = expr.op()
    if node.find(ops.InMemoryTable):
        return None
    reads = {t.name: t.schema for t in node.find(ops.DatabaseTable)}
    con = engine.con
    select = con.compiler.to_sqlglot(expr).sql(con.dialect)
    return Compiled(select, expr.schema(), tuple(sorted(reads.items())))


def _still_valid(engine: Engine, c: Compiled) -> bool:
    """Whether every table the statement reads exists with the schema it was compiled for."""
    for name, schema in c.reads:
        try:
            now = engine.con.get_schema(name)
        except Exception:
            return False
        if now != schema:
            return False
    return True


def _run(engine: Engine, name: str, c: Compiled) -> ir.Table:
    """Materialise the compiled SELECT as scratch table ``name`` (as ``Engine.scratch``)."""
    import sqlglot.expressions as sge

    con = engine.con
    tmp = f"_scratch_{name}"
    table = sge.table_(tmp, quoted=True)
    create = sge.Create(
        kind="TABLE",
        replace=True,
        this=sge.Schema(this=table, expressions=c.schema.to_sqlglot_column_defs(con.dialect)),
        properties=sge.Properties(expressions=[sge.TemporaryProperty()]),
    )
    columns = ", ".join(sge.to_identifier(n, quoted=True).sql(con.dialect) for n in c.schema)
    insert = f"INSERT INTO {table.sql(con.dialect)} ({columns}) {c.select}"
    with con._safe_raw_sql(create.sql(con.dialect)) as cur:
        cur.execute(insert).fetchall()
    return ops.DatabaseTable(tmp, schema=c.schema, source=con, namespace=ops.Namespace()).to_expr()
