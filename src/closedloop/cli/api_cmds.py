"""``closedloop api``: serve the read-only HTTP API (``closedloop.api``) with uvicorn.

Profiles are personal data: without ``CLOSEDLOOP_API_TOKEN`` the API has no guard, so it
is served on loopback only (``--host 127.0.0.1``) and any other host is refused.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated

import typer

from closedloop.cli.common import ProjectDir, err, project_or_exit


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def api(
    project: ProjectDir = Path("."),
    port: Annotated[int, typer.Option(help="port to listen on")] = 8000,
    host: Annotated[str, typer.Option(help="address to listen on")] = "127.0.0.1",
) -> None:
    """Serve profiles, segments, tags and validation as a read-only HTTP API (docs at /docs)."""
    from closedloop.api.app import TOKEN_ENV, create_api

    token = os.environ.get(TOKEN_ENV) or None
    if token is None and not _loopback(host):
        err.print(
            f"refusing to serve on {host}: {TOKEN_ENV} is not set, and profiles are personal "
            f"data; set {TOKEN_ENV} or use --host 127.0.0.1",
            markup=False,
        )
        raise typer.Exit(code=2)
    try:
        import uvicorn
    except ImportError:  # pragma: no cover - the server extra is missing
        err.print("closedloop api needs the `server` extra: pip install 'closedloop[server]'")
        raise typer.Exit(code=2) from None
    app = create_api(project_or_exit(project), token)
    uvicorn.run(app, host=host, port=port, log_level="warning")


def register(app: typer.Typer) -> None:
    app.command(name="api")(api)
