"""A/B/n measurement: every variant against the holdout, the split checked, a winner only when
the data say so.

The estimand is the campaign's (``measure.campaign``): **intent-to-treat**, everyone
*assigned* to an arm — the holdout, or a variant of the treatment group, messaged or stopped
by a timing rule of the contact policy. Variants are drawn by a hash independent of the
holdout's (``activate.assignment``), so each variant's people are exchangeable with the
holdout's and with each other's, and every difference below is an unbiased estimate.

Per arm, one grouped Ibis query (grouped by group *and* variant; no query per variant) gives
the people assigned, those messaged, those stopped, conversions, revenue and the revenue's sum
of squares. From those counts, per variant against the holdout: the absolute lift (Newcombe's
interval), the relative lift (log risk ratio) and the two-sided p-value (``stats.lift``), and
the revenue-per-person difference (Welch, ``stats.mean_difference``).

**Sample-ratio mismatch** across all arms: a chi-square goodness-of-fit test of the observed
counts against the designed shares (the holdout's share, then the treatment's share times each
variant's normalised weight); p < 0.001 flags a broken split — the arms are no longer
comparable and no lift should be believed until it is explained.

**Winner** (``choose_winner``): every pair of variants is compared with a two-sided
two-proportion z-test, and the p-values of all pairs are adjusted together with
Holm–Bonferroni. The variant with the highest conversion rate is named the winner only when
(a) its comparison with *every* other variant is significant at α = 0.05 after the Holm
adjustment and (b) it beats the holdout (positive lift, p < 0.05). Otherwise the verdict is
"no winner yet", with the comparison that failed. Under the null (A/A/…), a winner needs at
least one pairwise rejection, which Holm keeps below α; the holdout condition only lowers the
rate further (``tests/measure/test_variants.py`` simulates it).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import ibis
import ibis.expr.types as ir

from closedloop.activate import assignment as _assignment  # noqa: F401  (delivery_variants)
from closedloop.core.definitions import CampaignDef
from closedloop.core.engine import Engine
from closedloop.measure.campaign import goal_events
from closedloop.measure.stats import (
    SRM_ALPHA,
    Lift,
    MeanDifference,
    holm,
    lift,
    mean_difference,
    sample_ratio_arms_p,
)

ALPHA = 0.05
HOLDOUT = "holdout"
TREATMENT = "treatment"  # the one arm of a campaign without variants
NO_VARIANT = "(no variant)"  # treatment people with no recorded variant, in a campaign with some
METHOD = (
    "all pairs of variants compared by a two-sided two-proportion z-test, p-values adjusted "
    "together by Holm-Bonferroni at alpha 0.05; the best variant wins only if it beats every "
    "other variant after adjustment and beats the holdout (positive lift, p < 0.05)"
)


@dataclass(frozen=True)
class Arm:
    """One arm's counts (intent-to-treat: everyone assigned to it)."""

    name: str
    assigned: int
    reached: int  # messaged (status sent)
    stopped: int  # stopped (or, in the holdout, would have been) by a timing rule
    conversions: int
    revenue: float
    revenue_sumsq: float  # per person, for the revenue interval

    @property
    def rate(self) -> float:
        return self.conversions / self.assigned if self.assigned else 0.0

    @property
    def revenue_per_person(self) -> float:
        return self.revenue / self.assigned if self.assigned else 0.0


@dataclass(frozen=True)
class VariantResult:
    """A variant's counts and its effect over the holdout."""

    arm: Arm
    lift: Lift | None  # conversion rate vs the holdout (None when an arm is empty)
    revenue: MeanDifference | None  # revenue per person vs the holdout (needs 2 a side)


@dataclass(frozen=True)
class SampleRatio:
    """The chi-square check of the split across all arms (holdout first)."""

    arms: list[str]
    observed: list[int]
    expected_shares: list[float]
    p_value: float | None  # None when the arms do not match the campaign's design
    note: str = ""

    @property
    def flagged(self) -> bool:
        return self.p_value is not None and self.p_value < SRM_ALPHA

    def line(self) -> str:
        """The check as one sentence for the report."""
        if self.p_value is None:
            return f"sample-ratio check not possible: {self.note}"
        split = ", ".join(
            f"{a} {o:,} ({s:.1%} expected)"
            for a, o, s in zip(self.arms, self.observed, self.expected_shares, strict=True)
        )
        if self.flagged:
            return (
                f"SAMPLE-RATIO MISMATCH (p = {self.p_value:.2g} < {SRM_ALPHA}): {split}; "
                "the arms are not the designed random split, do not trust the lifts"
            )
        return f"sample-ratio check across arms p = {self.p_value:.3f} (ok): {split}"


@dataclass(frozen=True)
class Comparison:
    """One variant against another (``better`` has the higher observed rate)."""

    better: str
    worse: str
    lift: Lift
    p_adjusted: float  # Holm-adjusted over all pairs
    significant: bool

    def text(self) -> str:
        lf = self.lift
        return (
            f"{self.better} vs {self.worse}: {_pp(lf)}, p = {lf.p_value:.2g} "
            f"(Holm {self.p_adjusted:.2g})"
        )


@dataclass(frozen=True)
class Winner:
    """The A/B verdict: a name only when significant, else ``None`` and why not."""

    name: str | None
    reason: str
    comparisons: list[Comparison] = field(default_factory=list)
    vs_holdout: Lift | None = None  # the best variant's lift over the holdout
    method: str = METHOD

    def line(self) -> str:
        if self.name is None:
            return f"no winner yet: {self.reason}"
        return f"winner: {self.name} ({self.reason})"


@dataclass(frozen=True)
class VariantsOutcome:
    """One occasion of a campaign, per arm: the holdout and each variant."""

    campaign: str
    occasion: str
    has_variants: bool  # False: one treatment arm, named ``treatment``
    holdout: Arm
    variants: list[VariantResult]
    sample_ratio: SampleRatio
    winner: Winner


def _pp(lf: Lift) -> str:
    return (
        f"{lf.absolute * 100:+.2f} pp [{lf.absolute_low * 100:+.2f}, {lf.absolute_high * 100:+.2f}]"
    )


def choose_winner(
    holdout: tuple[int, int],
    variants: Sequence[tuple[str, int, int]],
    alpha: float = ALPHA,
) -> Winner:
    """The A/B verdict from counts: ``holdout`` is (conversions, people), each variant
    (name, conversions, people). See the module docstring for the method."""
    if len(variants) < 2:
        return Winner(None, "fewer than two variants: nothing to compare")
    empty = [name for name, _, n in variants if n <= 0]
    if empty:
        return Winner(None, f"nobody assigned to {', '.join(empty)}")
    ranked = sorted(variants, key=lambda v: (-v[1] / v[2], v[0]))
    pairs: list[tuple[str, str, Lift]] = []
    for i, (a, xa, na) in enumerate(ranked):
        for b, xb, nb in ranked[i + 1 :]:
            pairs.append((a, b, lift(xa, na, xb, nb)))
    adjusted = holm([lf.p_value for _, _, lf in pairs])
    comparisons = [
        Comparison(a, b, lf, p, p < alpha) for (a, b, lf), p in zip(pairs, adjusted, strict=True)
    ]
    best, bx, bn = ranked[0]
    hx, hn = holdout
    vs_holdout = lift(bx, bn, hx, hn) if hn > 0 else None
    against = [c for c in comparisons if c.better == best]
    failed = [c for c in against if not c.significant or c.lift.absolute <= 0]
    if failed:
        worst = max(failed, key=lambda c: c.p_adjusted)
        return Winner(
            None,
            f"{worst.text()}: not significant at {alpha:g} after the Holm adjustment",
            comparisons,
            vs_holdout,
        )
    if vs_holdout is None:
        return Winner(None, "nobody held out: no baseline to beat", comparisons)
    if not (vs_holdout.absolute > 0 and vs_holdout.p_value < alpha):
        return Winner(
            None,
            f"{best} vs holdout: {_pp(vs_holdout)}, p = {vs_holdout.p_value:.2g}: "
            "the best variant does not beat the holdout",
            comparisons,
            vs_holdout,
        )
    beats = "; ".join(c.text() for c in against)
    return Winner(
        best,
        f"{beats}; vs holdout {_pp(vs_holdout)}, p = {vs_holdout.p_value:.2g}",
        comparisons,
        vs_holdout,
    )


def arms_expr(engine: Engine, campaign: CampaignDef, occasion: str) -> ir.Table:
    """One row per arm (``group``, ``variant``): assigned, reached, stopped, conversions,
    revenue and revenue_sumsq — a single grouped query, as ``measure_campaign`` counts.

    Conversions are goal events of the customer (merged customers followed through their
    aliases) from the decision to the end of the attribution window, once per customer.
    """
    d = engine.table("deliveries")
    d = d.filter(
        (d.campaign == campaign.name)
        & (d.occasion == occasion)
        & d.group.isin([TREATMENT, HOLDOUT])
    )
    v = engine.table("delivery_variants")
    v = v.filter((v.campaign == campaign.name) & (v.occasion == occasion))
    v = v.select(variant_delivery="delivery_id", variant="variant")
    a = engine.table("customer_aliases").select(alias_id="alias_id", survivor="customer_id")
    goals = goal_events(engine, campaign.goal.event)
    window = ibis.interval(days=campaign.goal.window_days)
    customer = ibis.coalesce(a.survivor, d.customer_id)
    j = (
        d.left_join(v, d.delivery_id == v.variant_delivery)
        .left_join(a, d.customer_id == a.alias_id)
        .left_join(
            goals,
            [
                customer == goals.goal_customer,
                goals.goal_at >= d.decided_at,
                goals.goal_at < d.decided_at + window,
            ],
        )
    )
    j = j.select(
        customer_id=customer,
        group=d.group,
        # A campaign without variants has one treatment arm, whatever was recorded.
        variant=ibis.ifelse(
            (d.group == HOLDOUT) | ibis.literal(not campaign.variants),
            ibis.literal(""),
            v.variant.fill_null(""),
        ),
        reached=ibis.ifelse(d.status == "sent", 1, 0),  # PostgreSQL casts no bool to int
        stopped=ibis.ifelse(d.status == "suppressed", 1, 0),
        goal=goals.message_id,
        revenue=goals.revenue,
    )
    person = j.group_by("customer_id", "group", "variant").aggregate(
        converted=ibis.ifelse(j.goal.count() > 0, 1, 0),
        revenue=j.revenue.sum().fill_null(0.0),
        reached=j.reached.max(),
        stopped=j.stopped.max(),
    )
    return person.group_by("group", "variant").aggregate(
        assigned=person.count(),
        reached=person.reached.sum(),
        stopped=person.stopped.sum(),
        conversions=person.converted.sum(),
        revenue=person.revenue.sum(),
        revenue_sumsq=(person.revenue * person.revenue).sum(),
    )


def _arm(name: str, r: dict[str, object] | None) -> Arm:
    def num(k: str) -> float:
        x = None if r is None else r.get(k)
        return float(x) if isinstance(x, int | float) else 0.0

    return Arm(
        name,
        int(num("assigned")),
        int(num("reached")),
        int(num("stopped")),
        int(num("conversions")),
        num("revenue"),
        num("revenue_sumsq"),
    )


def _against(arm: Arm, holdout: Arm) -> VariantResult:
    lf = None
    if arm.assigned > 0 and holdout.assigned > 0:
        lf = lift(arm.conversions, arm.assigned, holdout.conversions, holdout.assigned)
    money = None
    if arm.assigned >= 2 and holdout.assigned >= 2:
        money = mean_difference(
            arm.assigned,
            arm.revenue,
            arm.revenue_sumsq,
            holdout.assigned,
            holdout.revenue,
            holdout.revenue_sumsq,
        )
    return VariantResult(arm, lf, money)


def sample_ratio(campaign: CampaignDef, holdout: Arm, arms: Sequence[Arm]) -> SampleRatio:
    """The split across the holdout and ``arms`` against the campaign's design."""
    h = campaign.holdout
    if campaign.variants:
        total = sum(x.weight for x in campaign.variants)
        design = {x.name: (1 - h) * x.weight / total for x in campaign.variants}
    else:
        design = {TREATMENT: 1 - h}
    names = [HOLDOUT, *design]
    counts = {x.name: x.assigned for x in arms}
    counts[HOLDOUT] = holdout.assigned
    shares = [h, *design.values()]
    observed = [counts.get(n, 0) for n in names]
    stray = sorted(n for n, c in counts.items() if n not in names and c > 0)
    if stray:
        return SampleRatio(
            names,
            observed,
            shares,
            None,
            f"arm(s) {', '.join(stray)} are not in the campaign's variants (changed since it "
            "ran?), so its weights are not the split it ran with",
        )
    return SampleRatio(names, observed, shares, sample_ratio_arms_p(observed, shares))


def measure_variants(
    engine: Engine, campaign: CampaignDef, occasion: str, alpha: float = ALPHA
) -> VariantsOutcome:
    """Per variant and holdout: counts, lift with 95% CIs, the SRM check and the verdict."""
    rows = arms_expr(engine, campaign, occasion).to_pyarrow().to_pylist()
    found = {(str(r["group"]), str(r["variant"] or "")): r for r in rows}
    holdout = _arm(HOLDOUT, found.get((HOLDOUT, "")))
    if campaign.variants:
        names = [x.name for x in campaign.variants]
        names += sorted(v for g, v in found if g == TREATMENT and v not in names and v)
        if (TREATMENT, "") in found:
            names.append(NO_VARIANT)
        key = {n: n for n in names} | {NO_VARIANT: ""}
        arms = [_arm(n, found.get((TREATMENT, key[n]))) for n in names]
    else:
        arms = [_arm(TREATMENT, found.get((TREATMENT, "")))]
    results = [_against(x, holdout) for x in arms]
    if campaign.variants:
        counted = [(x.name, x.conversions, x.assigned) for x in arms if x.name != NO_VARIANT]
        verdict = choose_winner((holdout.conversions, holdout.assigned), counted, alpha)
    else:
        verdict = Winner(None, "the campaign has no variants: no A/B test")
    return VariantsOutcome(
        campaign.name,
        occasion,
        bool(campaign.variants),
        holdout,
        results,
        sample_ratio(campaign, holdout, arms),
        verdict,
    )


HEADER = [
    "arm",
    "assigned",
    "messaged",
    "conversions",
    "rate",
    "revenue",
    "revenue / person",
    "lift vs holdout, 95% CI",
    "relative lift, 95% CI",
    "p",
    "revenue / person vs holdout, 95% CI",
]


def variant_table(o: VariantsOutcome) -> tuple[list[str], list[list[str]]]:
    """Header and rows (holdout first, then each variant) as the CLI and the HTML show them."""

    def counts(x: Arm) -> list[str]:
        return [
            x.name,
            f"{x.assigned:,}",
            f"{x.reached:,}",
            f"{x.conversions:,}",
            f"{x.rate:.2%}",
            f"{x.revenue:,.2f}",
            f"{x.revenue_per_person:,.2f}",
        ]

    rows = [[*counts(o.holdout), "—", "—", "—", "—"]]
    for r in o.variants:
        lf, m = r.lift, r.revenue
        rel = "—"
        if lf is not None and lf.relative is not None:
            rel = f"{lf.relative:+.1%} [{lf.relative_low:+.1%}, {lf.relative_high:+.1%}]"
        rows.append(
            [
                *counts(r.arm),
                "—" if lf is None else _pp(lf),
                rel,
                "—" if lf is None else f"{lf.p_value:.3g}",
                "—" if m is None else f"{m.difference:+,.2f} [{m.low:+,.2f}, {m.high:+,.2f}]",
            ]
        )
    return HEADER, rows
