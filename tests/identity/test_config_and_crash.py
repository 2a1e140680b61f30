"""A bad identity.yaml fails with a clear message; a crash half way loses nothing resolved."""

from __future__ import annotations

from pathlib import Path

import pytest

from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from closedloop.core.errors import DefinitionError
from closedloop.demo.project import init_project
from closedloop.identity.resolve import resolve
from tests.conftest import add_events
from tests.identity.test_resolve import CONFIG


def _problems(root: Path) -> list[str]:
    with pytest.raises(DefinitionError) as e:
        load_project(root)
    return [str(p) for p in e.value.problems]


def test_bad_rules_and_matching_name_file_line_and_what_is_wrong(tmp_path: Path) -> None:
    init_project(tmp_path / "p", key_suffix="test1234")
    path = tmp_path / "p" / "identity.yaml"
    text = path.read_text()
    text = text.replace("max_names: 1", "max_names: 0", 1)
    text = text.replace("threshold: 0.99", "threshold: 1.5")
    path.write_text(text)
    found = _problems(tmp_path / "p")
    assert any(f.startswith("identity.yaml:") and "max_names" in f for f in found), found
    assert any("threshold" in f and "less than 1" in f for f in found), found
    # Checks across fields run once each field is valid: fix those, the next problem shows.
    text = text.replace("max_names: 0", "max_names: 1").replace("threshold: 1.5", "threshold: 0.99")
    path.write_text(text.replace("[[birthday, city, gender]]", "[[birthday, shoe_size]]"))
    found = _problems(tmp_path / "p")
    assert any("shoe_size" in f and "not a configured matching field" in f for f in found), found
    path.write_text(text.replace("[[phone, advertising_id]]", "[[phone, idfa]]"))
    found = _problems(tmp_path / "p")
    assert any("never_link names unknown identifier type 'idfa'" in f for f in found), found


def test_a_crash_half_way_keeps_the_previous_resolution(engine: Engine) -> None:
    add_events(
        engine, [{"message_id": "a", "user_id": "M1"}, {"message_id": "b", "anonymous_id": "ck"}]
    )
    resolve(engine, CONFIG)
    before = engine.table("identity_map").to_pandas().sort_values("id_value")
    add_events(engine, [{"message_id": "c", "user_id": "M1", "anonymous_id": "ck"}])
    real, real_delete = engine.replace, engine.delete_keys

    def crash(name: str, data: object) -> None:  # a full run replaces the map...
        if name == "identity_map":
            raise RuntimeError("power cut")
        real(name, data)  # type: ignore[arg-type]

    def crash_after_delete(name: str, keys: object) -> None:  # ...an incremental one edits it
        real_delete(name, keys)  # type: ignore[arg-type]
        if name == "identity_map":
            raise RuntimeError("power cut")  # the region's old rows are gone, no new ones yet

    engine.replace = crash  # type: ignore[method-assign]
    engine.delete_keys = crash_after_delete  # type: ignore[method-assign]
    with pytest.raises(RuntimeError):
        resolve(engine, CONFIG)
    engine.replace, engine.delete_keys = real, real_delete  # type: ignore[method-assign]
    # The map is the previous, consistent one...
    after = engine.table("identity_map").to_pandas().sort_values("id_value")
    assert after["customer_id"].tolist() == before["customer_id"].tolist()
    # ...and a rerun gives exactly what an uninterrupted run gives.
    resolve(engine, CONFIG)
    clean = Engine("duckdb://")
    add_events(
        clean,
        [
            {"message_id": "a", "user_id": "M1"},
            {"message_id": "b", "anonymous_id": "ck"},
        ],
    )
    resolve(clean, CONFIG)
    add_events(clean, [{"message_id": "c", "user_id": "M1", "anonymous_id": "ck"}])
    resolve(clean, CONFIG)
    got = engine.table("identity_map").to_pandas().sort_values("id_value")
    want = clean.table("identity_map").to_pandas().sort_values("id_value")
    assert got["customer_id"].tolist() == want["customer_id"].tolist()
    assert len(engine.table("merge_ledger").to_pandas()) == len(
        clean.table("merge_ledger").to_pandas()
    )
    clean.close()
