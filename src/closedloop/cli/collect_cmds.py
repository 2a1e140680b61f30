"""CLI commands of the collect stage (``serve``, ``failed ...``)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()
err = Console(stderr=True)


def _loader_command(
    project: Path,
    spool: Path,
    window_days: float | None,
    journeys: bool,
    refresh_interval: float | None = None,
) -> list[str]:
    """The one process that owns the warehouse: the spool loader, or the journey worker.

    The worker loads the spool before each tick, so with journeys it replaces the loader
    (DuckDB allows one writing process) and reacts to events as soon as they are loaded.
    With ``refresh_interval`` (not None) that process also refreshes identities, portraits,
    tags and segments after every load that added events, and every ``refresh_interval``
    seconds for the clock alone (0: only after loads) — ``closedloop.serving.owner``.
    """
    if refresh_interval is not None:
        command = [sys.executable, "-m", "closedloop.serving.owner"]
        command += ["--refresh-interval", str(refresh_interval)]
        if journeys:
            command.append("--journeys")
    elif journeys:
        command = [sys.executable, "-m", "closedloop.cli.main", "worker"]
    else:
        command = [sys.executable, "-m", "closedloop.collect.drain"]
    command += ["--project", str(project), "--spool", str(spool)]
    if window_days is not None:
        command += ["--dedup-window-days", str(window_days)]
    return command


def serve(
    port: Annotated[int, typer.Option(min=1, max=65535, help="TCP port to listen on")] = 8088,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    project: Annotated[
        Path, typer.Option("--project", "-p", help="project folder (holds closedloop.yaml)")
    ] = Path("."),
    workers: Annotated[int, typer.Option(min=1, max=64, help="HTTP worker processes")] = 1,
    spool: Annotated[
        Path | None, typer.Option(help="spool folder (default: PROJECT/spool)")
    ] = None,
    max_backlog_mb: Annotated[
        int, typer.Option(min=1, help="answer 429 when this much spool awaits the loader")
    ] = 2048,
    dedup_window_days: Annotated[
        float | None,
        typer.Option(min=0, help="dedup look-back in days (default: forever)"),
    ] = None,
    journeys: Annotated[
        bool | None,
        typer.Option(
            "--journeys/--no-journeys",
            help="run the journey worker (default: when a campaign has a trigger)",
        ),
    ] = None,
    refresh: Annotated[
        bool,
        typer.Option(
            "--refresh/--no-refresh",
            help="refresh identities, portraits, tags and segments after each load",
        ),
    ] = True,
    refresh_interval: Annotated[
        float,
        typer.Option(
            min=0,
            help="seconds between refreshes for the clock alone (windows roll forward); 0: none",
        ),
    ] = 60.0,
) -> None:
    """Run the HTTP collector and its loader: Segment/RudderStack clients send here.

    The collector workers only append to the fsynced spool; one loader process owns the
    warehouse and moves spooled messages into `events`. If the loader dies it is restarted;
    acknowledged messages wait in the spool meanwhile. When campaigns have triggers, that
    process is the journey worker: it loads the spool, then fires triggers and sends.
    After each load that added events (and every --refresh-interval seconds) that process
    also brings the affected customers' identities, traits, tags and segment memberships up
    to date, so an event shows in the profile and segments within seconds.
    """
    from closedloop.cli.common import fail, project_or_exit
    from closedloop.core.errors import ClosedloopError

    try:
        import fastapi  # noqa: F401
        import fastjsonschema  # noqa: F401
        import msgspec  # noqa: F401
        import uvicorn
    except ImportError as e:
        raise fail(
            ClosedloopError(
                f"the HTTP collector needs the server extra ({e.name} is missing): "
                "pip install 'closedloop[server]'"
            )
        ) from None

    p = project_or_exit(project)
    from closedloop.collect.tracking_plan import load_tracking_plans
    from closedloop.core.errors import DefinitionError

    try:  # refuse to start on a broken plan rather than fail in every worker
        load_tracking_plans(p.root, {s.name for s in p.config.sources})
    except DefinitionError as e:
        raise fail(e) from None
    folder = (spool or p.root / "spool").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["CLOSEDLOOP_PROJECT"] = str(p.root)
    os.environ["CLOSEDLOOP_SPOOL"] = str(folder)
    os.environ["CLOSEDLOOP_MAX_BACKLOG"] = str(max_backlog_mb * 1024 * 1024)
    stopping = threading.Event()
    if journeys is None:
        journeys = any(c.trigger is not None for c in p.campaigns.values())
    if journeys:
        from closedloop.activate.journeys import check_journeys

        problems = check_journeys(p)
        if problems:
            raise fail(DefinitionError(problems))
    if refresh:  # the refresh runs the build's stages: refuse a project the build would refuse
        from closedloop.pipeline import check_project

        problems = check_project(p)
        if problems:
            raise fail(DefinitionError(problems))
    interval = refresh_interval if refresh else None
    command = _loader_command(p.root, folder, dedup_window_days, journeys, interval)
    loader = [subprocess.Popen(command)]  # noqa: S603 - our own interpreter and module

    def supervise() -> None:
        while not stopping.wait(0.5):
            if loader[0].poll() is not None:
                err.print(f"loader exited ({loader[0].returncode}); restarting it")
                loader[0] = subprocess.Popen(command)  # noqa: S603

    watcher = threading.Thread(target=supervise, name="loader-supervisor", daemon=True)
    watcher.start()
    console.print(
        f"collector on http://{host}:{port} ({workers} worker(s)), spool {folder}, "
        f"docs at http://{host}:{port}/docs" + (", journeys running" if journeys else "")
    )
    # uvicorn re-raises the SIGTERM that stopped it once it has shut down; with the default
    # action that kills this process before the `finally` below, leaving the warehouse owner
    # running on (mid-refresh) after `serve` is gone. A no-op handler lets the `finally` stop
    # and wait for it, so once `serve` has exited the warehouse is free.
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        uvicorn.run(
            "closedloop.collect.server:app_from_env",
            factory=True,
            host=host,
            port=port,
            workers=workers,
            log_level="warning",
            access_log=False,
        )
    finally:
        stopping.set()
        watcher.join(timeout=2)
        loader[0].terminate()
        try:
            loader[0].wait(timeout=30)
        except subprocess.TimeoutExpired:
            loader[0].kill()


failed_app = typer.Typer(help="Failed events: rejected messages and rows, kept with their reason.")
ProjectDir = Annotated[
    Path, typer.Option("--project", "-p", help="project folder (holds closedloop.yaml)")
]


@failed_app.command("list")
def failed_list(
    project: ProjectDir = Path("."),
    source: Annotated[str | None, typer.Option(help="only this source")] = None,
    reason: Annotated[str | None, typer.Option(help="only this reason code")] = None,
    limit: Annotated[int, typer.Option(min=1)] = 50,
    as_json: Annotated[bool, typer.Option("--json", help="one JSON object per line")] = False,
) -> None:
    """Show failed events with their reason and where they came from."""
    import json

    from rich.table import Table

    from closedloop.cli.common import project_or_exit
    from closedloop.collect.loader import list_failed
    from closedloop.core.engine import Engine

    p = project_or_exit(project)
    with Engine(p.engine_url) as engine:
        rows = list_failed(engine, source=source, reason=reason, limit=limit)
    if as_json:
        for r in rows:
            typer.echo(json.dumps(r, default=str, ensure_ascii=False))
        return
    t = Table("id", "source", "reason", "where", "detail")
    for r in rows:
        t.add_row(
            str(r["failure_id"]),
            str(r["source"]),
            str(r["reason_code"]),
            str(r["location"]),
            str(r["reason"]),
        )
    console.print(t)


@failed_app.command("show")
def failed_show(
    failure_id: Annotated[str, typer.Argument(help="the id shown by `failed list`")],
    project: ProjectDir = Path("."),
) -> None:
    """Show one failed event whole: its reason, where it came from, and its payload."""
    import json

    from closedloop.cli.common import project_or_exit
    from closedloop.core.engine import Engine

    p = project_or_exit(project)
    with Engine(p.engine_url) as engine:
        t = engine.table("failed_events")
        rows = engine.to_arrow(t.filter(t.failure_id == failure_id)).to_pylist()
    if not rows:
        err.print(f"no failed event {failure_id!r}", markup=False)
        raise typer.Exit(code=1)
    row = rows[0]
    for key in ("failure_id", "source", "reason_code", "reason", "location", "message_id"):
        console.print(f"{key}: {row[key]}", markup=False, highlight=False)
    console.print(f"failed_at: {row['failed_at']:%Y-%m-%d %H:%M:%S} UTC", markup=False)
    payload = row["payload"] or ""
    try:
        console.print_json(json.dumps(json.loads(payload)))
    except (ValueError, RecursionError):
        console.print(payload, markup=False, highlight=False)


@failed_app.command("replay")
def failed_replay(
    project: ProjectDir = Path("."),
    source: Annotated[str | None, typer.Option(help="only this source")] = None,
    reason: Annotated[str | None, typer.Option(help="only this reason code")] = None,
    failure_id: Annotated[
        list[str] | None, typer.Option("--id", help="only these failed events (repeatable)")
    ] = None,
    to_source: Annotated[
        str | None, typer.Option(help="replay rows of an unknown write key as this source")
    ] = None,
) -> None:
    """Send failed events through validation again (after fixing a definition).

    Accepted messages go into `events` (a message already there is a duplicate, not a
    copy) and leave the failed events; the rest stay with their reason.
    """
    from closedloop.cli.common import fail, project_or_exit
    from closedloop.collect.replay import replay_failed
    from closedloop.collect.tracking_plan import load_tracking_plans
    from closedloop.core.engine import Engine
    from closedloop.core.errors import DefinitionError

    p = project_or_exit(project)
    if to_source is not None and to_source not in {s.name for s in p.config.sources}:
        err.print(f"unknown source {to_source!r}", markup=False)
        raise typer.Exit(code=2)
    try:
        plans = load_tracking_plans(p.root, {s.name for s in p.config.sources})
    except DefinitionError as e:
        raise fail(e) from None
    with Engine(p.engine_url) as engine:
        r = replay_failed(
            engine,
            list(p.config.sources),
            plans=plans,
            source=source,
            reason=reason,
            failure_ids=failure_id,
            to_source=to_source,
        )
    typer.echo(
        f"replayed {r.rows:,} failed events: {r.resolved:,} resolved ({r.accepted:,} messages "
        f"accepted, {r.duplicate:,} already stored), {r.still_failing:,} still failing, "
        f"{r.skipped_unknown_source:,} skipped (unknown source; see --to-source)"
    )


def sql(
    query: Annotated[str, typer.Argument(help="one SQL query (DuckDB dialect)")],
    project: ProjectDir = Path("."),
    csv: Annotated[Path | None, typer.Option(help="write the whole result as CSV")] = None,
    parquet: Annotated[Path | None, typer.Option(help="write the whole result as Parquet")] = None,
    limit: Annotated[int, typer.Option(min=1, help="rows to print")] = 50,
) -> None:
    """Query the warehouse read-only: print a table, or write CSV/Parquet.

    The connection is opened read-only and without access to files or the network, so a
    query can neither change the warehouse nor read or write anything beside it. (DuckDB
    lets one process write a file at a time: stop `closedloop serve` first.)
    """
    import duckdb
    import pyarrow.csv as pacsv
    import pyarrow.parquet as pq
    from rich.table import Table

    from closedloop.cli.common import project_or_exit

    p = project_or_exit(project)
    url = p.engine_url
    if not url.startswith("duckdb:///"):
        err.print(
            f"`closedloop sql` reads DuckDB warehouses; this project uses {url.split(':')[0]}"
        )
        raise typer.Exit(code=2)
    path = url[len("duckdb://") :]
    if not Path(path).exists():
        err.print(f"no warehouse yet at {path}; run `closedloop build` or `closedloop serve`")
        raise typer.Exit(code=2)
    try:
        con = duckdb.connect(path, read_only=True, config={"enable_external_access": False})
    except duckdb.Error as e:
        err.print(f"cannot open the warehouse: {e}", markup=False)
        raise typer.Exit(code=2) from None
    try:
        relation = con.sql(query)
        if relation is None:
            err.print("the statement returned no rows (only queries are allowed)")
            raise typer.Exit(code=2)
        result = relation.to_arrow_table()
    except duckdb.Error as e:
        err.print(f"query refused: {e}", markup=False)
        raise typer.Exit(code=2) from None
    finally:
        con.close()
    if csv is not None:
        pacsv.write_csv(result, csv)
    if parquet is not None:
        pq.write_table(result, parquet)
    if csv is not None or parquet is not None:
        written = ", ".join(str(x) for x in (csv, parquet) if x is not None)
        typer.echo(f"{result.num_rows:,} rows written to {written}")
        return
    t = Table(*result.column_names)
    for row in result.slice(0, limit).to_pylist():
        t.add_row(*("" if v is None else str(v) for v in row.values()))
    console.print(t)
    if result.num_rows > limit:
        typer.echo(f"({result.num_rows:,} rows; first {limit} shown, --limit to see more)")


def import_cmd(
    file_or_table: Annotated[
        str,
        typer.Argument(
            metavar="FILE_OR_TABLE",
            help="CSV, Parquet or Segment JSON-lines file/folder, or a database table as "
            "ENGINE_URL#TABLE (duckdb:///shop.duckdb#orders, postgresql://…/db#crm.members)",
        ),
    ],
    source: Annotated[str, typer.Option(help="the source the rows come from")],
    mapping: Annotated[
        Path | None,
        typer.Option(help="YAML mapping of columns to a message (not for JSON lines)"),
    ] = None,
    name: Annotated[str | None, typer.Option(help="import name (default: file stem)")] = None,
    project: ProjectDir = Path("."),
) -> None:
    """Import a file or table through the same gate as the collector; re-running adds nothing.

    Bad rows go to failed events with their row number and reason (`closedloop failed`).
    An import killed half-way is resumed by running it again: rows already loaded are
    recognised by their messageId and skipped, the rest are loaded.
    """
    import re

    from pydantic import ValidationError
    from rich.progress import (
        BarColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
    )

    from closedloop.cli.common import fail, project_or_exit
    from closedloop.collect.importer import (
        import_ibis_table,
        import_table,
        is_table_ref,
        open_table_ref,
    )
    from closedloop.core.definitions import ImportFormat, ImportMapping, ImportSpec
    from closedloop.core.engine import Engine
    from closedloop.core.errors import ClosedloopError, DefinitionError, Problem
    from closedloop.core.yamlfile import load_yaml

    p = project_or_exit(project)
    if source not in {s.name for s in p.config.sources}:
        err.print(f"unknown source {source!r}", markup=False)
        raise typer.Exit(code=2)
    table_ref = is_table_ref(file_or_table)
    file = Path(file_or_table.rpartition("#")[2] if table_ref else file_or_table)
    suffix = "".join(file.suffixes).lower() if file.is_file() else ""
    if table_ref:
        if mapping is None:
            err.print("a table import needs --mapping", markup=False)
            raise typer.Exit(code=2)
        fmt = ImportFormat.PARQUET  # rows with typed columns, as a Parquet file's
    elif mapping is None:
        fmt = ImportFormat.SEGMENT_JSONL
    elif suffix.endswith(".parquet") or (file.is_dir() and any(file.glob("*.parquet"))):
        fmt = ImportFormat.PARQUET
    else:
        fmt = ImportFormat.CSV
    stem = file_or_table.rpartition("#")[2] if table_ref else file.stem
    import_name = name or re.sub(r"[^a-z0-9_]", "_", stem.lower()).strip("_") or "import"
    if not import_name[0].isalpha():
        import_name = "import_" + import_name
    try:
        mapped = None
        if mapping is not None:
            data, _lines = load_yaml(mapping)
            try:
                mapped = ImportMapping.model_validate(data)
            except ValidationError as e:
                raise DefinitionError(
                    [
                        Problem(str(mapping), x["msg"], key=".".join(map(str, x["loc"])))
                        for x in e.errors()
                    ]
                ) from None
        spec = ImportSpec(
            name=import_name, path=file_or_table, source=source, format=fmt, mapping=mapped
        )
        columns = (
            TextColumn("{task.description}"),
            BarColumn(),
            TextColumn("{task.completed:,.0f} rows"),
            TaskProgressColumn(),
            TimeElapsedColumn(),
        )
        with Engine(p.engine_url) as engine, Progress(*columns, console=console) as bar:
            if engine.backend == "duckdb":  # its own bar for long queries would draw over ours
                engine.con.raw_sql("SET enable_progress_bar = false")
            if table_ref:
                con, table = open_table_ref(file_or_table)
                try:
                    total = int(table.count().to_pyarrow().as_py())
                    task = bar.add_task(f"importing {file_or_table}", total=total)
                    r = import_ibis_table(
                        engine,
                        table,
                        spec,
                        p.config.source(source),
                        location=file_or_table,
                        progress=lambda n: bar.advance(task, n),
                    )
                finally:
                    con.disconnect()
            else:
                task = bar.add_task(f"importing {file.name}", total=_rows_known(file, fmt))
                r = import_table(
                    engine,
                    file,
                    spec,
                    p.config.source(source),
                    progress=lambda n: bar.advance(task, n),
                )
    except ClosedloopError as e:
        raise fail(e) from None
    typer.echo(
        f"{import_name}: received {r.received:,}, accepted {r.accepted:,}, "
        f"failed {r.failed:,}, duplicate {r.duplicate:,}"
    )


def _rows_known(path: Path, fmt: object) -> int | None:
    """Rows of a Parquet file or folder from its footers (for the progress bar), else None."""
    from closedloop.core.definitions import ImportFormat

    if fmt is not ImportFormat.PARQUET:
        return None
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    try:
        return sum(int(pq.ParquetFile(f).metadata.num_rows) for f in files)
    except Exception:  # unreadable: the import itself says why
        return None


def register(app: typer.Typer) -> None:
    """Add the collect stage's commands to the main app."""
    app.command()(serve)
    app.command()(sql)
    app.command("import")(import_cmd)
    app.add_typer(failed_app, name="failed")
