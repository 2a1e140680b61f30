"""The governed catalogue: tree, coverage, freshness, references, recorded uses, flags."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest

from closedloop.core.clock import Clock
from closedloop.core.definitions import Project, load_project
from closedloop.core.engine import Engine
from closedloop.demo.project import init_project
from closedloop.tags.build import build_tags
from closedloop.tags.catalogue import catalogue, record_tag_uses, tag_references
from closedloop.tags.coverage import tag_coverage
from tests.conftest import add_events
from tests.tags.helpers import NOW, set_profiles


@pytest.fixture
def project(tmp_path: Path) -> Project:
    root = tmp_path / "p"
    init_project(root)
    (root / "segments" / "vips.yaml").write_text(
        "name: vips\nwhere: {trait: vip_flag, op: eq, value: vip}\n", encoding="utf-8"
    )
    (root / "segments" / "lapsed_vips.yaml").write_text(
        "name: lapsed_vips\nwhere:\n  all:\n    - {in_segment: vips}\n"
        "    - {trait: aov_quartile, op: eq, value: q4_top}\n",
        encoding="utf-8",
    )
    winback = root / "campaigns" / "winback.yaml"
    winback.write_text(
        winback.read_text(encoding="utf-8").replace(
            "audience: lapsed_buyers", "audience: lapsed_vips"
        ),
        encoding="utf-8",
    )
    return load_project(root)


def test_references_follow_segments_and_campaign_audiences(project: Project) -> None:
    refs = tag_references(project)
    assert refs["vip_flag"] == {"segment:vips", "segment:lapsed_vips", "campaign:winback"}
    assert refs["aov_quartile"] == {"segment:lapsed_vips", "campaign:winback"}
    assert refs["first_category"] == set()


def test_coverage_freshness_and_flags(project: Project, engine: Engine) -> None:
    set_profiles(
        engine,
        [
            {"customer_id": "a", "avg_order_value": 10.0, "revenue": 10.0, "rfm_group": "loyal"},
            {"customer_id": "b", "avg_order_value": 30.0, "revenue": 3000.0},
            {"customer_id": "c"},
            {"customer_id": "d"},
        ],
    )
    add_events(engine, [{"event": "Order Completed", "timestamp": NOW - timedelta(days=1)}])
    tags = {n: t for n, t in project.tags.items() if t.type.value != "sql"}
    build_tags(engine, tags, Clock(NOW))
    by_name = {i.name: i for i in catalogue(engine, project, Clock(NOW + timedelta(days=1)))}
    vb = by_name["value_band"]
    assert (vb.customers, vb.coverage) == (2, 0.5)
    assert vb.values == {"high": 1, "low": 1}
    assert by_name["aov_quartile"].path == ["rfm_group_tag", "aov_quartile"]
    assert by_name["aov_quartile"].used_by == ["campaign:winback", "segment:lapsed_vips"]
    assert by_name["aov_quartile"].unused is False and by_name["first_category"].unused is True
    assert by_name["repeat_buyer"].flags[0] == "never computed" and by_name["repeat_buyer"].stale
    assert not by_name["value_band"].stale and by_name["value_band"].computed_at == NOW
    assert "no scores yet" in (by_name["churn_risk"].note or "")
    # Ten days on, every computed tag is past its 7 days.
    later = {i.name: i for i in catalogue(engine, project, Clock(NOW + timedelta(days=10)))}
    assert later["value_band"].stale
    assert "computed more than 7 days ago" in later["value_band"].flags
    # The old coverage summary still agrees.
    cov = {c.tag: c for c in tag_coverage(engine)}
    assert cov["value_band"].customers == 2


def test_inputs_older_than_the_limit_make_a_tag_stale(project: Project, engine: Engine) -> None:
    set_profiles(engine, [{"customer_id": "a", "rfm_group": "loyal"}])
    add_events(engine, [{"event": "x", "timestamp": NOW - timedelta(days=30)}])
    build_tags(
        engine, {"rfm_group_tag": project.tags["rfm_group_tag"]}, Clock(NOW + timedelta(days=20))
    )
    (info,) = catalogue(engine, project, Clock(NOW + timedelta(days=20)), names=["rfm_group_tag"])
    assert info.inputs_at == NOW - timedelta(days=30)
    assert info.flags[0] == "inputs older than 7 days" and info.stale


def test_uses_are_recorded_when_segments_and_campaigns_run(
    project: Project, engine: Engine
) -> None:
    set_profiles(engine, [{"customer_id": "a"}])
    assert record_tag_uses(engine, project, ["segment:vips"], Clock(NOW)) == 1
    later = NOW + timedelta(hours=3)
    assert (
        record_tag_uses(engine, project, ["campaign:winback", "segment:champions"], Clock(later))
        == 2
    )
    by_name = {i.name: i for i in catalogue(engine, project, Clock(later))}
    assert by_name["vip_flag"].last_used_at == later
    assert by_name["aov_quartile"].last_used_at == later
    assert by_name["value_band"].last_used_at is None
