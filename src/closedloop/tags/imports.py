"""Import tags: a CSV or Parquet file of customer id → value, bad rows reported by number.

A file from another team is never all good. Rows with no id, no value, an id seen on an
earlier row, or an id that is no customer are left out and reported as ``row N`` (data rows
counted from 1; in a CSV, row N is on line N + 1, after the header); the good rows still
give the tag its values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from closedloop.core.definitions.tags import TagDef
from closedloop.core.engine import Engine
from closedloop.core.errors import InputError

MAX_REPORTED = 20


@dataclass
class ImportedTag:
    rows: pa.Table  # customer_id, value (good rows only)
    bad: list[str] = field(default_factory=list)  # first MAX_REPORTED problems
    bad_rows: int = 0
    modified_at: datetime | None = None

    def note(self) -> str:
        if not self.bad_rows:
            return ""
        more = (
            f" (and {self.bad_rows - len(self.bad)} more)" if self.bad_rows > len(self.bad) else ""
        )
        return f"{self.bad_rows} bad row(s): " + "; ".join(self.bad) + more


def read_tag_file(path: Path, tag: TagDef) -> pa.Table:
    """The file's id and value columns as strings; a missing file or column is an InputError."""
    if not path.is_file():
        raise InputError(f"tags/{tag.name}.yaml [path]: no file {path}")
    try:
        if path.suffix.lower() == ".parquet":
            table = pq.read_table(path)
        else:
            table = pacsv.read_csv(
                path,
                convert_options=pacsv.ConvertOptions(
                    column_types={tag.id_column: pa.string(), tag.value_column: pa.string()},
                    strings_can_be_null=True,
                ),
            )
    except (pa.ArrowInvalid, OSError) as e:
        raise InputError(f"tags/{tag.name}.yaml [path]: cannot read {path}: {e}") from None
    missing = [c for c in (tag.id_column, tag.value_column) if c not in table.column_names]
    if missing:
        raise InputError(
            f"{path}: missing column(s) {', '.join(missing)} "
            f"(has {', '.join(table.column_names)}; set id_column / value_column in tags/{tag.name}.yaml)"
        )
    return pa.table(
        {
            "customer_id": table[tag.id_column].cast(pa.string()),
            "value": table[tag.value_column].cast(pa.string()),
        }
    )


def check_rows(engine: Engine, path: Path, tag: TagDef) -> ImportedTag:
    """Good rows of the file, and every bad one by its row number."""
    table = read_tag_file(path, tag)
    ids = table["customer_id"].to_pylist()
    values = table["value"].to_pylist()
    customers = engine.table("customers")
    known: set[str] = set()
    present = sorted({i.strip() for i in ids if i and i.strip()})
    if present:
        with engine.temporary(pa.table({"customer_id": present})) as wanted:
            hit = wanted.semi_join(customers, "customer_id")
            known = {str(x) for x in hit.customer_id.to_pyarrow().to_pylist()}
    out = ImportedTag(
        rows=pa.table(
            {"customer_id": pa.array([], pa.string()), "value": pa.array([], pa.string())}
        )
    )
    seen: dict[str, int] = {}
    good_ids: list[str] = []
    good_values: list[str] = []

    def bad(row: int, why: str) -> None:
        out.bad_rows += 1
        if len(out.bad) < MAX_REPORTED:
            out.bad.append(f"row {row}: {why}")

    for n, (raw_id, raw_value) in enumerate(zip(ids, values, strict=True), start=1):
        cid = (raw_id or "").strip()
        value = (raw_value or "").strip()
        if not cid:
            bad(n, f"empty {tag.id_column}")
        elif not value:
            bad(n, f"empty {tag.value_column} for {cid}")
        elif cid in seen:
            bad(n, f"{cid} is also on row {seen[cid]}")
        elif cid not in known:
            bad(n, f"no customer {cid}")
        else:
            seen[cid] = n
            good_ids.append(cid)
            good_values.append(value)
    out.rows = pa.table(
        {
            "customer_id": pa.array(good_ids, pa.string()),
            "value": pa.array(good_values, pa.string()),
        }
    )
    out.modified_at = datetime.fromtimestamp(path.stat().st_mtime, UTC)
    return out
