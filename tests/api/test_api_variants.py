"""A two-variant campaign end to end: `campaign run`, the answers imported as events, then
`closedloop report campaign` (per-variant table, verdict, HTML section and PNG) and the API's
report on a real server — the same numbers in both.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import pytest
from typer.testing import CliRunner

from closedloop.cli.main import app
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from closedloop.demo.generator import generate
from closedloop.demo.project import init_project, relative_data_dir
from closedloop.demo.world import respond
from closedloop.measure.variants import measure_variants, variant_table
from tests.api.test_api import TOKEN, Server, _start, call

pytestmark = pytest.mark.slow  # generates a brand, builds and refreshes it (~30 s)
runner = CliRunner()
RUN_AT = "2026-11-20T10:00:00+00:00"
MEASURE_AT = "2026-12-04T00:00:00+00:00"
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


def ok(*args: str) -> str:
    r = runner.invoke(app, list(args), catch_exceptions=False, env={"COLUMNS": "300"})
    assert r.exit_code == 0, r.output
    return r.output


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("variants")
    brand = root / "brand"
    generate(brand, 400, seed=5)
    p = root / "p"
    init_project(p, data_dir=relative_data_dir(p, brand / "data"))
    f = p / "campaigns" / "winback.yaml"
    text = re.sub(r"^subject: .*\n", "", f.read_text(), flags=re.M)
    f.write_text(re.sub(r"^template: \|\n(  .*\n)+", VARIANTS, text, flags=re.M))
    ok("build", "-p", str(p))
    ok("campaign", "run", "winback", "-p", str(p), "--as-of", RUN_AT, "--occasion", "o1")
    # The people answer (the demo's world), and their orders come back through `import`.
    outbox = sorted((p / "outbox" / "winback").glob("*.jsonl"))
    assert outbox
    start = datetime.fromisoformat(RUN_AT)
    respond(brand, outbox[0], campaign="winback", start=start, window_days=14, seed=3)
    for folder in sorted((brand / "data" / "responses" / "winback").iterdir()):
        ok(
            "import",
            str(folder),
            "--source",
            folder.name,
            "--name",
            f"r_{folder.name}",
            "-p",
            str(p),
        )
    ok("refresh", "-p", str(p), "--as-of", (start + timedelta(days=14)).isoformat())
    return p


@pytest.fixture(scope="module")
def server(project: Path) -> Iterator[Server]:
    proc, port = _start(project, {**os.environ, "CLOSEDLOOP_API_TOKEN": TOKEN})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            call(url + "/openapi.json")
            break
        except OSError:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the API did not start"
            time.sleep(0.1)
    yield Server(url, project)
    proc.terminate()
    proc.wait(10)


def test_report_and_api_show_the_same_per_variant_numbers(
    project: Path, server: Server, tmp_path: Path
) -> None:
    p = load_project(project)
    with Engine(p.engine_url) as engine:
        v = measure_variants(engine, p.campaigns["winback"], "o1")
    assert [r.arm.name for r in v.variants] == ["warm", "plain"]
    assert v.holdout.assigned > 0 and all(r.arm.assigned > 0 for r in v.variants)
    assert sum(r.arm.conversions for r in v.variants) + v.holdout.conversions > 0
    header, rows = variant_table(v)

    out = ok(
        "report", "campaign", "winback", "--occasion", "o1", "-p", str(project),
        "--as-of", MEASURE_AT, "--out", str(tmp_path / "r"),
    )  # fmt: skip
    printed = [" ".join(line.split()) for line in out.splitlines()]
    for row in rows:  # every arm's row, cell by cell, on one line of the table
        assert any(all(cell in line for cell in row) for line in printed), row
    verdict = v.winner.line()
    assert " ".join(verdict.split()) in printed
    assert verdict.startswith(("winner: ", "no winner yet: "))
    assert any(line.startswith("sample-ratio check across arms p = ") for line in printed)
    html = (tmp_path / "r" / "report.html").read_text()
    assert "Variants (intent-to-treat, each against the holdout)" in html
    assert "Holm-Bonferroni" in html and "warm" in html and "plain" in html
    png = tmp_path / "r" / "variants_winback.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    r = server.get("/v1/campaigns/winback/report", occasion="o1", as_of=MEASURE_AT)
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["has_variants"] is True
    assert got["variant_header"] == header and got["variant_rows"] == rows
    arms = [got["holdout"], *got["variants"]]
    want = [v.holdout, *(x.arm for x in v.variants)]
    for g, a in zip(arms, want, strict=True):
        assert (g["name"], g["assigned"], g["reached"], g["conversions"]) == (
            a.name,
            a.assigned,
            a.reached,
            a.conversions,
        )
        assert g["revenue"] == pytest.approx(a.revenue) and g["rate"] == pytest.approx(a.rate)
    for g, x in zip(got["variants"], v.variants, strict=True):
        assert x.lift is not None and g["lift"]["p_value"] == pytest.approx(x.lift.p_value)
        assert g["lift"]["absolute_low"] == pytest.approx(x.lift.absolute_low)
    assert got["sample_ratio"]["observed"] == v.sample_ratio.observed
    assert got["sample_ratio"]["p_value"] == pytest.approx(v.sample_ratio.p_value)
    assert got["winner"]["line"] == verdict and got["winner"]["name"] == v.winner.name
    assert len(got["winner"]["comparisons"]) == 1
