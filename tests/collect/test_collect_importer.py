"""import_table: CSV and Parquet rows through the same gate; mapping errors before any write."""

from __future__ import annotations

import bz2
import gzip
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from closedloop.collect import importer
from closedloop.collect.importer import import_table
from closedloop.collect.loader import LoadResult
from closedloop.core.clock import Clock
from closedloop.core.definitions import ImportSpec, Source
from closedloop.core.engine import Engine
from closedloop.core.errors import InputError

from .conftest import NOW, rows, track, write_jsonl

POS = Source(name="pos", channel="pos", write_key="wk_pos_00000001")

ORDERS_CSV = """\
order_no,member_phone,paid_at,amount,sku_category,coupon_code,member_no,store
000123,+8613800000001,2024-03-01 10:00:00,129.50,Tea,SPRING,00042,"Shanghai, Jing'an"
000124,+8613800000002,2024-03-01T18:00:00+08:00,88,Cups,,00043,"multi
line"
000125,,2024-03-02 09:00:00,10,Tea,,,Beijing
000126,+8613800000004,not a time,5,Tea,,00045,Beijing
000127,+8613800000005,2024-03-03 09:00:00,abc,Tea,,00046,Beijing,extra
,+8613800000006,2024-03-03 09:00:00,1,Tea,,00047,Beijing
000129,+8613800000007,,1,Tea,,00048,Beijing
000130,+8613800000008,2024-03-04 09:00:00,1e2,Tea,,00049,Beijing
"""


def orders_spec(**mapping: Any) -> ImportSpec:
    m: dict[str, Any] = {
        "type": "track",
        "event": "Order Completed",
        "message_id_from": ["order_no"],
        "user_id": "member_phone",
        "timestamp": "paid_at",
        "properties": {
            "order_id": "order_no",
            "revenue": "amount",
            "category": "sku_category",
            "coupon": "coupon_code",
            "store": "store",
        },
        "traits": {"member_no": "member_no"},
    }
    m.update(mapping)
    return ImportSpec.model_validate(
        {"name": "orders", "path": "orders.csv", "source": "pos", "format": "csv", "mapping": m}
    )


def run(engine: Engine, path: Path, spec: ImportSpec, **kw: Any) -> LoadResult:
    kw.setdefault("clock", Clock(NOW))
    return import_table(engine, path, spec, POS, **kw)


def counts(r: LoadResult) -> tuple[int, int, int, int]:
    return (r.received, r.accepted, r.failed, r.duplicate)


@pytest.fixture
def orders(tmp_path: Path) -> Path:
    path = tmp_path / "orders.csv"
    path.write_text(ORDERS_CSV, encoding="utf-8")
    return path


def test_csv_rows_become_track_messages(engine: Engine, orders: Path) -> None:
    r = run(engine, orders, orders_spec())
    assert counts(r) == (8, 3, 5, 0)
    events = {e["message_id"]: e for e in rows(engine, "events")}
    assert set(events) == {"orders:000123", "orders:000124", "orders:000130"}
    first = events["orders:000123"]
    assert (first["type"], first["event"], first["user_id"]) == (
        "track",
        "Order Completed",
        "+8613800000001",  # text, never guessed into a number
    )
    assert (first["source"], first["channel"]) == ("pos", "pos")
    assert first["timestamp"] == datetime(2024, 3, 1, 10, tzinfo=UTC)  # naive = UTC
    assert json.loads(first["properties"]) == {
        "order_id": "000123",
        "revenue": 129.5,
        "category": "Tea",
        "coupon": "SPRING",
        "store": "Shanghai, Jing'an",
    }
    assert json.loads(first["traits"]) == {"member_no": "00042"}  # leading zeros kept
    assert (first["order_id"], first["revenue"], first["category"], first["coupon"]) == (
        "000123",
        129.5,
        "Tea",
        "SPRING",
    )
    second = events["orders:000124"]
    assert second["timestamp"] == datetime(2024, 3, 1, 10, tzinfo=UTC)
    assert "coupon" not in json.loads(second["properties"])  # empty cells are left out
    assert json.loads(second["properties"])["store"] == "multi\nline"
    assert second["coupon"] is None
    assert events["orders:000130"]["revenue"] == 100.0


def test_bad_rows_are_failed_events_with_row_numbers(engine: Engine, orders: Path) -> None:
    run(engine, orders, orders_spec())
    failed = {f["location"]: f for f in rows(engine, "failed_events")}
    assert {loc: f["reason_code"] for loc, f in failed.items()} == {
        f"{orders}:row 3": "missing_identity",
        f"{orders}:row 4": "invalid_field",
        f"{orders}:row 5": "malformed",
        f"{orders}:row 6": "missing_field",
        f"{orders}:row 7": "missing_field",
    }
    assert "`timestamp`" in failed[f"{orders}:row 4"]["reason"]
    assert failed[f"{orders}:row 4"]["message_id"] == "orders:000126"
    assert json.loads(failed[f"{orders}:row 4"]["payload"])["paid_at"] == "not a time"
    assert "9 fields; the header has 8" in failed[f"{orders}:row 5"]["reason"]
    assert "order_no" in failed[f"{orders}:row 6"]["reason"]
    assert "paid_at" in failed[f"{orders}:row 7"]["reason"]


def test_a_non_numeric_amount_stays_text_and_revenue_is_null(
    engine: Engine, tmp_path: Path
) -> None:
    path = tmp_path / "o.csv"
    path.write_text(
        "order_no,member_phone,paid_at,amount\n1,p1,2024-01-01,n/a\n2,p2,2024-01-01, 12.5 \n"
    )
    spec = orders_spec(properties={"revenue": "amount", "order_id": "order_no"}, traits={})
    run(engine, path, spec)
    events = {e["message_id"]: e for e in rows(engine, "events")}
    assert json.loads(events["orders:1"]["properties"])["revenue"] == "n/a"
    assert events["orders:1"]["revenue"] is None
    assert events["orders:2"]["revenue"] == 12.5


def test_rerunning_an_import_adds_nothing(engine: Engine, orders: Path) -> None:
    run(engine, orders, orders_spec())
    before = {t: rows(engine, t) for t in ("events", "failed_events")}
    again = run(engine, orders, orders_spec())
    assert counts(again) == (8, 0, 5, 3)
    for table, old in before.items():
        assert rows(engine, table) == old, table
    assert len(rows(engine, "loads")) == 2


def test_a_later_export_adds_only_new_rows(engine: Engine, tmp_path: Path) -> None:
    header = "order_no,member_phone,paid_at\n"
    old = tmp_path / "old.csv"
    old.write_text(header + "1,p1,2024-01-01\n2,p2,2024-01-02\n")
    new = tmp_path / "new.csv"
    new.write_text(header + "2,p2,2024-01-02\n3,p3,2024-01-03\n")
    spec = orders_spec(properties={}, traits={})
    run(engine, old, spec)
    assert counts(run(engine, new, spec)) == (2, 1, 0, 1)
    assert engine.count("events") == 3


def test_missing_columns_fail_before_anything_is_written(engine: Engine, orders: Path) -> None:
    spec = orders_spec(user_id="phone", properties={"revenue": "total_amount"})
    with pytest.raises(InputError) as e:
        run(engine, orders, spec)
    text = str(e.value)
    assert str(orders) in text
    assert "phone" in text
    assert "total_amount" in text
    assert "member_phone" in text  # what the file does have, to help fix the mapping
    for table in ("events", "failed_events", "loads", "event_external_ids"):
        assert engine.count(table) == 0, table


def test_missing_file_fails_before_anything_is_written(engine: Engine, tmp_path: Path) -> None:
    with pytest.raises(InputError, match=r"no-such\.csv: no such file"):
        run(engine, tmp_path / "no-such.csv", orders_spec())
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(InputError, match="empty"):
        run(engine, empty, orders_spec())
    assert engine.count("loads") == 0


def test_identify_mapping_puts_traits_on_the_message(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "members.csv"
    path.write_text("member_no,phone,joined,tier\n00042,+8613800000001,2023-05-01,gold\n")
    spec = ImportSpec.model_validate(
        {
            "name": "members",
            "path": "members.csv",
            "source": "pos",
            "format": "csv",
            "mapping": {
                "type": "identify",
                "message_id_from": ["member_no", "joined"],
                "user_id": "member_no",
                "timestamp": "joined",
                "traits": {"phone": "phone", "tier": "tier"},
            },
        }
    )
    assert counts(run(engine, path, spec)) == (1, 1, 0, 0)
    (e,) = rows(engine, "events")
    assert (e["message_id"], e["type"], e["event"], e["user_id"]) == (
        "members:00042|2023-05-01",
        "identify",
        None,
        "00042",
    )
    assert json.loads(e["traits"]) == {"phone": "+8613800000001", "tier": "gold"}
    assert e["context"] is None


def test_parquet_import_in_batches_with_typed_columns(engine: Engine, tmp_path: Path) -> None:
    n = 25
    table = pa.table(
        {
            "order_no": pa.array(range(1000, 1000 + n), pa.int64()),
            "member": pa.array([f"m{i}" if i != 17 else None for i in range(n)]),
            "paid_at": pa.array(
                [datetime(2024, 3, 1, i % 24) for i in range(n)], pa.timestamp("us")
            ),
            "amount": pa.array([i * 1.5 for i in range(n)], pa.float64()),
            "qty": pa.array([str(i) for i in range(n)]),
            "unused": pa.array(["x"] * n),
        }
    )
    path = tmp_path / "orders.parquet"
    pq.write_table(table, path, row_group_size=10)
    spec = ImportSpec.model_validate(
        {
            "name": "pq",
            "path": "orders.parquet",
            "source": "pos",
            "format": "parquet",
            "mapping": {
                "type": "track",
                "event": "Order Completed",
                "message_id_from": ["order_no"],
                "user_id": "member",
                "timestamp": "paid_at",
                "properties": {"revenue": "amount", "quantity": "qty", "order_id": "order_no"},
            },
        }
    )
    progress: list[int] = []
    r = run(engine, path, spec, chunk_rows=7, progress=progress.append)
    assert counts(r) == (25, 24, 1, 0)
    assert sum(progress) == 25
    (bad,) = rows(engine, "failed_events")
    assert bad["location"] == f"{path}:row 18"
    assert bad["reason_code"] == "missing_identity"
    events = {e["message_id"]: e for e in rows(engine, "events")}
    e = events["pq:1003"]
    assert e["timestamp"] == datetime(2024, 3, 1, 3, tzinfo=UTC)
    assert json.loads(e["properties"]) == {"revenue": 4.5, "quantity": 3.0, "order_id": 1003}
    assert (e["revenue"], e["order_id"]) == (4.5, "1003")
    assert counts(run(engine, path, spec, chunk_rows=7)) == (25, 0, 1, 24)


def test_parquet_missing_columns_and_unreadable_files(engine: Engine, tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"a": [1]}), path)
    spec = ImportSpec.model_validate(
        {
            "name": "pq",
            "path": "x.parquet",
            "source": "pos",
            "format": "parquet",
            "mapping": {
                "type": "track",
                "event": "E",
                "message_id_from": ["a"],
                "user_id": "who",
                "timestamp": "when",
            },
        }
    )
    with pytest.raises(InputError, match=r"x\.parquet: missing column\(s\) when, who"):
        run(engine, path, spec)
    junk = tmp_path / "junk.parquet"
    junk.write_text("not parquet")
    with pytest.raises(InputError, match=r"junk\.parquet: not a readable Parquet file"):
        run(engine, junk, spec)
    assert engine.count("events") == 0


def test_a_folder_is_imported_file_by_file_and_checked_first(
    engine: Engine, tmp_path: Path
) -> None:
    folder = tmp_path / "exports"
    folder.mkdir()
    (folder / "a.csv").write_text("order_no,member_phone,paid_at\n1,p1,2024-01-01\n")
    (folder / "b.csv").write_text("order_no,member_phone,paid_at\n2,p2,bad\n")
    spec = orders_spec(properties={}, traits={})
    assert counts(run(engine, folder, spec)) == (2, 1, 1, 0)
    (bad,) = rows(engine, "failed_events")
    assert bad["location"] == f"{folder / 'b.csv'}:row 1"
    (folder / "c.csv").write_text("order_no,paid_at\n3,2024-01-01\n")  # lacks member_phone
    with pytest.raises(InputError, match=r"c\.csv: missing column"):
        run(engine, folder, spec)
    assert engine.count("loads") == 1


def test_segment_jsonl_specs_go_to_the_jsonl_loader(engine: Engine, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "s.jsonl", [track(1), track(1)])
    spec = ImportSpec(name="seg", path="s.jsonl", source="pos", format="segment_jsonl")
    assert counts(run(engine, path, spec)) == (2, 1, 0, 1)
    (load,) = rows(engine, "loads")
    assert load["import_name"] == "seg"


@pytest.mark.parametrize("block_bytes", [64, 200, 4 * 1024 * 1024])
def test_row_numbers_stay_exact_across_csv_blocks_with_broken_rows(
    engine: Engine, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, block_bytes: int
) -> None:
    # Arrow reads the file block by block and reports broken rows apart from the good ones;
    # whatever the block boundaries, every failure must name its own data row.
    monkeypatch.setattr(importer, "CSV_BLOCK_BYTES", block_bytes)
    broken, bad_time = {5, 12, 13, 29, 40}, {7, 14, 20, 30, 39}
    lines = ["order_no,member_phone,paid_at"]
    for i in range(1, 41):
        when = "bad" if i in bad_time else "2024-01-01"
        lines.append(f"{i},p{i},{when}" + (",extra" if i in broken else ""))
    path = tmp_path / "many.csv"
    path.write_text("\n".join(lines) + "\n")
    r = run(engine, path, orders_spec(properties={}, traits={}))
    assert counts(r) == (40, 30, 10, 0)
    failed = {f["location"]: f["reason_code"] for f in rows(engine, "failed_events")}
    assert failed == {
        **{f"{path}:row {i}": "malformed" for i in broken},
        **{f"{path}:row {i}": "invalid_field" for i in bad_time},
    }


def test_compressed_and_bom_csv_files(engine: Engine, tmp_path: Path) -> None:
    body = "order_no,member_phone,paid_at\n{n},p{n},2024-01-01\n"
    (tmp_path / "a.csv").write_bytes(b"\xef\xbb\xbf" + body.format(n=1).encode())
    with gzip.open(tmp_path / "b.csv.gz", "wt") as f:
        f.write(body.format(n=2))
    with bz2.open(tmp_path / "c.csv.bz2", "wt") as f:
        f.write(body.format(n=3))
    spec = orders_spec(properties={}, traits={})
    assert counts(run(engine, tmp_path, spec)) == (3, 3, 0, 0)
    assert sorted(e["message_id"] for e in rows(engine, "events")) == [
        "orders:1",
        "orders:2",
        "orders:3",
    ]
