"""`charlm grads`: gradient flow through time (command line only; the work is in charlm.grads)."""
from __future__ import annotations

import typer


def register(app: typer.Typer) -> None:
    """Add the grads command to app."""
