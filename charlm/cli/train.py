"""`charlm train`: parse the flags, call charlm.lm.train, render its events."""
from __future__ import annotations

import math
import signal
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..config import models_dir
from ..errors import CharlmError

from .common import (THREADS_HELP, StopFlag, dumps, err, fail, finite_or_none, limit_threads, load_model, out, run_dir_name,
                     warn)


def train_cmd(
    ctx: typer.Context,
    corpus: Annotated[Optional[str], typer.Argument(
        help="UTF-8 text file to learn from ('-' reads standard input). Without it, the English "
             "documentation text shipped with every CPython (pydoc_data.topics, ~460 KB).",
        show_default=False)] = None,
    cell: Annotated[str, typer.Option(help="Recurrent cell: rnn, gru, lstm, or esn (an Echo State Network: a fixed "
                                           "random reservoir, only the readout is trained).")] = "lstm",
    hidden: Annotated[int, typer.Option(help="Hidden units per layer.")] = 256,
    layers: Annotated[int, typer.Option(help="Number of stacked recurrent layers.")] = 2,
    embed: Annotated[int, typer.Option(help="Size of the input embedding.")] = 64,
    seq_len: Annotated[int, typer.Option("--seq-len", help="Tokens per truncated-BPTT window.")] = 64,
    batch: Annotated[int, typer.Option(help="Parallel streams over the text (batch size).")] = 32,
    lr: Annotated[float, typer.Option(help="Learning rate.")] = 2e-3,
    optimizer: Annotated[str, typer.Option(help="adam or sgd.")] = "adam",
    clip: Annotated[float, typer.Option(help="Clip the global gradient norm to this value; 0 turns clipping off.")] = 5.0,
    dropout: Annotated[float, typer.Option(help="Dropout between stacked layers, in [0, 1).")] = 0.0,
    units: Annotated[int, typer.Option(help="ESN: reservoir units.", rich_help_panel="Echo State Network (--cell esn)")] = 1000,
    leak: Annotated[float, typer.Option(help="ESN: leak rate a in (0, 1]: h = (1-a) h + a tanh(...).",
                                        rich_help_panel="Echo State Network (--cell esn)")] = 1.0,
    sr: Annotated[float, typer.Option(help="ESN: spectral radius the recurrent matrix is scaled to.",
                                      rich_help_panel="Echo State Network (--cell esn)")] = 0.9,
    connectivity: Annotated[float, typer.Option(help="ESN: share of non-zero recurrent weights. Default (0): 0.1, "
                                                     "or 100/units past 1,000 units.",
                                                rich_help_panel="Echo State Network (--cell esn)")] = 0.0,
    input_scaling: Annotated[float, typer.Option("--input-scaling", help="ESN: input weights drawn from U(-s, s).",
                                                 rich_help_panel="Echo State Network (--cell esn)")] = 1.0,
    bias_scaling: Annotated[float, typer.Option("--bias-scaling", help="ESN: reservoir bias drawn from U(-s, s).",
                                                rich_help_panel="Echo State Network (--cell esn)")] = 0.0,
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
    sample_length: Annotated[int, typer.Option("--sample-length", help="Tokens of the sample shown at each evaluation "
                                                                        "and at the end (0: none).")] = 200,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object per line (eval and done events) instead of the progress display.")] = False,
    quiet: Annotated[bool, typer.Option(help="No samples during training; only the progress bar and the summary.")] = False,
    level: Annotated[str, typer.Option(help="Tokens: char (Unicode code points) or word (whitespace-separated, "
                                            "<eos> at each line end, rare words as <unk>).")] = "char",
    lower: Annotated[bool, typer.Option(help="Word level: lower-case the text first.")] = False,
    min_count: Annotated[int, typer.Option("--min-count", help="Word level: keep words seen at least this often; "
                                                                "the rest become <unk>.")] = 1,
    max_vocab: Annotated[int, typer.Option("--max-vocab", help="Word level: at most this many tokens (the most "
                                                                "frequent), <eos> and <unk> included.")] = 50_000,
    val: Annotated[Optional[str], typer.Option(help="Validation text file; without it the last --val-frac of the "
                                                    "corpus is held out.", show_default=False)] = None,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP, show_default=False)] = None,
    resume: Annotated[Optional[str], typer.Option(help="Continue a run exactly where it stopped (run directory or "
        "checkpoint): weights, optimizer moments, step, learning rate, RNG, data position and carried state. "
        "Architecture and data come from the checkpoint; --steps/--epochs/--minutes count from where it stopped.",
        show_default=False)] = None,
    init_from: Annotated[Optional[str], typer.Option("--init-from", help="Start a new run on CORPUS from this "
        "checkpoint's weights and vocabulary (fine-tuning).", show_default=False)] = None,
    strict_vocab: Annotated[bool, typer.Option("--strict-vocab", help="With --init-from: refuse a corpus with "
        "tokens outside the checkpoint's vocabulary instead of mapping them to <unk> (characters: leaving them out).")] = False,
    checkpoint_every: Annotated[int, typer.Option("--checkpoint-every", help="Also save latest.npz every N steps "
                                                                           "(0: only at evaluations).")] = 0,
):
    """Train a model on a text and save checkpoints (the latest and the best by validation loss).

    Shows a progress bar with train loss, validation bits per character, tokens/s and ETA; samples at each
    evaluation; a summary table and a final sample at the end. Ctrl-C stops after the current step and saves.
    """
    from ..runtime import gc_on
    gc_on()  # a long run: the cyclic collector back on (off for start-up)
    from ..lm import checkpoint
    from ..config import ModelConfig, TrainConfig
    from ..data import check_text_file, default_corpus, iter_text, read_text
    from ..lm.train import Source, train as run_train

    try:
        for name, v in (("--steps", steps), ("--epochs", epochs), ("--minutes", minutes)):
            if v is not None and v <= 0:
                fail(f"{name} must be positive, got {v}")
        if sample_length < 0:
            fail(f"--sample-length must be 0 or positive, got {sample_length}")
        if checkpoint_every < 0:
            fail(f"--checkpoint-every must be 0 (off) or positive, got {checkpoint_every}")
        if resume and init_from:
            fail("give either --resume or --init-from, not both")
        if strict_vocab and not init_from:
            fail("--strict-vocab applies only with --init-from (a new run's vocabulary is built from its corpus)")
        budget_given = any(v is not None for v in (steps, epochs, minutes))
        explicit = {p for p in _MODEL_FLAGS + _DATA_FLAGS + _RUN_FLAGS
                    if ctx.get_parameter_source(p).name == "COMMANDLINE"}
        resume_ck = init_ck = None
        if resume:
            if corpus is not None or val is not None:
                fail("--resume continues with the run's own data; drop the CORPUS / --val arguments")
            resume_ck = checkpoint.load(_latest_of(resume))
            _refuse_contradictions(ctx, explicit, resume_ck, "--resume")
            if out_dir is not None and Path(out_dir).resolve() != Path(resume_ck.path).parent.resolve():
                fail(f"--out {out_dir} contradicts --resume, which continues in the run's own folder "
                     f"{Path(resume_ck.path).parent}: drop --out")
            level = resume_ck.vocab.level
        if init_from:
            init_ck = checkpoint.load(checkpoint.resolve(init_from, models_dir()))
            _refuse_contradictions(ctx, explicit & set(_MODEL_FLAGS) | (explicit & {"level", "lower"}),
                                   init_ck, "--init-from")
            level = init_ck.vocab.level
        if resume_ck is None:
            if corpus is None:
                text, corpus_name = default_corpus()
                source = Source.of(text, corpus_name)
            elif corpus == "-":
                corpus_name = "stdin"
                source = Source.of(read_text("-", encoding, errors), corpus_name)
            else:
                corpus_name = Path(corpus).name
                check_text_file(corpus, encoding, errors)  # fail early on a bad path, without reading the text
                source = Source(lambda: iter_text(corpus, encoding, errors), corpus_name)
            if val is not None:
                check_text_file(val, encoding, errors, what="validation file")
            val_source = (Source(lambda: iter_text(val, encoding, errors, what="validation file"), "validation")
                          if val is not None else None)
        else:
            source = val_source = None
            corpus_name = resume_ck.corpus
        if cell == "esn":
            given = sorted(f"--{p}" for p in ("hidden", "layers", "embed", "dropout") if p in explicit)
            if given:
                fail(f"{', '.join(given)} do not apply to --cell esn (one reservoir, no embedding); "
                     f"set its size with --units")
            mcfg = ModelConfig(cell="esn", embed=1, hidden=units, layers=1, leak=leak, sr=sr,
                               connectivity=connectivity, input_scaling=input_scaling, bias_scaling=bias_scaling)
        else:
            given = sorted(f"--{p.replace('_', '-')}" for p in _ESN_FLAGS if p in explicit)
            if given:
                fail(f"{', '.join(given)} apply only to --cell esn")
            mcfg = ModelConfig(cell=cell, embed=embed, hidden=hidden, layers=layers, dropout=dropout)
        tcfg = TrainConfig(seq_len=seq_len, batch=batch, lr=lr, optimizer=optimizer, clip=clip,
                           steps=steps or 0, epochs=epochs or 0.0, minutes=(minutes or 0.0) if budget_given else 3.0,
                           val_frac=val_frac, eval_every=eval_every, seed=seed, level=level, lower=lower,
                           min_count=min_count, max_vocab=max_vocab)
        if resume_ck is not None:
            run_dir = Path(resume_ck.path).parent
        else:
            run_dir = Path(out_dir) if out_dir else run_dir_name(corpus_name, init_ck.model.cell if init_ck else cell)
        show_samples = 0 if (quiet or as_json) else sample_length
        with StopFlag() as stop, limit_threads(threads):
            events = run_train(source, mcfg, tcfg, run_dir, corpus_name=corpus_name, val_text=val_source,
                               resume=resume_ck, init_from=init_ck, strict_vocab=strict_vocab,
                               checkpoint_every=checkpoint_every, sample_chars=show_samples, should_stop=stop)
            done = _render_training(events, as_json, quiet, level)
        if stop.signum:
            code = 128 + stop.signum
            err.print(f"stopped by {signal.Signals(stop.signum).name} at step {done['steps']}; checkpoint saved to "
                      f"{done['latest']}. Continue with: charlm train --resume {done['run_dir']}")
            raise typer.Exit(code)
        if sample_length and not as_json:
            ck, model = load_model(done["checkpoint"])
            from ..lm.sample import generate
            out.print("[bold]Sample[/] (temperature 0.8):")
            for chunk in generate(model, ck.vocab, sample_length, temperature=0.8, seed=seed):
                out.out(chunk, end="", highlight=False)
            out.out("")
    except CharlmError as e:
        fail(str(e))


_ESN_FLAGS = ["units", "leak", "sr", "connectivity", "input_scaling", "bias_scaling"]
_MODEL_FLAGS = ["cell", "hidden", "layers", "embed", "dropout"] + _ESN_FLAGS
_DATA_FLAGS = ["seq_len", "batch", "level", "lower", "min_count", "max_vocab", "val_frac", "optimizer", "seed"]
_RUN_FLAGS = ["lr", "clip", "eval_every"]  # continued exactly by --resume, free with --init-from


def _latest_of(path: str) -> str:
    """--resume takes a run directory (its latest checkpoint) or a checkpoint file."""
    from ..lm import checkpoint
    p = Path(path)
    if p.is_dir():
        if (p / checkpoint.LATEST).is_file():
            return str(p / checkpoint.LATEST)
        raise CharlmError(f"no {checkpoint.LATEST} in {p}: nothing to resume")
    if not p.exists():
        raise CharlmError(f"nothing to resume: {p} does not exist")
    latest = p.parent / checkpoint.LATEST
    if p.name != checkpoint.LATEST and latest.is_file():
        older, newer = checkpoint.load(p).step, checkpoint.load(latest).step
        if older < newer:
            raise CharlmError(f"resuming from {p} (step {older}) would overwrite {latest} (step {newer}); resume "
                              f"the run directory {p.parent}, or start a new run from {p} with --init-from")
    return str(p)


def _refuse_contradictions(ctx, explicit: set, ck, flag: str) -> None:
    """A flag given on the command line that disagrees with the checkpoint is an error."""
    have = {**ck.model.to_dict(), **(ck.train.to_dict() if ck.train else {}),
            "level": ck.vocab.level, "lower": ck.vocab.lower}
    if ck.model.cell == "esn":
        have["units"] = ck.model.hidden
    for name in sorted(explicit):
        if name in have and have[name] != ctx.params[name]:
            opt = "--" + name.replace("_", "-")
            fail(f"{opt} {ctx.params[name]} contradicts the checkpoint ({opt} {have[name]}); {flag} takes the "
                 f"architecture{', data and optimizer settings' if flag == '--resume' else ''} from the checkpoint: drop {opt}")


def _render_training(events, as_json: bool, quiet: bool, level: str = "char") -> dict:
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn

    if as_json:
        done = None
        for ev in events:
            kind = ev["event"]
            if kind == "eval":
                rec = {"event": "eval", "step": ev["step"], "train_loss": finite_or_none(ev["train_loss"]),
                       "val_bpc": finite_or_none(ev["val_bpc"]), "tokens_per_s": ev["tokens_per_s"]}
                if level == "word":
                    rec["val_ppl"] = finite_or_none(ev["val_ppl"])
                print(dumps(rec), flush=True)
            elif kind == "done":
                done = ev
                keys = ("event", "steps", "tokens", "seconds", "tokens_per_s", "best_val_bpc", "clipped_fraction",
                        "grad_norm_median", "checkpoint")
                print(dumps({k: ev[k] for k in keys + (("best_val_ppl",) if level == "word" else ())}),
                      flush=True)
            elif kind == "nonfinite":
                print(dumps({"event": "nonfinite", "step": ev["step"], "lr": ev["lr"]}), flush=True)
                err.print(f"[yellow]note:[/] step {ev['step']}: non-finite loss: update skipped, learning rate halved to {ev['lr']:g}", soft_wrap=True)
            elif kind == "note":
                err.print(f"[yellow]note:[/] {escape(ev['message'])}", soft_wrap=True)
        return done

    progress = Progress(
        TextColumn("[bold]train[/]"), BarColumn(), TaskProgressColumn(),
        TextColumn("step {task.fields[step]}"), TextColumn("loss {task.fields[loss]}"),
        TextColumn("val {task.fields[bpc]} " + ("ppl" if level == "word" else "bpc")), TextColumn("{task.fields[tps]} tok/s"),
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
                metric = ev["val_ppl"] if level == "word" else ev["val_bpc"]
                last_bpc = f"{metric:.3f}" if math.isfinite(metric) else "-"
                progress.update(task, bpc=last_bpc)
                if not quiet and ev["sample"]:
                    unit = "ppl" if level == "word" else "bpc"
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
    table.add_row("best checkpoint", done["checkpoint"])
    table.add_row("latest checkpoint", done["latest"])
    out.print(table)
    return done


