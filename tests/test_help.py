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


# Commands that run the model (train, sample, score, evaluate, measure) take --threads and --json; those
# that only read a checkpoint and write a file or a table do not need --threads. A new command must be
# put in one set or the other, so none is left without --threads by oversight.
COMPUTING = {("train",), ("sample",), ("score",), ("eval",), ("grads",),
             ("qa", "train"), ("qa", "eval"), ("qa", "ask"), ("qa", "babi")}
NOT_COMPUTING = {("info",), ("plot",), ("export",)}  # read a checkpoint; --json only


def test_every_computing_command_takes_threads_and_json():
    root = typer.main.get_command(cli.app)
    seen = set()
    for path, cmd in _commands(root):
        if not path or hasattr(cmd, "commands"):  # the app and the qa group only list commands
            continue
        seen.add(path)
        opts = {o for p in cmd.params for o in getattr(p, "opts", [])}
        assert path in COMPUTING | NOT_COMPUTING, f"charlm {' '.join(path)}: add it to COMPUTING or NOT_COMPUTING"
        assert "--json" in opts, f"charlm {' '.join(path)} has no --json"
        if path in COMPUTING:
            assert "--threads" in opts, f"charlm {' '.join(path)} computes but has no --threads"
    assert seen == COMPUTING | NOT_COMPUTING  # no stale entries


def test_threads_is_refused_when_not_positive(run_cli, tmp_path):
    from helpers import failed
    (tmp_path / "q.txt").write_text("1 Mary went to the kitchen.\n2 Where is Mary?\tkitchen\t1\n")
    failed(run_cli("qa", "eval", "q.txt", "--threads", "0"), "--threads")
