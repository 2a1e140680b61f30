"""Per-variant measurement, the sample-ratio check across arms, and the A/B winner.

Campaigns with variants are run for real (``run_campaign`` on DuckDB, variants drawn by the
hash), conversions are drawn with known per-variant effects from a fixed seed, and
``measure_variants`` must find exactly what was drawn — and the right winner, or none.
The statistics behind the verdict are simulated (A/A/A: no winner more often than 5%) and
checked with hypothesis.
"""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from closedloop.activate.campaign import run_campaign
from closedloop.core.clock import Clock
from closedloop.core.definitions import CampaignDef, SegmentDef
from closedloop.core.engine import Engine
from closedloop.measure.campaign import measure_campaign
from closedloop.measure.stats import holm, lift, sample_ratio_arms_p
from closedloop.measure.variants import (
    HOLDOUT,
    Arm,
    choose_winner,
    measure_variants,
    sample_ratio,
    variant_table,
)
from closedloop.segments.audience import Fields, evaluate_segment
from tests.conftest import add_events
from tests.segments.test_audience import set_profiles

T1 = datetime(2026, 11, 2, 12, tzinfo=UTC)
EVERYONE = SegmentDef.model_validate(
    {"name": "everyone", "where": {"trait": "customer_id", "op": "not_null"}}
)


def ab(weights: dict[str, float], holdout: float = 0.2) -> CampaignDef:
    return CampaignDef.model_validate(
        {
            "name": "ab",
            "audience": "everyone",
            "channel": "email",
            "holdout": holdout,
            "variants": [
                {
                    "name": n,
                    "weight": w / sum(weights.values()),
                    "subject": f"S {n}",
                    "template": f"Hello from {n}",
                }
                for n, w in weights.items()
            ],
            "goal": {"event": "Order Completed", "window_days": 7},
        }
    )


def simulate(
    engine: Engine,
    tmp_path: Path,
    campaign: CampaignDef,
    effects: dict[str, float],
    *,
    n: int,
    base: float = 0.1,
    seed: int = 1,
) -> dict[str, list[int]]:
    """Run the campaign on ``n`` people and draw conversions: the holdout at ``base``, each
    variant's people at ``base + effects[variant]``. Returns the drawn counts per arm:
    [assigned, messaged, conversions, revenue in cents]."""
    set_profiles(
        engine,
        [
            {
                "customer_id": f"c{i:06d}",
                "email": f"c{i}@x.cn",
                "consent_marketing": True,
                "timezone": "UTC",
            }
            for i in range(n)
        ],
    )
    evaluate_segment(engine, EVERYONE, Fields(), Clock(T1 - timedelta(hours=1)))
    run_campaign(engine, campaign, outbox_dir=tmp_path, occasion="o1", clock=Clock(T1))
    d = engine.table("deliveries")
    v = engine.table("delivery_variants").select(v_id="delivery_id", variant="variant")
    rows = (
        d.left_join(v, d.delivery_id == v.v_id)
        .select("customer_id", "group", "status", "variant")
        .order_by("customer_id")
        .to_pyarrow()
        .to_pylist()
    )
    rng = np.random.default_rng(seed)
    drawn: dict[str, list[int]] = {}
    msgs: list[dict[str, Any]] = []
    for r in rows:
        arm = HOLDOUT if r["group"] == HOLDOUT else str(r["variant"])
        c = drawn.setdefault(arm, [0, 0, 0, 0])
        c[0] += 1
        c[1] += r["status"] == "sent"
        if rng.random() < base + (effects.get(arm, 0.0) if arm != HOLDOUT else 0.0):
            cents = int(rng.integers(1000, 20000))
            c[2] += 1
            c[3] += cents
            msgs.append(
                {
                    "message_id": f"o{r['customer_id']}",
                    "user_id": r["customer_id"],
                    "event": "Order Completed",
                    "revenue": cents / 100,
                    "timestamp": T1 + timedelta(days=2),
                }
            )
    # A conversion after the window and one of another event: neither may count.
    msgs.append(
        {
            "message_id": "late",
            "user_id": rows[0]["customer_id"],
            "event": "Order Completed",
            "revenue": 5.0,
            "timestamp": T1 + timedelta(days=8),
        }
    )
    msgs.append({"message_id": "view", "user_id": rows[1]["customer_id"], "event": "Viewed"})
    add_events(engine, msgs)
    engine.append(
        "event_customers",
        pa.table(
            {
                "message_id": [m["message_id"] for m in msgs],
                "customer_id": [m["user_id"] for m in msgs],
            }
        ),
    )
    return drawn


def test_known_effects_give_the_right_winner_and_exact_counts(
    engine: Engine, tmp_path: Path
) -> None:
    c = ab({"a": 1, "b": 1, "c": 1})
    drawn = simulate(engine, tmp_path, c, {"a": 0.0, "b": 0.05, "c": 0.01}, n=20_000, seed=3)
    o = measure_variants(engine, c, "o1")
    assert o.has_variants and [r.arm.name for r in o.variants] == ["a", "b", "c"]
    for arm in [o.holdout, *(r.arm for r in o.variants)]:
        want = drawn[arm.name]
        assert [arm.assigned, arm.reached, arm.conversions] == want[:3], arm.name
        assert arm.revenue == pytest.approx(want[3] / 100)
    assert o.holdout.reached == 0
    # The holdout and the variants together are measure_campaign's intent-to-treat groups.
    whole = measure_campaign(engine, c, "o1", Clock(T1 + timedelta(days=7)))
    assert whole.held_out == o.holdout.assigned
    assert whole.treated == sum(r.arm.assigned for r in o.variants)
    assert whole.treated_conversions == sum(r.arm.conversions for r in o.variants)
    # Each variant against the holdout: near the true effect (within ~4.5 standard errors:
    # the three share one holdout, so their intervals miss together; coverage is simulated
    # below, on the statistics alone).
    for r, true in zip(o.variants, [0.0, 0.05, 0.01], strict=True):
        assert r.lift is not None and abs(r.lift.absolute - true) < 0.03
        assert r.lift.absolute_low <= r.lift.absolute <= r.lift.absolute_high
        assert r.revenue is not None and r.revenue.low <= r.revenue.difference <= r.revenue.high
    assert o.winner.name == "b", o.winner.reason
    assert o.winner.line().startswith("winner: b (b vs c: +")
    assert not o.sample_ratio.flagged and o.sample_ratio.p_value is not None
    assert o.sample_ratio.arms == ["holdout", "a", "b", "c"]
    header, rows = variant_table(o)
    assert len(header) == len(rows[0]) and [r[0] for r in rows] == ["holdout", "a", "b", "c"]


def test_equal_variants_give_no_winner_and_say_why(engine: Engine, tmp_path: Path) -> None:
    c = ab({"warm": 60, "plain": 40})
    simulate(engine, tmp_path, c, {"warm": 0.03, "plain": 0.03}, n=6000, seed=5)
    o = measure_variants(engine, c, "o1")
    assert o.winner.name is None
    line = o.winner.line()
    assert line.startswith("no winner yet: ") and " pp [" in line and "Holm" in line
    assert ("warm vs plain" in line) or ("plain vs warm" in line)
    assert o.sample_ratio.expected_shares == pytest.approx([0.2, 0.48, 0.32])


def test_best_variant_must_beat_the_holdout(engine: Engine, tmp_path: Path) -> None:
    # b is far better than a, but only because a *hurts*: b is no better than the holdout.
    c = ab({"a": 1, "b": 1}, holdout=0.3)
    simulate(engine, tmp_path, c, {"a": -0.07, "b": 0.0}, n=12_000, seed=8)
    o = measure_variants(engine, c, "o1")
    assert o.winner.name is None
    assert "does not beat the holdout" in o.winner.reason
    assert o.winner.comparisons and o.winner.comparisons[0].significant


def test_a_lost_share_of_one_variant_is_a_sample_ratio_mismatch(
    engine: Engine, tmp_path: Path
) -> None:
    c = ab({"a": 1, "b": 1})
    simulate(engine, tmp_path, c, {}, n=8000, seed=2)
    assert not measure_variants(engine, c, "o1").sample_ratio.flagged
    # A bug loses a fifth of variant b's delivery log: the split no longer matches the design.
    d, v = engine.table("deliveries"), engine.table("delivery_variants")
    lost = v.filter((v.variant == "b") & v.customer_id.re_search("[05]$"))
    engine.replace("deliveries", d.filter(~d.delivery_id.isin(lost.delivery_id)))
    o = measure_variants(engine, c, "o1")
    assert o.sample_ratio.flagged and o.sample_ratio.p_value is not None
    assert o.sample_ratio.line().startswith("SAMPLE-RATIO MISMATCH")


def test_a_campaign_without_variants_has_one_arm(engine: Engine, tmp_path: Path) -> None:
    c = CampaignDef.model_validate(
        {"name": "one", "audience": "everyone", "holdout": 0.25, "template": "Hi"}
    )
    simulate(engine, tmp_path, c, {}, n=2000, seed=4)
    o = measure_variants(engine, c, "o1")
    whole = measure_campaign(engine, c, "o1", Clock(T1 + timedelta(days=7)))
    assert not o.has_variants and [r.arm.name for r in o.variants] == ["treatment"]
    assert o.variants[0].lift == whole.lift
    assert o.winner.name is None and "no variants" in o.winner.reason
    assert o.sample_ratio.p_value == pytest.approx(whole.sample_ratio_p)


# ---- the statistics, simulated and property-tested ------------------------------------------
def declared_winner_rate(
    k: int, effects: list[float], rng: np.random.Generator, n: int = 10_000
) -> tuple[float, float]:
    """Share of ``k`` simulated campaigns with a declared winner, and with the right one (the
    variant of the largest effect, index 0 of the largest)."""
    base, share = 0.05, 0.2
    weights = np.full(len(effects), (1 - share) / len(effects))
    any_winner = right = 0
    for _ in range(k):
        counts = rng.multinomial(n, [share, *weights])
        hx = int(rng.binomial(counts[0], base))
        arms = [
            (f"v{i}", int(rng.binomial(m, base + e)), int(m))
            for i, (m, e) in enumerate(zip(counts[1:], effects, strict=True))
        ]
        w = choose_winner((hx, int(counts[0])), arms)
        any_winner += w.name is not None
        right += w.name == f"v{int(np.argmax(effects))}"
    return any_winner / k, right / k


def test_aaa_campaigns_declare_a_winner_at_most_5_percent_of_the_time() -> None:
    k = 600
    rate, _ = declared_winner_rate(k, [0.0, 0.0, 0.0], np.random.default_rng(11))
    assert rate <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / k)
    # Two variants alone: the pairwise test at 5% and the holdout gate together.
    rate2, _ = declared_winner_rate(k, [0.0, 0.0], np.random.default_rng(12))
    assert rate2 <= 0.05 + 2 * math.sqrt(0.05 * 0.95 / k)


def test_a_real_effect_is_found_and_named() -> None:
    # +3 points on a 5% base with ~2,700 people per arm: the right winner most of the time,
    # and never a wrong one that often.
    _, right = declared_winner_rate(300, [0.03, 0.0, 0.0], np.random.default_rng(13))
    assert right > 0.8


COUNT = st.integers(1, 400).flatmap(lambda n: st.tuples(st.integers(0, n), st.just(n)))


@given(COUNT, COUNT)
def test_lift_is_antisymmetric_under_swapping_arms(a: tuple[int, int], b: tuple[int, int]) -> None:
    ab_, ba = lift(a[0], a[1], b[0], b[1]), lift(b[0], b[1], a[0], a[1])
    assert ab_.absolute == pytest.approx(-ba.absolute, abs=1e-12)
    assert ab_.absolute_low == pytest.approx(-ba.absolute_high, abs=1e-12)
    assert ab_.absolute_high == pytest.approx(-ba.absolute_low, abs=1e-12)
    assert ab_.p_value == pytest.approx(ba.p_value)
    assert 0.0 <= ab_.p_value <= 1.0
    assert ab_.absolute_low - 1e-12 <= ab_.absolute <= ab_.absolute_high + 1e-12


@given(st.lists(st.floats(0, 1, allow_nan=False), min_size=1, max_size=30))
def test_holm_never_rejects_more_than_unadjusted(ps: list[float]) -> None:
    adj = holm(ps)
    assert all(0.0 <= q <= 1.0 for q in adj)
    assert all(q >= p for p, q in zip(ps, adj, strict=True))
    for alpha in (0.01, 0.05, 0.1):
        assert sum(q < alpha for q in adj) <= sum(p < alpha for p in ps)
        assert sum(q < alpha for q in adj) >= sum(p * len(ps) < alpha for p in ps)  # ≥ Bonferroni
    order = sorted(range(len(ps)), key=lambda i: ps[i])
    assert all(adj[i] <= adj[j] for i, j in pairwise(order))


def test_holm_matches_a_worked_example() -> None:
    # Holm (1979) step-down: sorted 0.005, 0.01, 0.03, 0.04 times 4, 3, 2, 1, made monotone.
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])


ARMS = st.lists(
    st.integers(50, 3000).flatmap(lambda n: st.tuples(st.integers(0, n // 4), st.just(n))),
    min_size=2,
    max_size=5,
)


@settings(max_examples=60, deadline=None)
@given(ARMS, COUNT, st.randoms(use_true_random=False))
def test_the_verdict_does_not_depend_on_the_order_of_variants(
    arms: list[tuple[int, int]], hold: tuple[int, int], rnd: Any
) -> None:
    named = [(f"v{i}", x, n) for i, (x, n) in enumerate(arms)]
    shuffled = list(named)
    rnd.shuffle(shuffled)
    w1, w2 = choose_winner(hold, named), choose_winner(hold, shuffled)
    assert w1.name == w2.name and w1.reason == w2.reason
    assert len(w1.comparisons) == len(arms) * (len(arms) - 1) // 2
    if w1.name is not None:  # a named winner beat everyone after adjustment, and the holdout
        mine = [c for c in w1.comparisons if c.better == w1.name]
        assert len(mine) == len(arms) - 1 and all(c.p_adjusted < 0.05 for c in mine)
        assert w1.vs_holdout is not None and w1.vs_holdout.p_value < 0.05
        assert w1.vs_holdout.absolute > 0
    for c in w1.comparisons:
        assert c.p_adjusted >= c.lift.p_value and 0 <= c.p_adjusted <= 1


@given(st.lists(st.integers(0, 10_000), min_size=2, max_size=6), st.data())
def test_sample_ratio_p_is_a_probability(counts: list[int], data: st.DataObject) -> None:
    shares = data.draw(
        st.lists(st.floats(0.01, 10), min_size=len(counts), max_size=len(counts)), "shares"
    )
    p = sample_ratio_arms_p(counts, shares)
    assert 0.0 <= p <= 1.0
    # The counts the design expects exactly are never a mismatch.
    total = 1_000_000
    exact = [round(total * s / sum(shares)) for s in shares]
    assert sample_ratio_arms_p(exact, shares) > 0.9  # rounded to whole people


def test_sample_ratio_flags_a_skewed_split_not_a_fair_one() -> None:
    c = ab({"a": 50, "b": 30, "c": 20})
    rng = np.random.default_rng(21)
    shares = [0.2, 0.4, 0.24, 0.16]
    flagged = 0
    for _ in range(200):  # fair draws: flagged about 0.1% of the time
        counts = rng.multinomial(10_000, shares)
        arms = [Arm(n, int(m), 0, 0, 0, 0.0, 0.0) for n, m in zip("abc", counts[1:], strict=True)]
        hold = Arm(HOLDOUT, int(counts[0]), 0, 0, 0, 0.0, 0.0)
        flagged += sample_ratio(c, hold, arms).flagged
    assert flagged <= 2
    skewed = [Arm("a", 4000, 0, 0, 0, 0.0, 0.0), Arm("b", 2100, 0, 0, 0, 0.0, 0.0)]
    skewed.append(Arm("c", 1600, 0, 0, 0, 0.0, 0.0))
    s = sample_ratio(c, Arm(HOLDOUT, 2000, 0, 0, 0, 0.0, 0.0), skewed)
    assert s.flagged and "b 2,100 (24.0% expected)" in s.line()
    stray = sample_ratio(
        c, Arm(HOLDOUT, 2000, 0, 0, 0, 0.0, 0.0), [*skewed, Arm("d", 5, 0, 0, 0, 0.0, 0.0)]
    )
    assert stray.p_value is None and "d" in stray.note
