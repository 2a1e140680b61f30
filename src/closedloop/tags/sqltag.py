"""SQL tags: a read-only SELECT, checked before it runs and run only as a query's subquery.

Analytic work is Ibis everywhere else; a SQL tag is the one escape hatch, for an analyst who
has the query already. It is held to three rules:

1. parsed with sqlglot, it is exactly one statement, a ``SELECT`` (or a set operation of
   SELECTs) with no ``INTO`` and no data-changing or DDL node anywhere;
2. it reads only warehouse tables declared in the catalogue (or its own CTEs): no table
   functions, no file paths, no schema-qualified names, no file- or system-reading
   functions (``read_csv``, ``pg_read_file``, ...);
3. it returns ``customer_id`` and ``value`` — checked on the parsed select list where it is
   explicit, and on the result schema before anything runs.

It then runs only embedded as a subquery of the build's own SELECT (Ibis ``con.sql``), so
even a statement the parser let through could not change the warehouse: the engine would
reject a data-changing statement in a FROM clause.
"""

from __future__ import annotations

import sqlglot
from sqlglot import exp
from sqlglot.errors import ParseError

from closedloop.core.catalogue import CATALOGUE
from closedloop.core.errors import ClosedloopError
from closedloop.tags import tables as _tables  # noqa: F401  (tag tables are readable too)

# Nodes that change data or schema, or move data out of the query.
_FORBIDDEN = (
    exp.Insert,
    exp.Update,
    exp.Delete,
    exp.Merge,
    exp.Create,
    exp.Drop,
    exp.Alter,
    exp.Command,
    exp.Copy,
    exp.Into,
    exp.Set,
    exp.Transaction,
    exp.Commit,
    exp.Rollback,
    exp.Pragma,
    exp.Use,
    exp.LoadData,
    exp.Lock,
)
# Functions that reach files, the network or the server's state, on DuckDB or PostgreSQL.
_FORBIDDEN_FUNCTION_PREFIXES = (
    "read_",
    "glob",
    "sniff_",
    "parquet_",
    "getenv",
    "load_",
    "pg_",
    "lo_",
    "dblink",
    "query",
    "current_setting",
    "set_config",
    "copy",
    "http",
    "install",
)


class SqlTagError(ClosedloopError):
    """A SQL tag that is not one read-only SELECT of declared tables."""


def check_select(sql: str, dialect: str = "duckdb") -> exp.Query:
    """The parsed query if ``sql`` is one read-only SELECT over declared tables; else raise."""
    try:
        statements = [s for s in sqlglot.parse(sql, read=dialect) if s is not None]
    except ParseError as e:
        first = e.errors[0]["description"] if e.errors else str(e)
        raise SqlTagError(f"not valid {dialect} SQL: {first}") from None
    if len(statements) != 1:
        raise SqlTagError(f"expected one SELECT statement, got {len(statements)} statements")
    query = statements[0]
    if not isinstance(query, (exp.Select, exp.SetOperation)):
        raise SqlTagError(f"only a SELECT is allowed, got {query.key.upper()}")
    for node in query.walk():
        if isinstance(node, _FORBIDDEN):
            raise SqlTagError(f"{node.key.upper()} is not allowed in a tag's SELECT")
        if isinstance(node, exp.Func):
            name = (node.name if isinstance(node, exp.Anonymous) else node.sql_name()).lower()
            if name.startswith(_FORBIDDEN_FUNCTION_PREFIXES):
                raise SqlTagError(f"function {name}() is not allowed in a tag's SELECT")
    ctes = {c.alias_or_name for c in query.find_all(exp.CTE)}
    for table in query.find_all(exp.Table):
        if not isinstance(table.this, exp.Identifier):
            raise SqlTagError("table functions are not allowed in a tag's SELECT")
        if table.args.get("db") or table.args.get("catalog"):
            raise SqlTagError(f"{table.sql()}: name warehouse tables without a schema")
        if table.name not in ctes and table.name not in CATALOGUE:
            raise SqlTagError(f"unknown table {table.name!r}: a tag reads warehouse tables only")
    names = query.named_selects
    if "*" not in names:
        missing = [c for c in ("customer_id", "value") if c not in names]
        if missing:
            raise SqlTagError(
                f"the SELECT must return customer_id and value; missing {', '.join(missing)}"
            )
    return query
