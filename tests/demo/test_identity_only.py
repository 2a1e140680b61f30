"""``generate(..., identity_only=True)``: the same world for identity at a quarter of the messages.

The accuracy run at 1,000,000 persons generates only the messages that show identity
evidence not shown before. That is only sound if identity resolution cannot tell the
difference: these tests load both brands of one seed through ``collect`` and resolve them,
and require the same customers (same ids, same identifiers, same quarantine verdicts, same
first sightings) and the same accuracy against the truth.
"""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from closedloop.core.clock import Clock
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from closedloop.demo.accuracy import identity_accuracy
from closedloop.demo.generator import REFERENCE_TIME, generate
from closedloop.demo.project import init_project, relative_data_dir
from closedloop.identity.resolve import resolve
from closedloop.pipeline import load_imports

PERSONS = 1_500


def _resolved(root: Path, identity_only: bool) -> tuple[pa.Table, float, float, int]:
    summary = generate(root / "brand", PERSONS, identity_only=identity_only)
    init_project(root / "p", data_dir=relative_data_dir(root / "p", root / "brand" / "data"))
    project = load_project(root / "p")
    with Engine(project.engine_url) as engine:
        load_imports(engine, project)
        resolve(engine, project.identity, Clock(REFERENCE_TIME))
        imap = engine.table("identity_map")
        rows = imap.select("id_type", "id_value", "customer_id", "quarantined", "first_seen")
        table = rows.order_by(["id_type", "id_value"]).to_pyarrow()
        acc = identity_accuracy(engine, root / "brand" / "truth")
    return table, acc.precision, acc.recall, summary.messages


def test_identity_only_resolves_to_the_same_customers(tmp_path: Path) -> None:
    full, p_full, r_full, n_full = _resolved(tmp_path / "full", False)
    thin, p_thin, r_thin, n_thin = _resolved(tmp_path / "thin", True)
    assert n_thin < 0.4 * n_full  # the point: far fewer messages
    assert full.num_rows > 5 * PERSONS
    assert thin.equals(full)
    assert (p_thin, r_thin) == (p_full, r_full)
    # The truth is the world's, not the messages': identical files.
    for name in ("identifiers", "persons"):
        a = pq.read_table(tmp_path / "full" / "brand" / "truth" / f"{name}.parquet")
        b = pq.read_table(tmp_path / "thin" / "brand" / "truth" / f"{name}.parquet")
        assert a.equals(b)


def test_identity_only_keeps_every_identify_and_each_new_combination(tmp_path: Path) -> None:
    from closedloop.demo import generator as g

    full = g.make_block(7, 0, 200)
    thin = g.make_block(7, 0, 200, identity_only=True)
    kept = set(thin.messages.column("message_id").to_pylist())
    assert kept < set(full.messages.column("message_id").to_pylist())
    lines = [ln for part in thin.lines for ln in part.to_pylist()]
    assert len(lines) == len(kept)
    assert sum('"type":"identify"' in ln for ln in lines) == sum(
        '"type":"identify"' in ln for part in full.lines for ln in part.to_pylist()
    )
