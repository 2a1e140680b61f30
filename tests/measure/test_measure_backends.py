"""Funnels, cohorts and programme lift on PostgreSQL equal the same on DuckDB, row for row."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import ibis
import numpy as np
import pyarrow as pa
import pytest

from closedloop.collect.tables import EVENTS
from closedloop.core.engine import Engine
from closedloop.measure.cohorts import cohort_expr
from closedloop.measure.funnels import funnel_expr
from closedloop.measure.programme import programme_lift
from tests.conftest import event_rows
from tests.test_backends import postgres_url  # noqa: F401  (the fixture)

START = datetime(2026, 1, 1, tzinfo=UTC)
END = datetime(2026, 7, 1, tzinfo=UTC)
STEPS = ["Product Viewed", "Product Added", "Order Completed"]


def history(seed: int = 11) -> list[dict[str, Any]]:
    """Random shopping sessions of 300 customers over half a year."""
    rng = np.random.default_rng(seed)
    msgs: list[dict[str, Any]] = []
    for c in range(300):
        t = START + timedelta(days=float(rng.uniform(-20, 170)))
        for _ in range(int(rng.integers(1, 12))):
            t += timedelta(hours=float(rng.exponential(60)))
            event = str(rng.choice([*STEPS, "Signed Up"], p=[0.5, 0.25, 0.2, 0.05]))
            msgs.append(
                {
                    "message_id": f"m{len(msgs)}",
                    "user_id": f"c{c:03d}",
                    "event": event,
                    "timestamp": t,
                    "revenue": float(rng.integers(10, 500)) if event == STEPS[2] else None,
                    "channel": str(rng.choice(["web", "app", "wechat"])),
                }
            )
    return msgs


def results(url: str, msgs: list[dict[str, Any]]) -> dict[str, Any]:
    with Engine(url) as engine:
        for t in ("events", "event_customers"):
            if engine.exists(t):
                engine.drop(t)
        schema = ibis.schema(EVENTS.columns).to_pyarrow()  # no null-typed columns (PostgreSQL)
        engine.append("events", event_rows(msgs).select(schema.names).cast(schema))
        engine.append(
            "event_customers",
            pa.table(
                {
                    "message_id": [m["message_id"] for m in msgs],
                    "customer_id": [m["user_id"] for m in msgs],
                }
            ),
        )
        ids = sorted({m["user_id"] for m in msgs})
        groups = pa.table({"customer_id": ids, "group": [f"g{i % 3}" for i in range(len(ids))]})
        control = pa.table({"customer_id": ids, "control": [i % 5 == 0 for i in range(len(ids))]})
        with engine.temporary(groups) as g, engine.temporary(control) as pop:
            f = funnel_expr(engine, STEPS, 7, START, END, g).to_pandas()
            # A zone with daylight saving, so the offset CASE runs on both engines.
            c = cohort_expr(engine, START, END, by="channel", tz="Europe/Berlin").to_pandas()
            p = programme_lift(engine, pop, STEPS[2], START, END)
    return {
        "funnel": f.sort_values(["group", "step"]).reset_index(drop=True),
        "cohorts": c.sort_values(["cohort_month", "split", "months_since"]).reset_index(drop=True),
        "programme": (p.exposed, p.control, p.exposed_conversions, p.control_conversions),
        "revenue": (p.exposed_revenue, p.control_revenue),
    }


@pytest.mark.postgres
def test_measures_on_postgres_equal_duckdb(postgres_url: str) -> None:  # noqa: F811
    import pandas as pd

    msgs = history()
    duck, pg = results("duckdb://", msgs), results(postgres_url, msgs)
    assert len(duck["funnel"]) == 9 and duck["funnel"].customers.sum() > 100
    assert len(duck["cohorts"]) > 20
    pd.testing.assert_frame_equal(duck["funnel"], pg["funnel"], check_dtype=False)
    pd.testing.assert_frame_equal(duck["cohorts"], pg["cohorts"], check_dtype=False)
    assert duck["programme"] == pg["programme"]
    assert duck["revenue"] == pytest.approx(pg["revenue"])


def variant_campaign_tables(url: str, seed: int = 5) -> dict[str, Any]:
    """A two-variant campaign's delivery log, variants, goal events and a merge, written to
    ``url``; returns the per-arm rows of ``arms_expr`` and ``measure_variants``' verdict."""
    from closedloop.activate.tables import DELIVERIES
    from closedloop.core.definitions import CampaignDef
    from closedloop.measure.variants import arms_expr, measure_variants

    campaign = CampaignDef.model_validate(
        {
            "name": "ab",
            "audience": "everyone",
            "holdout": 0.2,
            "variants": [
                {"name": "a", "weight": 0.5, "template": "A"},
                {"name": "b", "weight": 0.5, "template": "B"},
            ],
            "goal": {"event": "Order Completed", "window_days": 7},
        }
    )
    rng = np.random.default_rng(seed)
    n, at = 900, START
    group = np.where(rng.random(n) < 0.2, "holdout", "treatment")
    variant = np.where(rng.random(n) < 0.5, "a", "b")
    status = np.where(
        group == "holdout", "held_out", np.where(rng.random(n) < 0.1, "suppressed", "sent")
    )
    ids = [f"c{i:04d}" for i in range(n)]
    deliveries = {c: [None] * n for c in DELIVERIES.columns}
    deliveries.update(
        delivery_id=[f"d{i}" for i in range(n)],
        campaign=["ab"] * n,
        occasion=["o1"] * n,
        customer_id=ids,
        group=group.tolist(),
        status=status.tolist(),
        channel=["email"] * n,
        decided_at=[at] * n,
    )
    treated = [i for i in range(n) if group[i] == "treatment"]
    msgs: list[dict[str, Any]] = []
    for i in range(n):
        p = 0.1 + (0.08 if group[i] == "treatment" and variant[i] == "b" else 0.0)
        for k in range(2 if rng.random() < 0.2 else 1):  # some convert twice: counted once
            if rng.random() < p:
                days = float(rng.uniform(0, 9))  # some after the 7-day window
                msgs.append(
                    {
                        "message_id": f"g{i}_{k}",
                        "user_id": ids[i] if i % 50 else f"s{i}",  # every 50th since merged
                        "event": "Order Completed",
                        "timestamp": at + timedelta(days=days),
                        "revenue": float(rng.integers(10, 300)),
                    }
                )
    aliases = pa.table(
        {
            "alias_id": [ids[i] for i in range(0, n, 50)],
            "customer_id": [f"s{i}" for i in range(0, n, 50)],
            "merged_at": pa.array([at] * len(range(0, n, 50)), pa.timestamp("us", tz="UTC")),
        }
    )
    with Engine(url) as engine:
        for t in ("events", "event_customers", "deliveries", "delivery_variants"):
            if engine.exists(t):
                engine.drop(t)
        schema = ibis.schema(EVENTS.columns).to_pyarrow()
        engine.append("events", event_rows(msgs).select(schema.names).cast(schema))
        engine.append(
            "event_customers",
            pa.table(
                {
                    "message_id": [m["message_id"] for m in msgs],
                    "customer_id": [m["user_id"] for m in msgs],
                }
            ),
        )
        engine.append("deliveries", pa.table(deliveries).cast(DELIVERIES.schema.to_pyarrow()))
        engine.append(
            "delivery_variants",
            pa.table(
                {
                    "delivery_id": [f"d{i}" for i in treated],
                    "campaign": ["ab"] * len(treated),
                    "occasion": ["o1"] * len(treated),
                    "customer_id": [ids[i] for i in treated],
                    "variant": [str(variant[i]) for i in treated],
                    "salt": ["ab"] * len(treated),
                }
            ),
        )
        engine.replace("customer_aliases", aliases)
        arms = arms_expr(engine, campaign, "o1").to_pandas()
        o = measure_variants(engine, campaign, "o1")
    return {
        "arms": arms.sort_values(["group", "variant"]).reset_index(drop=True),
        "counts": [
            (a.name, a.assigned, a.reached, a.stopped, a.conversions)
            for a in [o.holdout, *(r.arm for r in o.variants)]
        ],
        "srm": o.sample_ratio.p_value,
        "winner": o.winner.line(),
    }


@pytest.mark.postgres
def test_variant_measurement_on_postgres_equals_duckdb(postgres_url: str) -> None:  # noqa: F811
    import pandas as pd

    duck, pg = variant_campaign_tables("duckdb://"), variant_campaign_tables(postgres_url)
    assert [c[0] for c in duck["counts"]] == ["holdout", "a", "b"]
    assert sum(c[1] for c in duck["counts"]) == 900 and duck["counts"][1][4] > 0
    pd.testing.assert_frame_equal(duck["arms"], pg["arms"], check_dtype=False)
    assert duck["counts"] == pg["counts"]
    assert duck["srm"] == pytest.approx(pg["srm"])
    assert duck["winner"] == pg["winner"]
