"""Global control, holdout and variants: realised splits match weights, and never drift."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from scipy import stats

from closedloop.activate.assignment import (
    GLOBAL_SCOPE,
    assign,
    campaign_salt,
    campaign_scope,
    current_salt,
    global_control_salt,
    in_global_control,
    in_holdout,
    pick_variants,
    reshuffle,
    salt_history,
)
from closedloop.activate.campaign import assign_group, run_campaign
from closedloop.activate.templates import check_templates
from closedloop.core.clock import Clock
from closedloop.core.definitions import CampaignDef, GlobalControl, SegmentDef, Variant
from closedloop.core.engine import Engine
from closedloop.segments.audience import Fields, evaluate_segment
from tests.segments.test_audience import set_profiles

IDS = [f"c_{i:07d}" for i in range(40_000)]
ABC = [
    Variant(name="a", weight=0.5, template="A"),
    Variant(name="b", weight=0.3, template="B"),
    Variant(name="c", weight=0.2, template="C"),
]


def _chi2_p(names: list[str], variants: list[Variant]) -> float:
    observed = [names.count(v.name) for v in variants]
    w = np.array([v.weight for v in variants])
    expected = w / w.sum() * len(names)
    return float(stats.chisquare(observed, expected).pvalue)


def test_variant_split_matches_weights_chi_square() -> None:
    names = pick_variants(IDS, "promo", ABC)
    assert _chi2_p(names, ABC) > 0.001
    # The same test rejects a split that does not match: it can fail.
    wrong = [Variant(name=v.name, weight=1 / 3, template="x") for v in ABC]
    assert _chi2_p(names, wrong) < 1e-6


def test_holdout_and_global_control_shares_binomial() -> None:
    for share in (0.05, 0.2, 0.5):
        k = int(in_holdout(IDS, "promo", share).sum())
        assert stats.binomtest(k, len(IDS), share).pvalue > 0.001, share
        g = int(in_global_control(IDS, "global", share).sum())
        assert stats.binomtest(g, len(IDS), share).pvalue > 0.001, share
    assert not in_global_control(IDS, "global", 0.0).any()


def test_hashes_are_independent_across_kinds() -> None:
    """Variants split the treatment group by weight whatever the holdout draw was."""
    groups = assign(IDS, campaign_salt="promo", holdout=0.3, variants=ABC, global_share=0.05)
    treated = [v for g, v in zip(groups.group, groups.variant, strict=True) if g == "treatment"]
    assert None not in treated
    assert _chi2_p(treated, ABC) > 0.001  # type: ignore[arg-type]
    # The holdout's share among people outside global control is still 30%.
    not_gc = [g for g in groups.group if g != "global_control"]
    k = not_gc.count("holdout")
    assert stats.binomtest(k, len(not_gc), 0.3).pvalue > 0.001
    assert all(
        v is None for g, v in zip(groups.group, groups.variant, strict=True) if g != "treatment"
    )


def test_default_campaign_salt_keeps_the_existing_split() -> None:
    ho = in_holdout(IDS[:3000], "winback", 0.3)
    old = [assign_group("winback", c, 0.3) == "holdout" for c in IDS[:3000]]
    assert ho.tolist() == old


_SCRIPT = """
import json, sys
from closedloop.activate.assignment import assign
from closedloop.core.definitions import Variant
ids = [f"p{i}" for i in range(3000)]
v = [Variant(name="x", weight=2, template="x"), Variant(name="y", weight=98, template="y")]
g = assign(ids, campaign_salt="s1", holdout=0.2, variants=v, global_share=0.05)
print(json.dumps([g.group, g.variant]))
"""


def test_assignment_is_stable_across_processes() -> None:
    """Other interpreters (with other hash seeds) draw exactly the same groups."""
    outs = []
    for seed in ("1", "2"):
        r = subprocess.run(
            [sys.executable, "-c", _SCRIPT],
            capture_output=True,
            text=True,
            check=True,
            env={"PYTHONHASHSEED": seed, "PATH": ""},
        )
        outs.append(json.loads(r.stdout))
    assert outs[0] == outs[1]
    v = [Variant(name="x", weight=2, template="x"), Variant(name="y", weight=98, template="y")]
    here = assign(
        [f"p{i}" for i in range(3000)],
        campaign_salt="s1",
        holdout=0.2,
        variants=v,
        global_share=0.05,
    )
    assert outs[0] == [here.group, here.variant]


@settings(max_examples=50, deadline=None)
@given(
    ids=st.lists(st.text(min_size=1, max_size=12), min_size=1, max_size=50, unique=True),
    holdout=st.floats(0.01, 0.5),
    share=st.floats(0.0, 0.2),
)
def test_every_person_has_exactly_one_group_and_order_does_not_matter(
    ids: list[str], holdout: float, share: float
) -> None:
    g = assign(ids, campaign_salt="c", holdout=holdout, variants=ABC, global_share=share)
    rev = assign(ids[::-1], campaign_salt="c", holdout=holdout, variants=ABC, global_share=share)
    mine = dict(zip(ids, zip(g.group, g.variant, strict=True), strict=True))
    theirs = dict(zip(ids[::-1], zip(rev.group, rev.variant, strict=True), strict=True))
    assert mine == theirs
    for group, variant in mine.values():
        assert group in ("global_control", "holdout", "treatment")
        assert (variant is not None) == (group == "treatment")


def test_reshuffle_is_explicit_persistent_and_kept_in_history(tmp_path: Path) -> None:
    url = f"duckdb:///{tmp_path / 'w.duckdb'}"
    with Engine(url) as e:
        assert campaign_salt(e, "promo") == "promo"
        assert global_control_salt(e) == "global"
        before = in_holdout(IDS[:5000], campaign_salt(e, "promo"), 0.2)
        new = reshuffle(e, campaign_scope("promo"), reason="new season")
        assert new != "promo"
    with Engine(url) as e:  # survives a restart
        assert campaign_salt(e, "promo") == new
        assert global_control_salt(e) == "global"  # another scope is untouched
        after = in_holdout(IDS[:5000], campaign_salt(e, "promo"), 0.2)
        assert (before != after).sum() > 500  # a fresh split, not the old one
        reshuffle(e, GLOBAL_SCOPE)
        third = reshuffle(e, campaign_scope("promo"))
        hist = salt_history(e, campaign_scope("promo"))
        assert [h["salt"] for h in hist] == [new, third]
        assert hist[0]["previous_salt"] == "promo" and hist[1]["previous_salt"] == new
        assert hist[0]["reason"] == "new season"
        assert current_salt(e, GLOBAL_SCOPE) != "global"


def _campaign(**kw: object) -> dict[str, object]:
    return {"name": "promo", "audience": "everyone", **kw}


def test_variant_definitions_are_validated() -> None:
    ok = CampaignDef.model_validate(
        _campaign(
            variants=[
                {"name": "a", "weight": 50, "template": "A"},
                {"name": "b", "weight": 50, "template": "B"},
            ]
        )
    )
    assert [v.name for v in ok.variants] == ["a", "b"]
    with pytest.raises(ValidationError, match="must sum to 1"):
        CampaignDef.model_validate(
            _campaign(
                variants=[
                    {"name": "a", "weight": 0.5, "template": "A"},
                    {"name": "b", "weight": 0.3, "template": "B"},
                ]
            )
        )
    with pytest.raises(ValidationError, match="repeated"):
        CampaignDef.model_validate(
            _campaign(
                variants=[
                    {"name": "a", "weight": 0.5, "template": "A"},
                    {"name": "a", "weight": 0.5, "template": "B"},
                ]
            )
        )
    with pytest.raises(ValidationError, match="remove the campaign's"):
        CampaignDef.model_validate(
            _campaign(template="T", variants=[{"name": "a", "weight": 1, "template": "A"}])
        )
    with pytest.raises(ValidationError, match="needs a `template`"):
        CampaignDef.model_validate(_campaign())
    with pytest.raises(ValidationError, match="greater than 0"):
        CampaignDef.model_validate(
            _campaign(variants=[{"name": "a", "weight": 0, "template": "A"}])
        )


def test_variant_templates_are_checked_for_fields() -> None:
    c = CampaignDef.model_validate(
        _campaign(
            variants=[
                {"name": "a", "weight": 25, "subject": "Hi {{ name }}", "template": "{{ nmae }}"},
                {"name": "b", "weight": 25, "template": "{{ offer.code }}"},
                {"name": "c", "weight": 50, "template": "{% if %}"},
            ]
        )
    )
    problems = check_templates(c)
    text = [str(p) for p in problems]
    assert any("[variants.0.template]" in t and "'nmae'" in t for t in text), text
    assert any("[variants.1.template]" in t and "offer" in t for t in text), text
    assert any("[variants.2.template]" in t and "template error" in t for t in text), text
    assert len(problems) == 3


# ---- in a campaign run ---------------------------------------------------------------------
NOW = datetime(2026, 11, 20, 4, 0, tzinfo=UTC)
EVERYONE = SegmentDef.model_validate(
    {"name": "everyone", "where": {"trait": "customer_id", "op": "not_null"}}
)
AB = CampaignDef.model_validate(
    {
        "name": "ab",
        "audience": "everyone",
        "holdout": 0.2,
        "variants": [
            {"name": "short", "weight": 0.7, "subject": "S {{ name }}", "template": "short"},
            {
                "name": "long",
                "weight": 0.3,
                "subject": "L {{ city }}",
                "template": "long {{ name }}",
            },
        ],
        "fallback_template": "a treat for you",  # the long subject reads the profile
    }
)


@pytest.fixture
def audience(engine: Engine) -> Engine:
    rows: list[dict[str, object]] = [
        {
            "customer_id": f"c{i:04d}",
            "name": f"N{i}",
            "city": "Hangzhou",
            "email": f"p{i}@x.cn",
            "consent_marketing": True,
        }
        for i in range(2000)
    ]
    set_profiles(engine, rows)
    evaluate_segment(engine, EVERYONE, Fields(), Clock(NOW))
    return engine


def test_run_sends_each_variant_its_message_and_excludes_global_control(
    audience: Engine, tmp_path: Path
) -> None:
    gc = GlobalControl(share=0.1)
    run = run_campaign(
        audience, AB, outbox_dir=tmp_path, occasion="o1", clock=Clock(NOW), global_control=gc
    )
    ids = [f"c{i:04d}" for i in range(2000)]
    in_gc = dict(zip(ids, in_global_control(ids, "global", 0.1).tolist(), strict=True))
    assert run.outbox is not None
    lines = [json.loads(x) for x in run.outbox.read_text().splitlines()]
    assert len(lines) == run.sent
    for m in lines:
        assert not in_gc[m["customer_id"]]  # nobody of the global control is messaged
        if m["variant"] == "short":
            assert m["subject"].startswith("S N") and m["body"] == "short"
        else:
            assert m["variant"] == "long" and m["subject"] == "L Hangzhou"
            assert m["body"].startswith("long N")
    d = audience.table("deliveries").to_pyarrow().to_pylist()
    gc_rows = [r for r in d if r["group"] == "global_control"]
    assert {r["customer_id"] for r in gc_rows} == {c for c, x in in_gc.items() if x}
    assert all(r["status"] == "held_out" and r["reason"] == "global_control" for r in gc_rows)
    assert stats.binomtest(len(gc_rows), 2000, 0.1).pvalue > 0.001
    # The variant of every sent message is on record, and matches the outbox.
    recorded = {
        r["delivery_id"]: r["variant"]
        for r in audience.table("delivery_variants").to_pyarrow().to_pylist()
    }
    assert recorded == {m["delivery_id"]: m["variant"] for m in lines}
    names = [m["variant"] for m in lines]
    assert _chi2_p(names, list(AB.variants)) > 0.001
    # A re-run (a restart) decides nobody again and records nothing twice.
    again = run_campaign(
        audience, AB, outbox_dir=tmp_path, occasion="o1", clock=Clock(NOW), global_control=gc
    )
    assert again.sent == 0 and again.already_decided == 2000
    assert audience.count("delivery_variants") == len(lines)


def test_dry_run_returns_the_variant_of_each_person(audience: Engine, tmp_path: Path) -> None:
    run = run_campaign(
        audience, AB, outbox_dir=tmp_path, occasion="o1", clock=Clock(NOW), dry_run=True
    )
    assert run.decisions is not None
    rows = run.decisions.to_pylist()
    for r in rows:
        assert (r["variant"] is not None) == (r["group"] == "treatment")
    ids = [r["customer_id"] for r in rows if r["group"] == "treatment"]
    assert [r["variant"] for r in rows if r["group"] == "treatment"] == pick_variants(
        ids, "ab", AB.variants
    )
    assert audience.count("delivery_variants") == 0 and not list(tmp_path.iterdir())
