"""Reports: charts at the edges (no or all conversions) and a self-contained, escaped page."""

from __future__ import annotations

from pathlib import Path

import pytest

from closedloop.measure.campaign import CampaignOutcome
from closedloop.measure.report import Section, bar_chart, lift_chart, write_report
from closedloop.measure.stats import lift


def outcome(xt: int, nt: int, xc: int, nc: int) -> CampaignOutcome:
    return CampaignOutcome("c", "o", nt, nc, xt, xc, 0.0, 0.0, lift(xt, nt, xc, nc), 1.0)


@pytest.mark.parametrize(
    "counts", [(0, 50, 0, 10), (50, 50, 10, 10), (0, 3, 41, 41), (7, 90, 1, 30)]
)
def test_lift_chart_at_the_edges(counts: tuple[int, int, int, int]) -> None:
    chart = lift_chart(outcome(*counts), true_effect=0.05)
    assert chart.png.startswith(b"\x89PNG") and len(chart.png) > 5_000


def test_report_page_is_self_contained_and_escaped(tmp_path: Path) -> None:
    sections = [
        Section("Summary <b>", rows=[("name", "<script>alert(1)</script>")]),
        Section("Chart", charts=[bar_chart("ladder", "Ladder", {"fan": 3, "member": 2})]),
    ]
    path = write_report(tmp_path / "r", "Title & more", "sub", sections)
    html = path.read_text()
    assert "<script>" not in html and "&lt;script&gt;" in html
    assert "data:image/png;base64," in html
    assert (tmp_path / "r" / "ladder.png").read_bytes().startswith(b"\x89PNG")


def test_funnel_and_cohort_charts_and_tables(tmp_path: Path) -> None:
    from datetime import date

    from closedloop.measure.cohorts import Cohort
    from closedloop.measure.funnels import Funnel, FunnelGroup
    from closedloop.measure.report import cohort_chart, cohort_table, funnel_chart, funnel_table

    f = Funnel(
        ["View", "Add", "Order"],
        7,
        [FunnelGroup("holdout", [0, 0, 0], 10), FunnelGroup("treatment", [40, 12, 5], 50)],
    )
    header, rows = funnel_table(f)
    assert header[0] == "group" and len(rows) == 6
    assert rows[4] == ["treatment", "Add", "12", "30.0%", rows[4][4]]
    assert rows[0][3] == "0.0%"  # nobody of the 10 held out entered
    cohorts = [
        Cohort(date(2026, 1, 1), "all", 4, [4, 2, 1], [100.0, 40.0, 0.0]),
        Cohort(date(2026, 2, 1), "all", 2, [2, 0], [10.0, 0.0]),
    ]
    ch, cr = cohort_table(cohorts)
    assert ch == ["cohort", "split", "customers", "M0", "M1", "M2"]
    assert cr[0][3:] == ["100% · 25", "50% · 35", "25% · 35"] and cr[1][-1] == ""
    charts = [funnel_chart(f), cohort_chart(cohorts), cohort_chart([])]
    assert all(c.png.startswith(b"\x89PNG") for c in charts)
    page = write_report(
        tmp_path, "t", "s", [Section("Funnel", header=header, table=rows, charts=charts[:1])]
    ).read_text()
    assert "<th>of previous step</th>" in page and '<td class="num">treatment</td>' in page
