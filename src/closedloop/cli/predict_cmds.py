"""``closedloop predict recommend``: next-best products per customer (``predict.recommend``)."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer

from closedloop.cli.common import ProjectDir, console, fail, project_or_exit
from closedloop.core.errors import ClosedloopError

predict_app = typer.Typer(help="Predictions: recommended products.", no_args_is_help=True)


@predict_app.command("recommend")
def recommend_cmd(
    project: ProjectDir = Path("."),
    top: Annotated[int, typer.Option("--top", min=1, max=50, help="products per customer")] = 5,
    exclude_days: Annotated[
        int, typer.Option(min=0, help="never recommend what was bought this recently")
    ] = 90,
    as_of: Annotated[
        datetime | None, typer.Option("--as-of", help="the clock (UTC); default now")
    ] = None,
) -> None:
    """Write the `recommendations` table (templates read it as `recommended`)."""
    from closedloop.core.clock import Clock
    from closedloop.core.engine import Engine
    from closedloop.predict.recommend import build_recommendations

    p = project_or_exit(project)
    clock = Clock(as_of.replace(tzinfo=as_of.tzinfo or UTC) if as_of else None)
    try:
        with Engine(p.engine_url) as engine:
            run = build_recommendations(engine, clock=clock, k=top, exclude_days=exclude_days)
    except ClosedloopError as e:
        raise fail(e) from None
    console.print(f"recommendations: {run.rows:,} rows for {run.customers:,} customers")
    for reason, n in sorted(run.by_reason.items(), key=lambda x: -x[1]):
        console.print(f"  {reason}: {n:,}")


def register(app: typer.Typer) -> None:
    app.add_typer(predict_app, name="predict")
