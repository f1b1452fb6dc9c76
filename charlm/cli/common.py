"""What every command shares: the consoles, one-line errors and warnings, strict JSON, the
signal flag, thread limits and the model loader. Only charlm.cli imports typer and rich."""
from __future__ import annotations

import inspect
import json
import math
import signal
import warnings
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from ..config import models_dir

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 1):
    from .. import dist
    if dist.launched() and dist.rank() != 0:  # under MPI every rank has the same error; rank 0 says it
        raise typer.Exit(code)
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str):
    err.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """The library's own warnings (an all-OOV text scored, temporary files cleaned up, a first float64
    compile) as one line on stderr, `note:` or `warning:` as the category says; others as Python shows them."""
    if not getattr(category, "__module__", "").startswith("charlm."):
        return _python_showwarning(message, category, filename, lineno, file, line)
    from .. import dist
    if dist.launched() and dist.rank() != 0:  # every rank has the same warning; rank 0 says it
        return
    prefix = getattr(category, "prefix", "warning")
    err.print(f"[yellow]{prefix}:[/] {escape(str(message))}", soft_wrap=True)


_python_showwarning = warnings.showwarning
warnings.showwarning = _show_warning  # the CLI's process only: the library never prints


def show_token(tok: str) -> str:
    return {"\n": "\\n", "\t": "\\t", " ": "␣"}.get(tok, tok)


THREADS_HELP = ("Threads to compute with. Default: every core. Results do not depend on it except in the last "
                "bits of float32 sums; use the same value for bit-identical runs.")


def limit_threads(threads: Optional[int]):
    if threads is not None and threads <= 0:
        fail(f"--threads must be positive, got {threads}")
    from ..runtime import compute_threads
    return compute_threads(threads)


def load_model(model: Optional[str]):
    from ..lm import checkpoint
    from ..lm.models import build_model
    path = checkpoint.resolve(model, models_dir())
    ck = checkpoint.load(path)
    return ck, build_model(ck.model, ck.params)


class StopFlag:
    """SIGINT / SIGTERM ask training to stop after the current step; a second signal stops at once."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum:  # the second: stop at once (finally blocks still run), exit 128 + signum
            err.print(f"interrupted by a second {signal.Signals(signum).name}")
            raise SystemExit(128 + signum)
        self.signum = signum

    def __call__(self) -> bool:
        return bool(self.signum)

    def __exit__(self, *exc):
        # once a signal has asked the run to stop, the process is on its way out: a second signal
        # that comes now (while the checkpoint is reported or Python shuts down) ends it at once
        # and quietly, as during the run; restoring the old handler would raise KeyboardInterrupt
        # into whatever shutdown code is running and print its traceback
        for s, h in self._old.items():
            signal.signal(s, _exit_now if self.signum else h)


def _exit_now(signum, frame):
    """A second signal after the run has stopped (its checkpoint is saved): exit 128 + signum."""
    from ..runtime import exit_now
    exit_now(signum, frame, f"interrupted by a second {signal.Signals(signum).name}\n")


def strict_json(obj):
    """The object with every non-finite float (a diverged model's perplexity) as None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    return obj


def dumps(obj, **kw) -> str:
    """Strict JSON (no NaN / Infinity tokens: they become null)."""
    return json.dumps(strict_json(obj), allow_nan=False, **kw)


def finite_or_none(x):
    return x if x is not None and math.isfinite(x) else None



PPL_HELP = ("With N scored tokens (the end factor included, as KenLM counts them) and total ln P: "
            "perplexity = exp(-ln P / N); perplexity excluding OOV = exp(-(ln P - ln P_oov) / (N - n_oov)), "
            "where ln P_oov sums the factors of out-of-vocabulary words (P(<unk> | history)); "
            "bits per token = -ln P / (N ln 2).")



def unwrap_help(doc: str | None) -> str | None:
    """A docstring as --help should show it: the lines of each paragraph joined into one, so the
    terminal wraps them (Typer keeps the source's line breaks, which break lines mid-sentence)."""
    if not doc:
        return doc
    paras = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paras)

