"""Every tag type gives the same values on PostgreSQL as on DuckDB (real server, same data)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from closedloop.core.clock import Clock
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from closedloop.demo.generator import generate
from closedloop.demo.project import init_project, relative_data_dir
from closedloop.pipeline import build
from closedloop.tags.build import build_tags
from closedloop.tags.manual import set_tag
from tests.test_backends import postgres_url  # noqa: F401  (the fixture that starts PostgreSQL)

EXTRA_TAGS = {
    "last_viewed.yaml": "name: last_viewed\ntype: last\nevent: Product Viewed\nproperty: product_id\n",
    "first_query.yaml": "name: first_query\ntype: first\nevent: Products Searched\nproperty: query\n",
    "orders_band.yaml": (
        "name: orders_band\ntype: bucket\nfield: orders\n"
        "ranges: [{value: none, max: 1}, {value: one, min: 1, max: 2}, {value: many, min: 2}]\n"
    ),
    "rfm_scores.yaml": "name: rfm_scores\ntype: rfm\nrfm: scores\n",
    "orders_90d_band.yaml": "name: orders_90d_band\ntype: bucket\nfield: orders_90d\npercentiles: [0.5]\n",
    "imported.yaml": "name: imported\ntype: import\npath: imported.csv\n",
}


def _tags(url: str, root: Path, customers: list[str] | None) -> tuple[pd.DataFrame, list[str]]:
    project = load_project(root / "p")
    clock = Clock(pd.Timestamp("2026-11-20T00:00:00Z").to_pydatetime())
    with Engine(url) as engine:
        build(engine, project, clock=clock)
        ids = sorted(str(x) for x in engine.table("customers").customer_id.to_pyarrow().to_pylist())
        chosen = customers or ids[::7]
        rows = ["customer_id,value", *(f"{c},g{i % 3}" for i, c in enumerate(chosen)), "nobody,g1"]
        (root / "p" / "imported.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
        engine.append(
            "model_scores",
            pa.table(
                {
                    "customer_id": chosen,
                    "model": ["churn"] * len(chosen),
                    "score": [i / len(chosen) for i in range(len(chosen))],
                    "label": pa.array([None] * len(chosen), pa.string()),
                    "scored_at": pa.array(
                        [clock.now()] * len(chosen), pa.timestamp("us", tz="UTC")
                    ),
                }
            ),
        )
        build_tags(engine, project.tags, clock, root=project.root)
        set_tag(engine, project, chosen[0], "vip_flag", "vip", by="alice", clock=clock)
        tv = engine.table("tag_values").select("tag", "customer_id", "value")
        return tv.order_by(["tag", "customer_id"]).to_pandas(), chosen


@pytest.mark.postgres
@pytest.mark.slow
def test_tags_on_postgres_equal_duckdb(tmp_path: Path, postgres_url: str) -> None:  # noqa: F811
    generate(tmp_path / "brand", 300, seed=5)
    init_project(
        tmp_path / "p", data_dir=relative_data_dir(tmp_path / "p", tmp_path / "brand" / "data")
    )
    for name, text in EXTRA_TAGS.items():
        (tmp_path / "p" / "tags" / name).write_text(text, encoding="utf-8")
    (tmp_path / "p" / "imported.csv").write_text("customer_id,value\n", encoding="utf-8")
    duck, chosen = _tags("duckdb://", tmp_path, None)
    pg, _ = _tags(postgres_url, tmp_path, chosen)
    project = load_project(tmp_path / "p")
    for t in project.tags:
        assert (duck.tag == t).any(), f"tag {t} has no values: the comparison would prove nothing"
    pd.testing.assert_frame_equal(
        duck.reset_index(drop=True), pg.reset_index(drop=True), check_dtype=False
    )
