"""`charlm qa ...`: question answering with a memory network (command line only; the work is in charlm.qa)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import CharlmError

qa_app = typer.Typer(
    help="Question answering over short stories with an end-to-end memory network: train on bAbI-format "
         "files, evaluate, ask a question and see which sentences the model attended to.",
    no_args_is_help=True, pretty_exceptions_enable=False, add_completion=False)

# ------------------------------------------------------------------ shared options
Encoder = Annotated[str, typer.Option(help="Sentence encoder: bow (bag of words), pe (position encoding), "
                                           "gru (a GRU's last state + pe) or bigru (forward and backward GRU "
                                           "states concatenated + pe).")]
Dim = Annotated[int, typer.Option(help="Embedding size d (bigru: even; two GRUs of d/2).")]
Hops = Annotated[int, typer.Option(help="Memory reads K (story-selection steps) before answering.")]
MemSize = Annotated[int, typer.Option("--memory-size", help="Keep the most recent N story sentences as memories.")]
Epochs = Annotated[int, typer.Option(help="Passes over the training questions.")]
Minutes = Annotated[Optional[float], typer.Option(help="Stop after this many minutes (and at --epochs at the "
                                                       "latest).", show_default=False)]
Batch = Annotated[int, typer.Option(help="Questions per update.")]
Lr = Annotated[float, typer.Option(help="Learning rate.")]
Optim = Annotated[str, typer.Option(help="adam or sgd.")]
Clip = Annotated[float, typer.Option(help="Clip the global gradient norm to this value; 0 turns clipping off.")]
Anneal = Annotated[int, typer.Option("--anneal-every", help="Halve the learning rate every N epochs after the "
                                                            "linear start (0: never).")]
ValFrac = Annotated[float, typer.Option("--val-frac", help="Fraction of the training questions held out to pick "
                                                           "the best epoch.")]
LinStart = Annotated[int, typer.Option("--linear-start", help="Train at most N epochs without the attention "
                                                              "softmax first (until validation loss stops "
                                                              "falling; at most half the epochs); 0 turns it off.")]
Noise = Annotated[float, typer.Option(help="Random noise: chance of an empty memory slot after each sentence "
                                           "while training (regularises the temporal encoding).")]
Runs = Annotated[int, typer.Option(help="Independent training runs (initialisations); the one with the best "
                                        "validation accuracy is kept.")]
Supervise = Annotated[bool, typer.Option("--supervise-facts", help="Also train story selection on the supporting "
                                                                   "facts (hop k attends to the k-th).")]
Seed = Annotated[int, typer.Option(help="Random seed for the split, initialisation and batches.")]
Relative = Annotated[int, typer.Option(help="Hops 2..K also match each memory's age relative to the memory the "
                                            "previous hop chose, clipped to +-N sentences (finds 'the move before "
                                            "that one'); 0 turns it off.")]
Mlp = Annotated[int, typer.Option(help="Answer selection also reads a tanh layer of N units over the question and "
                                       "every hop's read memory, in hop order; 0 turns it off.")]
RepeatLast = Annotated[bool, typer.Option("--repeat-last-fact", help="With --supervise-facts, hops past a "
                                                                      "question's last supporting fact attend to "
                                                                      "that fact again (default: left free).")]
Json = Annotated[bool, typer.Option("--json", help="Print strict JSON instead of the display.")]
Threads = Annotated[Optional[int], typer.Option(help="Threads to compute with. Default: every core.",
                                                show_default=False)]


def _configs(encoder, dim, hops, memory_size, epochs, minutes, batch, lr, optimizer, clip, anneal_every,
             val_frac, linear_start, noise, supervise_facts, runs, seed, relative=0, mlp=0, repeat_last_fact=False):
    from ..qa.model import QAConfig
    from ..qa.train import QATrainConfig
    if minutes is not None and minutes <= 0:
        raise CharlmError(f"--minutes must be positive, got {minutes}")
    if repeat_last_fact and not supervise_facts:
        raise CharlmError("--repeat-last-fact only means something with --supervise-facts")
    cfg = QAConfig(encoder=encoder, dim=dim, hops=hops, memory_size=memory_size, relative=relative, mlp=mlp)
    tcfg = QATrainConfig(epochs=epochs, minutes=minutes or 0.0, batch=batch, lr=lr, optimizer=optimizer, clip=clip,
                         anneal_every=anneal_every, val_frac=val_frac, seed=seed, linear_start=linear_start,
                         noise=noise, supervise_facts=supervise_facts, runs=runs, repeat_last_fact=repeat_last_fact)
    return cfg, tcfg


def _public(ev: dict) -> dict:
    return {k: v for k, v in ev.items() if k not in ("model", "config")}


# ------------------------------------------------------------------ train
@qa_app.command("train")
def train_cmd(
    file: Annotated[str, typer.Argument(help="bAbI-format training file ('-' reads standard input).",
                                        show_default=False)],
    encoder: Encoder = "pe", dim: Dim = 20, hops: Hops = 3, memory_size: MemSize = 50,
    epochs: Epochs = 100, minutes: Minutes = None, batch: Batch = 32, lr: Lr = 0.01, optimizer: Optim = "adam",
    clip: Clip = 40.0, anneal_every: Anneal = 25, val_frac: ValFrac = 0.1, linear_start: LinStart = 20,
    noise: Noise = 0.1, supervise_facts: Supervise = False, repeat_last_fact: RepeatLast = False,
    relative: Relative = 0, mlp: Mlp = 0, runs: Runs = 1, seed: Seed = 0,
    out_dir: Annotated[Optional[str], typer.Option("--out", help="Folder for the model (best.npz). Default: a new "
                                                   "folder models/<file>-<encoder>-<time>.", show_default=False)] = None,
    as_json: Json = False, threads: Threads = None,
):
    """Train a memory network on a bAbI-format file; keeps the model with the best validation accuracy.

    Ctrl-C stops after the current epoch (once the attention softmax is in) and saves the best model so far.

    With --json: one object per epoch {"event": "epoch", "epoch", "phase", "train_loss", "train_acc",
    "val_loss", "val_acc", "lr", "seconds"} and a last {"event": "done", ..., "checkpoint"}.
    """
    from ..runtime import gc_on
    gc_on()  # a long run: the cyclic collector back on (off for start-up)
    from .common import limit_threads, StopFlag, err, fail, out
    from ..lm.run import run_dir_name
    from ..qa import babi
    from ..qa.train import preflight, train
    try:
        cfg, tcfg = _configs(encoder, dim, hops, memory_size, epochs, minutes, batch, lr, optimizer, clip,
                             anneal_every, val_frac, linear_start, noise, supervise_facts, runs, seed,
                             relative, mlp, repeat_last_fact)
        questions = babi.read(file)
        name = "stdin" if file == "-" else Path(file).name
        run_dir = Path(out_dir) if out_dir else run_dir_name(name, f"qa-{encoder}")
        preflight(questions, cfg, tcfg, str(run_dir))  # memory and folder, before the progress display
        with StopFlag() as stop, limit_threads(threads):
            events = train(questions, cfg, tcfg, str(run_dir), source=name, should_stop=stop)
            done = _render_train(events, as_json, tcfg.epochs, tcfg.runs)
        if stop.signum:
            err.print(f"stopped after epoch {done['epochs']}; the best model so far is saved to {done['checkpoint']}")
            raise typer.Exit(128 + stop.signum)
        if as_json:
            return
        from rich.table import Table
        t = Table(title="memory network", show_header=False)
        t.add_row("questions (train / validation)", f"{done['n_train']:,} / {done['n_val']:,}")
        t.add_row("best validation accuracy", f"{100 * done['best_val_acc']:.1f} % (epoch {done['best_epoch']}"
                  + (f", run {done['best_run'] + 1} of {len(done['runs_val_acc'])})" if tcfg.runs > 1 else ")"))
        t.add_row("epochs, time", f"{done['epochs']}, {done['seconds']:.1f} s")
        t.add_row("model", str(done["checkpoint"]))
        out.print(t)
    except CharlmError as e:
        fail(str(e))


def _render_train(events, as_json: bool, epochs: int, runs: int) -> dict:
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .common import dumps, err
    done = None
    if as_json:
        for ev in events:
            if ev["event"] in ("epoch", "done"):
                print(dumps(_public(ev)), flush=True)
            if ev["event"] == "done":
                done = ev
        return done
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=err, transient=False) as prog:
        task = prog.add_task("epochs", total=epochs * runs, info="")
        base = 0
        for ev in events:
            if ev["event"] == "epoch":
                if ev["epoch"] == 1 and ev["run"] > 0:
                    base = prog.tasks[0].completed
                prog.update(task, completed=base + ev["epoch"],
                            info=f"{ev['phase']:7s} loss {ev['train_loss']:.3f}  val acc {100 * ev['val_acc']:.1f}%")
            elif ev["event"] == "done":
                prog.update(task, total=ev["epochs"], completed=ev["epochs"])
                done = ev
    return done


def _load_qa(model: str):
    """The QA checkpoint --model names or, without it, the most recently written one under models/
    (run folders holding a language model are passed over)."""
    from pathlib import Path

    from ..config import models_dir
    from ..qa.checkpoint import load
    if model:
        return load(model)
    root = Path(models_dir())
    files = sorted(((f.stat().st_mtime, str(f)) for f in root.glob("*/best.npz")), reverse=True) if root.is_dir() else []
    for _, f in files:
        try:
            return load(f)
        except CharlmError:
            continue  # a language model's run, or a damaged file: look further
    raise CharlmError(f"no trained QA model found under {root}/; train one with `charlm qa train` or pass --model PATH")


# ------------------------------------------------------------------ eval
@qa_app.command("eval")
def eval_cmd(
    file: Annotated[str, typer.Argument(help="bAbI-format test file ('-' reads standard input).", show_default=False)],
    model: Annotated[str, typer.Option(help="Model file or run folder (its best.npz). Default: the most recently "
                                            "written QA model under models/.", show_default=False)] = "",
    as_json: Json = False, threads: Threads = None,
):
    """Accuracy and error % of a model on a bAbI-format file (answers it has never seen count as errors).

    --json gives {"n_questions", "accuracy", "error_pct"}.
    """
    from .common import dumps, fail, limit_threads, out
    from ..qa import babi
    from ..qa.model import QAModel
    from ..qa.train import evaluate
    try:
        with limit_threads(threads):
            r = evaluate(QAModel(_load_qa(model)), babi.read(file))
        if as_json:
            print(dumps({k: r[k] for k in ("n_questions", "accuracy", "error_pct")}))
            return
        out.print(f"questions = {r['n_questions']:,}   correct = {r['correct']:,}   accuracy = "
                  f"{100 * r['accuracy']:.2f} %   error = {r['error_pct']:.2f} %")
        if r["unknown_words"]:
            out.print(f"{r['unknown_words']:,} words outside the model's vocabulary were left out of the sentences")
        if r["unknown_answers"]:
            out.print(f"{r['unknown_answers']:,} questions have an answer the model never saw in training "
                      f"(counted as errors)")
    except CharlmError as e:
        fail(str(e))


# ------------------------------------------------------------------ ask
@qa_app.command("ask")
def ask_cmd(
    question: Annotated[str, typer.Argument(help="The question, e.g. \"Where is Mary?\"", show_default=False)],
    model: Annotated[str, typer.Option(help="Model file or run folder (its best.npz). Default: the most recently "
                                            "written QA model under models/.", show_default=False)] = "",
    story: Annotated[Optional[str], typer.Option(help="The story: sentences ending in '.', e.g. \"Mary went to "
                                                      "the kitchen. John went home.\"", show_default=False)] = None,
    story_file: Annotated[Optional[str], typer.Option("--story-file", help="Read the story from a file (one or "
                                                      "more sentences per line; '-' is standard input).",
                                                      show_default=False)] = None,
    as_json: Json = False, threads: Threads = None,
):
    """Answer a question about a story, and show the story selection: each memory's attention weight per hop,
    the selected sentence (s*) marked.

    --json gives {"answer", "probability", "top", "memories", "forgotten", "hops": [{"hop", "weights",
    "selected", "selected_sentence"}]}.
    """
    from rich.table import Table

    from .common import dumps, fail, limit_threads, out
    from ..qa import babi
    from ..qa.model import QAModel
    from ..qa.train import ask
    try:
        if (story is None) == (story_file is None):
            raise CharlmError("give the story with either --story \"...\" or --story-file FILE")
        if story_file is not None:
            from ..data import read_text
            text = read_text(story_file, what="story file")
        else:
            text = story
        with limit_threads(threads):
            r = ask(QAModel(_load_qa(model)), babi.split_story(text), question)
        if as_json:
            print(dumps(r, ensure_ascii=False))
            return
        t = Table(title=f"story selection over {len(r['memories'])} memories"
                        + (f" ({r['forgotten']} older sentences forgotten)" if r["forgotten"] else ""))
        t.add_column("#", justify="right")
        t.add_column("memory")
        for h in r["hops"]:
            t.add_column(f"hop {h['hop']}", justify="right")
        for i, sent in enumerate(r["memories"]):
            cells = []
            for h in r["hops"]:
                w = f"{h['weights'][i]:.3f}"
                cells.append(f"[bold]{w} *[/]" if h["selected"] == i else w)
            t.add_row(str(i + 1), sent, *cells)
        out.print(t)
        out.print("* = s*, the sentence the hop selected (largest attention weight); each hop's weights sum to 1")
        out.print(f"Q: {question}")
        out.print(f"A: [bold]{r['answer']}[/]   (probability {r['probability']:.3f})")
    except CharlmError as e:
        fail(str(e))


# ------------------------------------------------------------------ babi
@qa_app.command("babi")
def babi_cmd(
    folder: Annotated[str, typer.Argument(help="Folder with the bAbI files qaN_<name>_train.txt / _test.txt "
                                               "(e.g. tasks_1-20_v1-2/en).", show_default=False)],
    tasks: Annotated[str, typer.Option(help="Tasks to run: ranges and lists, e.g. 1-20 or 1,3,5-7.")] = "1-20",
    encoder: Annotated[str, typer.Option(help="Sentence encoder (bow, pe, gru, bigru), or several separated by "
                                               "commas: each task then trains one model per encoder and keeps the one "
                                               "with the best validation accuracy (the test file is not consulted).")] = "pe",
    dim: Dim = 20,
    hops: Annotated[str, typer.Option(help="Memory reads K before answering; several separated by commas (e.g. "
                                           "3,5) train one model per value and encoder on each task and keep the "
                                           "best by validation accuracy (ties: the lower validation loss, then "
                                           "the fewer hops).")] = "3",
    memory_size: MemSize = 50,
    epochs: Epochs = 100, minutes: Annotated[Optional[float], typer.Option(
        help="Stop each task's training after this many minutes (and at --epochs at the latest).",
        show_default=False)] = None,
    batch: Batch = 32, lr: Lr = 0.01, optimizer: Optim = "adam",
    clip: Clip = 40.0, anneal_every: Anneal = 25, val_frac: ValFrac = 0.1, linear_start: LinStart = 20,
    noise: Noise = 0.1, supervise_facts: Supervise = False, repeat_last_fact: RepeatLast = False,
    relative: Relative = 0, mlp: Mlp = 0,
    runs: Annotated[str, typer.Option(help="Independent training runs (initialisations) per task, the best by "
                                           "validation accuracy kept; with several --encoder values, one number "
                                           "for all or one per encoder (e.g. --encoder pe,bigru --runs 10,1).")] = "1",
    seed: Seed = 0,
    out_dir: Annotated[Optional[str], typer.Option("--out", help="Save each task's model in DIR/qaN/best.npz. "
                                                   "Default: not saved.", show_default=False)] = None,
    as_json: Json = False, threads: Threads = None,
):
    """Train and test one model per bAbI task; a table of test error % per task beside the published
    numbers (Sukhbaatar et al. 2015, 1k training), the mean error and the tasks failed (> 5 % error).

    --json gives {"tasks": [{"task", "name", "test_error_pct", "n_test", "encoder", "hops", "best_val_acc",
    "epochs", "seconds", "ref_lstm", "ref_memnn", "ref_memn2n"}], "mean_error_pct", "failed", "n_tasks",
    "seconds", "encoder", "runs", "hops", "supervise_facts", "reference"}.
    """
    from ..runtime import gc_on
    gc_on()  # a long run: the cyclic collector back on (off for start-up)
    from .common import StopFlag, dumps, limit_threads, fail, out
    from ..qa import babi
    from ..qa.train import REFERENCE_MEAN, suite
    try:
        choices = _babi_choices(encoder, runs, hops)
        for e, r, h in choices:  # each choice validated up front
            cfg, tcfg = _configs(e, dim, h, memory_size, epochs, minutes, batch, lr, optimizer, clip,
                                 anneal_every, val_frac, linear_start, noise, supervise_facts, r, seed,
                                 relative, mlp, repeat_last_fact)
        task_list = babi.parse_tasks(tasks)
        with StopFlag() as stop, limit_threads(threads):
            events = suite(folder, task_list, cfg, tcfg, out_dir, should_stop=stop, choices=choices)
            summary = _follow_suite(events, as_json, len(task_list))
        ref = {k: {"mean_error_pct": v[0], "failed": v[1]} for k, v in REFERENCE_MEAN.items()}
        if as_json:
            print(dumps({**summary, "reference": ref}))
            return
        out.print(_suite_table(summary, ref, choices, tcfg.supervise_facts))
        if summary["n_tasks"] == 20:
            out.print("Reference means are over all 20 tasks (Sukhbaatar et al. 2015, Table 1).")
        else:
            out.print(f"{summary['n_tasks']} of 20 tasks run; the reference means are over all 20.")
        if stop.signum:
            raise typer.Exit(128 + stop.signum)
    except CharlmError as e:
        fail(str(e))


def _babi_choices(encoder: str, runs: str, hops: str) -> list[tuple[str, int, int]]:
    """The (encoder, runs, hops) models each task trains, from the comma-separated options."""
    encoders = [e.strip() for e in encoder.split(",")]
    try:
        run_counts = [int(r) for r in runs.split(",")]
    except ValueError:
        raise CharlmError(f"--runs must be a whole number or one per encoder separated by commas, got {runs!r}") from None
    if len(run_counts) == 1:
        run_counts *= len(encoders)
    if len(run_counts) != len(encoders) or len(set(encoders)) != len(encoders):
        raise CharlmError(f"--runs {runs} does not match --encoder {encoder}: give one number, or one per "
                          f"(distinct) encoder")
    try:
        hop_counts = list(dict.fromkeys(int(h) for h in hops.split(",")))
    except ValueError:
        raise CharlmError(f"--hops must be a whole number or several separated by commas, got {hops!r}") from None
    return [(e, r, h) for h in hop_counts for e, r in zip(encoders, run_counts)]


def _follow_suite(events, as_json: bool, n_tasks: int) -> dict:
    """Run the suite's events to the end (a progress bar on stderr unless as_json); its summary."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    from .common import err
    summary = None
    if as_json:
        for ev in events:
            if ev["event"] == "suite":
                summary = ev
        return summary
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} tasks"),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn(),
                  console=err) as prog:
        bar = prog.add_task("bAbI", total=n_tasks, info="")
        for ev in events:
            if ev["event"] == "task_start":
                prog.update(bar, description=f"task {ev['task']} {ev['name']}", info="")
            elif ev["event"] == "epoch":
                prog.update(bar, info=f"epoch {ev['epoch']} val acc {100 * ev['val_acc']:.1f}%")
            elif ev["event"] == "task":
                prog.update(bar, advance=1, info=f"test error {ev['test_error_pct']:.1f}%")
            elif ev["event"] == "suite":
                summary = ev
    return summary


def _suite_table(summary: dict, ref: dict, choices: list[tuple[str, int, int]], supervise_facts: bool):
    """The test error % per task beside the published numbers, the mean and the tasks failed."""
    from rich.table import Table
    sup = "strongly supervised (--supervise-facts)" if supervise_facts else "weakly supervised"
    several = len(choices) > 1
    several_hops = len({h for _, _, h in choices}) > 1
    t = Table(title=f"bAbI test error % (1k training) - charlm {summary['encoder']}, {sup}")
    cols = ("task", "name", "charlm") + (("encoder",) if several else ()) + (
        "LSTM", "MemNN (strong)", "MemN2N (weak)", "seconds")
    for c in cols:
        t.add_column(c, justify="left" if c in ("name", "encoder") else "right")
    for r in summary["tasks"]:
        e = r["test_error_pct"]
        mark = " ✗" if e > 5 else ""
        kept = r["encoder"] + (f", {r['hops']} hops" if several_hops else "")
        t.add_row(str(r["task"]), r["name"], f"{e:.1f}{mark}", *((kept,) if several else ()),
                  *(f"{r[k]:g}" if r[k] is not None else "-" for k in ("ref_lstm", "ref_memnn", "ref_memn2n")),
                  f"{r['seconds']:.0f}")
    t.add_section()
    pad = ("",) if several else ()
    t.add_row("mean", "", f"{summary['mean_error_pct']:.1f}", *pad, *(f"{ref[k]['mean_error_pct']:g}" for k in
              ("lstm", "memnn", "memn2n")), f"{summary['seconds']:.0f}")
    t.add_row("failed (> 5 %)", "", str(summary["failed"]), *pad, *(str(ref[k]["failed"]) for k in
              ("lstm", "memnn", "memn2n")), "")
    return t
