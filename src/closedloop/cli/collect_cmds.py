"""CLI commands of the collect stage (``serve``, ``failed ...``)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the collect stage's commands to the main app."""
