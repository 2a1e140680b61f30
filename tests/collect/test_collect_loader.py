"""load_jsonl on a real DuckDB engine: good, bad and duplicate lines; re-runs add nothing."""

from __future__ import annotations

import gzip
import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from closedloop.collect import loader
from closedloop.collect.loader import LoadResult, list_failed, load_jsonl
from closedloop.collect.messages import MAX_MESSAGE_BYTES, MAX_PAYLOAD_BYTES, Reason
from closedloop.core.clock import Clock
from closedloop.core.definitions import Source
from closedloop.core.engine import Engine
from closedloop.core.errors import InputError

from .conftest import NOW, rows, track, write_jsonl


def load(engine: Engine, paths: list[Path], source: Source, **kw: Any) -> LoadResult:
    kw.setdefault("clock", Clock(NOW))
    return load_jsonl(engine, paths, source, import_name="test", **kw)


def counts(r: LoadResult) -> tuple[int, int, int, int]:
    return (r.received, r.accepted, r.failed, r.duplicate)


@pytest.fixture
def mixed(tmp_path: Path) -> Path:
    """A file with every kind of line, at known line numbers."""
    return write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            track(1),  # 1 good
            track(2, context={"externalIds": [{"id": "o_2", "type": "wechat_openid"}]}),  # 2
            "",  # 3 blank: skipped, not counted
            "{not json",  # 4 malformed
            [1, 2],  # 5 valid JSON, not an object
            track(3, event=None),  # 6 track without event
            track(1, event="Again"),  # 7 duplicate of line 1 in the same file
            {"type": "identify", "anonymousId": "a9", "traits": {"x": 1}},  # 8 good, no messageId
            track(4, userId=None),  # 9 no identity
        ],
    )


def test_good_bad_and_duplicate_lines(engine: Engine, source: Source, mixed: Path) -> None:
    r = load(engine, [mixed], source)
    assert counts(r) == (8, 3, 4, 1)
    events = {e["message_id"]: e for e in rows(engine, "events")}
    assert len(events) == 3
    assert {"m1", "m2"} <= set(events)
    assert events["m1"]["event"] == "Product Viewed"  # the first copy wins
    assert all(e["load_id"] == r.load_id for e in events.values())
    failed = {f["location"]: f for f in rows(engine, "failed_events")}
    assert {loc: f["reason_code"] for loc, f in failed.items()} == {
        f"{mixed}:4": "malformed",
        f"{mixed}:5": "malformed",
        f"{mixed}:6": "missing_field",
        f"{mixed}:9": "missing_identity",
    }
    assert failed[f"{mixed}:4"]["payload"] == "{not json"
    assert failed[f"{mixed}:6"]["message_id"] == "m3"
    assert failed[f"{mixed}:6"]["reason"] == "track message needs `event`"
    assert all(f["source"] == "web" and f["load_id"] == r.load_id for f in failed.values())
    assert rows(engine, "event_external_ids") == [
        {"message_id": "m2", "type": "wechat_openid", "id": "o_2", "collection": None}
    ]


def test_the_load_is_recorded_with_counts_that_add_up(
    engine: Engine, source: Source, mixed: Path
) -> None:
    r = load(engine, [mixed], source)
    (row,) = rows(engine, "loads")
    assert row["load_id"] == r.load_id
    assert (row["import_name"], row["source"], row["location"]) == ("test", "web", str(mixed))
    assert (row["received"], row["accepted"], row["failed"], row["duplicate"]) == counts(r)
    assert row["received"] == row["accepted"] + row["failed"] + row["duplicate"]
    assert row["started_at"] == row["finished_at"] == NOW


def test_rerunning_a_load_adds_nothing(engine: Engine, source: Source, mixed: Path) -> None:
    first = load(engine, [mixed], source)
    before = {t: rows(engine, t) for t in ("events", "event_external_ids", "failed_events")}
    again = load(engine, [mixed], source)
    assert counts(again) == (8, 0, 4, 4)
    assert again.load_id != first.load_id
    for table, old in before.items():
        assert rows(engine, table) == old, table
    assert len(rows(engine, "loads")) == 2


def test_messages_without_message_id_dedup_on_reload(
    engine: Engine, source: Source, tmp_path: Path
) -> None:
    line = {"type": "track", "event": "E", "anonymousId": "a1", "timestamp": "2024-01-01T00:00:00Z"}
    path = write_jsonl(tmp_path / "a.jsonl", [line, dict(line, event="F")])
    assert counts(load(engine, [path], source)) == (2, 2, 0, 0)
    copy = write_jsonl(tmp_path / "copy.jsonl", [dict(reversed(list(line.items())))])
    assert counts(load(engine, [copy], source)) == (1, 0, 0, 1)


def test_dedup_against_the_warehouse_across_chunks(
    engine: Engine, source: Source, tmp_path: Path
) -> None:
    ids = [1, 2, 3, 1, 4, 2, 2, 5, 3]
    path = write_jsonl(tmp_path / "d.jsonl", [track(i) for i in ids])
    progress: list[int] = []
    r = load(engine, [path], source, chunk_rows=2, progress=progress.append)
    assert counts(r) == (9, 5, 0, 4)
    assert sorted(e["message_id"] for e in rows(engine, "events")) == [f"m{i}" for i in range(1, 6)]
    assert progress == [2, 2, 2, 2, 1]


def test_external_ids_of_duplicates_are_not_written(
    engine: Engine, source: Source, tmp_path: Path
) -> None:
    ext = {"externalIds": [{"id": "o1", "type": "wechat_openid", "collection": "users"}]}
    first = write_jsonl(tmp_path / "1.jsonl", [track(1, context=ext)])
    load(engine, [first], source)
    other_ext = {"externalIds": [{"id": "o2", "type": "wechat_openid"}]}
    second = write_jsonl(tmp_path / "2.jsonl", [track(1, context=other_ext), track(2, context=ext)])
    assert counts(load(engine, [second], source)) == (2, 1, 0, 1)
    assert sorted((x["message_id"], x["id"]) for x in rows(engine, "event_external_ids")) == [
        ("m1", "o1"),
        ("m2", "o1"),
    ]


def test_a_crash_between_writes_is_repaired_by_rerunning(
    engine: Engine, source: Source, tmp_path: Path
) -> None:
    # External ids are written before events: a crash between the two leaves external ids
    # whose events are missing. Re-running writes the events and no second external id.
    ext = {"externalIds": [{"id": "o1", "type": "wechat_openid"}]}
    path = write_jsonl(tmp_path / "c.jsonl", [track(1, context=ext)])
    engine.append(
        "event_external_ids",
        pa.table(
            {
                "message_id": ["m1"],
                "type": ["wechat_openid"],
                "id": ["o1"],
                "collection": pa.array([None], pa.string()),
            }
        ),
    )
    assert counts(load(engine, [path], source)) == (1, 1, 0, 0)
    assert len(rows(engine, "event_external_ids")) == 1
    assert len(rows(engine, "events")) == 1


def test_lines_too_long_and_payloads_truncated(
    engine: Engine, source: Source, tmp_path: Path
) -> None:
    big_message = track(1, properties={"blob": "x" * MAX_MESSAGE_BYTES})
    not_json = "y" * (MAX_PAYLOAD_BYTES + 100)
    path = write_jsonl(tmp_path / "big.jsonl", [big_message, not_json, track(2)])
    assert counts(load(engine, [path], source)) == (3, 1, 2, 0)
    failed = {f["location"]: f for f in rows(engine, "failed_events")}
    assert failed[f"{path}:1"]["reason_code"] == "too_large"
    assert failed[f"{path}:1"]["message_id"] == "m1"
    assert failed[f"{path}:2"]["reason_code"] == "malformed"
    assert len(failed[f"{path}:2"]["payload"]) == MAX_PAYLOAD_BYTES


def test_encodings_bom_gzip_and_folders(engine: Engine, source: Source, tmp_path: Path) -> None:
    folder = tmp_path / "drop"
    folder.mkdir()
    (folder / "a.jsonl").write_bytes(
        b"\xef\xbb\xbf" + json.dumps(track(1)).encode() + b"\r\n" + b"\xff\xfe bad\n"
    )
    with gzip.open(folder / "b.jsonl.gz", "wt") as f:
        f.write(json.dumps(track(2)) + "\n")
    (folder / "notes.txt").write_text("not loaded")
    r = load(engine, [folder], source)
    assert counts(r) == (3, 2, 1, 0)
    (bad,) = rows(engine, "failed_events")
    assert bad["location"] == f"{folder / 'a.jsonl'}:2"
    assert bad["reason"] == "line is not UTF-8 text"
    assert "\ufffd" in bad["payload"]


def test_unicode_text_survives(engine: Engine, source: Source, tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "zh.jsonl", [track(1, event="下单", properties={"门店": "上海"})])
    load(engine, [path], source)
    (e,) = rows(engine, "events")
    assert e["event"] == "下单"
    assert json.loads(e["properties"]) == {"门店": "上海"}


def test_missing_paths_fail_before_anything_is_written(
    engine: Engine, source: Source, tmp_path: Path
) -> None:
    good = write_jsonl(tmp_path / "good.jsonl", [track(1)])
    with pytest.raises(InputError, match=r"nope\.jsonl: no such file"):
        load(engine, [good, tmp_path / "nope.jsonl"], source)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="folder holds no"):
        load(engine, [empty], source)
    assert engine.count("events") == 0
    assert engine.count("loads") == 0


def test_list_failed_filters_by_source_and_reason(
    engine: Engine, source: Source, mixed: Path
) -> None:
    load(engine, [mixed], source)
    pos = Source(name="pos", channel="pos", write_key="wk_pos_00000001")
    other = write_jsonl(mixed.parent / "pos.jsonl", ["nope"])
    load(engine, [other], pos)
    assert len(list_failed(engine)) == 5
    assert len(list_failed(engine, limit=2)) == 2
    assert {f["location"] for f in list_failed(engine, source="pos")} == {f"{other}:1"}
    malformed = list_failed(engine, source="web", reason=Reason.MALFORMED)
    assert sorted(f["location"] for f in malformed) == [f"{mixed}:4", f"{mixed}:5"]
    assert list_failed(engine, reason="missing_identity")[0]["location"] == f"{mixed}:9"
    assert list_failed(engine, source="nobody") == []


def test_received_at_is_the_load_start(engine: Engine, source: Source, tmp_path: Path) -> None:
    stamped = datetime(2024, 5, 5, 5, tzinfo=UTC)
    path = write_jsonl(tmp_path / "t.jsonl", [track(1, timestamp=None)])
    load(engine, [path], source, clock=Clock(stamped))
    (e,) = rows(engine, "events")
    assert e["received_at"] == e["timestamp"] == stamped


# ---- the accounting invariant, on arbitrary files ------------------------------------------
line_kinds = st.one_of(
    st.integers(0, 6).map(lambda i: json.dumps(track(i))),  # valid, often repeated
    st.integers(0, 6).map(lambda i: json.dumps(track(i, event=None))),  # invalid message
    st.integers(0, 6).map(lambda i: json.dumps({"type": "page", "anonymousId": f"a{i}"})),
    st.text(st.characters(exclude_characters="\ufeff"), max_size=30),  # mostly not JSON
    st.just(""),
)


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(lines=st.lists(line_kinds, max_size=25), chunk_rows=st.integers(1, 8))
def test_counts_always_add_up_and_reruns_add_nothing(
    source: Source, lines: list[str], chunk_rows: int
) -> None:
    lines = [line.replace("\n", " ").replace("\r", " ") for line in lines]
    with tempfile.TemporaryDirectory() as tmp, Engine("duckdb://") as engine:
        path = Path(tmp) / "h.jsonl"
        path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
        first = load(engine, [path], source, chunk_rows=chunk_rows)
        nonblank = sum(1 for line in lines if line.strip(" \t\x0b\x0c"))
        assert first.received == nonblank
        assert first.received == first.accepted + first.failed + first.duplicate
        assert engine.count("events") == first.accepted
        assert engine.count("failed_events") == first.failed
        again = load(engine, [path], source, chunk_rows=chunk_rows)
        assert (again.accepted, again.failed) == (0, first.failed)
        assert again.duplicate == first.accepted + first.duplicate
        assert engine.count("events") == first.accepted
        assert engine.count("failed_events") == first.failed


def test_results_of_several_loads_add_up(engine: Engine, source: Source, tmp_path: Path) -> None:
    a = load(engine, [write_jsonl(tmp_path / "a.jsonl", [track(1), "x"])], source)
    b = load(engine, [write_jsonl(tmp_path / "b.jsonl", [track(1), track(2)])], source)
    total = a + b
    assert counts(total) == (4, 2, 1, 1)
    assert total.load_id == f"{a.load_id},{b.load_id}"


def test_line_numbers_stay_exact_across_blocks(
    engine: Engine, source: Source, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader, "BLOCK_BYTES", 256)  # many blocks, lines cut at their ends
    bad = {3, 10, 11, 27, 40}
    lines: list[Any] = [("nope" if i in bad else track(i)) for i in range(1, 41)]
    lines[19] = ""  # a blank line 20
    path = write_jsonl(tmp_path / "blocks.jsonl", lines)
    assert counts(load(engine, [path], source)) == (39, 34, 5, 0)
    assert {f["location"] for f in rows(engine, "failed_events")} == {f"{path}:{i}" for i in bad}


def test_an_over_long_line_is_refused_without_holding_it_in_memory(
    engine: Engine, source: Source, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(loader, "BLOCK_BYTES", 256)
    monkeypatch.setattr(loader, "MAX_PAYLOAD_BYTES", 100)
    huge = json.dumps(track(99, properties={"blob": "z" * 5000}))
    path = write_jsonl(tmp_path / "long.jsonl", [track(1), huge, track(2), "bad", track(3)])
    assert counts(load(engine, [path], source)) == (5, 3, 2, 0)
    failed = {f["location"]: f for f in rows(engine, "failed_events")}
    assert set(failed) == {f"{path}:2", f"{path}:4"}
    assert failed[f"{path}:2"]["reason_code"] == "too_large"
    assert "longer than 256 bytes" in failed[f"{path}:2"]["reason"]
    assert failed[f"{path}:2"]["payload"] == huge[:104]


def test_a_single_path_is_not_read_as_a_sequence_of_letters(
    engine: Engine, source: Source, tmp_path: Path
) -> None:
    path = write_jsonl(tmp_path / "one.jsonl", [track(1)])
    assert counts(load_jsonl(engine, path, source, import_name="x")) == (1, 1, 0, 0)  # type: ignore[arg-type]
    again = load_jsonl(engine, str(path), source, import_name="x")  # type: ignore[arg-type]
    assert counts(again) == (1, 0, 0, 1)


def test_no_scratch_tables_are_left_behind(engine: Engine, source: Source, mixed: Path) -> None:
    # Ibis keeps memtables registered (with their data) until the process exits unless they
    # are dropped; a long load must not accumulate one per chunk.
    load(engine, [mixed], source, chunk_rows=2)
    assert engine.count("events") == 3
    assert [t for t in engine.con.list_tables() if "memtable" in t] == []
