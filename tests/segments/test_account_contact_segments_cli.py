"""`closedloop segment size` on accounts selected by their contacts' customer segment."""

from __future__ import annotations

from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from closedloop.cli import segment_cmds
from closedloop.core.clock import Clock
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from closedloop.demo.generator import REFERENCE_TIME, generate
from closedloop.demo.project import init_project, relative_data_dir
from closedloop.pipeline import build

pytestmark = pytest.mark.slow  # a whole build of a generated brand (~20 s here)
runner = CliRunner()
AS_OF = "2026-11-20T00:00:00+00:00"
# Named to sort before lapsed_buyers: the build must still evaluate that one first.
SEGMENT = """\
name: accounts_with_lapsed
of: accounts
where:
  contacts: {in_segment: lapsed_buyers}
  count: {op: gte, value: 1}
"""


def test_segment_size_counts_accounts_by_their_contacts_segment(tmp_path: Path) -> None:
    generate(tmp_path / "brand", 400, seed=5, accounts=12)
    p = tmp_path / "p"
    init_project(p, data_dir=relative_data_dir(p, tmp_path / "brand" / "data"))
    (p / "segments" / "accounts_with_lapsed.yaml").write_text(SEGMENT)
    project = load_project(p)
    with Engine(project.engine_url) as engine:
        report = build(engine, project, clock=Clock(REFERENCE_TIME))
        m = engine.table("segment_membership")
        lapsed = set(
            m.filter((m.segment == "lapsed_buyers") & m.exited_at.isnull())
            .customer_id.to_pyarrow()
            .to_pylist()
        )
        contacts = engine.table("account_contacts").to_pyarrow().to_pylist()
        built = set(engine.table("account_membership").account_id.to_pyarrow().to_pylist())
    want = {c["account_id"] for c in contacts if c["customer_id"] in lapsed}
    assert lapsed and want  # else the comparisons below prove nothing
    assert report.segments["accounts_with_lapsed"].size == len(want)
    assert built == want  # in the build: evaluated after the customers' segment

    app = typer.Typer()
    app.command("noop")(lambda: None)  # a group, so `segment` stays a sub-command
    segment_cmds.register(app)
    r = runner.invoke(
        app, ["segment", "size", "accounts_with_lapsed", "-p", str(p), "--as-of", AS_OF]
    )
    assert r.exit_code == 0, r.output
    assert int(r.output.split(":")[1].split()[0]) == len(want), r.output
    assert " accounts" in r.output
    r = runner.invoke(
        app,
        ["segment", "preview", "accounts_with_lapsed", "-p", str(p), "--as-of", AS_OF],
        env={"COLUMNS": "300"},
    )
    assert r.exit_code == 0 and "contacts in lapsed_buyers" in r.output, r.output
