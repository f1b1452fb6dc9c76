"""`charlm info MODEL` and `charlm plot RUN`: what a checkpoint holds, and its training curves
(charlm.lm.info computes both; this module only renders)."""
from __future__ import annotations

from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import CharlmError
from .common import dumps, fail, out, show_token

MODEL_ARG = typer.Argument(help="Checkpoint file or run directory (its best checkpoint). Default: the most recently "
                                "written run under models/.", show_default=False)


def _load(model: Optional[str]):
    from ..config import models_dir
    from ..lm import checkpoint
    return checkpoint.load(checkpoint.resolve(model, models_dir()))


def info_cmd(
    model: Annotated[Optional[str], MODEL_ARG] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the table.")] = False,
):
    """What a checkpoint holds: architecture, vocabulary, parameters, training steps, best validation and the
    step it came at, corpus and its checksum."""
    from ..lm.info import describe
    try:
        d = describe(_load(model))
    except CharlmError as e:
        fail(str(e))
    if as_json:
        print(dumps(d, ensure_ascii=False))
        return
    cfg = d["config"]
    t = Table(show_header=False, title=escape(d["path"]))
    t.add_column(style="bold")
    t.add_column()
    arch = (f"{cfg['cell']}, {cfg['layers']} x {cfg['hidden']} hidden, embedding {cfg['embed']}"
            if cfg["cell"] != "esn" else f"esn, {cfg['hidden']} reservoir units, leak {cfg['leak']}, sr {cfg['sr']}")
    t.add_row("model", escape(arch + _options(cfg)))
    sample = " ".join(show_token(tok) if d["level"] == "char" else tok for tok in d["vocab_sample"])
    t.add_row("vocabulary", f"{d['vocab_size']:,} {'characters' if d['level'] == 'char' else 'words'}: "
                            f"{escape(sample)}{' …' if d['vocab_size'] > len(d['vocab_sample']) else ''}")
    t.add_row("parameters", f"{d['parameters']:,} ({d['dtype']})"
              + (f", {d['trainable_parameters']:,} trained" if d["trainable_parameters"] != d["parameters"] else ""))
    t.add_row("trained", f"{d['steps']:,} steps" + (f", {d['tokens']:,} tokens" if d["tokens"] else "")
              + (f", {d['train_seconds']:.0f} s" if d["train_seconds"] else ""))
    unit = "perplexity" if d["unit"] == "ppl" else "bits/char"
    t.add_row("best validation", "-" if d["best_val"] is None else f"{d['best_val']:.4f} {unit}"
              + (f" at step {d['best_step']:,}" if d["best_step"] is not None else ""))
    t.add_row("evaluations", str(d["evaluations"]))
    t.add_row("corpus", escape(d["corpus"] or "-"))
    for k, v in (d["corpus_checksum"] or {}).items():
        t.add_row(escape(str(k)), escape(str(v)))
    out.print(t)


def plot_cmd(
    run: Annotated[Optional[str], MODEL_ARG] = None,
    output: Annotated[str, typer.Option("--output", "-o", help="PNG file to write.")] = "curves.png",
    title: Annotated[Optional[str], typer.Option(help="Title of the figure. Default: the model and corpus.",
                                                 show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Also print the curves as one JSON object.")] = False,
):
    """Plot the training and validation curves kept in a checkpoint's history, in one unit (bits per character,
    or perplexity for word models), with the best step marked. Needs matplotlib: pip install "charlm\\[plot]"."""
    from ..lm.info import plot_curves
    try:
        c = plot_curves(_load(run), output, title)
    except CharlmError as e:
        fail(str(e))
    if as_json:
        print(dumps({**c, "path": output}))
    else:
        out.print(f"curves of {len(c['steps'])} evaluations written to {escape(output)}"
                  + (f"; best validation {c['best_val']:.4f} {c['unit']} at step {c['best_step']:,}"
                     if c["best_step"] is not None else ""))


def _options(cfg: dict) -> str:
    """The model options beyond the sizes, as the flags name them (none: "")."""
    out = []
    if cfg.get("tie"):
        out.append("tied decoder")
    if cfg.get("softmax") == "adaptive":
        out.append(f"adaptive softmax (cutoffs {','.join(map(str, cfg.get('cutoffs') or ()))}, "
                   f"div {cfg.get('div_value', 4.0):g})")
    drops = [f"{name} {cfg[key]:g}" for name, key in (("dropout", "dropout"), ("in", "dropout_in"),
                                                      ("out", "dropout_out")) if cfg.get(key)]
    if drops:
        out.append(("variational " if cfg.get("variational") else "") + "dropout " + ", ".join(drops).replace(
            "dropout ", "", 1))
    return "".join(", " + o for o in out)
