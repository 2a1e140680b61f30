"""CLI commands of the identity stage (``identity explain``, ``identity split``, ...)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the identity stage's commands to the main app."""
