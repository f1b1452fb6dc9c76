"""Shared pytest fixtures (keep generic: other test modules use them too). Plain helpers
that are not fixtures live in tests/helpers.py; gradient checks in tests/gradcheck.py."""
import numpy as np
import pytest

from tests.helpers import env_plain


@pytest.fixture
def rng():
    """A fresh seeded generator per test, so no test depends on another's draws."""
    return np.random.default_rng(0)


@pytest.fixture
def run_cli(tmp_path, monkeypatch):
    """Invoke the app inside an empty working folder whose models/ is the default models dir."""
    from typer.testing import CliRunner

    from charlm.cli import app as cli
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CHARLM_MODELS_DIR", raising=False)
    runner = CliRunner()

    def invoke(*args, input=None):
        result = runner.invoke(cli.app, [str(a) for a in args], input=input, env=env_plain())
        # an exception other than a clean exit is a crash, even if the runner swallowed it
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        assert "Traceback" not in result.output
        return result

    return invoke
