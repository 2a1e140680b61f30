"""`closedloop segment export NAME --webhook URL` on a real built project and a real server."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from closedloop.cli.main import app
from closedloop.demo.generator import generate
from closedloop.demo.project import init_project, relative_data_dir
from tests.segments.test_export import SECRET, Receiver
from tests.segments.test_export import receiver as receiver  # the fixture

runner = CliRunner()
AS_OF = "2026-11-20T00:00:00+00:00"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("seg")
    generate(root / "brand", 300, seed=3)
    init_project(root / "p", data_dir=relative_data_dir(root / "p", root / "brand" / "data"))
    r = runner.invoke(app, ["build", "-p", str(root / "p")])
    assert r.exit_code == 0, r.output
    yield root / "p"


def test_webhook_export_sends_every_member_signed(built: Path, receiver: Receiver) -> None:
    r = runner.invoke(app, ["segment", "size", "lapsed_buyers", "-p", str(built), "--as-of", AS_OF])
    assert r.exit_code == 0, r.output
    total = int(r.output.split(":")[1].split()[0].replace(",", ""))
    assert total > 0
    args = ["segment", "export", "lapsed_buyers", "-p", str(built), "--as-of", AS_OF]
    args += ["--webhook", receiver.url, "--batch-size", "7", "--field", "email"]
    r = runner.invoke(app, args, env={"CLOSEDLOOP_WEBHOOK_SECRET": SECRET.decode()})
    assert r.exit_code == 0, r.output
    assert "signed batch" in r.output
    bodies = receiver.delivered()
    assert all(q["signed"] for q in receiver.requests)
    assert len(bodies) == -(-total // 7)
    got = [m for b in bodies for m in b["members"]]
    assert len({m["customer_id"] for m in got}) == total
    assert all("email" in m for m in got)
    assert {b["as_of"] for b in bodies} == {AS_OF}


def test_webhook_export_errors(built: Path, tmp_path: Path) -> None:
    base = ["segment", "export", "lapsed_buyers", "-p", str(built)]
    r = runner.invoke(app, [*base, "--webhook", "http://127.0.0.1:9/"], env={"X": "1"})
    assert r.exit_code == 2 and "CLOSEDLOOP_WEBHOOK_SECRET" in r.output
    env = {"CLOSEDLOOP_WEBHOOK_SECRET": "k"}
    r = runner.invoke(app, [*base, "--webhook", "file:///etc/passwd"], env=env)
    assert r.exit_code == 2 and "not an http" in r.output
    r = runner.invoke(app, [*base, "--webhook", "http://x/", "--out", str(tmp_path / "a.csv")])
    assert r.exit_code == 2 and "either --out FILE or --webhook URL" in r.output
    r = runner.invoke(app, base)
    assert r.exit_code == 2 and "either --out FILE or --webhook URL" in r.output
    r = runner.invoke(app, [*base, "--webhook", "http://x/", "--field", "nope"], env=env)
    assert r.exit_code == 2 and "no profile field nope" in r.output
