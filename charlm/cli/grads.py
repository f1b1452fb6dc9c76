"""`charlm grads`: gradient flow through time. Parse, call charlm.lm.grads, render."""
from __future__ import annotations

import math
import time
from typing import Annotated, List, Optional

import typer

from ..config import models_dir
from ..errors import CharlmError

# --help text: paragraphs wrapped here for the source, joined into single lines below so that
# the terminal wraps them (Typer keeps line breaks as they are)
_HELP = """Measure how the gradient of the loss at the last step of a window flows back through time.

For --windows windows of CORPUS (each --warmup tokens of context from the zero state, then --max-lag + 1
measured steps): the mean over windows of ||dL_T/dh_(T-k)|| for k = 0..--max-lag, L_T being the loss of the
prediction at the last step T alone. The gradient is the one backpropagation through time computes at the
hidden state k steps back: everything computed from it onwards follows it (for the LSTM the cell state is held
fixed; its own curve is c_norms in the JSON). For a model of several layers the reported curve ("norms") is
the FIRST layer's, the gradient that has come down through the whole stack; every layer is in norms_by_layer.
Exact, in float64, with charlm's own backward kernels.

Also reported: the mean tanh' and sigmoid' of the units along the measured steps (the bounds: tanh' <= 1,
sigmoid' <= 1/4); the decay per step, the geometric mean of norm(k) / norm(k-1) from lag 1 on (below 1 the
gradient vanishes, above 1 it explodes); and for a trained model the share of its training steps whose
gradient was clipped.

--json prints one object {"cell", "label", "norms", "mean_dtanh", "mean_dsigmoid", "clipped_fraction",
"norms_by_layer", "c_norms", "decay_per_step", ...}, or a list of them when several --model / --cell are
given; non-finite numbers are null.
"""
GRADS_HELP = "\n\n".join(" ".join(p.split()) for p in _HELP.split("\n\n"))


def grads_cmd(
    corpus: Annotated[Optional[str], typer.Argument(
        help="UTF-8 text to take the windows from ('-' reads standard input). Required with --cell; with "
             "--model it defaults to the token file of the model's training run.", show_default=False)] = None,
    model: Annotated[Optional[List[str]], typer.Option(
        help="Checkpoint file or run directory (its best checkpoint); repeat for several. Default, when no "
             "--cell is given either: the most recently written run under models/.", show_default=False)] = None,
    cell: Annotated[Optional[List[str]], typer.Option(
        help="Measure a freshly initialised model of this cell (rnn, gru or lstm) instead; repeat for several.",
        show_default=False)] = None,
    max_lag: Annotated[int, typer.Option("--max-lag", help="Largest lag k (steps back from the last step).")] = 64,
    windows: Annotated[int, typer.Option(help="Windows of text averaged over (spread evenly over CORPUS).")] = 32,
    warmup: Annotated[int, typer.Option(help="Tokens of context run from the zero state before the measured steps "
                                             "of each window, so the states are realistic.")] = 32,
    hidden: Annotated[int, typer.Option(help="With --cell: hidden units per layer.")] = 256,
    layers: Annotated[int, typer.Option(help="With --cell: number of stacked layers.")] = 2,
    embed: Annotated[int, typer.Option(help="With --cell: size of the input embedding.")] = 64,
    seed: Annotated[int, typer.Option(help="With --cell: random seed of the initialisation.")] = 0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of the table (see above).")] = False,
    plot_file: Annotated[Optional[str], typer.Option(
        "--plot", help='Also write a PNG of the curves (log scale, all models on one figure); needs matplotlib: '
                       'pip install "charlm\\[plot]".', show_default=False)] = None,
    threads: Annotated[Optional[int], typer.Option(help="Threads to compute with. Default: every core.",
                                                   show_default=False)] = None,
):
    from .common import dumps, fail, limit_threads, warn
    from ..lm import grads

    try:
        grads.check_options(max_lag, windows, warmup)
        if plot_file is not None:
            _require_matplotlib(grads.PLOT_HINT)
        jobs = grads.make_jobs(corpus, model or (), cell or (), hidden=hidden, layers=layers, embed=embed,
                               seed=seed, root=models_dir())
        for job in jobs:
            if job.warning:
                warn(job.warning)
        with limit_threads(threads):
            _compile(jobs, quiet=as_json)
            results = _measure(jobs, max_lag=max_lag, windows=windows, warmup=warmup, quiet=as_json)
        if plot_file is not None:
            grads.plot(results, plot_file)
        if as_json:
            objs = [r.to_dict() for r in results]
            print(dumps(objs[0] if len(objs) == 1 else objs))
            return
        _render(results, plot_file)
    except CharlmError as e:
        fail(str(e))


def _require_matplotlib(hint: str) -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        from .common import fail
        fail(hint)


def _compile(jobs, quiet: bool) -> None:
    """Compile (or load from Numba's cache) the kernels of each cell, under a status line."""
    from .common import err
    from ..lm import grads
    t0 = time.perf_counter()
    with err.status("Compiling kernels (first run only; cached afterwards)…"):
        grads.warm_up_jobs(jobs)
    if time.perf_counter() - t0 > 3 and not quiet:
        err.print(f"Kernels compiled in {time.perf_counter() - t0:.1f} s (cached for next time).")


def _measure(jobs, *, max_lag: int, windows: int, warmup: int, quiet: bool) -> list:
    """Each job's GradFlow, one progress bar per job on stderr (none when quiet)."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
    from .common import err
    from ..lm import grads
    results = []
    with Progress(TextColumn("[bold]grads[/] {task.description}"), BarColumn(), TaskProgressColumn(),
                  TimeRemainingColumn(), console=err, transient=True, disable=quiet) as progress:
        for job in jobs:
            task = progress.add_task(job.label, total=max_lag + 1)
            results.append(grads.measure_job(job, max_lag=max_lag, windows=windows, warmup=warmup,
                                             progress=lambda d, n, task=task: progress.update(task, completed=d)))
    return results


def _fmt(x, spec=".3g") -> str:
    return "-" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _render(results, plot_file) -> None:
    import numpy as np
    from rich.table import Table
    from rich.markup import escape
    from .common import out
    from ..lm import grads

    K = results[0].max_lag
    table = Table(title=f"mean ||dL_T/dh_(T-k)|| over {results[0].windows} windows (first layer)")
    table.add_column("lag k", justify="right")
    for r in results:  # one column per model: the norm, then its ratio to the norm at lag 0
        table.add_column(escape(r.label) + "\nnorm   ÷ lag 0", justify="right", overflow="fold")
    for k in grads.table_lags(K):
        row = [str(k)]
        for r in results:
            n0 = r.norms[0]
            row.append(f"{_fmt(float(r.norms[k]), '.2e')} {_fmt(float(r.norms[k] / n0) if n0 > 0 else None, '.2g'):>7}")
        table.add_row(*row)
    out.print(table)
    with np.errstate(all="ignore"):
        logs = np.concatenate([np.log10(r.norms[r.norms > 0]) for r in results])
    logs = logs[np.isfinite(logs)]
    lo, hi = (float(logs.min()), float(logs.max())) if logs.size else (0.0, 0.0)
    width = max(len(r.label) for r in results)
    out.print(f"lag 0 → {K}, log scale from 1e{lo:.1f} (▁) to 1e{hi:.1f} (█):")
    for r in results:
        out.print(f"{escape(r.label.ljust(width))}  {grads.sparkline(r.norms, lo, hi)}")
    for r in results:
        parts = [f"decay per step {_fmt(r.decay_per_step(), '.3f')}",
                 f"mean |tanh'| {_fmt(r.mean_dtanh, '.3f')} (≤ 1)",
                 f"mean |σ'| {_fmt(r.mean_dsigmoid, '.3f')} (≤ 0.25)" if r.mean_dsigmoid is not None
                 else "no sigmoid gates",
                 f"loss at T {_fmt(r.loss, '.3f')} nats"]
        if r.c_norms is not None:
            parts.insert(1, f"cell state c: decay per step {_fmt(grads.decay_per_step(r.c_norms), '.3f')}")
        if r.steps == 0:
            parts.append("never trained (step 0)")
        elif r.steps is not None:
            parts.append(f"clipped {_fmt(100 * r.clipped_fraction if r.clipped_fraction is not None else None, '.1f')} % "
                         f"of {r.steps:,} training steps")
            if r.grad_norm_median is not None:
                parts.append(f"gradient norm median {_fmt(r.grad_norm_median)}, max {_fmt(r.grad_norm_max)}")
        out.print(f"[bold]{escape(r.label)}[/]: " + "; ".join(parts))
    if plot_file is not None:
        out.print(f"plot written to {escape(plot_file)}")


grads_cmd.__doc__ = GRADS_HELP

