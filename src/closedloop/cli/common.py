"""What every CLI command group shares: consoles, the --project option, error reporting."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from closedloop.core.definitions import Project, load_project
from closedloop.core.errors import ClosedloopError, DefinitionError

console = Console()
err = Console(stderr=True)

ProjectDir = Annotated[
    Path, typer.Option("--project", "-p", help="project folder (holds closedloop.yaml)")
]


def fail(e: ClosedloopError) -> typer.Exit:
    """Print a user's error (every problem of a definition, with file and line); exit code 2."""
    if isinstance(e, DefinitionError):
        err.print(f"[red]{len(e.problems)} problem(s) in the project:[/red]")
        for p in e.problems:
            err.print(f"  {p}", markup=False, highlight=False, soft_wrap=True)
    else:
        err.print(f"[red]error:[/red] {escape(str(e))}", highlight=False, soft_wrap=True)
    return typer.Exit(code=2)


def project_or_exit(path: Path) -> Project:
    try:
        return load_project(path)
    except ClosedloopError as e:
        raise fail(e) from None
