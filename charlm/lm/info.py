"""What a checkpoint holds, as plain values (`charlm info`), and its training curves (`charlm plot`).

Losses are shown in one unit, train and validation alike: bits per character for a character
model (loss / ln 2), perplexity for a word model (exp(loss)); the history of a checkpoint keeps
one record per evaluation ({"step", "train_loss", "val_loss", ...}, natural logs).
"""
from __future__ import annotations

import math

from ..errors import CharlmError
from . import checkpoint
from .gradplot import PLOT_HINT
from .score import safe_exp

LN2 = math.log(2.0)


def unit_of(level: str) -> str:
    """The unit losses are shown in: "bpc" (character models) or "ppl" (word models)."""
    return "ppl" if level == "word" else "bpc"


def in_unit(loss: float | None, level: str) -> float | None:
    """A mean cross-entropy (nats per token) in the level's unit (None stays None)."""
    if loss is None or not math.isfinite(loss):
        return None
    return safe_exp(loss) if level == "word" else loss / LN2


def done_validation(history: list, best_val: float | None, vocab_size: int) -> dict:
    """{"best_step": the step of the lowest validation loss in history (None if none), "val_absurd":
    whether the best validation loss (nats) is over twice that of guessing uniformly among the
    vocabulary, 2 ln V: a diverged model, not a poor one (such a model once reported 2.9 million
    bits per character and exit code 0)} for the done event of training."""
    scored = [(h["val_loss"], h["step"]) for h in history if isinstance(h, dict) and h.get("val_loss") is not None]
    absurd = best_val is not None and (not math.isfinite(best_val) or best_val > 2 * math.log(max(vocab_size, 2)))
    return {"best_step": min(scored)[1] if scored else None, "val_absurd": bool(absurd)}


def curves(ckpt: checkpoint.Checkpoint) -> dict:
    """{"unit", "steps", "train", "val", "best_step", "best_val"} from the checkpoint's history, in
    the level's unit (None where a value was not finite); best_* the lowest validation."""
    level = ckpt.vocab.level
    hist = [h for h in ckpt.history if isinstance(h, dict) and "step" in h]
    steps = [int(h["step"]) for h in hist]
    train = [in_unit(h.get("train_loss"), level) for h in hist]
    val = [in_unit(h.get("val_loss"), level) for h in hist]
    scored = [(v, s) for v, s in zip(val, steps) if v is not None]
    best_val, best_step = min(scored) if scored else (None, None)
    return {"unit": unit_of(level), "steps": steps, "train": train, "val": val, "best_step": best_step,
            "best_val": best_val}


def describe(ckpt: checkpoint.Checkpoint) -> dict:
    """What `charlm info MODEL --json` prints: the file, the architecture, the vocabulary (size and
    the first 20 tokens), the parameter count, the training behind it (steps, tokens, seconds), the
    best validation (in the level's unit, and the step it came at), the corpus and its checksum."""
    cfg, vocab = ckpt.model, ckpt.vocab
    c = curves(ckpt)
    n_params = int(sum(a.size for a in ckpt.params.values()))
    trainable = n_params if cfg.cell != "esn" else int(sum(ckpt.params[n].size for n in ("decoder.weight",
                                                                                          "decoder.bias")))
    data = ckpt.data if isinstance(ckpt.data, dict) else {}
    sha = {k: v for k, v in data.items() if "sha" in str(k).lower()}
    dtype = str(next(iter(ckpt.params.values())).dtype)
    return {
        "path": ckpt.path,
        "config": {k: v for k, v in vars(cfg).items()},
        "level": vocab.level,
        "vocab_size": len(vocab),
        "vocab_sample": list(vocab.tokens[:20]),
        "parameters": n_params,
        "trainable_parameters": trainable,
        "dtype": dtype,
        "steps": ckpt.step,
        "epoch": ckpt.epoch,
        "tokens": ckpt.counters.get("tokens") if isinstance(ckpt.counters, dict) else None,
        "train_seconds": ckpt.counters.get("train_seconds") if isinstance(ckpt.counters, dict) else None,
        "unit": c["unit"],
        "best_val": in_unit(ckpt.best_val_loss, vocab.level),
        "best_step": c["best_step"],
        "evaluations": len(c["steps"]),
        "corpus": ckpt.corpus,
        "corpus_checksum": sha or None,
        "data": data,
    }


def plot_curves(ckpt: checkpoint.Checkpoint, path: str, title: str | None = None) -> dict:
    """Write a PNG of the training and validation curves (one unit, the best step marked) to path;
    returns curves(ckpt). Needs matplotlib (the `plot` extra): CharlmError naming it otherwise."""
    c = curves(ckpt)
    if not c["steps"]:
        raise CharlmError(f"{ckpt.path} has no evaluations in its history: nothing to plot")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CharlmError(PLOT_HINT) from None
    label = "perplexity" if c["unit"] == "ppl" else "bits per character"
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    pts = lambda ys: ([s for s, y in zip(c["steps"], ys) if y is not None], [y for y in ys if y is not None])
    ax.plot(*pts(c["train"]), label="train (mean of the steps since the last evaluation)", color="tab:blue")
    ax.plot(*pts(c["val"]), label="validation", color="tab:orange", marker="o", markersize=3)
    if c["best_step"] is not None:
        ax.axvline(c["best_step"], color="gray", linestyle=":", linewidth=1)
        ax.plot([c["best_step"]], [c["best_val"]], marker="*", markersize=12, color="tab:red",
                label=f"best: {c['best_val']:.3f} at step {c['best_step']:,}", linestyle="none")
    ax.set_xlabel("step")
    ax.set_ylabel(label)
    if c["unit"] == "ppl":
        ax.set_yscale("log")
    ax.set_title(title or f"{ckpt.model.cell} {ckpt.model.layers}x{ckpt.model.hidden} on {ckpt.corpus or 'its corpus'}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        raise CharlmError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
    return c
