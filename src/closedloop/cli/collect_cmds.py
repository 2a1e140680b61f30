"""CLI commands of the collect stage (``serve``, ``failed ...``)."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

console = Console()
err = Console(stderr=True)


def _loader_command(project: Path, spool: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "closedloop.collect.drain",
        "--project",
        str(project),
        "--spool",
        str(spool),
    ]


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
) -> None:
    """Run the HTTP collector and its loader: Segment/RudderStack clients send here.

    The collector workers only append to the fsynced spool; one loader process owns the
    warehouse and moves spooled messages into `events`. If the loader dies it is restarted;
    acknowledged messages wait in the spool meanwhile.
    """
    import uvicorn

    from closedloop.cli.main import _project

    p = _project(project)
    folder = (spool or p.root / "spool").resolve()
    folder.mkdir(parents=True, exist_ok=True)
    os.environ["CLOSEDLOOP_PROJECT"] = str(p.root)
    os.environ["CLOSEDLOOP_SPOOL"] = str(folder)
    os.environ["CLOSEDLOOP_MAX_BACKLOG"] = str(max_backlog_mb * 1024 * 1024)
    stopping = threading.Event()
    loader: list[subprocess.Popen[bytes]] = [subprocess.Popen(_loader_command(p.root, folder))]  # noqa: S603 - our own interpreter and module

    def supervise() -> None:
        while not stopping.wait(0.5):
            if loader[0].poll() is not None:
                err.print(f"loader exited ({loader[0].returncode}); restarting it")
                loader[0] = subprocess.Popen(_loader_command(p.root, folder))  # noqa: S603

    watcher = threading.Thread(target=supervise, name="loader-supervisor", daemon=True)
    watcher.start()
    console.print(
        f"collector on http://{host}:{port} ({workers} worker(s)), spool {folder}, "
        f"docs at http://{host}:{port}/docs"
    )
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


def register(app: typer.Typer) -> None:
    """Add the collect stage's commands to the main app."""
    app.command()(serve)
