"""`charlm train`: parse the flags, plan and run the training (charlm.lm.run), render its events
(charlm.cli.render_train). The options' meaning and defaults are the library's (charlm.lm.run.DEFAULTS)."""
from __future__ import annotations

import signal
from typing import Annotated, Optional

import typer

from ..errors import CharlmError
from ..lm.run import DEFAULTS

from .common import THREADS_HELP, StopFlag, err, fail, limit_threads, load_model, out
from .render_train import render_training


# The arguments and options of `charlm train`. Their defaults, and what they mean, are the library's:
# charlm.lm.run.DEFAULTS and charlm.lm.run.train().
_ESN = "Echo State Network (--cell esn)"
_WORD = "Regularisation and output layer"
_SCHEDULE = "Learning-rate schedule and early stopping"
Corpus = Annotated[Optional[list[str]], typer.Argument(
    help="UTF-8 text files and directories to learn from (.gz, .bz2 and .xz are decompressed; '-' alone reads "
         "standard input). Files are read in the order given; a directory's files (recursively, regular files "
         "only, hidden ones skipped) in sorted path order; each file ends a line. Without it, the English "
         "documentation text shipped with every CPython (pydoc_data.topics, ~460 KB).", show_default=False,
    metavar="CORPUS")]
Cell = Annotated[str, typer.Option(help="Recurrent cell: rnn, gru, lstm, or esn (an Echo State Network: a fixed "
                                        "random reservoir, only the readout is trained).")]
Hidden = Annotated[int, typer.Option(help="Hidden units per layer.")]
Layers = Annotated[int, typer.Option(help="Number of stacked recurrent layers.")]
Embed = Annotated[int, typer.Option(help="Size of the input embedding.")]
SeqLen = Annotated[int, typer.Option("--seq-len", help="Tokens per truncated-BPTT window.")]
Batch = Annotated[int, typer.Option(help="Parallel streams over the text (batch size).")]
Lr = Annotated[float, typer.Option(help="Learning rate.")]
Optimizer = Annotated[str, typer.Option(help="adam or sgd.")]
Clip = Annotated[float, typer.Option(help="Clip the global gradient norm to this value; 0 turns clipping off.")]
Dropout = Annotated[float, typer.Option(help="Dropout between stacked layers, in [0, 1).")]
DropoutIn = Annotated[float, typer.Option("--dropout-in", help="Dropout on the embeddings (the first layer's "
                                          "input), in [0, 1); training only.", rich_help_panel=_WORD)]
DropoutOut = Annotated[float, typer.Option("--dropout-out", help="Dropout on the last layer's output (the decoder's "
                                           "input), in [0, 1); training only.", rich_help_panel=_WORD)]
Variational = Annotated[bool, typer.Option(help="Variational dropout: one mask per window and stream, shared by its "
                                                "time steps (without it: a new mask at every step).",
                                           rich_help_panel=_WORD)]
Tie = Annotated[bool, typer.Option(help="Tie the decoder to the embedding table (one matrix for both); needs "
                                        "--embed equal to --hidden.", rich_help_panel=_WORD)]
Softmax = Annotated[str, typer.Option(help="Output layer: full, or adaptive (Grave et al. 2017: frequent words in a "
                                           "head, rare ones in smaller tail clusters), for large word vocabularies "
                                           "(--level word only).", rich_help_panel=_WORD)]
Cutoffs = Annotated[Optional[str], typer.Option(
    help="--softmax adaptive: ascending token ids where the head and each tail cluster end, e.g. 2000,10000. "
         "Default: those of 2000,10000,50000 below the vocabulary size (one cut at half a vocabulary under 2,000).",
    show_default=False, rich_help_panel=_WORD)]
DivValue = Annotated[float, typer.Option("--div-value", help="--softmax adaptive: tail cluster i projects to hidden "
                                         "/ div-value^(i+1) units.", rich_help_panel=_WORD)]
LrSchedule = Annotated[str, typer.Option("--lr-schedule", help="constant; plateau (divide the rate by --lr-decay "
                                         "after each evaluation whose validation loss is not the best yet); or "
                                         "cosine (anneal to --min-lr as 0.5 (1 + cos(pi step/budget)) over the "
                                         "run's --steps or --epochs; with a time budget alone, over the steps it "
                                         "is estimated to hold from the speed over its first tenth).",
                                         rich_help_panel=_SCHEDULE)]
LrDecay = Annotated[float, typer.Option("--lr-decay", help="--lr-schedule plateau: the divisor.",
                                        rich_help_panel=_SCHEDULE)]
Warmup = Annotated[int, typer.Option(help="Raise the rate linearly from lr/STEPS to lr over the first STEPS steps "
                                          "(0: no warm-up); with any schedule.", metavar="STEPS",
                                     rich_help_panel=_SCHEDULE)]
Patience = Annotated[int, typer.Option(help="Stop after N evaluations in a row whose validation loss is not the "
                                            "best yet (0: never).", metavar="N", rich_help_panel=_SCHEDULE)]
MinLr = Annotated[float, typer.Option("--min-lr", help="The floor: plateau never divides below it, cosine "
                                      "anneals down to it.", rich_help_panel=_SCHEDULE)]
SparseEmbedding = Annotated[bool, typer.Option(
    "--sparse-embedding", help="Adam updates only the embedding rows a batch uses, as PyTorch's SparseAdam: "
                               "much faster with a large vocabulary, and rows of words not in a batch keep their "
                               "Adam moments (so not the same numbers as dense Adam). Not with --tie. SGD always "
                               "updates only those rows (the same numbers).", rich_help_panel=_WORD)]
Units = Annotated[int, typer.Option(help="ESN: reservoir units.", rich_help_panel=_ESN)]
Leak = Annotated[float, typer.Option(help="ESN: leak rate a in (0, 1]: h = (1-a) h + a tanh(...).",
                                     rich_help_panel=_ESN)]
Sr = Annotated[float, typer.Option(help="ESN: spectral radius the recurrent matrix is scaled to.",
                                   rich_help_panel=_ESN)]
Connectivity = Annotated[float, typer.Option(help="ESN: share of non-zero recurrent weights. Default (0): 0.1, "
                                                  "or 100/units past 1,000 units.", rich_help_panel=_ESN)]
InputScaling = Annotated[float, typer.Option("--input-scaling", help="ESN: input weights drawn from U(-s, s).",
                                             rich_help_panel=_ESN)]
BiasScaling = Annotated[float, typer.Option("--bias-scaling", help="ESN: reservoir bias drawn from U(-s, s).",
                                            rich_help_panel=_ESN)]
Steps = Annotated[Optional[int], typer.Option(help="Stop after this many updates.", show_default=False)]
Epochs = Annotated[Optional[float], typer.Option(help="Stop after this many passes over the text.", show_default=False)]
Minutes = Annotated[Optional[float], typer.Option(
    help="Stop after this many minutes of training. If none of --steps/--epochs/--minutes is given: 3 minutes.",
    show_default=False)]
ValFrac = Annotated[float, typer.Option("--val-frac", help="Fraction of the text (its tail) held out for validation.")]
EvalEvery = Annotated[int, typer.Option("--eval-every", help="Evaluate, show a sample and save every N steps (and at "
                                                             "the end).")]
Seed = Annotated[int, typer.Option(help="Random seed for initialisation, dropout and samples.")]
OutDir = Annotated[Optional[str], typer.Option("--out", help="Run directory for latest.npz and best.npz. Default: a "
                                               "new folder models/<corpus>-<cell>-<time>.", show_default=False)]
Encoding = Annotated[str, typer.Option(help="Text encoding of the corpus.")]
Errors = Annotated[str, typer.Option(help="What to do with undecodable bytes: strict (stop with an error), "
                                          "replace (U+FFFD) or ignore.")]
SampleLength = Annotated[int, typer.Option("--sample-length", help="Tokens of the sample shown at each evaluation "
                                                                   "and at the end (0: none).")]
AsJson = Annotated[bool, typer.Option("--json", help="Print one JSON object per line (eval and done events) instead "
                                                     "of the progress display.")]
Quiet = Annotated[bool, typer.Option(help="No samples during training; only the progress bar and the summary.")]
Level = Annotated[str, typer.Option(help="Tokens: char (Unicode code points) or word (whitespace-separated, "
                                         "<eos> at each line end, rare words as <unk>).")]
Lower = Annotated[bool, typer.Option(help="Word level: lower-case the text first.")]
MinCount = Annotated[int, typer.Option("--min-count", help="Word level: keep words seen at least this often; "
                                                           "the rest become <unk>.")]
MaxVocab = Annotated[int, typer.Option("--max-vocab", help="Word level: at most this many tokens (the most "
                                                           "frequent), <eos> and <unk> included.")]
Val = Annotated[Optional[str], typer.Option(help="Validation text file; without it the last --val-frac of the "
                                                 "corpus is held out.", show_default=False)]
Threads = Annotated[Optional[int], typer.Option(help=THREADS_HELP, show_default=False)]
Resume = Annotated[Optional[str], typer.Option(
    help="Continue a run exactly where it stopped (run directory or checkpoint): weights, optimizer moments, step, "
         "learning rate, RNG, data position and carried state. Architecture and data come from the checkpoint; "
         "--steps/--epochs/--minutes count from where it stopped.", show_default=False)]
InitFrom = Annotated[Optional[str], typer.Option("--init-from", help="Start a new run on CORPUS from this "
                                                 "checkpoint's weights and vocabulary (fine-tuning).",
                                                 show_default=False)]
StrictVocab = Annotated[bool, typer.Option("--strict-vocab", help="With --init-from: refuse a corpus with tokens "
                                           "outside the checkpoint's vocabulary instead of mapping them to <unk> "
                                           "(characters: leaving them out).")]
CheckpointEvery = Annotated[int, typer.Option("--checkpoint-every", help="Also save latest.npz every N steps "
                                                                         "(0: only at evaluations).")]


def train_cmd(
    ctx: typer.Context,
    corpus: Corpus = None,
    cell: Cell = DEFAULTS["cell"],
    hidden: Hidden = DEFAULTS["hidden"],
    layers: Layers = DEFAULTS["layers"],
    embed: Embed = DEFAULTS["embed"],
    seq_len: SeqLen = DEFAULTS["seq_len"],
    batch: Batch = DEFAULTS["batch"],
    lr: Lr = DEFAULTS["lr"],
    optimizer: Optimizer = DEFAULTS["optimizer"],
    clip: Clip = DEFAULTS["clip"],
    dropout: Dropout = DEFAULTS["dropout"],
    dropout_in: DropoutIn = DEFAULTS["dropout_in"],
    dropout_out: DropoutOut = DEFAULTS["dropout_out"],
    variational: Variational = DEFAULTS["variational"],
    tie: Tie = DEFAULTS["tie"],
    softmax: Softmax = DEFAULTS["softmax"],
    cutoffs: Cutoffs = DEFAULTS["cutoffs"],
    div_value: DivValue = DEFAULTS["div_value"],
    sparse_embedding: SparseEmbedding = DEFAULTS["sparse_embedding"],
    lr_schedule: LrSchedule = DEFAULTS["lr_schedule"],
    lr_decay: LrDecay = DEFAULTS["lr_decay"],
    warmup: Warmup = DEFAULTS["warmup"],
    patience: Patience = DEFAULTS["patience"],
    min_lr: MinLr = DEFAULTS["min_lr"],
    units: Units = DEFAULTS["units"],
    leak: Leak = DEFAULTS["leak"],
    sr: Sr = DEFAULTS["sr"],
    connectivity: Connectivity = DEFAULTS["connectivity"],
    input_scaling: InputScaling = DEFAULTS["input_scaling"],
    bias_scaling: BiasScaling = DEFAULTS["bias_scaling"],
    steps: Steps = DEFAULTS["steps"],
    epochs: Epochs = DEFAULTS["epochs"],
    minutes: Minutes = DEFAULTS["minutes"],
    val_frac: ValFrac = DEFAULTS["val_frac"],
    eval_every: EvalEvery = DEFAULTS["eval_every"],
    seed: Seed = DEFAULTS["seed"],
    out_dir: OutDir = DEFAULTS["out"],
    encoding: Encoding = DEFAULTS["encoding"],
    errors: Errors = DEFAULTS["errors"],
    sample_length: SampleLength = DEFAULTS["sample_length"],
    as_json: AsJson = False,
    quiet: Quiet = False,
    level: Level = DEFAULTS["level"],
    lower: Lower = DEFAULTS["lower"],
    min_count: MinCount = DEFAULTS["min_count"],
    max_vocab: MaxVocab = DEFAULTS["max_vocab"],
    val: Val = DEFAULTS["val"],
    threads: Threads = None,
    resume: Resume = DEFAULTS["resume"],
    init_from: InitFrom = DEFAULTS["init_from"],
    strict_vocab: StrictVocab = DEFAULTS["strict_vocab"],
    checkpoint_every: CheckpointEvery = DEFAULTS["checkpoint_every"],
):
    """Train a model on a text and save checkpoints (the latest and the best by validation loss).

    Shows a progress bar with train loss, validation bits per character, tokens/s and ETA; samples at each
    evaluation; a summary table and a final sample at the end. Ctrl-C stops after the current step and saves.
    """
    from ..runtime import gc_on
    gc_on()  # a long run: the cyclic collector back on (off for start-up)
    from ..lm import run

    # --json and --quiet show no samples during training: none are drawn (a bad value is still refused)
    given = _given(ctx, out_dir, 0 if (quiet or as_json) and sample_length > 0 else sample_length)
    try:
        plan = run.plan(corpus or None, **given)  # one path, several, or none: run.plan takes each
        with StopFlag() as stop, limit_threads(threads):
            # under MPI every rank renders, but only rank 0's output is shown (charlm.cli.app)
            done = render_training(plan.events(should_stop=stop), as_json, quiet, plan.level)
        if stop.signum or done["reason"] == "interrupted":  # (under MPI: a signal to any rank stops all)
            _stopped(stop.signum, done)
        if sample_length and not as_json and done["checkpoint"]:
            _final_sample(done["checkpoint"], sample_length, seed)
    except CharlmError as e:
        fail(str(e))


def _given(ctx: typer.Context, out_dir: Optional[str], sample_length: int) -> dict:
    """The options given on the command line: what may contradict a checkpoint (the rest takes the
    library's defaults); --out and --sample-length always."""
    given = {name: ctx.params[name] for name in DEFAULTS
             if name != "out" and ctx.get_parameter_source(name).name == "COMMANDLINE"}
    if out_dir is not None:
        given["out"] = out_dir
    given["sample_length"] = sample_length
    return given


def _stopped(signum: int, done: dict) -> None:
    """A run stopped by a signal: say how to continue it, and exit with 128 + the signal's number."""
    by = signal.Signals(signum).name if signum else "a signal to another process"
    err.print(f"stopped by {by} at step {done['steps']}; checkpoint saved to "
              f"{done['latest']}. Continue with: charlm train --resume {done['run_dir']}")
    raise typer.Exit(128 + (signum or signal.SIGINT))


def _final_sample(checkpoint: str, length: int, seed: int) -> None:
    from ..lm.sample import generate
    ck, model = load_model(checkpoint)
    out.print("[bold]Sample[/] (temperature 0.8):")
    for chunk in generate(model, ck.vocab, length, temperature=0.8, seed=seed):
        out.out(chunk, end="", highlight=False)
    out.out("")
