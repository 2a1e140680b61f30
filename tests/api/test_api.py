"""The HTTP API (`closedloop api`) as a real uvicorn server over a built demo project.

Every route's answer must equal what the CLI or the Python functions behind it give for the
same project; the server runs in its own process, as in production, so a writer holding the
warehouse is a real DuckDB file lock.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import pytest
from typer.testing import CliRunner

from closedloop.api.app import segment_sample, segment_size, validate_project
from closedloop.cli.main import app
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from closedloop.demo.generator import generate
from closedloop.demo.project import init_project, relative_data_dir
from tests.collect.conftest import free_port

runner = CliRunner()
TOKEN = "t0k3n-for-tests"  # noqa: S105 - a test token
AS_OF = "2030-01-01T00:00:00+00:00"
RUN_AT = "2026-11-20T10:00:00+00:00"  # the campaign decides then
MEASURE_AT = "2026-12-04T00:00:00+00:00"  # and is measured then


@dataclass
class Answer:
    status_code: int
    headers: dict[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)


def call(url: str, method: str = "GET", token: str | None = None) -> Answer:
    """One real HTTP request; an error status is an answer, not an exception."""
    req = urllib.request.Request(url, method=method, data=b"" if method == "POST" else None)  # noqa: S310
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=60) as r:  # noqa: S310 - loopback only
            return Answer(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode())
    except urllib.error.HTTPError as e:
        return Answer(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode())


@dataclass
class Server:
    url: str
    project: Path

    def get(self, path: str, token: str | None = TOKEN, **params: Any) -> Answer:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        return call(self.url + urllib.parse.quote(path) + query, token=token)

    def post(self, path: str, token: str | None = TOKEN) -> Answer:
        return call(self.url + path, "POST", token)


def _start(
    project: Path, env: dict[str, str], host: str = "127.0.0.1"
) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    cmd = [sys.executable, "-m", "closedloop.cli.main", "api", "-p", str(project)]
    proc = subprocess.Popen(
        [*cmd, "--port", str(port), "--host", host],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    return proc, port


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("api")
    generate(root / "brand", 300, seed=11)
    p = root / "p"
    init_project(p, data_dir=relative_data_dir(p, root / "brand" / "data"))
    r = runner.invoke(app, ["build", "-p", str(p)])
    assert r.exit_code == 0, r.output
    args = ["--as-of", RUN_AT, "--occasion", "o1", "-p", str(p)]
    r = runner.invoke(app, ["campaign", "run", "winback", *args])
    assert r.exit_code == 0, r.output
    env = {**os.environ, "CLOSEDLOOP_API_TOKEN": TOKEN}
    proc, port = _start(p, env)
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
    yield Server(url, p)
    proc.terminate()
    proc.wait(10)


def a_member(p: Path) -> dict[str, str]:
    with Engine(load_project(p).engine_url) as e:
        m = e.table("identity_map")
        row = (
            m.filter((m.id_type == "email") & ~m.quarantined)
            .order_by("id_value")
            .limit(1)
            .to_pyarrow()
            .to_pylist()[0]
        )
    return {"email": row["id_value"], "customer_id": row["customer_id"]}


def test_profile_equals_the_cli(server: Server) -> None:
    who = a_member(server.project)
    r = server.get(f"/v1/profiles/{who['email'].upper()}")
    assert r.status_code == 200, r.text
    cli = runner.invoke(app, ["profile", who["email"].upper(), "--json", "-p", str(server.project)])
    assert cli.exit_code == 0, cli.output
    assert r.json() == json.loads(cli.output)
    assert r.json()["customer_id"] == who["customer_id"]
    typed = server.get(f"/v1/profiles/{who['email']}", type="email")
    assert typed.json()["customer_id"] == who["customer_id"]


def test_profile_unknown_is_404_with_a_message(server: Server) -> None:
    r = server.get("/v1/profiles/nobody@example.org")
    assert r.status_code == 404
    assert r.json()["detail"] == "no customer or account has the identifier 'nobody@example.org'"
    r = server.get("/v1/profiles/nobody@example.org", type="no_such_type")
    assert r.status_code == 400 and "no_such_type" in r.json()["detail"]


def test_segments_equal_the_python_functions(server: Server) -> None:
    project = load_project(server.project)
    from datetime import datetime

    when = datetime.fromisoformat(AS_OF)
    r = server.get("/v1/segments", as_of=AS_OF)
    assert r.status_code == 200, r.text
    listed = r.json()
    assert [s["name"] for s in listed] == sorted(project.segments)
    with Engine(project.engine_url) as engine:
        expected = {n: segment_size(engine, project, n, when) for n in project.segments}
        name = max(expected, key=lambda n: expected[n][0])
        sample = segment_sample(engine, project, name, 5, when)
    assert {s["name"]: s["size"] for s in listed} == {n: v[0] for n, v in expected.items()}
    assert any(s["size"] > 0 for s in listed)
    assert {s["kind"] for s in listed} <= {"customers", "accounts"}
    one = server.get(f"/v1/segments/{name}", sample=5, as_of=AS_OF).json()
    assert one["size"] == expected[name][0] > 0
    assert one["by"] == expected[name][1]
    assert len(one["sample"]) == min(5, one["size"])
    assert one["sample"] == json.loads(json.dumps(sample, default=str))


def test_segment_size_agrees_with_the_cli(server: Server) -> None:
    listed = server.get("/v1/segments").json()
    seg = next(s for s in listed if s["kind"] == "customers" and s["size"] > 0)
    cli = runner.invoke(app, ["segment", "size", seg["name"], "-p", str(server.project)])
    assert cli.exit_code == 0, cli.output
    assert f"segment {seg['name']}: {seg['size']:,} customers" in cli.output


def test_unknown_segment_is_404_naming_the_known(server: Server) -> None:
    r = server.get("/v1/segments/no_such_segment")
    assert r.status_code == 404
    assert r.json()["detail"].startswith("no segment 'no_such_segment'; known: ")


def test_tags_equal_the_cli(server: Server) -> None:
    r = server.get("/v1/tags")
    assert r.status_code == 200, r.text
    cli = runner.invoke(app, ["tags", "list", "--json", "-p", str(server.project)])
    assert cli.exit_code == 0, cli.output
    want = json.loads(cli.output)
    got = r.json()
    assert [t["name"] for t in got] == [t["name"] for t in want] and got
    for g, w in zip(got, want, strict=True):
        for k in ("type", "owner", "coverage", "customers", "computed_at", "last_used_at", "flags"):
            assert g[k] == w[k], (g["name"], k)


def test_campaign_report_equals_measure_and_the_cli(server: Server) -> None:
    from dataclasses import asdict
    from datetime import datetime

    from closedloop.core.clock import Clock
    from closedloop.measure.campaign import measure_campaign
    from closedloop.measure.report import campaign_rows

    r = server.get("/v1/campaigns/winback/report", occasion="o1", as_of=MEASURE_AT)
    assert r.status_code == 200, r.text
    got = r.json()
    project = load_project(server.project)
    with Engine(project.engine_url) as engine:
        o = measure_campaign(
            engine, project.campaigns["winback"], "o1", Clock(datetime.fromisoformat(MEASURE_AT))
        )
    want = json.loads(json.dumps(asdict(o)))
    assert {k: got[k] for k in want} == want
    assert o.treated > 0 and o.held_out > 0
    assert got["treated_rate"] == o.treated_conversions / o.treated
    assert got["held_out_rate"] == o.held_out_conversions / o.held_out
    assert [tuple(x) for x in got["rows"]] == campaign_rows(o)
    # the occasion decided last is the default
    assert server.get("/v1/campaigns/winback/report", as_of=MEASURE_AT).json() == got
    args = ["winback", "--occasion", "o1", "--as-of", MEASURE_AT, "-p", str(server.project)]
    cli = runner.invoke(app, ["report", "campaign", *args])
    assert cli.exit_code == 0, cli.output
    printed = " ".join(cli.output.split())  # the console wraps long lines
    for label, text in got["rows"]:
        assert f"{label}: {' '.join(text.split())}" in printed


def test_campaign_report_unknowns_are_404(server: Server) -> None:
    r = server.get("/v1/campaigns/nope/report")
    assert r.status_code == 404 and r.json()["detail"] == "no campaign 'nope'; known: winback"
    r = server.get("/v1/campaigns/winback/report", occasion="o9")
    assert r.status_code == 404
    assert r.json()["detail"] == "campaign 'winback' has no occasion 'o9'; known: o1"


def test_validate_returns_the_problems_with_file_line_key(server: Server, tmp_path: Path) -> None:
    r = server.post("/v1/validate")
    assert r.status_code == 200 and r.json() == {"ok": True, "problems": []}
    # a broken copy: the same function the route calls reports file, line and key
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(server.project, broken, ignore=shutil.ignore_patterns("*.duckdb*", "*.sqlite*"))
    seg = sorted((broken / "segments").glob("*.yaml"))[0]
    seg.write_text(seg.read_text() + "\nbogus_key: 1\n")
    problems = validate_project(broken)
    assert problems and problems[0].file.endswith(seg.name) and problems[0].line is not None


def test_validate_sees_the_project_on_disk(server: Server) -> None:
    seg = sorted((server.project / "segments").glob("*.yaml"))[0]
    original = seg.read_text()
    try:
        seg.write_text(original + "\nbogus_key: 1\n")
        r = server.post("/v1/validate")
        body = r.json()
        assert r.status_code == 200 and body["ok"] is False
        p = body["problems"][0]
        assert p["file"].endswith(seg.name) and p["line"] is not None and p["message"]
        assert any(x["key"] and "bogus_key" in x["key"] for x in body["problems"]), body
    finally:
        seg.write_text(original)


def test_token_is_required(server: Server) -> None:
    assert server.get("/v1/tags", token=None).status_code == 401
    r = server.get("/v1/segments", token="wrong")  # noqa: S106
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    assert server.post("/v1/validate", token=None).status_code == 401


def test_a_writer_holding_the_warehouse_gives_503_with_retry_after(server: Server) -> None:
    path = load_project(server.project).engine_url[len("duckdb://") :]
    con = duckdb.connect(path)  # a writer, in another process than the server
    try:
        routes = [
            "/v1/tags",
            "/v1/segments",
            "/v1/segments/champions",
            "/v1/profiles/someone@example.org",
        ]
        for route in [*routes, "/v1/campaigns/winback/report"]:
            r = server.get(route)
            assert r.status_code == 503, (route, r.text)
            assert int(r.headers["retry-after"]) > 0
            assert "cannot be opened" in r.json()["detail"]
    finally:
        con.close()
    assert server.get("/v1/tags").status_code == 200


def test_a_busy_warehouse_answers_profiles_from_the_serving_store(server: Server) -> None:
    import sqlite3
    from datetime import datetime

    from closedloop.api.warehouse import store_path

    who = a_member(server.project)
    cli = runner.invoke(app, ["profile", who["email"], "--json", "-p", str(server.project)])
    assert cli.exit_code == 0, cli.output
    want = json.loads(cli.output)
    url = load_project(server.project).engine_url
    store = store_path(url)
    assert store is not None and store.exists()
    with sqlite3.connect(store) as db:
        written = db.execute("SELECT value FROM meta WHERE key = 'written_at'").fetchone()[0]
    con = duckdb.connect(url[len("duckdb://") :])  # a writer, in another process
    try:
        r = server.get(f"/v1/profiles/{who['email']}")
        assert r.status_code == 200, r.text
        got = r.json()
        for k in ("kind", "customer_id", "matched", "profile"):
            assert got[k] == want[k], k
        assert got["source"] == "serving" and got["accounts"] is None
        assert got["served_from"]["written_at"] == written
        assert datetime.fromisoformat(written) <= datetime.now(
            datetime.fromisoformat(written).tzinfo
        )
        assert "the warehouse is busy" in got["served_from"]["why"]
        by_id = server.get(f"/v1/profiles/{who['customer_id']}", type="customer_id")
        assert by_id.status_code == 200 and by_id.json()["profile"] == want["profile"]
        # Unknown under a given type: 404, saying as of when.
        r = server.get("/v1/profiles/nobody@example.org", type="email")
        assert r.status_code == 404
        assert r.json()["detail"] == (
            "no customer has the identifier 'nobody@example.org' "
            f"(as of the serving store written at {written})"
        )
        assert server.get("/v1/profiles/x", type="no_such_type").status_code == 400
        # Accounts, and an identifier that might be one, only the warehouse knows: 503.
        for params in ({"type": "account"}, {}):
            r = server.get("/v1/profiles/nobody.example.org", **params)
            assert r.status_code == 503 and int(r.headers["retry-after"]) > 0, params
        # Without a store, nothing can answer: 503.
        moved = store.with_name(store.name + ".away")
        store.rename(moved)
        try:
            r = server.get(f"/v1/profiles/{who['email']}")
            assert r.status_code == 503 and "no profile serving store" in r.json()["detail"]
        finally:
            moved.rename(store)
    finally:
        con.close()
    r = server.get(f"/v1/profiles/{who['email']}")
    assert r.status_code == 200 and "served_from" not in r.json()


def test_openapi_lists_the_routes(server: Server) -> None:
    schema = server.get("/openapi.json").json()
    assert set(schema["paths"]) >= {
        "/v1/profiles/{identifier}",
        "/v1/segments",
        "/v1/segments/{name}",
        "/v1/tags",
        "/v1/validate",
        "/v1/campaigns/{name}/report",
    }
    assert "post" in schema["paths"]["/v1/validate"]


def test_cli_refuses_a_public_host_without_a_token(tmp_path: Path) -> None:
    init_project(tmp_path / "p")
    env = {k: v for k, v in os.environ.items() if k != "CLOSEDLOOP_API_TOKEN"}
    proc, _ = _start(tmp_path / "p", env, host="0.0.0.0")  # noqa: S104 - the point of the test
    _, errs = proc.communicate(timeout=60)
    assert proc.returncode == 2
    assert b"CLOSEDLOOP_API_TOKEN is not set" in errs and b"--host 127.0.0.1" in errs
