"""How `charlm train` shows the events of charlm.lm.train: JSON lines, or a progress bar with samples
and a summary table. Each renderer consumes the events and returns the "done" event."""
from __future__ import annotations

import math
from typing import Iterable

from rich.markup import escape
from rich.table import Table

from .common import dumps, err, finite_or_none, out, warn

_DONE_KEYS = ("event", "steps", "tokens", "seconds", "tokens_per_s", "best_val_bpc", "clipped_fraction",
              "grad_norm_median", "checkpoint", "reason")


def render_training(events: Iterable[dict], as_json: bool, quiet: bool, level: str = "char") -> dict:
    """Render the events (as JSON lines, or as progress and a summary table); the "done" event."""
    if as_json:
        done = render_json(events, level)
    else:
        done = render_progress(events, quiet, level)
        out.print(summary_table(done, level))
    if done and done.get("val_absurd"):
        warn(f"the best validation loss ({done['best_val_bpc']:.4g} bits per token) is worse than guessing "
             f"uniformly among the vocabulary: the model diverged; try a lower --lr or --clip")
    return done


def render_json(events: Iterable[dict], level: str = "char") -> dict:
    """One JSON object per line for the eval (with the learning rate of its last step), nonfinite and done
    (with why training stopped: "budget", "interrupted" or "patience") events; notes go to stderr."""
    done = None
    for ev in events:
        kind = ev["event"]
        if kind == "eval":
            rec = {"event": "eval", "step": ev["step"], "train_loss": finite_or_none(ev["train_loss"]),
                   "val_bpc": finite_or_none(ev["val_bpc"]), "tokens_per_s": ev["tokens_per_s"], "lr": ev["lr"]}
            if level == "word":
                rec["val_ppl"] = finite_or_none(ev["val_ppl"])
            print(dumps(rec), flush=True)
            if ev["lr_decayed"]:
                err.print(f"[yellow]note:[/] {_decay_message(ev)}", soft_wrap=True)
        elif kind == "done":
            done = ev
            keys = _DONE_KEYS + (("best_val_ppl",) if level == "word" else ())
            print(dumps({k: ev[k] for k in keys}), flush=True)
        elif kind == "nonfinite":
            print(dumps({"event": "nonfinite", "step": ev["step"], "lr": ev["lr"]}), flush=True)
            err.print(f"[yellow]note:[/] step {ev['step']}: non-finite loss: update skipped, learning rate halved "
                      f"to {ev['lr']:g}", soft_wrap=True)
        elif kind == "note":
            err.print(f"[yellow]note:[/] {escape(ev['message'])}", soft_wrap=True)
    return done


def render_progress(events: Iterable[dict], quiet: bool, level: str = "char") -> dict:
    """A progress bar on stderr (step, loss, validation metric, tokens/s, ETA), samples at evaluations."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    unit = "ppl" if level == "word" else "bpc"
    # the training loss in the validation's unit: bits per character, or perplexity for words
    in_unit = (lambda nats: math.exp(min(nats, 700.0))) if level == "word" else (lambda nats: nats / math.log(2))
    progress = Progress(
        TextColumn("[bold]train[/]"), BarColumn(), TaskProgressColumn(),
        TextColumn("step {task.fields[step]}"), TextColumn("train {task.fields[loss]} " + unit),
        TextColumn("val {task.fields[bpc]} " + unit), TextColumn("lr {task.fields[lr]}"),
        TextColumn("{task.fields[tps]} tok/s"),
        TimeRemainingColumn(), console=err, transient=False)
    task = done = status = start = None
    last_bpc = "-"
    try:
        for ev in events:
            kind = ev["event"]
            if kind == "note":
                warn(ev["message"])
            elif kind == "compiling":
                status = err.status("Compiling kernels (first run only; cached afterwards)…")
                status.start()
            elif kind == "compiled":
                if status:
                    status.stop()
                if ev["seconds"] > 3:
                    err.print(f"Kernels compiled in {ev['seconds']:.1f} s (cached for next time).")
            elif kind == "start":
                start = ev
                err.print(f"Training on {ev['n_train']:,} tokens ({ev['n_val']:,} held out), vocabulary "
                          f"{ev['vocab_size']}, {ev['params']:,} parameters, {ev['streams']} streams; run directory "
                          f"{ev['run_dir']}")
                progress.start()
                task = progress.add_task("train", total=ev["total_steps"] or ev["deadline_s"], step=0, loss="-",
                                         bpc="-", tps="-", lr="-")
            elif kind == "step":
                completed = ev["step"] if start["total_steps"] else min(ev["elapsed_s"], start["deadline_s"])
                progress.update(task, completed=completed, step=ev["step"], loss=f"{in_unit(ev['loss']):.3f}",
                                bpc=last_bpc, tps=f"{ev['tokens_per_s']:,.0f}", lr=f"{ev['lr']:.3g}")
            elif kind == "nonfinite":
                progress.console.print(f"[yellow]step {ev['step']}: loss is not finite; update skipped, "
                                       f"learning rate halved to {ev['lr']:g}[/]")
            elif kind == "eval":
                metric = ev["val_ppl"] if level == "word" else ev["val_bpc"]
                last_bpc = f"{metric:.3f}" if math.isfinite(metric) else "-"
                progress.update(task, bpc=last_bpc, lr=f"{ev['lr_next']:.3g}")
                if ev["lr_decayed"]:
                    progress.console.print(f"[yellow]{_decay_message(ev)}[/]")
                if not quiet and ev["sample"]:
                    progress.console.print(f"[dim]── step {ev['step']}, val {last_bpc} {unit} ──[/]")
                    progress.console.print(escape(ev["sample"]), soft_wrap=True)
            elif kind == "done":
                done = ev
                if start and not start["total_steps"]:
                    progress.update(task, completed=start["deadline_s"])
    finally:
        if status:
            status.stop()
        progress.stop()
    return done


def _decay_message(ev: dict) -> str:
    """What the plateau schedule did at an evaluation."""
    return (f"step {ev['step']}: the validation loss is not the best yet; learning rate divided to "
            f"{ev['lr_next']:.3g} (--lr-schedule plateau)")


def summary_table(done: dict, level: str = "char") -> Table:
    """The table shown after training: steps, tokens, time, rate, best validation metric, checkpoints."""
    table = Table(title="Training summary", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("steps", f"{done['steps']:,}")
    table.add_row("tokens", f"{done['tokens']:,}")
    table.add_row("time", f"{done['seconds']:.1f} s")
    table.add_row("tokens/s", f"{done['tokens_per_s']:,.0f}")
    if level == "word":
        table.add_row("best val perplexity", f"{done['best_val_ppl']:.2f}" if done["best_val_ppl"] is not None else "-")
    table.add_row("best val bits/token" if level == "word" else "best val bpc",
                  f"{done['best_val_bpc']:.4f}" if done["best_val_bpc"] is not None else "-")
    table.add_row("clipped steps", f"{100 * done['clipped_fraction']:.1f} %"
                  + (f" (median gradient norm before clipping {done['grad_norm_median']:.3g})"
                     if done.get("grad_norm_median") is not None else ""))
    if done.get("best_step") is not None:
        table.add_row("best at step", f"{done['best_step']:,}")
    if done.get("lr") is not None:
        table.add_row("learning rate", f"{done['lr']:.3g} (at the end)")
    if done.get("reason") == "patience":
        table.add_row("stopped early", f"the validation loss was not the best yet at {done['patience']} evaluations "
                                       f"in a row (--patience {done['patience']})")
    table.add_row("best checkpoint", done["checkpoint"])
    table.add_row("latest checkpoint", done["latest"])
    return table
