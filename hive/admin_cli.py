"""The admin commands of the `hive` CLI (issue 5: to be built)."""

from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Adds the admin commands to ``app``."""
