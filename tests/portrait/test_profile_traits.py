"""Profile traits: identify fields merged per customer by a declared strategy."""

from __future__ import annotations

from collections import Counter
from datetime import timedelta
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from closedloop.collect.tables import EVENTS
from closedloop.core.definitions.traits import TraitDef
from closedloop.core.engine import Engine
from closedloop.portrait.traits import build_traits, check_trait, trait_dtype
from tests.conftest import event_rows
from tests.portrait.test_build import NOW

DAY = timedelta(days=1)


def trait(**kw: Any) -> TraitDef:
    return TraitDef.model_validate({"kind": "profile", **kw})


def typed(t: pa.Table) -> pa.Table:
    """Event rows with the declared types (PostgreSQL refuses null-typed columns)."""
    return t.cast(EVENTS.schema.to_pyarrow())


def load(engine: Engine, stated: list[tuple[str, str, int, Any]]) -> None:
    """(customer, source, days ago, value) identify calls, attributed without identity."""
    msgs = [
        {
            "message_id": f"m{i}",
            "type": "identify",
            "user_id": c,
            "timestamp": NOW - d * DAY,
            "traits": {"tier": v},
            "source": src,
        }
        for i, (c, src, d, v) in enumerate(stated)
    ]
    for m in msgs:
        engine.append("events", typed(event_rows([m], source=str(m["source"]))))
    engine.append(
        "event_customers",
        pa.table(
            {"message_id": [m["message_id"] for m in msgs], "customer_id": [s[0] for s in stated]}
        ),
    )
    ids = sorted({s[0] for s in stated})
    engine.append(
        "customers",
        pa.table(
            {
                "customer_id": ids,
                "created_at": pa.array([NOW] * len(ids), pa.timestamp("us", tz="UTC")),
                "identifiers": [1] * len(ids),
                "updated_at": pa.array([NOW] * len(ids), pa.timestamp("us", tz="UTC")),
            }
        ),
    )


def values(engine: Engine, traits: dict[str, TraitDef]) -> dict[tuple[str, str], Any]:
    from closedloop.core.clock import Clock

    build_traits(engine, traits, Clock(NOW))
    rows = engine.table("computed_traits").to_pyarrow().to_pylist()
    return {
        (r["customer_id"], r["trait"]): r["number_value"]
        if r["number_value"] is not None
        else r["text_value"]
        for r in rows
    }


STRATEGIES = {
    "latest": trait(name="latest", field="tier", strategy="latest"),
    "first": trait(name="first", field="tier", strategy="first"),
    "biggest": trait(name="biggest", field="tier", strategy="max"),
    "top": trait(name="top", field="tier", strategy="most_frequent"),
    "crm_first": trait(
        name="crm_first", field="tier", strategy="source_priority", sources=["crm", "pos"]
    ),
    "points": trait(name="points", field="tier", strategy="max", type="number"),
}


def test_each_strategy(engine: Engine) -> None:
    load(
        engine,
        [
            ("A", "web", 1, "silver"),  # latest, from a web form
            ("A", "crm", 5, "gold"),  # the CRM's word
            ("A", "web", 9, "silver"),
            ("A", "pos", 20, "bronze"),  # first
            ("A", "web", 3, "  "),  # blank: never chosen
            ("B", "web", 2, 900),  # numbers: 900 < 1200 as numbers, > "1200" as text
            ("B", "web", 4, 1200),
            ("B", "app", 6, "n/a"),  # not a number: left out of `type: number`
            ("C", "web", 2, "x"),  # no CRM or POS value: unlisted sources still count
        ],
    )
    v = values(engine, STRATEGIES)
    assert v["A", "latest"] == "silver" and v["A", "first"] == "bronze"
    assert v["A", "biggest"] == "silver" and v["A", "top"] == "silver"
    assert v["A", "crm_first"] == "gold"
    assert v["B", "points"] == 1200.0 and v["B", "biggest"] == "n/a"
    assert v["C", "crm_first"] == "x" and ("C", "points") not in v
    assert trait_dtype(STRATEGIES["points"]) == "float64"


def test_ties_are_deterministic(engine: Engine) -> None:
    # Same time, same source, same count: the smallest value wins every strategy.
    load(engine, [("A", "crm", 1, "silver"), ("A", "crm", 1, "gold"), ("A", "crm", 1, "zinc")])
    v = values(engine, STRATEGIES)
    assert {v["A", n] for n in ("latest", "first", "top", "crm_first")} == {"gold"}


def test_definition_errors() -> None:
    with pytest.raises(ValidationError, match="needs a `field` and a `strategy`"):
        trait(name="x", field="tier")
    with pytest.raises(ValidationError, match="`sources` is required"):
        trait(name="x", field="tier", strategy="source_priority")
    with pytest.raises(ValidationError, match="`sources` is required"):
        trait(name="x", field="tier", strategy="latest", sources=["crm"])
    with pytest.raises(ValidationError, match="do not apply"):
        trait(name="x", field="tier", strategy="latest", window_days=3)
    with pytest.raises(ValidationError, match="only apply to `kind: profile`"):
        TraitDef.model_validate({"name": "x", "aggregation": "count", "strategy": "latest"})
    with pytest.raises(ValidationError, match="strategy"):
        trait(name="x", field="tier", strategy="newest")
    assert check_trait(trait(name="tier", field="tier", strategy="latest"))[0].key == "name"
    # Existing computed traits stay valid without `kind`.
    assert TraitDef.model_validate({"name": "x", "aggregation": "count"}).kind == "computed"


def reference(t: TraitDef, rows: list[tuple[str, int, str]]) -> str | None:
    """The documented rule in plain Python: rows are (source, days ago, value)."""
    rows = [r for r in rows if r[2].strip()]
    if not rows:
        return None
    if t.strategy == "latest":
        return min(rows, key=lambda r: (r[1], r[2]))[2]
    if t.strategy == "first":
        return min(rows, key=lambda r: (-r[1], r[2]))[2]
    if t.strategy == "max":
        return max(r[2] for r in rows)
    if t.strategy == "most_frequent":
        counts = Counter(r[2] for r in rows)
        last = {v: min(r[1] for r in rows if r[2] == v) for v in counts}
        return min(counts, key=lambda v: (-counts[v], last[v], v))
    assert t.sources is not None
    order = {s: i for i, s in enumerate(t.sources)}
    return min(rows, key=lambda r: (order.get(r[0], len(order)), r[1], r[2]))[2]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["A", "B"]),
            st.sampled_from(["crm", "pos", "web"]),
            st.integers(0, 4),
            st.sampled_from(["gold", "silver", "bronze", " "]),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_strategies_match_the_documented_rule(stated: list[tuple[str, str, int, str]]) -> None:
    traits = {n: t for n, t in STRATEGIES.items() if n != "points"}
    with Engine("duckdb://") as engine:
        load(engine, stated)
        got = values(engine, traits)
    for c in ("A", "B"):
        rows = [(s, d, v) for cc, s, d, v in stated if cc == c]
        for name, t in traits.items():
            assert got.get((c, name)) == reference(t, rows), (c, name)


def test_traits_yaml_accepts_profile_kind(tmp_path: Any) -> None:
    from closedloop.core.yamlfile import load_yaml

    p = tmp_path / "tier.yaml"
    p.write_text(
        "name: tier_merged\nkind: profile\nfield: tier\nstrategy: source_priority\n"
        "sources: [crm, web]\n"
    )
    data, _ = load_yaml(p)
    assert TraitDef.model_validate(data).sources == ["crm", "web"]
