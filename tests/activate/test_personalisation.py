"""Recommended products in templates, and the non-personalised choice honoured.

A person who refused personalisation (consent purpose ``personalisation`` false) may still
get marketing they consented to, but never content drawn from their profile: their render
context holds no personal field and no recommendations, and the campaign's fallback (or the
template's own defaults) is what they read.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from closedloop.activate.campaign import run_campaign
from closedloop.activate.templates import check_templates
from closedloop.collect.tables import EVENTS
from closedloop.core.clock import Clock
from closedloop.core.definitions import CampaignDef, SegmentDef
from closedloop.core.engine import Engine
from closedloop.predict.recommend import RECOMMENDATIONS
from closedloop.segments.audience import Fields, evaluate_segment
from closedloop.tags.tables import TAG_VALUES
from tests.conftest import event_rows
from tests.segments.test_audience import set_profiles

NOW = datetime(2026, 11, 20, 4, 0, tzinfo=UTC)
EVERYONE = SegmentDef.model_validate(
    {"name": "everyone", "where": {"trait": "customer_id", "op": "not_null"}}
)


def campaign(**kw: Any) -> CampaignDef:
    base: dict[str, Any] = {"name": "c", "audience": "everyone", "holdout": 0.01}
    return CampaignDef.model_validate(base | kw)


def problems(c: CampaignDef) -> list[str]:
    return [str(p) for p in check_templates(c)]


# ---- validation ---------------------------------------------------------------------------
def test_a_bare_personal_field_needs_a_fallback() -> None:
    bare = campaign(template="Because you like {{ top_category }}")
    (p,) = problems(bare)
    assert "[template]" in p and "prints top_category" in p and "fallback_template" in p
    assert problems(campaign(template="Because you like {{ top_category or 'tea' }}")) == []
    assert problems(campaign(template="{% if top_category %}{{ name }}{% endif %}")) == []
    assert problems(campaign(template="{{ top_category|default('tea') }}, {{ name }}")) == []
    ok = campaign(template="{{ top_category }}", fallback_template="Our teas, {{ name }}")
    assert problems(ok) == []  # a name addresses the person; it does not profile them


def test_the_fallback_reads_no_profile_data_and_recommended_fields_are_checked() -> None:
    c = campaign(template="{{ city }}", fallback_template="near {{ city or 'you' }}")
    (p,) = problems(c)
    assert "[fallback_template]" in p and "must not read profile data: city" in p
    loop = "{% for r in recommended %}{{ r.name }} {{ r.price }} {{ r.colour }}{% endfor %}"
    (p,) = problems(campaign(template=loop))
    assert "unknown product field 'colour' of `recommended`" in p
    assert problems(campaign(template="{{ recommended[0].name }}")) != []  # bare: needs one
    good = campaign(template="{{ recommended[0].name }}", fallback_template="Our teas")
    assert problems(good) == []


def test_tags_are_read_by_name_and_unknown_tags_fail_validation() -> None:
    c = campaign(template="For a {{ tags.style or 'tea lover' }}: {{ tags['tier_band'] or '' }}")
    assert check_templates(c, ["style", "tier_band"]) == []
    (p,) = [str(x) for x in check_templates(c, ["style"])]
    assert "[template]" in p and "unknown tag 'tier_band'" in p and "style" in p
    bare = [str(x) for x in check_templates(campaign(template="{{ tags.style }}"), ["style"])]
    assert len(bare) == 1 and "prints tags" in bare[0]  # a tag profiles the person
    tested = campaign(template="{% if tags.style == 'oolong' %}Oolong for you{% endif %}")
    assert check_templates(tested, ["style"]) == []  # a test never prints the tag
    dyn = campaign(template="{% for k in ['style'] %}{{ tags[k] or '' }}{% endfor %}")
    assert any("computed name" in str(x) for x in check_templates(dyn, ["style"]))


# ---- in a run -----------------------------------------------------------------------------
SENTINEL = {"top_category": "CAT-SECRET", "city": "CITY-SECRET"}
PRODUCT = "PRODUCT-SECRET"
TAG = "TAG-SECRET"


def setup(engine: Engine, refused: dict[str, bool | None], n: int) -> None:
    rows: list[dict[str, object]] = [
        {
            "customer_id": f"c{i:03d}",
            "name": f"N{i}",
            "email": f"p{i}@x.cn",
            "consent_marketing": True,
            **SENTINEL,
        }
        for i in range(n)
    ]
    set_profiles(engine, rows)
    evaluate_segment(engine, EVERYONE, Fields(), Clock(NOW))
    said = [(c, v) for c, v in refused.items() if v is not None]
    messages = [
        {
            "message_id": f"consent{i}",
            "type": "identify",
            "user_id": c,
            "timestamp": NOW,
            "context": {
                "consent": {"categoryPreferences": {"marketing": True, "personalisation": v}}
            },
        }
        for i, (c, v) in enumerate(said)
    ]
    if messages:
        schema = EVENTS.schema.to_pyarrow()
        engine.append("events", event_rows(messages).select(schema.names).cast(schema))
        ec = [{"message_id": m["message_id"], "customer_id": m["user_id"]} for m in messages]
        engine.append("event_customers", pa.Table.from_pylist(ec))
    recs = [
        {
            "customer_id": f"c{i:03d}",
            "rank": r,
            "product_id": f"p{r}",
            "name": f"{PRODUCT}-{r}",
            "category": "tea",
            "price": 9.9,
            "score": 1.0 / r,
            "reason": "bought_together",
            "computed_at": NOW,
        }
        for i in range(n)
        for r in (1, 2, 3, 4)
    ]
    engine.replace(
        "recommendations", pa.Table.from_pylist(recs, RECOMMENDATIONS.schema.to_pyarrow())
    )
    tags = [  # every other person has a style tag
        {"customer_id": f"c{i:03d}", "tag": "style", "value": f"{TAG}-{i}", "computed_at": NOW}
        for i in range(0, n, 2)
    ]
    engine.replace("tag_values", pa.Table.from_pylist(tags, TAG_VALUES.schema.to_pyarrow()))


TEMPLATES = [
    {"template": "Hi {{ name }}, {{ top_category or 'our teas' }} in {{ city or 'town' }}"},
    {
        "subject": "For {{ city }}",
        "template": "{% for r in recommended %}{{ r.name }};{% endfor %}{{ top_category }}",
        "fallback_subject": "For you",
        "fallback_template": "Hello {{ name }}, see our best sellers",
    },
    {"template": "{% if recommended %}{{ recommended[0].name }}{% else %}new teas{% endif %}"},
    {"template": "For a {{ tags.style or 'tea lover' }}, {{ name }}"},
]


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    choices=st.lists(st.sampled_from([None, True, False]), min_size=12, max_size=12),
    which=st.integers(0, len(TEMPLATES) - 1),
)
def test_no_personalised_content_ever_reaches_a_person_who_refused_it(
    tmp_path_factory: pytest.TempPathFactory, choices: list[bool | None], which: int
) -> None:
    refused = {f"c{i:03d}": v for i, v in enumerate(choices)}
    with Engine("duckdb://") as engine:
        setup(engine, refused, len(choices))
        c = campaign(**TEMPLATES[which])
        assert check_templates(c) == []
        run = run_campaign(
            engine, c, outbox_dir=tmp_path_factory.mktemp("o"), occasion="o", clock=Clock(NOW)
        )
    assert run.outbox is not None
    for m in map(json.loads, run.outbox.read_text().splitlines()):
        text = m["subject"] + m["body"]
        personal = any(s in text for s in [*SENTINEL.values(), PRODUCT, TAG])
        if refused[m["customer_id"]] is False:  # refused: never anything of the profile
            assert not m["personalised"] and not personal, m
            assert "None" not in text
        elif which == len(TEMPLATES) - 1 and int(m["customer_id"][1:]) % 2:  # has no tag
            assert m["personalised"] and TAG not in text and "tea lover" in text, m
        else:  # never stated or granted: the personalised message
            assert m["personalised"] and personal, m
            if which == len(TEMPLATES) - 1:  # each person their own tag's value
                assert f"{TAG}-{int(m['customer_id'][1:])}," in text, m
    assert run.sent > 0


def test_recommended_products_are_rendered_in_rank_order(engine: Engine, tmp_path: Path) -> None:
    setup(engine, {}, 3)
    c = campaign(
        template="{% for r in recommended %}{{ r.rank }}.{{ r.name }} {% endfor %}",
        fallback_template="our best sellers",
        recommend=2,
    )
    run = run_campaign(engine, c, outbox_dir=tmp_path, occasion="o", clock=Clock(NOW))
    assert run.outbox is not None
    bodies = {
        m["customer_id"]: m["body"] for m in map(json.loads, run.outbox.read_text().splitlines())
    }
    assert bodies and all(b == f"1.{PRODUCT}-1 2.{PRODUCT}-2 " for b in bodies.values())


def test_a_declared_personalisation_trait_is_honoured_too(engine: Engine, tmp_path: Path) -> None:
    from closedloop.activate.policy import personalisation_refused
    from closedloop.portrait.tables import COMPUTED_TRAITS

    setup(engine, {"c000": False}, 4)  # c000 refused by consent
    values = [("c001", "No", None), ("c002", "yes", None), ("c003", None, 0.0)]
    rows = [
        {"customer_id": c, "trait": "personalisation", "number_value": n, "text_value": t}
        | {"computed_at": NOW}
        for c, t, n in values
    ]
    engine.replace(
        "computed_traits", pa.Table.from_pylist(rows, COMPUTED_TRAITS.schema.to_pyarrow())
    )
    assert personalisation_refused(engine) == {"c000", "c001", "c003"}
    assert personalisation_refused(engine, ["c001", "c002"]) == {"c001"}
    c = campaign(template="{{ top_category or 'teas' }}")
    run = run_campaign(engine, c, outbox_dir=tmp_path, occasion="o", clock=Clock(NOW))
    assert run.outbox is not None
    got = {
        m["customer_id"]: m["body"] for m in map(json.loads, run.outbox.read_text().splitlines())
    }
    assert all((b == "teas") == (cid in {"c000", "c001", "c003"}) for cid, b in got.items())


def test_each_person_gets_their_own_tags(engine: Engine, tmp_path: Path) -> None:
    setup(engine, {"c002": False}, 4)  # c002 refused personalisation
    c = campaign(template="For a {{ tags.style or 'tea lover' }}, {{ name }}")
    run = run_campaign(engine, c, outbox_dir=tmp_path, occasion="o", clock=Clock(NOW))
    assert run.outbox is not None
    bodies = {
        m["customer_id"]: m["body"] for m in map(json.loads, run.outbox.read_text().splitlines())
    }
    expected = {
        "c000": f"For a {TAG}-0, N0",
        "c001": "For a tea lover, N1",  # no style tag
        "c002": "For a tea lover, N2",  # has one, but refused personalisation
        "c003": "For a tea lover, N3",
    }
    assert {k: v for k, v in bodies.items() if k in expected} == {
        k: v for k, v in expected.items() if k in bodies
    }
    assert "c000" in bodies and "c002" in bodies  # a 1% holdout of four people keeps them
