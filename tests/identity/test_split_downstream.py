"""`closedloop identity split` rebuilds what depended on the old partition.

A built project; one customer whose member id is linked to other identifiers (cookies,
phones). Splitting the member id off must change that customer's profile — the member id
and the events it carried leave it — and give the member id a profile of its own, without
another `closedloop build`.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from typer.testing import CliRunner

from closedloop.cli.main import app
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from closedloop.demo.generator import generate
from closedloop.demo.project import init_project, relative_data_dir

runner = CliRunner()


def _tables(project: Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    with Engine(load_project(project).engine_url) as engine:
        imap = engine.table("identity_map").to_pandas()
        profiles = engine.table("profiles").to_pandas()
        members = engine.table("segment_membership").to_pandas()
    return imap, profiles, members


@pytest.mark.slow
def test_split_recomputes_profiles_of_the_affected_customers(tmp_path: Path) -> None:
    generate(tmp_path / "brand", 120, seed=3)
    p = tmp_path / "p"
    init_project(p, data_dir=relative_data_dir(p, tmp_path / "brand" / "data"))
    r = runner.invoke(app, ["build", "-p", str(p)])
    assert r.exit_code == 0, r.output
    imap, before, _ = _tables(p)

    # A customer with a member id, other identifiers and events beyond the member's own.
    live = imap[~imap["quarantined"]]
    sizes = live.groupby("customer_id").size()
    members = live[(live["id_type"] == "member_id") & live["customer_id"].map(sizes).gt(2)]
    prof = before.set_index("customer_id")
    members = members[members["customer_id"].map(prof["events"]).gt(1)]
    assert len(members), "the sample needs a linked member"
    row = members.sort_values("id_value").iloc[0]
    cid, member = str(row["customer_id"]), str(row["id_value"])
    assert prof.loc[cid, "member_id"] == member

    r = runner.invoke(
        app, ["identity", "split", "-p", str(p), "--identifier", f"member_id:{member}", "--block"]
    )
    assert r.exit_code == 0, r.output
    assert "downstream rebuilt" in r.output
    imap2, after, _ = _tables(p)
    owner = dict(zip(imap2["id_type"] + ":" + imap2["id_value"], imap2["customer_id"], strict=True))
    new = owner[f"member_id:{member}"]
    after_p = after.set_index("customer_id")
    # The member id now has a profile of its own, showing it ...
    assert after_p.loc[new, "member_id"] == member
    # ... and the customer it was split from (under whatever id it now has) no longer does.
    others = live[(live["customer_id"] == cid) & (live["id_type"] != "member_id")]
    rest = {owner[f"{t}:{v}"] for t, v in zip(others["id_type"], others["id_value"], strict=True)}
    assert new not in rest
    for c in rest:
        if c in after_p.index:
            assert after_p.loc[c, "member_id"] != member
    # Profiles equal what a fresh full build of the same state gives (nothing stale).
    r = runner.invoke(app, ["build", "-p", str(p)])
    assert r.exit_code == 0, r.output
    _, rebuilt, _ = _tables(p)
    cols = ["customer_id", "member_id", "phone", "email", "events"]
    pd.testing.assert_frame_equal(
        after[cols].sort_values("customer_id").reset_index(drop=True),
        rebuilt[cols].sort_values("customer_id").reset_index(drop=True),
    )


def test_split_without_downstream_says_so(tmp_path: Path) -> None:
    generate(tmp_path / "brand", 40, seed=3)
    p = tmp_path / "p"
    init_project(p, data_dir=relative_data_dir(p, tmp_path / "brand" / "data"))
    assert runner.invoke(app, ["build", "-p", str(p)]).exit_code == 0
    imap, _, _ = _tables(p)
    member = imap[imap["id_type"] == "member_id"]["id_value"].min()
    r = runner.invoke(
        app,
        [
            "identity",
            "split",
            "-p",
            str(p),
            "--identifier",
            f"member_id:{member}",
            "--no-downstream",
        ],
    )
    assert r.exit_code == 0, r.output
    assert "run `closedloop build`" in r.output
