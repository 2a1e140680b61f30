"""The table catalogue: every table a stage writes, declared once.

Each declaration names the owning stage, the schema, the key, and how erasure of a person
reaches the table. Stages declare their tables in their own ``tables`` module; the engine
refuses to write a table that is not declared, so nothing lands in the warehouse unaccounted
for — which is what a later erasure ("forget this person") needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum

import ibis
import ibis.expr.schema as sch

STAGES = (
    "collect",
    "identity",
    "portrait",
    "tags",
    "segments",
    "predict",
    "activate",
    "measure",
    "privacy",
)


class Erasure(StrEnum):
    """How an erasure request for one person reaches a table."""

    DELETE_BY_CUSTOMER = "delete_by_customer"  # delete rows whose customer column is the person's
    DELETE_BY_IDENTIFIER = "delete_by_identifier"  # delete rows carrying one of the person's ids
    DELETE_BY_MESSAGE = "delete_by_message"  # delete rows of the person's messages (message_id)
    RECOMPUTE = "recompute"  # derived from other tables: rebuilt after the erasure
    NONE = "none"  # holds no personal data


@dataclass(frozen=True)
class TableSpec:
    """A warehouse table: name, owner, schema, key and erasure rule."""

    name: str
    stage: str
    columns: dict[str, str]
    key: tuple[str, ...]
    erasure: Erasure
    erasure_column: str | None = None
    description: str = ""
    indexes: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"table {self.name}: unknown stage {self.stage!r}")
        missing = [k for k in self.key if k not in self.columns]
        if missing:
            raise ValueError(f"table {self.name}: key columns {missing} not in schema")
        needs_column = self.erasure in (
            Erasure.DELETE_BY_CUSTOMER,
            Erasure.DELETE_BY_IDENTIFIER,
            Erasure.DELETE_BY_MESSAGE,
        )
        if needs_column and self.erasure_column not in self.columns:
            raise ValueError(f"table {self.name}: erasure {self.erasure} needs an erasure_column")

    @property
    def schema(self) -> sch.Schema:
        return ibis.schema(self.columns)


class Catalogue:
    """A registry of table specs; a table name can be declared by one stage only."""

    def __init__(self) -> None:
        self._tables: dict[str, TableSpec] = {}

    def declare(self, spec: TableSpec) -> TableSpec:
        existing = self._tables.get(spec.name)
        if existing is not None and existing != spec:
            raise ValueError(
                f"table {spec.name} declared twice (by {existing.stage} and {spec.stage})"
            )
        self._tables[spec.name] = spec
        return spec

    def get(self, name: str) -> TableSpec:
        try:
            return self._tables[name]
        except KeyError:
            raise KeyError(f"table {name!r} is not declared in the catalogue") from None

    def __contains__(self, name: object) -> bool:
        return name in self._tables

    def __iter__(self) -> Iterator[TableSpec]:
        return iter(sorted(self._tables.values(), key=lambda s: (STAGES.index(s.stage), s.name)))

    def owned_by(self, stage: str) -> list[TableSpec]:
        return [s for s in self if s.stage == stage]


CATALOGUE = Catalogue()


def declare(spec: TableSpec) -> TableSpec:
    """Declare a table in the process-wide catalogue (called at import of a stage's ``tables``)."""
    return CATALOGUE.declare(spec)
