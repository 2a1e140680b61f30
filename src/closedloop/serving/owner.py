"""The process that owns the warehouse while serving: load the spool, refresh, (tick journeys).

``python -m closedloop.serving.owner --project DIR --spool DIR [--journeys]`` — started (and
restarted if it dies) by ``closedloop serve``. DuckDB allows one writing process, so loading,
the live refresh and the journeys share this one:

* without journeys: the collector's spool loader, pass after pass, calling the
  :class:`~closedloop.serving.live.LiveRefresher` after each pass;
* with journeys: the journey worker (``activate.worker.run_worker``), which loads the spool
  before each tick; the refresher runs between the load and the tick, so a segment entry
  the refresh records fires its journey in the same pass.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import threading
from datetime import timedelta
from pathlib import Path

from closedloop.serving.live import DEFAULT_INTERVAL, INCREMENTAL_FROM, LiveRefresher

log = logging.getLogger(__name__)


def run_loader(
    project_dir: Path,
    spool: Path,
    stop: threading.Event,
    *,
    refresher: LiveRefresher | None,
    dedup_window: timedelta | None = None,
    idle_seconds: float = 0.05,
    once: bool = False,
) -> None:
    """Load the spool pass after pass until ``stop``; refresh after each pass.

    ``once``: one pass (load, then the start-up refresh) and return — a cron job's run, or a
    repair after a crash.
    """
    import closedloop.collect.tables  # noqa: F401 - declares the tables written here
    from closedloop.collect.drain import SpoolLoader
    from closedloop.core.definitions import load_project
    from closedloop.core.engine import Engine

    project = load_project(project_dir)
    with Engine(project.engine_url) as engine:
        loader = SpoolLoader(engine, list(project.config.sources), spool, dedup_window=dedup_window)
        while not stop.is_set():
            moved = loader.run_once()
            ran = refresher(engine, moved.accepted) if refresher is not None else None
            if once:
                return
            if moved.records == 0 and ran is None:
                stop.wait(idle_seconds)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--project", default=".")
    parser.add_argument("--spool", required=True)
    parser.add_argument("--journeys", action="store_true", help="run the journey worker")
    parser.add_argument("--tick-interval", type=float, default=1.0, help="seconds between ticks")
    parser.add_argument(
        "--refresh-interval",
        type=float,
        default=DEFAULT_INTERVAL,
        help="seconds between clock-only refreshes (0: none)",
    )
    parser.add_argument("--no-refresh", action="store_true", help="load only, refresh nothing")
    parser.add_argument("--dedup-window-days", type=float, default=None)
    parser.add_argument("--once", action="store_true", help="one pass and its refresh, then exit")
    args = parser.parse_args(argv)
    window = None if args.dedup_window_days is None else timedelta(days=args.dedup_window_days)
    logging.basicConfig(level=logging.INFO, format="serve: %(message)s")

    from closedloop.core.definitions import load_project

    project = load_project(args.project)
    refresher = (
        None
        if args.no_refresh
        else LiveRefresher(
            project,
            interval=args.refresh_interval or None,
            report=log.info,
            # Where incremental tags, segments and lookup start (live.INCREMENTAL_FROM);
            # an environment setting so benchmarks can compare both paths.
            incremental_from=int(os.environ.get("CLOSEDLOOP_INCREMENTAL_FROM", INCREMENTAL_FROM)),
        )
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    if args.journeys:
        from closedloop.activate.worker import run_worker

        run_worker(
            project,
            interval=args.tick_interval,
            spool=Path(args.spool),
            stop=stop,
            dedup_window=window,
            on_tick=log.info,
            after_load=refresher,
            once=args.once,
        )
    else:
        run_loader(
            project.root,
            Path(args.spool),
            stop,
            refresher=refresher,
            dedup_window=window,
            once=args.once,
        )


if __name__ == "__main__":
    main()
