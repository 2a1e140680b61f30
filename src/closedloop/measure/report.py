"""Reports: an HTML page with charts, and the charts as PNG files beside it.

Charts are drawn with matplotlib (Agg, no display needed) and embedded in the HTML as data
URIs, so the page is one self-contained file that can be mailed or archived; the PNGs are
written too for slides and chat. HTML is built with Jinja2 with autoescaping on.
"""

from __future__ import annotations

import base64
import io
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from jinja2 import Environment, select_autoescape
from matplotlib.figure import Figure

from closedloop.measure.campaign import CampaignOutcome
from closedloop.measure.cohorts import Cohort
from closedloop.measure.funnels import Funnel
from closedloop.measure.programme import ProgrammeOutcome
from closedloop.measure.stats import Lift, wilson
from closedloop.measure.variants import METHOD, VariantsOutcome, variant_table

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{{ title }}</title>
<style>
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;max-width:960px;margin:2em auto;color:#222}
h1{font-size:1.6em} h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse} td,th{padding:4px 12px;border-bottom:1px solid #eee;text-align:left}
td.num{text-align:right;font-variant-numeric:tabular-nums} img{max-width:100%}
.note{color:#666;font-size:.9em}
</style></head><body>
<h1>{{ title }}</h1>
<p class="note">{{ subtitle }}</p>
{% for section in sections %}
<h2>{{ section.title }}</h2>
{% if section.rows %}<table>{% for k, v in section.rows %}<tr><th>{{ k }}</th><td class="num">{{ v }}</td></tr>{% endfor %}</table>{% endif %}
{% if section.table %}<table><tr>{% for h in section.header %}<th>{{ h }}</th>{% endfor %}</tr>{% for row in section.table %}<tr>{% for v in row %}<td class="num">{{ v }}</td>{% endfor %}</tr>{% endfor %}</table>{% endif %}
{% if section.note %}<p class="note">{{ section.note }}</p>{% endif %}
{% for chart in section.charts %}<p><img alt="{{ chart.title }}" src="data:image/png;base64,{{ chart.data }}"></p>{% endfor %}
{% endfor %}
</body></html>
"""


@dataclass
class Chart:
    name: str
    title: str
    png: bytes

    @property
    def data(self) -> str:
        return base64.b64encode(self.png).decode("ascii")


@dataclass
class Section:
    title: str
    rows: list[tuple[str, str]] = field(default_factory=list)
    charts: list[Chart] = field(default_factory=list)
    note: str = ""
    header: list[str] = field(default_factory=list)
    table: list[list[str]] = field(default_factory=list)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def lift_chart(outcome: CampaignOutcome, true_effect: float | None = None) -> Chart:
    """Conversion rate per group with 95% Wilson intervals, and the lift with its interval."""
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(9, 3.4), gridspec_kw={"width_ratios": [2, 1.3]}
    )
    groups = [
        ("treatment", outcome.treated_conversions, outcome.treated),
        ("holdout", outcome.held_out_conversions, outcome.held_out),
    ]
    rates, lows, highs = [], [], []
    for _, x, n in groups:
        r = x / n if n else 0.0
        lo, hi = wilson(x, n)
        rates.append(r * 100)
        lows.append(max(0.0, r - lo) * 100)
        highs.append(max(0.0, hi - r) * 100)
    left.bar(
        [g for g, _, _ in groups],
        rates,
        yerr=[lows, highs],
        capsize=6,
        color=["#2b7bba", "#aaaaaa"],
    )
    left.set_ylabel("conversion rate (%)")
    left.set_title("Conversions in the goal window")
    lf = outcome.lift
    right.errorbar(
        [lf.absolute * 100],
        [0],
        xerr=[
            [max(0.0, lf.absolute - lf.absolute_low) * 100],
            [max(0.0, lf.absolute_high - lf.absolute) * 100],
        ],
        fmt="o",
        color="#2b7bba",
        capsize=6,
        label="measured lift (intent-to-treat), 95% CI",
    )
    if true_effect is not None:
        right.axvline(
            true_effect * 100, color="#d9534f", linestyle="--", label="true effect (generator)"
        )
    right.axvline(0, color="#999", linewidth=0.8)
    right.set_yticks([])
    right.set_xlabel("absolute lift (percentage points)")
    right.set_title("Lift over holdout")
    right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.3), fontsize=8)
    return Chart(f"lift_{outcome.campaign}", f"Lift of {outcome.campaign}", _png(fig))


def bar_chart(name: str, title: str, counts: dict[str, int], *, horizontal: bool = False) -> Chart:
    fig, ax = plt.subplots(figsize=(7, 3))
    labels, values = list(counts), list(counts.values())
    if horizontal:
        ax.barh(labels[::-1], values[::-1], color="#2b7bba")
    else:
        ax.bar(labels, values, color="#2b7bba")
        ax.tick_params(axis="x", rotation=20)
    ax.set_title(title)
    for i, v in enumerate(values[::-1] if horizontal else values):
        if horizontal:
            ax.text(v, i, f" {v:,}", va="center", fontsize=8)
        else:
            ax.text(i, v, f"{v:,}", ha="center", va="bottom", fontsize=8)
    return Chart(name, title, _png(fig))


def write_report(out: Path, title: str, subtitle: str, sections: list[Section]) -> Path:
    """Write ``report.html`` and one PNG per chart into ``out``; return the HTML path."""
    out.mkdir(parents=True, exist_ok=True)
    for s in sections:
        for c in s.charts:
            (out / f"{c.name}.png").write_bytes(c.png)
    env = Environment(autoescape=select_autoescape(default=True, default_for_string=True))
    html = env.from_string(PAGE).render(title=title, subtitle=subtitle, sections=sections)
    path = out / "report.html"
    path.write_text(html, encoding="utf-8")
    return path


COLOURS = ["#2b7bba", "#aaaaaa", "#f0a30a", "#5cb85c", "#d9534f", "#8e6bbf"]


def funnel_chart(f: Funnel, name: str = "funnel") -> Chart:
    """Customers reaching each step, one bar series per group, with the step-to-step rate."""
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / max(1, len(f.groups))
    for gi, g in enumerate(f.groups):
        xs = [k + gi * width for k in range(len(f.steps))]
        # Share of those who entered, so groups of different sizes compare.
        ys = [g.overall(k) * 100 for k in range(len(f.steps))]
        ax.bar(xs, ys, width=width, color=COLOURS[gi % len(COLOURS)], label=g.group)
        for k, (x, y) in enumerate(zip(xs, ys, strict=True)):
            ax.text(x, y, f"{g.reached[k]:,}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks([k + 0.4 - width / 2 for k in range(len(f.steps))], f.steps)
    ax.set_ylabel("% of those who entered")
    ax.set_ylim(0, 110)
    ax.set_title(f"Funnel within {f.within_days} days (labels: customers)")
    if len(f.groups) > 1:
        ax.legend(fontsize=8)
    return Chart(name, "Funnel", _png(fig))


def funnel_table(f: Funnel) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per group and step, customers, step rate, rate of the whole group."""
    header = ["group", "step", "customers", "of previous step", "of group (95% CI)"]
    rows: list[list[str]] = []
    for g in f.groups:
        for k, step in enumerate(f.steps):
            prev = "" if k == 0 and g.size is None else f"{g.step_rate(k):.1%}"
            rate, lo, hi = g.of_group(k)
            rows.append(
                [g.group, step, f"{g.reached[k]:,}", prev, f"{rate:.1%} [{lo:.1%}, {hi:.1%}]"]
            )
    return header, rows


def cohort_chart(found: list[Cohort], name: str = "cohorts") -> Chart:
    """Retention heatmap: cohort month × months since, the share of the cohort active."""
    labels = [
        c.month.strftime("%Y-%m") + ("" if c.split == "all" else f" {c.split}") for c in found
    ]
    span = max((len(c.active) for c in found), default=1)
    grid = np.full((max(1, len(found)), span), np.nan)
    for i, c in enumerate(found):
        for m in range(len(c.active)):
            grid[i, m] = c.retention(m) * 100
    fig, ax = plt.subplots(figsize=(min(12, 2 + 0.7 * span), 1.2 + 0.35 * max(1, len(found))))
    im = ax.imshow(grid, aspect="auto", cmap="Blues", vmin=0, vmax=100)
    for i in range(grid.shape[0]):
        for m in range(span):
            if not np.isnan(grid[i, m]):
                colour = "white" if grid[i, m] > 60 else "#222"
                ax.text(
                    m, i, f"{grid[i, m]:.0f}", ha="center", va="center", fontsize=7, color=colour
                )
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_xticks(range(span))
    ax.set_xlabel("months since first")
    ax.set_title("Retention (% of cohort active)")
    fig.colorbar(im, ax=ax, fraction=0.03)
    return Chart(name, "Cohort retention", _png(fig))


def cohort_table(found: list[Cohort]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: per cohort, its size, then retention and cumulative revenue per month."""
    span = max((len(c.active) for c in found), default=0)
    header = ["cohort", "split", "customers", *[f"M{m}" for m in range(span)]]
    rows = []
    for c in found:
        cells = [
            f"{c.retention(m):.0%} · {c.revenue_per_customer(m):,.0f}" for m in range(len(c.active))
        ]
        rows.append(
            [c.month.strftime("%Y-%m"), c.split, f"{c.size:,}", *cells, *[""] * (span - len(cells))]
        )
    return header, rows


def lift_rows(lf: Lift) -> list[tuple[str, str]]:
    """Rates, absolute and relative lift with intervals, and the p-value, as report rows."""
    rows = [
        ("conversion rate", f"{lf.treated_rate:.2%} / {lf.control_rate:.2%}"),
        (
            "absolute lift, 95% CI",
            f"{lf.absolute * 100:+.2f} pp [{lf.absolute_low * 100:+.2f}, {lf.absolute_high * 100:+.2f}]",
        ),
    ]
    if lf.relative is not None and lf.relative_low is not None and lf.relative_high is not None:
        rows.append(
            (
                "relative lift, 95% CI",
                f"{lf.relative:+.1%} [{lf.relative_low:+.1%}, {lf.relative_high:+.1%}]",
            )
        )
    rows.append(("p-value", f"{lf.p_value:.3g}" + (" (significant)" if lf.significant else "")))
    return rows


def campaign_rows(o: CampaignOutcome) -> list[tuple[str, str]]:
    """A campaign outcome as report rows: intent-to-treat first, the as-sent view after it."""
    rows = [
        ("estimand", o.estimand),
        ("assigned treatment / holdout", f"{o.treated:,} / {o.held_out:,}"),
        (
            "of them stopped by the policy",
            f"{o.treated_stopped:,} / {o.held_out_stopped:,} (treatment messaged: {o.reach_share:.1%})",
        ),
        ("conversions", f"{o.treated_conversions:,} / {o.held_out_conversions:,}"),
        ("revenue", f"{o.treated_revenue:,.2f} / {o.held_out_revenue:,.2f}"),
        *lift_rows(o.lift),
        ("sample-ratio check p", f"{o.sample_ratio_p:.3f}"),
    ]
    if o.as_sent is not None and (o.treated_stopped or o.held_out_stopped):
        rows.append(
            (
                "as sent (messaged vs not-stopped held out; biased when caps stop people)",
                _pp(o.as_sent),
            )
        )
    if o.as_sent_symmetric is not None and o.held_out_capped:
        rows.append(
            (
                f"as sent, caps replayed on the holdout ({o.held_out_capped:,} more held out left out)",
                _pp(o.as_sent_symmetric),
            )
        )
    return rows


def _pp(lf: Lift) -> str:
    return (
        f"{lf.absolute * 100:+.2f} pp [{lf.absolute_low * 100:+.2f}, {lf.absolute_high * 100:+.2f}]"
    )


def programme_rows(p: ProgrammeOutcome) -> list[tuple[str, str]]:
    r = p.revenue
    return [
        ("estimand", p.estimand),
        ("period", f"{p.start:%Y-%m-%d} to {p.end:%Y-%m-%d}, goal {p.goal}"),
        ("programme / global control", f"{p.exposed:,} / {p.control:,}"),
        ("messaged in the period", f"{p.exposed_messaged:,} / {p.control_messaged:,}"),
        ("conversions", f"{p.exposed_conversions:,} / {p.control_conversions:,}"),
        *lift_rows(p.lift),
        (
            "revenue per customer, 95% CI",
            f"{r.treated_mean:,.2f} / {r.control_mean:,.2f}: {r.difference:+,.2f} [{r.low:+,.2f}, {r.high:+,.2f}]",
        ),
        ("incremental revenue (programme)", f"{p.incremental_revenue:+,.0f}"),
        (
            "sample-ratio check p",
            "—" if p.sample_ratio_p is None else f"{p.sample_ratio_p:.3f}",
        ),
    ]


def variant_chart(o: VariantsOutcome) -> Chart:
    """Conversion rate per arm (95% Wilson intervals), and each variant's lift over the
    holdout (95% Newcombe intervals); the winner, if any, in its own colour."""
    arms = [o.holdout, *(r.arm for r in o.variants)]
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(9, 0.9 + 0.5 * len(arms)), gridspec_kw={"width_ratios": [1.4, 1.4]}
    )
    names = [a.name for a in arms]
    rates = [a.rate * 100 for a in arms]
    errs: list[list[float]] = [[], []]
    for a in arms:
        lo, hi = wilson(a.conversions, a.assigned)
        errs[0].append(max(0.0, a.rate - lo) * 100)
        errs[1].append(max(0.0, hi - a.rate) * 100)

    def colour(name: str) -> str:
        if name == "holdout":
            return "#aaaaaa"
        return "#5cb85c" if name == o.winner.name else "#2b7bba"

    ys = list(range(len(arms)))[::-1]
    left.barh(ys, rates, xerr=errs, capsize=5, color=[colour(n) for n in names])
    left.set_yticks(ys, names)
    left.set_xlabel("conversion rate (%)")
    left.set_title("Conversions per arm, 95% CI")
    for y, r in zip(ys[1:], o.variants, strict=True):
        lf = r.lift
        if lf is None:
            continue
        right.errorbar(
            [lf.absolute * 100],
            [y],
            xerr=[
                [max(0.0, lf.absolute - lf.absolute_low) * 100],
                [max(0.0, lf.absolute_high - lf.absolute) * 100],
            ],
            fmt="o",
            capsize=5,
            color=colour(r.arm.name),
        )
    right.axvline(0, color="#999", linewidth=0.8)
    right.set_yticks(ys[1:], names[1:])
    right.set_ylim(-0.5, len(arms) - 0.5)
    right.set_xlabel("lift over holdout (percentage points)")
    right.set_title(f"winner: {o.winner.name}" if o.winner.name else "no winner yet", fontsize=9)
    fig.tight_layout()
    return Chart(f"variants_{o.campaign}", f"Variants of {o.campaign}", _png(fig))


def variant_notes(o: VariantsOutcome) -> list[str]:
    """The verdict, the split check and the method, one sentence each."""
    return [o.winner.line(), o.sample_ratio.line(), f"method: {METHOD}"]


def variant_section(o: VariantsOutcome) -> Section:
    """Per variant and holdout: the table, the chart, the verdict and the split check."""
    header, rows = variant_table(o)
    return Section(
        "Variants (intent-to-treat, each against the holdout)",
        header=header,
        table=rows,
        charts=[variant_chart(o)],
        note=" · ".join(variant_notes(o)),
    )
