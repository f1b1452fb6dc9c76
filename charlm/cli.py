"""The command line: parse, call a plain library function, render.

This is the only module that imports typer or rich. Library errors
(CharlmError) become one line on stderr and exit code 1; never a traceback.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .errors import CharlmError

app = typer.Typer(
    help="Train recurrent language models (RNN, GRU, LSTM) on your text, sample from them, and score text "
         "by the chain rule.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False)

MODELS_DIR = os.environ.get("CHARLM_MODELS_DIR", "models")


def fail(message: str, code: int = 1):
    err.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code)


def warn(message: str):
    err.print(f"[yellow]warning:[/] {escape(message)}", soft_wrap=True)


def _show_token(tok: str) -> str:
    return {"\n": "\\n", "\t": "\\t", " ": "␣"}.get(tok, tok)


def _load_model(model: Optional[str]):
    from . import checkpoint
    from .model import Model
    path = checkpoint.resolve(model, MODELS_DIR)
    ck = checkpoint.load(path)
    return ck, Model(ck.model, ck.params)


def _run_dir_name(corpus_name: str, cell: str) -> Path:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(corpus_name).stem)[:40] or "corpus"
    base = Path(MODELS_DIR) / f"{stem}-{cell}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = Path(f"{base}-{i}")
    return path


class _StopFlag:
    """SIGINT / SIGTERM ask training to stop after the current step; a second signal stops at once."""

    def __init__(self):
        self.signum = 0
        self._old = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum

    def __call__(self) -> bool:
        return bool(self.signum)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


@app.command()
def train(
    corpus: Annotated[Optional[str], typer.Argument(
        help="UTF-8 text file to learn from ('-' reads standard input). Without it, the English "
             "documentation text shipped with every CPython (pydoc_data.topics, ~460 KB).",
        show_default=False)] = None,
    cell: Annotated[str, typer.Option(help="Recurrent cell: rnn, gru or lstm.")] = "lstm",
    hidden: Annotated[int, typer.Option(help="Hidden units per layer.")] = 256,
    layers: Annotated[int, typer.Option(help="Number of stacked recurrent layers.")] = 2,
    embed: Annotated[int, typer.Option(help="Size of the input embedding.")] = 64,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per truncated-BPTT window.")] = 64,
    batch: Annotated[int, typer.Option(help="Parallel streams over the text (batch size).")] = 32,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 2e-3,
    optimizer: Annotated[str, typer.Option(help="adam or sgd.")] = "adam",
    clip: Annotated[float, typer.Option(help="Clip the global gradient norm to this value; 0 turns clipping off.")] = 5.0,
    dropout: Annotated[float, typer.Option(help="Dropout between stacked layers, in [0, 1).")] = 0.0,
    steps: Annotated[Optional[int], typer.Option(help="Stop after this many updates.", show_default=False)] = None,
    epochs: Annotated[Optional[float], typer.Option(help="Stop after this many passes over the text.", show_default=False)] = None,
    minutes: Annotated[Optional[float], typer.Option(
        help="Stop after this many minutes of training. If none of --steps/--epochs/--minutes is given: 3 minutes.",
        show_default=False)] = None,
    val_frac: Annotated[float, typer.Option("--val-frac", help="Fraction of the text (its tail) held out for validation.")] = 0.05,
    eval_every: Annotated[int, typer.Option("--eval-every", help="Evaluate, show a sample and save every N steps (and at the end).")] = 500,
    seed: Annotated[int, typer.Option(help="Random seed for initialisation, dropout and samples.")] = 0,
    out_dir: Annotated[Optional[str], typer.Option("--out", help="Run directory for latest.npz and best.npz. "
        "Default: a new folder models/<corpus>-<cell>-<time>.", show_default=False)] = None,
    encoding: Annotated[str, typer.Option(help="Text encoding of the corpus.")] = "utf-8",
    errors: Annotated[str, typer.Option(help="What to do with undecodable bytes: strict (stop with an error), "
                                                "replace (U+FFFD) or ignore.")] = "strict",
    sample_length: Annotated[int, typer.Option("--sample-length", help="Characters of the sample shown at each evaluation "
                                                                        "and at the end (0: none).")] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per line (eval and done events) instead of the progress display.")] = False,
    quiet: Annotated[bool, typer.Option(help="No samples during training; only the progress bar and the summary.")] = False,
):
    """Train a model on a text and save checkpoints (the latest and the best by validation loss).

    Shows a progress bar with train loss, validation bits per character, tokens/s and ETA; samples at each
    evaluation; a summary table and a final sample at the end. Ctrl-C stops after the current step and saves.
    """
    from .config import ModelConfig, TrainConfig
    from .data import default_corpus, read_text
    from .train import train as run_train

    try:
        if corpus is None:
            text, corpus_name = default_corpus()
        else:
            text = read_text(corpus, encoding, errors)
            corpus_name = "stdin" if corpus == "-" else Path(corpus).name
        if not text.strip():
            fail(f"the corpus {corpus_name} is empty (or only whitespace); give a text with some content")
        budget_given = any(v is not None for v in (steps, epochs, minutes))
        mcfg = ModelConfig(cell=cell, embed=embed, hidden=hidden, layers=layers, dropout=dropout)
        tcfg = TrainConfig(seq_len=seq_len, batch=batch, lr=lr, optimizer=optimizer, clip=clip,
                           steps=steps or 0, epochs=epochs or 0.0, minutes=(minutes or 0.0) if budget_given else 3.0,
                           val_frac=val_frac, eval_every=eval_every, seed=seed)
        for name, v in (("--steps", steps), ("--epochs", epochs), ("--minutes", minutes)):
            if v is not None and v <= 0:
                fail(f"{name} must be positive, got {v}")
        if sample_length < 0:
            fail(f"--sample-length must be 0 or positive, got {sample_length}")
        run_dir = Path(out_dir) if out_dir else _run_dir_name(corpus_name, cell)
        show_samples = 0 if (quiet or as_json) else sample_length
        with _StopFlag() as stop:
            events = run_train(text, mcfg, tcfg, run_dir, corpus_name=corpus_name,
                               sample_chars=show_samples, should_stop=stop)
            done = _render_training(events, as_json, quiet)
        if stop.signum:
            code = 128 + stop.signum
            err.print(f"stopped by {signal.Signals(stop.signum).name} at step {done['steps']}; "
                      f"checkpoint saved to {done['latest']}")
            raise typer.Exit(code)
        if sample_length and not as_json:
            ck, model = _load_model(done["checkpoint"])
            from .sample import generate
            out.print("[bold]Sample[/] (temperature 0.8):")
            for chunk in generate(model, ck.vocab, sample_length, temperature=0.8, seed=seed):
                out.out(chunk, end="", highlight=False)
            out.out("")
    except CharlmError as e:
        fail(str(e))


def _render_training(events, as_json: bool, quiet: bool) -> dict:
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    if as_json:
        done = None
        for ev in events:
            kind = ev["event"]
            if kind == "eval":
                print(json.dumps({"event": "eval", "step": ev["step"], "train_loss": _num(ev["train_loss"]),
                                  "val_bpc": _num(ev["val_bpc"]), "tokens_per_s": ev["tokens_per_s"]}), flush=True)
            elif kind == "done":
                done = ev
                print(json.dumps({k: ev[k] for k in ("event", "steps", "tokens", "seconds", "tokens_per_s",
                                                     "best_val_bpc", "checkpoint")}), flush=True)
            elif kind in ("note", "nonfinite"):
                err.print(f"[yellow]note:[/] {escape(ev.get('message') or 'non-finite loss: update skipped, learning rate halved to %g' % ev['lr'])}")
        return done

    progress = Progress(
        TextColumn("[bold]train[/]"), BarColumn(), TaskProgressColumn(),
        TextColumn("step {task.fields[step]}"), TextColumn("loss {task.fields[loss]}"),
        TextColumn("val {task.fields[bpc]} bpc"), TextColumn("{task.fields[tps]} tok/s"),
        TimeRemainingColumn(), console=err, transient=False)
    task = None
    done = None
    status = None
    start = None
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
                err.print(f"Training on {ev['n_train']:,} tokens ({ev['n_val']:,} held out), vocabulary {ev['vocab_size']}, "
                          f"{ev['params']:,} parameters, {ev['streams']} streams; run directory {ev['run_dir']}")
                total = ev["total_steps"] or ev["deadline_s"]
                progress.start()
                task = progress.add_task("train", total=total, step=0, loss="-", bpc="-", tps="-")
            elif kind == "step":
                completed = ev["step"] if start["total_steps"] else min(ev["elapsed_s"], start["deadline_s"])
                progress.update(task, completed=completed, step=ev["step"], loss=f"{ev['loss']:.3f}",
                                bpc=last_bpc, tps=f"{ev['tokens_per_s']:,.0f}")
            elif kind == "nonfinite":
                progress.console.print(f"[yellow]step {ev['step']}: loss is not finite; update skipped, "
                                       f"learning rate halved to {ev['lr']:g}[/]")
            elif kind == "eval":
                last_bpc = f"{ev['val_bpc']:.3f}" if math.isfinite(ev["val_bpc"]) else "-"
                progress.update(task, bpc=last_bpc)
                if not quiet and ev["sample"]:
                    progress.console.print(f"[dim]── step {ev['step']}, val {last_bpc} bpc ──[/]")
                    progress.console.print(escape(ev["sample"]), soft_wrap=True)
            elif kind == "done":
                done = ev
                if start and not start["total_steps"]:
                    progress.update(task, completed=start["deadline_s"])
    finally:
        if status:
            status.stop()
        progress.stop()
    table = Table(title="Training summary", show_header=False)
    table.add_column(style="bold")
    table.add_column()
    table.add_row("steps", f"{done['steps']:,}")
    table.add_row("tokens", f"{done['tokens']:,}")
    table.add_row("time", f"{done['seconds']:.1f} s")
    table.add_row("tokens/s", f"{done['tokens_per_s']:,.0f}")
    table.add_row("best val bpc", f"{done['best_val_bpc']:.4f}" if done["best_val_bpc"] is not None else "-")
    table.add_row("clipped steps", f"{100 * done['clipped_fraction']:.1f} %")
    table.add_row("best checkpoint", done["checkpoint"])
    table.add_row("latest checkpoint", done["latest"])
    out.print(table)
    return done


def _num(x):
    return x if x is not None and math.isfinite(x) else None


@app.command()
def sample(
    model: Annotated[Optional[str], typer.Option(help="Checkpoint file or run directory (its best checkpoint). "
        "Default: the most recently written run under models/.", show_default=False)] = None,
    temp: Annotated[float, typer.Option(help="Temperature: below 1 is more conservative, above 1 more varied.")] = 0.8,
    length: Annotated[int, typer.Option(help="Number of tokens to generate.")] = 500,
    prime: Annotated[str, typer.Option(help="Text to start from; it is printed first. Characters not in the "
                                            "vocabulary are skipped with a warning.")] = "",
    seed: Annotated[Optional[int], typer.Option(help="Random seed; the same seed gives the same text. Default: random.",
                                                show_default=False)] = None,
    greedy: Annotated[bool, typer.Option(help="Always take the most likely token (ignores --temp).")] = False,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample only among the K most likely tokens (0: all).")] = 0,
):
    """Generate text from a trained model, streamed to stdout as it is produced."""
    try:
        if length <= 0:
            fail(f"--length must be positive, got {length}")
        if not greedy and not temp > 0:
            fail(f"--temp must be positive, got {temp}")
        if top_k < 0:
            fail(f"--top-k must be 0 (off) or positive, got {top_k}")
        ck, m = _load_model(model)
        from .sample import generate
        _, oov = ck.vocab.encode(prime)
        if oov:
            chars = "".join(sorted({c for _, c in oov}))
            warn(f"{len(oov)} prime character(s) not in the model's vocabulary were skipped: {chars!r}")
        sys.stdout.write(prime)
        for chunk in generate(m, ck.vocab, length, temperature=temp, prime=prime, seed=seed,
                              top_k=top_k, greedy=greedy):
            sys.stdout.write(chunk)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except CharlmError as e:
        fail(str(e))


@app.command()
def score(
    text: Annotated[Optional[str], typer.Argument(help="The text to score; '-' reads standard input, one text per line.",
                                                  show_default=False)] = None,
    file: Annotated[Optional[str], typer.Option(help="Read texts from this file, one per line.", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option(help="Checkpoint file or run directory. Default: the most recent run "
                                                      "under models/.", show_default=False)] = None,
    no_eos: Annotated[bool, typer.Option("--no-eos", help="Leave out the end-of-text factor P(newline | text).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
):
    """Score text by the chain rule: P(W) = prod_k P(w_k | w_1..w_(k-1)), token by token.

    The context starts from the zero state with a newline fed as the first input (the begin-of-text context);
    the last factor is P(newline | the whole text) unless --no-eos. Characters outside the vocabulary are left
    out of the product and counted as OOV. Perplexity = exp(-ln P / N), bits per token = -log2 P / N, where N
    counts the scored tokens (including the end factor).
    """
    from .data import read_text
    from .score import corpus_total, score_text
    try:
        if text is not None and file is not None:
            fail("give either TEXT or --file, not both")
        if file is not None or text == "-":
            raw = read_text(file if file is not None else "-", what="input")
            texts = raw.split("\n")
            if texts and texts[-1] == "":
                texts.pop()
            if not texts:
                fail("no text to score: the input is empty")
        elif text is not None:
            texts = [text]
        else:
            fail("give a TEXT to score, '-' for standard input, or --file FILE")
        ck, m = _load_model(model)
        results = [score_text(m, ck.vocab, t, eos=not no_eos) for t in texts]
        total = corpus_total(results)
        if as_json:
            strip = lambda r: {k: v for k, v in r.items() if k not in ("oov_tokens", "oov_logprob")}
            if len(results) == 1:
                print(json.dumps(strip(results[0]), ensure_ascii=False))
            else:
                print(json.dumps({"texts": [strip(r) for r in results], "total": total}, ensure_ascii=False))
            return
        for i, (t, r) in enumerate(zip(texts, results)):
            table = Table(title=f"text {i + 1}" if len(texts) > 1 else None)
            table.add_column("token")
            table.add_column("P(token | before)", justify="right")
            table.add_column("ln P", justify="right")
            for tk in r["tokens"]:
                table.add_row(escape(_show_token(tk["token"])), f"{tk['prob']:.6g}", f"{tk['logprob']:.4f}")
            out.print(table)
            out.print(f"ln P = {r['logprob']:.4f}   log10 P = {r['log10prob']:.4f}   "
                      f"bits/char = {r['bits_per_token']:.4f}   perplexity = {r['perplexity']:.4f}   "
                      f"tokens = {r['n_tokens']}   OOV = {r['oov']}"
                      + (f" ({escape(''.join(r['oov_tokens']))!s})" if r["oov"] else ""))
        if len(texts) > 1:
            out.print(f"[bold]total[/] over {len(texts)} texts: ln P = {total['logprob']:.4f}   "
                      f"log10 P = {total['log10prob']:.4f}   bits/char = {total['bits_per_token']:.4f}   "
                      f"perplexity = {total['perplexity']:.4f}   tokens = {total['n_tokens']}   OOV = {total['oov']}")
    except CharlmError as e:
        fail(str(e))


def main():
    """Console-script entry: any unexpected error is one line unless CHARLM_DEBUG=1."""
    try:
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
