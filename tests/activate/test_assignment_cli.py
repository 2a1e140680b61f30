"""`closedloop campaign dry-run` shows each person's variant; `reshuffle`; bad variants fail."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from closedloop.activate.assignment import (
    campaign_salt,
    global_control_salt,
    pick_variants,
    salt_history,
)
from closedloop.cli.main import app
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from closedloop.demo.generator import generate
from closedloop.demo.project import init_project, relative_data_dir

pytestmark = pytest.mark.slow  # generates a brand and builds it (~20 s)
runner = CliRunner()
AS_OF = "2026-11-20T10:00:00+00:00"
VARIANTS = """variants:
  - name: warm
    weight: 60
    subject: "{{ name or 'Hello' }}, we saved you a treat"
    template: "Hi {{ name or 'there' }}: {{ offer.code }} ({{ offer.conditions }})"
  - name: plain
    weight: 40
    subject: "Your code {{ offer.code }}"
    template: "{{ offer.description }} — {{ offer.conditions }}"
"""


def _with_variants(project: Path, variants: str = VARIANTS) -> None:
    f = project / "campaigns" / "winback.yaml"
    text = f.read_text()
    text = re.sub(r"^subject: .*\n", "", text, flags=re.M)
    text = re.sub(r"^template: \|\n(  .*\n)+", variants, text, flags=re.M)
    f.write_text(text)
    cfg = project / "closedloop.yaml"
    cfg.write_text(cfg.read_text() + "\nglobal_control: {share: 0.05}\n")


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("cli")
    generate(tmp / "brand", 400, seed=5)
    init_project(tmp / "p", data_dir=relative_data_dir(tmp / "p", tmp / "brand" / "data"))
    _with_variants(tmp / "p")
    r = runner.invoke(app, ["build", "-p", str(tmp / "p")])
    assert r.exit_code == 0, r.output
    return tmp / "p"


def test_dry_run_lists_variant_per_person_and_reshuffle_keeps_history(built: Path) -> None:
    args = ["winback", "-p", str(built), "--as-of", AS_OF, "--occasion", "o1", "--show", "400"]
    r = runner.invoke(app, ["campaign", "dry-run", *args], terminal_width=200)
    assert r.exit_code == 0, r.output
    assert "warm" in r.output and "plain" in r.output
    people = [ln for ln in r.output.splitlines() if re.search(r"\bc_[0-9a-f]{16}\b", ln)]
    assert len(people) == 69
    variants = load_project(built).campaigns["winback"].variants
    seen = set()
    for ln in people:
        cid, group, variant = ln.split()[:3]
        seen.add(group)
        if group == "treatment":
            assert [variant] == pick_variants([cid], "winback", variants)
        else:
            assert variant == "—"
    assert {"treatment", "holdout", "global_control"} <= seen
    r = runner.invoke(app, ["campaign", "reshuffle", "winback", "-p", str(built), "--reason", "t"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["campaign", "reshuffle", "-p", str(built), "--global-control"])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["campaign", "reshuffle", "-p", str(built)])
    assert r.exit_code != 0 and "--global-control" in r.output
    with Engine(load_project(built).engine_url) as e:
        assert campaign_salt(e, "winback") == "winback#1"
        assert global_control_salt(e) == "global#1"
        assert salt_history(e, "campaign:winback")[0]["reason"] == "t"


def test_bad_variants_fail_with_file_line_and_key(built: Path, tmp_path: Path) -> None:
    import shutil

    p = tmp_path / "p"
    shutil.copytree(built, p, ignore=shutil.ignore_patterns("*.duckdb*", "outbox"))
    f = p / "campaigns" / "winback.yaml"
    f.write_text(f.read_text().replace("weight: 40", "weight: 30"))
    r = runner.invoke(app, ["campaign", "dry-run", "winback", "-p", str(p)], terminal_width=200)
    assert r.exit_code != 0
    assert "campaigns/winback.yaml" in r.output and "must sum to 1" in r.output
    f.write_text(f.read_text().replace("weight: 30", "weight: 40").replace("{{ name }}", "x"))
    f.write_text(f.read_text().replace("Your code {{ offer.code }}", "Hi {{ nickname }}"))
    r = runner.invoke(app, ["campaign", "dry-run", "winback", "-p", str(p)], terminal_width=200)
    assert r.exit_code != 0
    assert "[variants.1.subject]" in r.output and "'nickname'" in r.output
