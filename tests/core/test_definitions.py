"""Definitions: the example project loads; every kind of mistake names its file, line and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from closedloop.core.definitions import load_project
from closedloop.core.errors import DefinitionError
from closedloop.demo.project import init_project
from closedloop.pipeline import check_project


@pytest.fixture
def project(tmp_path: Path) -> Path:
    init_project(tmp_path / "p", key_suffix="test1234")
    return tmp_path / "p"


def problems_of(root: Path) -> list[str]:
    with pytest.raises(DefinitionError) as e:
        load_project(root)
    return [str(p) for p in e.value.problems]


def test_example_project_is_valid(project: Path) -> None:
    p = load_project(project)
    assert p.config.source("pos").write_key == "wk_pos_test1234"
    assert set(p.segments) == {"lapsed_buyers", "champions", "tea_regulars"}
    assert p.campaigns["winback"].audience == "lapsed_buyers"
    assert check_project(p) == []
    assert p.engine_url == "duckdb:///" + str((project / "warehouse.duckdb").resolve()).lstrip("/")


def test_init_refuses_to_overwrite(project: Path) -> None:
    with pytest.raises(Exception, match="already holds"):
        init_project(project)


def test_wrong_operator_points_at_line_and_key(project: Path) -> None:
    (project / "segments" / "bad.yaml").write_text(
        "name: bad\nwhere:\n  all:\n    - {trait: orders, op: gte, value: 1}\n    - trait: city\n      op: bigger\n      value: x\n"
    )
    (found,) = problems_of(project)
    assert found.startswith("segments/bad.yaml:6 [where.all.1.op]")
    assert "'eq'" in found and "bigger" in found


def test_unknown_key_is_an_error(project: Path) -> None:
    text = (project / "campaigns" / "winback.yaml").read_text()
    (project / "campaigns" / "winback.yaml").write_text(text + "holdot: 0.1\n")
    (found,) = problems_of(project)
    assert "campaigns/winback.yaml" in found and "[holdot]" in found and "Extra inputs" in found


def test_every_problem_is_reported_at_once(project: Path) -> None:
    (project / "segments" / "champions.yaml").write_text(
        "name: champions\nwhere: {trait: x, op: in, value: 3}\n"
    )
    (project / "tags" / "value_band.yaml").write_text("name: Value Band\nrules: []\n")
    found = problems_of(project)
    assert len(found) == 3
    assert any("champions.yaml:2" in f and "non-empty list" in f for f in found)
    assert any("value_band.yaml:1 [name]" in f for f in found)
    assert any("value_band.yaml:2 [rules]" in f for f in found)


def test_yaml_syntax_error_has_a_line(project: Path) -> None:
    (project / "identity.yaml").write_text("types:\n  - name: phone\n    paths: [traits.phone\n")
    (found,) = problems_of(project)
    assert found.startswith("identity.yaml:4") or found.startswith("identity.yaml:3")
    assert "not valid YAML" in found


def test_campaign_needs_an_existing_segment(project: Path) -> None:
    text = (
        (project / "campaigns" / "winback.yaml")
        .read_text()
        .replace("audience: lapsed_buyers", "audience: nobody")
    )
    (project / "campaigns" / "winback.yaml").write_text(text)
    (found,) = problems_of(project)
    assert "audience 'nobody' is not a segment" in found


def test_identity_paths_and_regexes_are_checked(project: Path) -> None:
    text = (project / "identity.yaml").read_text()
    text = text.replace("paths: [traits.email]", "paths: [traits..email]").replace(
        '"^test@"', '"^(test@"'
    )
    (project / "identity.yaml").write_text(text)
    found = problems_of(project)
    assert any("traits..email" in f and "expected user_id" in f for f in found)
    assert any("not a valid regex" in f for f in found)


def test_duplicate_names_across_files(project: Path) -> None:
    (project / "segments" / "copy.yaml").write_text(
        (project / "segments" / "champions.yaml").read_text()
    )
    (found,) = problems_of(project)
    assert "segment 'champions' is also defined in segments/champions.yaml" in found


def test_cross_checks_find_unknown_fields_and_template_names(project: Path) -> None:
    seg = project / "segments" / "lapsed_buyers.yaml"
    seg.write_text(seg.read_text().replace("trait: orders,", "trait: ordres,"))
    camp = project / "campaigns" / "winback.yaml"
    camp.write_text(camp.read_text().replace("{{ name or 'there' }}", "{{ nickname }}"))
    problems = [str(p) for p in check_project(load_project(project))]
    assert any("unknown field 'ordres'" in p for p in problems)
    assert any("unknown field 'nickname' in template" in p for p in problems)


def test_not_a_project(tmp_path: Path) -> None:
    (found,) = problems_of(tmp_path)
    assert "no closedloop.yaml" in found


def test_accounts_yaml_is_part_of_the_project(project: Path) -> None:
    """build and refresh read B2B roles from the project: load_project carries accounts.yaml."""
    assert load_project(project).accounts.default_role == "user"  # no file: the defaults
    (project / "accounts.yaml").write_text(
        "role_rules:\n  - {role: finance, match: [founder]}\ndefault_role: it\n"
    )
    accounts = load_project(project).accounts
    assert accounts.default_role == "it"
    assert [(r.role, r.match) for r in accounts.role_rules] == [("finance", ["founder"])]
    (project / "accounts.yaml").write_text("role_rules:\n  - {role: chef, match: [cook]}\n")
    with pytest.raises(DefinitionError) as e:
        load_project(project)
    assert "accounts.yaml:2 [role_rules.0.role]" in str(e.value)
