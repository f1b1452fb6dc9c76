"""Shared pytest fixtures (keep generic: other test modules use them too)."""
import numpy as np
import pytest


@pytest.fixture
def rng():
    """A fresh seeded generator per test, so no test depends on another's draws."""
    return np.random.default_rng(0)
