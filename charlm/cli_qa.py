"""`charlm qa ...`: question answering with a memory network (command line only; the work is in charlm.qa)."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the qa command group to app."""
