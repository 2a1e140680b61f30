"""The closed-loop demo: generate a brand, run every stage, answer the campaign, measure it.

1. generate the synthetic brand (events, POS orders, CRM members; truth kept apart);
2. scaffold the example project and build it: collect → identity → portrait → tags → segments;
3. run the win-back campaign with a holdout, messages to the outbox;
4. the generator's world answers the messages (opens, clicks, orders) for the goal window;
5. load the responses back through collect, resolve and re-portray (the loop closes);
6. measure conversions and lift with a 95% CI, and check it against the true effect;
7. print a summary and write an HTML report with PNG charts.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from closedloop.activate.campaign import CampaignRun, run_campaign
from closedloop.collect.loader import load_jsonl
from closedloop.core.clock import Clock
from closedloop.core.definitions import load_project
from closedloop.core.engine import Engine
from closedloop.core.errors import ClosedloopError
from closedloop.demo.accuracy import IdentityAccuracy, identity_accuracy
from closedloop.demo.generator import GenerationSummary, generate
from closedloop.demo.project import init_project, relative_data_dir
from closedloop.demo.world import ResponseSummary, respond
from closedloop.identity.resolve import resolve
from closedloop.measure.campaign import CampaignOutcome, measure_campaign
from closedloop.measure.report import Section, bar_chart, lift_chart, write_report
from closedloop.pipeline import BuildReport, build
from closedloop.portrait.build import build_profiles
from closedloop.predict.recommend import build_recommendations
from closedloop.tags.coverage import TagCoverage, tag_coverage

CAMPAIGN = "winback"
MARKER = ".closedloop-demo"


def prepare_output(out: Path) -> None:
    """Empty ``out`` for a new run, but only if it is missing, empty or an earlier demo's output."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not (out / MARKER).exists():
            raise ClosedloopError(
                f"{out} is not empty and not an earlier demo's output; choose another --out"
            )
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text("written by `closedloop demo`; safe to delete\n", encoding="utf-8")


@dataclass
class DemoResult:
    generation: GenerationSummary
    build: BuildReport
    accuracy: IdentityAccuracy
    campaign: CampaignRun
    world: ResponseSummary
    outcome: CampaignOutcome
    report: Path
    seconds: float
    lifecycle: dict[str, int] = field(default_factory=dict)
    ladder: dict[str, int] = field(default_factory=dict)
    showcase: list[tuple[str, str]] = field(default_factory=list)
    coverage: list[TagCoverage] = field(default_factory=list)


def run_demo(
    persons: int, out: Path, *, seed: int = 7, console: Console | None = None
) -> DemoResult:
    console = console or Console()
    started = time.perf_counter()
    out = Path(out).resolve()
    brand = out / "brand"
    project_dir = out / "project"
    prepare_output(out)

    with _progress(console) as progress:
        gen_task = progress.add_task("generate brand", total=persons)
        generation = generate(
            brand, persons, seed=seed, progress=lambda n: progress.advance(gen_task, n)
        )

        init_project(
            project_dir,
            data_dir=relative_data_dir(project_dir, brand / "data"),
            key_suffix=f"demo{seed}",
        )
        project = load_project(project_dir)
        clock = Clock(generation.reference_time)
        tasks: dict[str, TaskID] = {}

        def tick(step: str, n: int, total: int | None) -> None:
            if step not in tasks:
                tasks[step] = progress.add_task(step, total=total)
            progress.advance(tasks[step], n)

        with Engine(project.engine_url) as engine:
            report = build(engine, project, clock=clock, progress=tick)
            # predict: next-best products, which the win-back e-mail lists (`recommended`)
            build_recommendations(engine, clock=clock)
            tick("recommendations", 1, 1)
            campaign = project.campaigns[CAMPAIGN]
            occasion = generation.reference_time.date().isoformat()
            run = run_campaign(
                engine,
                campaign,
                outbox_dir=project.path(project.config.outbox),
                occasion=occasion,
                clock=clock,
                global_control=project.config.global_control,
            )
            tick("campaign", 1, 1)
            world = respond(
                brand,
                run.outbox if run.outbox else project.path(project.config.outbox) / "empty.jsonl",
                campaign=CAMPAIGN,
                start=generation.reference_time,
                window_days=campaign.goal.window_days,
                seed=seed,
            )
            tick("responses", 1, 1)
            # The loop closes: responses come back as ordinary events through collect.
            response_files = sorted((brand / "data" / "responses" / CAMPAIGN).glob("*/*.jsonl"))
            for f in response_files:
                load_jsonl(
                    engine,
                    [f],
                    project.config.source(f.parent.name),
                    import_name=f"responses_{f.parent.name}",
                )
            after = Clock(generation.reference_time + timedelta(days=campaign.goal.window_days))
            resolve(engine, project.identity, after)
            build_profiles(engine, after)
            outcome = measure_campaign(engine, campaign, occasion, after)
            accuracy = identity_accuracy(engine, brand / "truth")
            tick("measure", 1, 1)
            lifecycle = _counts(engine, "lifecycle_stage")
            ladder = _counts(engine, "ladder_stage")
            showcase = _showcase(engine)
            coverage = tag_coverage(engine)

    result = DemoResult(
        generation,
        report,
        accuracy,
        run,
        world,
        outcome,
        Path(),
        time.perf_counter() - started,
        lifecycle,
        ladder,
        showcase,
        coverage,
    )
    result.report = _write(out / "report", result)
    _print(console, result)
    return result


def _progress(console: Console) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description:<28}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=False,
    )


SHOWN_FIELDS = (
    "name",
    "gender",
    "age",
    "city",
    "tier",
    "member_id",
    "email",
    "phone",
    "orders",
    "revenue",
    "avg_order_value",
    "coupon_share",
    "recency_days",
    "rfm_group",
    "lifecycle_stage",
    "ladder_stage",
    "preferred_channel",
    "top_category",
    "product_views",
    "cart_adds",
)


def _showcase(engine: Engine) -> list[tuple[str, str]]:
    """The 360° portrait of one customer: the champion seen under the most identifiers."""
    imap = engine.table("identity_map")
    counts = imap.group_by("customer_id").aggregate(ids=imap.count())
    p = engine.table("profiles")
    pick = p.filter(p.rfm_group == "champions").join(counts, "customer_id")
    top = pick.order_by([pick.ids.desc(), pick.customer_id]).limit(1).to_pyarrow().to_pylist()
    if not top:
        return []
    row = top[0]
    cid = str(row["customer_id"])
    rows = [("customer", cid)]
    for f in SHOWN_FIELDS:
        v = row.get(f)
        if v is not None:
            rows.append((f, f"{v:,.2f}" if isinstance(v, float) else str(v)))
    ids = imap.filter(imap.customer_id == cid).order_by(["id_type", "id_value"]).to_pyarrow()
    for t, v in zip(ids["id_type"].to_pylist(), ids["id_value"].to_pylist(), strict=True):
        rows.append((f"identifier {t}", str(v)))
    tv = engine.table("tag_values")
    for r in tv.filter(tv.customer_id == cid).to_pyarrow().to_pylist():
        rows.append((f"tag {r['tag']}", str(r["value"])))
    m = engine.table("segment_membership")
    segs = m.filter((m.customer_id == cid) & m.exited_at.isnull()).segment.to_pyarrow().to_pylist()
    rows.append(("segments", ", ".join(sorted(str(s) for s in segs)) or "—"))
    return rows


def _counts(engine: Engine, column: str) -> dict[str, int]:
    p = engine.table("profiles")
    rows = p.group_by(column).aggregate(n=p.count()).order_by(column).to_pyarrow().to_pylist()
    return {str(r[column]): int(r["n"]) for r in rows}


def _true_itt(r: DemoResult) -> float:
    """The generator's effect as the report estimates it: intent-to-treat, so people of the
    treatment group the policy stopped count with no effect (see ``measure.campaign``)."""
    return r.world.true_effect * r.outcome.reach_share


def _facts(r: DemoResult) -> list[tuple[str, str]]:
    lf = r.outcome.lift
    return [
        ("persons generated", f"{r.generation.persons:,}"),
        ("messages generated", f"{r.generation.messages:,}"),
        ("events accepted", f"{sum(x.accepted for x in r.build.loads.values()):,}"),
        ("failed events (kept with reason)", f"{sum(x.failed for x in r.build.loads.values()):,}"),
        ("customers resolved", f"{r.build.customers:,}"),
        ("identity precision (pairwise)", f"{r.accuracy.precision:.4f}"),
        ("identity recall (pairwise)", f"{r.accuracy.recall:.4f}"),
        ("identity recall of linkable pairs", f"{r.accuracy.linkable_recall:.4f}"),
        ("persons resolved exactly", f"{r.accuracy.exact_persons:.1%}"),
        *[(f"segment {n}", f"{s.size:,}") for n, s in r.build.segments.items()],
        ("campaign audience", f"{r.campaign.audience:,}"),
        ("messages sent", f"{r.campaign.sent:,}"),
        ("held out", f"{r.campaign.held_out:,}"),
        (
            "suppressed by contact policy",
            f"{r.campaign.suppressed:,}"
            + (
                " ("
                + ", ".join(f"{k} {v:,}" for k, v in sorted((r.campaign.reasons or {}).items()))
                + ")"
                if r.campaign.reasons
                else ""
            ),
        ),
        ("postponed (quiet hours)", f"{r.campaign.postponed:,}"),
        ("messages against consent or opt-out (world)", f"{r.world.violations:,}"),
        (
            "conversions (treated / held out)",
            f"{r.outcome.treated_conversions:,} / {r.outcome.held_out_conversions:,}",
        ),
        ("conversion rate (treated / held out)", f"{lf.treated_rate:.1%} / {lf.control_rate:.1%}"),
        (
            "intent-to-treat lift, 95% CI",
            f"{lf.absolute * 100:+.1f} pp [{lf.absolute_low * 100:+.1f}, {lf.absolute_high * 100:+.1f}], p={lf.p_value:.3g}",
        ),
        ("true effect on the messaged (generator)", f"{r.world.true_effect * 100:+.1f} pp"),
        (
            "true intent-to-treat effect (× share of treatment messaged)",
            f"{_true_itt(r) * 100:+.1f} pp ({r.outcome.reach_share:.1%} messaged)",
        ),
        (
            "CI covers true effect",
            "yes" if lf.absolute_low <= _true_itt(r) <= lf.absolute_high else "no",
        ),
        ("sample-ratio check p", f"{r.outcome.sample_ratio_p:.3f}"),
        ("run time", f"{r.seconds:.1f} s"),
    ]


def _coverage_rows(r: DemoResult) -> list[tuple[str, str]]:
    return [
        (
            c.tag,
            f"{c.customers:,} customers ({c.share:.0%}): "
            + ", ".join(f"{v} {n:,}" for v, n in c.values.items()),
        )
        for c in r.coverage
    ]


def _write(folder: Path, r: DemoResult) -> Path:
    sections = [
        Section("Summary", rows=_facts(r)),
        Section(
            f"Campaign {r.outcome.campaign}",
            charts=[lift_chart(r.outcome, _true_itt(r))],
            note="Intent-to-treat: everyone assigned to treatment (messaged or stopped by the "
            "contact policy) against everyone held out. Bars: conversion rate with 95% Wilson "
            "intervals. Right: absolute lift with its 95% Newcombe interval; the dashed line is "
            "the true intent-to-treat effect known to the generator.",
        ),
        Section(
            "Customers",
            charts=[
                bar_chart("ladder", "Ladder: fan → member → customer → super user", r.ladder),
                bar_chart("lifecycle", "Lifecycle stages", r.lifecycle, horizontal=True),
            ],
        ),
        Section("Tag coverage", rows=_coverage_rows(r)),
        Section(
            "One customer's 360° portrait",
            rows=r.showcase,
            note="The champion seen under the most identifiers, merged across touchpoints.",
        ),
    ]
    return write_report(
        folder,
        "closedloop demo — the marketing loop, closed",
        "Synthetic tea & beauty brand",
        sections,
    )


def _print(console: Console, r: DemoResult) -> None:
    for title, rows in (
        ("One customer's 360° portrait", r.showcase),
        ("Tag coverage", _coverage_rows(r)),
        ("closedloop demo", _facts(r)),
    ):
        table = Table(title=title, show_header=False)
        table.add_column(style="bold")
        table.add_column(justify="right")
        for k, v in rows:
            table.add_row(k, v)
        console.print(table)
    console.print(f"report: {r.report}")
