"""Profile lookup by identifier: the serving store, its fallback, and that it never goes stale.

A real generated brand is built once into a DuckDB file (through ``pipeline.build``, which
writes the serving store); each test works on its own copy of that project.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest

from closedloop.core.clock import Clock
from closedloop.core.definitions import Project, load_project
from closedloop.core.engine import Engine
from closedloop.core.errors import InputError
from closedloop.demo.generator import generate
from closedloop.demo.project import init_project, relative_data_dir
from closedloop.identity.explain import split
from closedloop.pipeline import build
from closedloop.portrait.lookup import ProfileLookup, materialise, serving_path

AS_OF = Clock(datetime.fromisoformat("2026-11-20T00:00:00+00:00"))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("lookup")
    generate(root / "brand", 150, seed=11)
    p = root / "p"
    init_project(p, data_dir=relative_data_dir(p, root / "brand" / "data"))
    project = load_project(p)
    with Engine(project.engine_url) as engine:
        build(engine, project, clock=AS_OF)
    return p


@pytest.fixture
def project(built: Path, tmp_path: Path) -> Project:
    shutil.copytree(built.parent, tmp_path / "copy")  # data dir is relative: copy both
    return load_project(tmp_path / "copy" / "p")


@pytest.fixture
def engine(project: Project) -> Iterator[Engine]:
    with Engine(project.engine_url) as e:
        yield e


def person_with(engine: Engine, *types: str) -> dict[str, Any]:
    """A customer having every one of ``types``, with one value of each."""
    m = engine.table("identity_map")
    rows = m.filter(~m.quarantined).to_pyarrow().to_pylist()
    by: dict[str, dict[str, str]] = {}
    for r in sorted(rows, key=lambda r: (r["customer_id"], r["id_type"], r["id_value"])):
        by.setdefault(r["customer_id"], {}).setdefault(r["id_type"], r["id_value"])
    cid, ids = next((c, i) for c, i in sorted(by.items()) if all(t in i for t in types))
    return {"customer_id": cid, **ids}


def test_build_writes_a_store_that_answers_like_the_warehouse(
    project: Project, engine: Engine, tmp_path: Path
) -> None:
    path = serving_path(engine)
    assert path is not None and path.is_file()
    who = person_with(engine, "email", "phone")
    with ProfileLookup.open(engine, project.identity) as served:
        assert served.source == "serving"
        # written the way people type it: case, spaces, a national phone number
        email = "  " + who["email"].upper() + " "
        m = served.find(email, "email")
        assert m is not None and m.customer_id == who["customer_id"]
        assert m.matched == ("email", who["email"]) and m.source == "serving"
        national = who["phone"].removeprefix("+86")
        assert served.find(national, "phone") == m.__class__(
            who["customer_id"], ("phone", who["phone"]), m.profile, "serving"
        )
        assert served.find(who["email"]) is not None  # no type: every type is tried
        assert served.find(who["customer_id"], "customer_id") is not None
    warehouse = ProfileLookup.open(engine, project.identity, path=tmp_path / "none.sqlite")
    assert warehouse.source == "warehouse"
    w = warehouse.find(email, "email")
    assert w is not None and w.source == "warehouse"
    assert w.profile == m.profile  # same types and values either way
    assert m.profile is not None and m.profile["customer_id"] == who["customer_id"]
    assert isinstance(m.profile["computed_at"], datetime)


def test_every_profile_is_served_identically(project: Project, engine: Engine) -> None:
    served = ProfileLookup.open(engine, project.identity)
    assert served.source == "serving"
    rows = engine.table("profiles").to_pyarrow().to_pylist()
    assert rows
    for row in rows:
        assert served._profile(row["customer_id"]) == row


def test_bad_input_says_what(project: Project, engine: Engine) -> None:
    lookup = ProfileLookup.open(engine, project.identity)
    with pytest.raises(InputError, match="unknown identifier type 'shoe_size'"):
        lookup.find("42", "shoe_size")
    with pytest.raises(InputError, match="not a valid email"):
        lookup.find("not-an-address", "email")
    assert lookup.find("nobody@example.org", "email") is None
    assert lookup.find("nobody@example.org") is None


def test_a_changed_warehouse_is_never_served_stale(project: Project, engine: Engine) -> None:
    who = person_with(engine, "email")
    lookup = ProfileLookup.open(engine, project.identity)
    assert lookup.source == "serving"
    engine.con.con.execute(
        "UPDATE profiles SET points = 987654 WHERE customer_id = ?", [who["customer_id"]]
    )
    stale = ProfileLookup.open(engine, project.identity)
    assert stale.source == "warehouse"  # the fingerprint no longer matches
    p = stale.profile(who["email"], "email")
    assert p is not None and p["points"] == 987654
    materialise(engine)  # a build ends with this: the open lookup sees the new file
    p = lookup.profile(who["email"], "email")
    assert lookup.source == "serving" and p is not None and p["points"] == 987654


def test_aliases_are_followed(project: Project, engine: Engine) -> None:
    who = person_with(engine, "email")
    retired = {"alias_id": ["c_retired"], "customer_id": [who["customer_id"]]}
    merged_at = pa.array([AS_OF.now()], pa.timestamp("us", tz="UTC"))
    engine.append("customer_aliases", pa.table(retired).append_column("merged_at", merged_at))
    materialise(engine)
    lookup = ProfileLookup.open(engine, project.identity)
    assert lookup.source == "serving"
    m = lookup.find("c_retired")
    assert m is not None and m.customer_id == who["customer_id"]
    assert m.matched == ("customer_id", "c_retired") and m.profile is not None


def test_refresh_and_split_keep_the_lookup_current(project: Project, engine: Engine) -> None:
    who = person_with(engine, "email", "phone")
    lookup = ProfileLookup.open(engine, project.identity)
    before = lookup.find(who["email"], "email")
    assert before is not None and before.profile is not None
    later = Clock(datetime.fromisoformat("2026-12-20T00:00:00+00:00"))
    build(engine, project, clock=later, load=False, incremental=True)
    after = lookup.find(who["email"], "email")
    assert after is not None and after.source == "serving" and after.profile is not None
    assert after.profile["computed_at"] == later.now()
    # take the e-mail away from its customer: it is now someone else's
    split(engine, project.identity, identifier=f"email:{who['email']}", clock=later)
    build(engine, project, clock=later, load=False, identity=False)
    moved = lookup.find(who["email"], "email")
    kept = lookup.find(who["phone"], "phone")
    assert moved is not None and kept is not None and lookup.source == "serving"
    assert kept.customer_id == who["customer_id"]
    assert moved.customer_id != who["customer_id"]
    assert moved.profile is not None and moved.profile["customer_id"] == moved.customer_id


def test_a_failed_write_leaves_the_old_store_and_no_debris(
    project: Project, engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = serving_path(engine)
    assert path is not None
    before = (path.stat().st_ino, path.read_bytes())

    def crash(_: Engine) -> str:
        raise RuntimeError("disk gone")  # fails after every row was copied, before the rename

    monkeypatch.setattr("closedloop.portrait.lookup.fingerprint", crash)
    with pytest.raises(RuntimeError, match="disk gone"):
        materialise(engine)
    assert (path.stat().st_ino, path.read_bytes()) == before
    assert sorted(p.name for p in path.parent.iterdir() if p.name.endswith(".tmp")) == []
    monkeypatch.undo()
    assert ProfileLookup.open(engine, project.identity).source == "serving"
