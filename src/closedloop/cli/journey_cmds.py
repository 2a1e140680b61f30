"""``closedloop worker``: the journey worker (triggers, entries, steps) as a command."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from closedloop.cli.common import ProjectDir, console, fail, project_or_exit
from closedloop.core.errors import ClosedloopError, DefinitionError


def worker(
    project: ProjectDir = Path("."),
    once: Annotated[bool, typer.Option("--once", help="one tick, then exit")] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.05, help="seconds between ticks")
    ] = 1.0,
    spool: Annotated[
        Path | None,
        typer.Option(help="a collector's spool folder to load before each tick (one writer)"),
    ] = None,
    as_of: Annotated[
        datetime | None,
        typer.Option("--as-of", help="with --once: tick as of this time (UTC), e.g. on history"),
    ] = None,
    dedup_window_days: Annotated[
        float | None,
        typer.Option(min=0, help="with --spool: dedup look-back in days (default: forever)"),
    ] = None,
) -> None:
    """Run the journeys: fire triggers, admit entries, advance waits and send — resumable.

    A crash at any point is repaired by the next tick; nobody is messaged twice.
    """
    import signal
    import threading
    from datetime import timedelta

    from closedloop.activate.journeys import check_journeys
    from closedloop.activate.worker import run_worker
    from closedloop.core.clock import Clock

    p = project_or_exit(project)
    problems = check_journeys(p)
    if problems:
        raise fail(DefinitionError(problems))
    if as_of is not None and not once:
        raise fail(ClosedloopError("--as-of needs --once (a pinned clock does not advance)"))
    stop = threading.Event()
    # `closedloop serve` stops its worker with SIGTERM: finish the tick under way, then exit.
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    window = None if dedup_window_days is None else timedelta(days=dedup_window_days)
    try:
        last = run_worker(
            p,
            interval=interval,
            once=once,
            spool=spool,
            stop=stop,
            clock=Clock(as_of) if as_of else None,
            dedup_window=window,
            on_tick=None if once else lambda line: console.print(line, highlight=False),
        )
    except KeyboardInterrupt:
        stop.set()
        return
    except ClosedloopError as e:
        raise fail(e) from None
    done = ", ".join(f"{k} {v:,}" for k, v in sorted(last.finished.items())) or "none"
    console.print(
        f"entered {last.entered:,}, sent {last.sent:,}, held out {last.held_out:,}, "
        f"stopped by policy {last.suppressed:,}, waiting {last.waiting:,}; finished: {done}"
    )


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
