from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pyarrow as pa

from closedloop.core.clock import Clock
from closedloop.core.definitions import SegmentDef, TagDef
from closedloop.core.engine import Engine
from closedloop.portrait.tables import PROFILES
from closedloop.segments.audience import Fields, check_segment, current_members, evaluate_segment
from closedloop.tags.rules import PROFILE_COLUMNS, build_tags, check_tag

T0 = datetime(2026, 11, 1, tzinfo=UTC)


def set_profiles(engine: Engine, rows: list[dict[str, object]]) -> None:
    full = [{c: r.get(c) for c in PROFILES.columns} for r in rows]
    engine.replace("profiles", pa.Table.from_pylist(full))


SEG = SegmentDef.model_validate(
    {
        "name": "lapsed_buyers",
        "where": {
            "all": [
                {"trait": "orders", "op": ">=", "value": 1},
                {"trait": "lifecycle_stage", "op": "in", "value": ["silent", "churn_risk"]},
            ]
        },
    }
)


def test_entries_and_exits_are_kept_as_stays(engine: Engine) -> None:
    set_profiles(
        engine,
        [
            {"customer_id": "a", "orders": 2, "lifecycle_stage": "silent"},
            {"customer_id": "b", "orders": 1, "lifecycle_stage": "active"},
            {"customer_id": "c", "orders": 0, "lifecycle_stage": "prospect"},
        ],
    )
    r1 = evaluate_segment(engine, SEG, Fields(), Clock(T0))
    assert (r1.size, r1.entered, r1.exited) == (1, 1, 0)
    # b lapses, a comes back.
    set_profiles(
        engine,
        [
            {"customer_id": "a", "orders": 3, "lifecycle_stage": "active"},
            {"customer_id": "b", "orders": 1, "lifecycle_stage": "churn_risk"},
        ],
    )
    t1 = T0 + timedelta(days=1)
    r2 = evaluate_segment(engine, SEG, Fields(), Clock(t1))
    assert (r2.size, r2.entered, r2.exited) == (1, 1, 1)
    assert current_members(engine, "lapsed_buyers").customer_id.to_pyarrow().to_pylist() == ["b"]
    stays = engine.table("segment_membership").to_pandas().set_index("customer_id")
    assert stays.loc["a", "entered_at"] == T0 and stays.loc["a", "exited_at"] == t1
    # Nothing changed: nothing is rewritten.
    r3 = evaluate_segment(engine, SEG, Fields(), Clock(t1 + timedelta(days=1)))
    assert (r3.entered, r3.exited) == (0, 0)
    assert engine.count("segment_membership") == 2


def test_segment_over_a_tag(engine: Engine) -> None:
    set_profiles(
        engine,
        [
            {"customer_id": "a", "revenue": 5000.0},
            {"customer_id": "b", "revenue": 50.0},
            {"customer_id": "c", "revenue": None},
        ],
    )
    tag = TagDef.model_validate(
        {
            "name": "value_band",
            "rules": [
                {"value": "high", "when": {"trait": "revenue", "op": ">=", "value": 1000}},
                {"value": "low", "when": {"trait": "revenue", "op": "gt", "value": 0}},
            ],
        }
    )
    assert check_tag(tag, PROFILE_COLUMNS) == []
    assert build_tags(engine, {"value_band": tag}, Clock(T0)) == {"value_band": 2}
    seg = SegmentDef.model_validate(
        {"name": "vip", "where": {"trait": "value_band", "op": "eq", "value": "high"}}
    )
    assert check_segment(seg, Fields(tags=("value_band",))) == []
    assert evaluate_segment(engine, seg, Fields(tags=("value_band",)), Clock(T0)).size == 1


def test_check_points_at_the_offending_clause() -> None:
    seg = SegmentDef.model_validate(
        {
            "name": "bad",
            "where": {
                "all": [
                    {"trait": "orders", "op": "gt", "value": "many"},
                    {"trait": "nope", "op": "is_null"},
                ]
            },
        }
    )
    problems = check_segment(seg, Fields())
    assert [p.key for p in problems] == ["where.all.0.value", "where.all.1.trait"]
    assert "int64" in problems[0].message and "unknown field 'nope'" in problems[1].message


def test_tag_with_unknown_field_is_reported() -> None:
    tag = TagDef.model_validate(
        {"name": "t", "rules": [{"value": "x", "when": {"trait": "nope", "op": "is_null"}}]}
    )
    assert [p.key for p in check_tag(tag, PROFILE_COLUMNS)] == ["rules.0.when"]
