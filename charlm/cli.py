"""The command line: parse, call a plain library function, render.

This is the only module that imports typer or rich. Library errors
(CharlmError) become one line on stderr and exit code 1; never a traceback.
"""
from __future__ import annotations

import inspect
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


THREADS_HELP = ("Threads to compute with. Default: every core. Results do not depend on it except in the last "
                "bits of float32 sums; use the same value for bit-identical runs.")


def _limit_threads(threads: Optional[int]):
    if threads is not None and threads <= 0:
        fail(f"--threads must be positive, got {threads}")
    from .model import compute_threads
    return compute_threads(threads)


def _load_model(model: Optional[str]):
    from . import checkpoint
    from .model import build_model
    path = checkpoint.resolve(model, MODELS_DIR)
    ck = checkpoint.load(path)
    return ck, build_model(ck.model, ck.params)


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
        if self.signum:  # the second: stop at once (finally blocks still run), exit 128 + signum
            err.print(f"interrupted by a second {signal.Signals(signum).name}")
            raise SystemExit(128 + signum)
        self.signum = signum

    def __call__(self) -> bool:
        return bool(self.signum)

    def __exit__(self, *exc):
        for s, h in self._old.items():
            signal.signal(s, h)


@app.command()
def train(
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
    from ._entry import gc_on
    gc_on()  # a long run: the cyclic collector back on (off for start-up)
    from . import checkpoint
    from .config import ModelConfig, TrainConfig
    from .data import check_text_file, default_corpus, iter_text, read_text
    from .train import Source, train as run_train

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
            init_ck = checkpoint.load(checkpoint.resolve(init_from, MODELS_DIR))
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
            run_dir = Path(out_dir) if out_dir else _run_dir_name(corpus_name, init_ck.model.cell if init_ck else cell)
        show_samples = 0 if (quiet or as_json) else sample_length
        with _StopFlag() as stop, _limit_threads(threads):
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
            ck, model = _load_model(done["checkpoint"])
            from .sample import generate
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
    from . import checkpoint
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
                rec = {"event": "eval", "step": ev["step"], "train_loss": _num(ev["train_loss"]),
                       "val_bpc": _num(ev["val_bpc"]), "tokens_per_s": ev["tokens_per_s"]}
                if level == "word":
                    rec["val_ppl"] = _num(ev["val_ppl"])
                print(_dumps(rec), flush=True)
            elif kind == "done":
                done = ev
                keys = ("event", "steps", "tokens", "seconds", "tokens_per_s", "best_val_bpc", "clipped_fraction",
                        "grad_norm_median", "checkpoint")
                print(_dumps({k: ev[k] for k in keys + (("best_val_ppl",) if level == "word" else ())}),
                      flush=True)
            elif kind == "nonfinite":
                print(_dumps({"event": "nonfinite", "step": ev["step"], "lr": ev["lr"]}), flush=True)
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


def _strict(obj):
    """The object with every non-finite float (a diverged model's perplexity) as None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _strict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_strict(v) for v in obj]
    return obj


def _dumps(obj, **kw) -> str:
    """Strict JSON (no NaN / Infinity tokens: they become null)."""
    return json.dumps(_strict(obj), allow_nan=False, **kw)


def _num(x):
    return x if x is not None and math.isfinite(x) else None


@app.command()
def sample(
    model: Annotated[Optional[str], typer.Option(help="Checkpoint file or run directory (its best checkpoint). "
        "Default: the most recently written run under models/.", show_default=False)] = None,
    temp: Annotated[float, typer.Option(help="Temperature: below 1 is more conservative, above 1 more varied.")] = 0.8,
    length: Annotated[int, typer.Option(help="Number of tokens to generate.")] = 500,
    prime: Annotated[str, typer.Option(help="Text to start from (words, for a word model); it is printed first. "
                                            "Characters not in the vocabulary are skipped, words not in it are fed "
                                            "as <unk>, with a warning.")] = "",
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
            if ck.vocab.level == "word":
                words = " ".join(sorted({w for _, w in oov}))
                warn(f"{len(oov)} prime word(s) not in the model's vocabulary are fed as <unk>: {words}")
            else:
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


PPL_HELP = ("With N scored tokens (the end factor included, as KenLM counts them) and total ln P: "
            "perplexity = exp(-ln P / N); perplexity excluding OOV = exp(-(ln P - ln P_oov) / (N - n_oov)), "
            "where ln P_oov sums the factors of out-of-vocabulary words (P(<unk> | history)); "
            "bits per token = -ln P / (N ln 2).")


@app.command()
def score(
    text: Annotated[Optional[str], typer.Argument(help="The text to score; '-' reads standard input, one text per line.",
                                                  show_default=False)] = None,
    file: Annotated[Optional[str], typer.Option(help="Read texts from this file, one per line.", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option(help="Checkpoint file or run directory. Default: the most recent run "
                                                      "under models/.", show_default=False)] = None,
    no_eos: Annotated[bool, typer.Option("--no-eos", help="Leave out the end-of-sentence factor P(<eos> | text) "
                                                          "(the newline for character models).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP, show_default=False)] = None,
):
    """Score text by the chain rule: P(W) = prod_k P(w_k | w_1..w_(k-1)), token by token.

    Each text starts from the begin-of-sentence context (the zero state with <eos>, or a newline for character
    models, fed first, like KenLM's <s>) and ends with the factor P(<eos> | the whole text) unless --no-eos.
    A word outside the vocabulary contributes P(<unk> | history) and counts as OOV; a character outside it is
    left out of the product and counted as OOV.
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
        with _limit_threads(threads):
            results = [score_text(m, ck.vocab, t, eos=not no_eos) for t in texts]
        total = corpus_total(results)
        if as_json:
            strip = lambda r: {k: v for k, v in r.items() if k not in ("oov_tokens", "oov_logprob")}
            if len(results) == 1:
                print(_dumps(strip(results[0]), ensure_ascii=False))
            else:
                print(_dumps({"texts": [strip(r) for r in results], "total": total}, ensure_ascii=False))
            return
        word = ck.vocab.level == "word"
        for i, (t, r) in enumerate(zip(texts, results)):
            table = Table(title=f"text {i + 1}" if len(texts) > 1 else None)
            table.add_column("token")
            table.add_column("id", justify="right")
            table.add_column("P(token | before)", justify="right")
            table.add_column("ln P", justify="right")
            table.add_column("log10 P", justify="right")
            for tk in r["tokens"]:
                tid = f"<unk>={tk['id']}" if tk["oov"] else str(tk["id"])
                table.add_row(escape(_show_token(tk["token"]) if not word else tk["token"]), tid,
                              f"{tk['prob']:.6g}", f"{tk['logprob']:.4f}", f"{tk['logprob'] / math.log(10):.4f}")
            out.print(table)
            unit = "bits/token" if word else "bits/char"
            out.print(f"Total (log10 P) = {r['log10prob']:.4f}   ln P = {r['logprob']:.4f}   OOV = {r['oov']}"
                      + (f" ({escape(' '.join(r['oov_tokens']))!s})" if r["oov"] else "")
                      + f"   {unit} = {r['bits_per_token']:.4f}   perplexity = {r['perplexity']:.4f}"
                      + f"   tokens = {r['n_tokens']}")
        if len(texts) > 1:
            out.print(f"[bold]total[/] over {len(texts)} texts: log10 P = {total['log10prob']:.4f}   "
                      f"ln P = {total['logprob']:.4f}   tokens = {total['n_tokens']}   OOV = {total['oov']}")
            out.print(f"Perplexity including OOVs: {total['perplexity']:.4f}")
            out.print(f"Perplexity excluding OOVs: {total['perplexity_excl_oov']:.4f}")
    except CharlmError as e:
        fail(str(e))


score.__doc__ = score.__doc__ + "\n\n" + PPL_HELP


@app.command("eval")
def eval_cmd(
    file: Annotated[str, typer.Argument(help="Text file to evaluate ('-' reads standard input).", show_default=False)],
    model: Annotated[Optional[str], typer.Option(help="Checkpoint file or run directory. Default: the most recent run "
                                                      "under models/.", show_default=False)] = None,
    streams: Annotated[int, typer.Option(help="Score the file as K contiguous parts side by side, for speed. Each part "
                                              "restarts from the zero state, so K > 1 is slightly pessimistic; "
                                              "1 is exact (the state is carried through the whole file).")] = 1,
    encoding: Annotated[str, typer.Option(help="Text encoding of the file.")] = "utf-8",
    errors: Annotated[str, typer.Option(help="Undecodable bytes: strict, replace or ignore.")] = "strict",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the summary.")] = False,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP, show_default=False)] = None,
):
    """Perplexity (word models) or bits per character (character models) of a whole file.

    The file is one token sequence (one <eos> per line for word models, the newline characters for character
    models) scored from the begin context, the first input being <eos> (or a newline).
    """
    from .data import read_text
    from .score import evaluate_text
    try:
        if streams <= 0:
            fail(f"--streams must be positive, got {streams}")
        text = read_text(file, encoding, errors, what="file")
        if text and not text.endswith("\n"):
            text += "\n"  # the last line ends with <eos> too, newline or not
        ck, m = _load_model(model)
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
        with _limit_threads(threads), Progress(
                TextColumn("[bold]eval[/]"), BarColumn(), TaskProgressColumn(),
                TextColumn("{task.fields[count]} tokens"), TimeRemainingColumn(),
                console=err, transient=True, disable=as_json) as progress:
            task = progress.add_task("eval", total=None, count="-")  # total unknown until the text is encoded
            r = evaluate_text(m, ck.vocab, text, streams=streams,
                              progress=lambda d, n: progress.update(task, completed=d, total=n,
                                                                    count=f"{d:,}/{n:,}"))
        if r["n_tokens"] == 0:  # not a perfect perplexity of 1
            fail(f"nothing to evaluate: {file} is empty" + (f" but for {r['oov']} characters outside the model's "
                                                           f"vocabulary" if r["oov"] else ""))
        if as_json:
            print(_dumps({k: r[k] for k in ("n_tokens", "logprob", "perplexity", "perplexity_excl_oov",
                                                 "bits_per_token", "oov")}))
            return
        word = ck.vocab.level == "word"
        out.print(f"tokens = {r['n_tokens']:,}   ln P = {r['logprob']:.2f}   OOV = {r['oov']:,}   streams = {r['streams']}")
        if word:
            out.print(f"perplexity = {r['perplexity']:.3f}   perplexity excluding OOVs = {r['perplexity_excl_oov']:.3f}"
                      f"   bits/token = {r['bits_per_token']:.4f}")
        else:
            out.print(f"bits/char = {r['bits_per_token']:.4f}   perplexity = {r['perplexity']:.4f}")
    except CharlmError as e:
        fail(str(e))


eval_cmd.__doc__ = eval_cmd.__doc__ + "\n\n" + PPL_HELP

# Commands kept in their own modules (they import fail/out/err/_dumps from here, so this comes last).
from . import cli_grads, cli_qa  # noqa: E402

cli_grads.register(app)
cli_qa.register(app)


def unwrap_help(doc: str | None) -> str | None:
    """A docstring as --help should show it: the lines of each paragraph joined into one, so the
    terminal wraps them (Typer keeps the source's line breaks, which break lines mid-sentence)."""
    if not doc:
        return doc
    paras = inspect.cleandoc(doc).split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paras)


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
