"""Every command's --help, rendered: nothing written in square brackets is lost to Rich markup
(`pip install "charlm[plot]"` once showed as `pip install "charlm"`), no placeholder such as
<bool> is printed, and --version and shell completion are there (issue 16)."""
from __future__ import annotations

import re

import typer

import charlm
from charlm.cli import app as cli
from helpers import ok


def _commands(cmd, path=()):
    yield path, cmd
    if hasattr(cmd, "commands"):  # a group (Typer may bring its own copy of click)
        for name, sub in cmd.commands.items():
            yield from _commands(sub, path + (name,))


def _flat(text: str) -> str:
    return re.sub(r"[\s│╭╮╰╯─]+", "", text)


def test_help_keeps_every_bracketed_text(run_cli):
    root = typer.main.get_command(cli.app)
    checked = 0
    for path, cmd in _commands(root):
        shown = _flat(ok(run_cli(*path, "--help")).stdout)
        sources = [cmd.help or ""] + [getattr(p, "help", None) or "" for p in cmd.params]
        for src in sources:
            for m in re.finditer(r"\\?\[[^\]\s]*\]", src):
                needle = _flat(m.group(0).lstrip("\\"))
                assert needle in shown, (path, needle)
                checked += 1
        assert "<bool>" not in shown and "BOOLEAN" not in shown, path
    assert checked >= 2  # grads' and plot's "charlm[plot]" at least


def test_version_and_completion(run_cli):
    assert ok(run_cli("--version")).stdout.strip() == f"charlm {charlm.__version__}"
    text = ok(run_cli("--help")).stdout
    assert "--install-completion" in text and "--version" in text
    for name in ("train", "sample", "score", "eval", "grads", "info", "plot", "qa"):
        assert name in text
