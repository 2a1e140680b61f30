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
