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
from jinja2 import Environment, select_autoescape
from matplotlib.figure import Figure

from closedloop.measure.campaign import CampaignOutcome
from closedloop.measure.stats import wilson

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
        label="measured lift, 95% CI",
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
