"""The Typer app: every command registered here; main() is the console script's body.

Library errors (CharlmError) become one line on stderr and exit code 1; never a traceback.
"""
from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from rich.markup import escape

from .common import err, unwrap_help
from .export import export_cmd
from .grads import grads_cmd
from .info import info_cmd, plot_cmd
from .qa import qa_app
from .train import train_cmd
from .use import eval_cmd, sample_cmd, score_cmd

def _no_flag_placeholders() -> None:
    """Typer 0.29 shows each option's type in --help ("<int>"), flags included: "--json <bool>" reads
    as if the flag took a value. Flags show no type."""
    from typer.core import TyperOption
    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "_charlm", False):
        return

    def display_type_rich(self, ctx):
        return None if getattr(self, "is_flag", False) else shown(self, ctx)
    display_type_rich._charlm = True
    TyperOption.display_type_rich = display_type_rich


_no_flag_placeholders()

app = typer.Typer(
    help="Train recurrent language models (RNN, GRU, LSTM) on your text, sample from them, and score text "
         "by the chain rule.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=True)


def _version(value: bool) -> None:
    if value:
        from .. import __version__
        print(f"charlm {__version__}")
        raise typer.Exit()


@app.callback()
def _root(version: Annotated[bool, typer.Option("--version", help="Print the version and exit.",
                                                callback=_version, is_eager=True)] = False):
    pass


app.command("train")(train_cmd)
app.command("sample")(sample_cmd)
app.command("score")(score_cmd)
app.command("eval")(eval_cmd)
app.command("grads")(grads_cmd)
app.command("info")(info_cmd)
app.command("plot")(plot_cmd)
app.command("export")(export_cmd)
app.add_typer(qa_app, name="qa")


def _unwrap_all(typer_app: typer.Typer) -> None:
    for info in typer_app.registered_commands:
        info.callback.__doc__ = unwrap_help(info.callback.__doc__)
    for group in typer_app.registered_groups:
        _unwrap_all(group.typer_instance)


_unwrap_all(app)



def main():
    """Console-script entry: any unexpected error is one line unless CHARLM_DEBUG=1."""
    for stream in (sys.stdout, sys.stderr):
        # bytes of the command line that are not valid UTF-8 arrive as lone surrogates (PEP 383);
        # echoing them (a --prime, an OOV character) must write those bytes back, not crash
        if getattr(stream, "errors", None) == "strict" and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="surrogateescape")
    try:
        _quiet_unless_rank_0()
        app()
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as e:  # a bug: still no wall of text for the user
        if os.environ.get("CHARLM_DEBUG"):
            raise
        err.print(f"[bold red]internal error:[/] {type(e).__name__}: {escape(str(e))} "
                  f"(set CHARLM_DEBUG=1 to see the traceback, and please report it)")
        sys.exit(1)


def _quiet_unless_rank_0() -> None:
    """Under MPI every rank runs the command and rank 0 alone prints: the others' output goes nowhere
    (charlm.dist.abort still reaches the terminal, through sys.__stderr__)."""
    from .. import dist
    if dist.launched() and dist.rank() != 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
