"""Arbitration: a person who qualifies for several campaigns is given to one — the highest
expected incremental value (a model's score × value per conversion) when every contender has
a score, else the highest priority; ties by priority, then name."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from closedloop.activate.campaign import run_campaign
from closedloop.activate.policy import LOST, arbitrate, pick_winner
from closedloop.core.clock import Clock
from closedloop.core.definitions import CampaignDef, SegmentDef
from closedloop.core.engine import Engine
from closedloop.segments.audience import Fields, evaluate_segment
from closedloop.tags.tables import MODEL_SCORES
from tests.segments.test_audience import set_profiles

NOW = datetime(2026, 11, 20, 4, 0, tzinfo=UTC)


def camp(name: str, priority: int = 0, **kw: object) -> CampaignDef:
    base = {"name": name, "audience": "everyone", "template": "hi", "priority": priority}
    return CampaignDef.model_validate(base | {"arbitration": "value"} | kw)


names = st.sampled_from(["a", "b", "c", "d", "e"])
contest = st.lists(
    st.tuples(
        names,
        st.integers(-2, 2),
        st.one_of(st.none(), st.sampled_from([0.0, 1.0, 2.5, 10.0])),
    ),
    min_size=1,
    max_size=5,
    unique_by=lambda t: t[0],
)


@given(contest)
def test_the_winner_never_has_a_lower_expected_value(
    entries: list[tuple[str, int, float | None]],
) -> None:
    rivals = [camp(n, p, value_model="m", value_per_conversion=1.0) for n, p, _ in entries]
    values = {n: v for n, _, v in entries if v is not None}
    w = pick_winner(rivals, values, by_value=True)
    if len(values) == len(entries):  # every contender scored: value decides
        assert all(values[w.name] >= v for v in values.values())
        top = [c for c in rivals if values[c.name] == values[w.name]]
        assert w.priority == max(c.priority for c in top)
    else:  # a missing score: priority, as without a model
        assert w.priority == max(c.priority for c in rivals)
    best = [c for c in rivals if c.priority == w.priority]
    if len(values) != len(entries):
        assert w.name == min(c.name for c in best)


def test_validation() -> None:
    with pytest.raises(ValidationError, match="arbitration: value needs `value_model`"):
        CampaignDef.model_validate(
            {"name": "x", "audience": "a", "template": "t", "arbitration": "value"}
        )
    with pytest.raises(ValidationError, match="go together"):
        CampaignDef.model_validate(
            {"name": "x", "audience": "a", "template": "t", "value_model": "m"}
        )


@pytest.fixture
def scored(engine: Engine) -> Engine:
    set_profiles(
        engine,
        [
            {"customer_id": c, "email": f"{c}@x.cn", "consent_marketing": True}
            for c in ("x", "y", "z")
        ],
    )
    seg = SegmentDef.model_validate(
        {"name": "everyone", "where": {"trait": "customer_id", "op": "not_null"}}
    )
    evaluate_segment(engine, seg, Fields(), Clock(NOW))
    rows = [
        ("x", "p_a", 0.10),  # a: 0.10 × 100 = 10
        ("x", "p_b", 0.30),  # b: 0.30 × 50 = 15 → b wins x
        ("y", "p_a", 0.50),  # a: 50
        ("y", "p_b", 0.20),  # b: 10 → a wins y
        ("z", "p_a", 0.90),  # b has no score for z: priority (b) wins z
    ]
    data = [
        {"customer_id": c, "model": m, "score": s, "label": None, "scored_at": NOW}
        for c, m, s in rows
    ]
    engine.replace("model_scores", pa.Table.from_pylist(data, MODEL_SCORES.schema.to_pyarrow()))
    return engine


A = camp("a", 0, value_model="p_a", value_per_conversion=100)
B = camp("b", 1, value_model="p_b", value_per_conversion=50)


def test_arbitrate_by_expected_value_with_priority_fallback(scored: Engine) -> None:
    people = ["x", "y", "z"]
    assert arbitrate(scored, A, [A, B], people) == {"x": "b", "z": "b"}
    assert arbitrate(scored, B, [A, B], people) == {"y": "a"}
    by_priority = A.model_copy(update={"arbitration": "priority"})
    assert arbitrate(scored, by_priority, [by_priority, B], people) == dict.fromkeys(people, "b")
    assert arbitrate(scored, A, [], people) == {}  # no rivals, no contest


def test_a_run_records_who_was_lost_and_to_whom(scored: Engine, tmp_path: Path) -> None:
    run = run_campaign(
        scored, A, outbox_dir=tmp_path, occasion="o", clock=Clock(NOW), dry_run=True, rivals=[A, B]
    )
    assert run.decisions is not None
    rows = {r["customer_id"]: r for r in run.decisions.to_pylist()}
    assert rows["x"]["reason"] == LOST + "b" and rows["x"]["status"] == "suppressed"
    assert rows["z"]["reason"] == LOST + "b" and rows["x"]["group"] is None
    assert rows["y"]["reason"] != LOST + "b"
    assert (run.reasons or {}).get(LOST + "b") == 2
