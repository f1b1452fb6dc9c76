"""Run planning: what the options of `charlm train` (and of charlm.train) mean.

plan() turns a corpus and options into a Plan: the checks that options do not contradict each other or
the checkpoint a run resumes / starts from, the model and training configurations, the corpus to read and
the run directory. train() is plan() followed by the training loop (charlm.lm.train), and is what the
command line calls. Every problem is a CharlmError worded with the command line's flag names.

Options a caller passes are "given": with --resume or --init-from, a given option that disagrees with the
checkpoint is refused (naming it) rather than silently ignored. Options not passed take DEFAULTS.

Heavy modules (the model, its kernels, NumPy) are imported only when a run is planned, so importing
this module (and charlm) stays fast.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from ..config import ModelConfig, TrainConfig, models_dir
from ..errors import CharlmError

# The options of `charlm train`, by their Python names, with the defaults the command line shows.
DEFAULTS: dict[str, Any] = dict(
    cell="lstm", hidden=256, layers=2, embed=64, seq_len=64, batch=32, lr=2e-3, optimizer="adam", clip=5.0,
    dropout=0.2, dropout_in=0.0, dropout_out=0.2, variational=False, tie=False, softmax="full", cutoffs=None,
    div_value=4.0, lr_schedule="plateau", lr_decay=4.0, warmup=0, patience=0, min_lr=0.0, sparse_embedding=False,
    units=1000, leak=1.0, sr=0.9, connectivity=0.0, input_scaling=1.0, bias_scaling=0.0,
    steps=None, epochs=None, minutes=None, val_frac=0.05, eval_every=500, seed=0, out=None, encoding="utf-8",
    errors="strict", sample_length=200, level="char", lower=False, min_count=1, max_vocab=50_000, val=None,
    resume=None, init_from=None, strict_vocab=False, checkpoint_every=0)
DEFAULT_MINUTES = 3.0  # the budget when none of steps / epochs / minutes is given

_ESN_FLAGS = ["units", "leak", "sr", "connectivity", "input_scaling", "bias_scaling"]
_WORD_MODEL_FLAGS = ["dropout_in", "dropout_out", "variational", "tie", "softmax", "cutoffs", "div_value"]
_MODEL_FLAGS = ["cell", "hidden", "layers", "embed", "dropout"] + _WORD_MODEL_FLAGS + _ESN_FLAGS
_DATA_FLAGS = ["seq_len", "batch", "level", "lower", "min_count", "max_vocab", "val_frac", "optimizer", "seed"]
# continued exactly by --resume, free with --init-from
_RUN_FLAGS = ["lr", "clip", "eval_every", "lr_schedule", "lr_decay", "warmup", "patience", "min_lr", "sparse_embedding"]


def _check_sparse_embedding(m: ModelConfig, t: TrainConfig) -> None:
    if t.optimizer != "adam":
        raise CharlmError("--sparse-embedding is for --optimizer adam (SGD already updates only the embedding rows "
                          "a batch uses, with the same numbers)")
    if m.cell == "esn":
        raise CharlmError("--sparse-embedding: an ESN's input weights are fixed, only its readout is trained")
    if m.tie:
        raise CharlmError("--sparse-embedding does not go with --tie: the tied output layer updates every row")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


@dataclass
class Plan:
    """A run, fully decided: what train() hands to the training loop."""
    model: ModelConfig              # on resume / init-from the checkpoint's (the loop takes it from there)
    train: TrainConfig              # on resume only its budget (steps, epochs, minutes) counts
    run_dir: Path
    corpus_name: str
    source: Any = None              # charlm.lm.start.Source of the corpus; None on resume
    val_source: Any = None          # of the validation file, if one is given
    resume: Any = None              # the checkpoint continued (charlm.lm.checkpoint.Checkpoint)
    init_from: Any = None           # the checkpoint a new run starts from
    strict_vocab: bool = False
    checkpoint_every: int = 0
    sample_length: int = 200

    @property
    def level(self) -> str:
        return self.train.level

    def events(self, should_stop: Optional[Callable[[], bool]] = None) -> Iterator[dict]:
        """Run the training loop on this plan; yields the events of charlm.lm.train."""
        from .train import train as run_train
        for ev in run_train(self.source, self.model, self.train, self.run_dir, corpus_name=self.corpus_name,
                            val_text=self.val_source, resume=self.resume, init_from=self.init_from,
                            strict_vocab=self.strict_vocab, checkpoint_every=self.checkpoint_every,
                            sample_chars=self.sample_length, should_stop=should_stop or (lambda: False)):
            yield ev
            if ev["event"] == "done" and ev["latest"] is None:  # every save met non-finite weights
                raise CharlmError(f"no checkpoint was written to {ev['run_dir']}: the weights were not finite at "
                                  f"any save; start again with a lower --lr")


def train(corpus: str | os.PathLike | Sequence[str | os.PathLike] | None = None, *,
          should_stop: Optional[Callable[[], bool]] = None, **options) -> Iterator[dict]:
    """Train a language model, yielding progress events; what `charlm train` runs.

    corpus: a UTF-8 text file (str or path; .gz, .bz2 and .xz are decompressed), a directory, a list of
    files and directories (read in the order given; a directory's files recursively, regular files only,
    hidden ones skipped, in sorted path order; each file ends a line), "-" for standard input (alone), or
    None for the built-in corpus (the English documentation text shipped with CPython). Not allowed with
    resume, which continues with the run's own data.

    options: those of `charlm train`, with underscores (defaults in DEFAULTS):
      model      cell ("rnn", "gru", "lstm", "esn"), hidden, layers, embed, dropout, dropout_in, dropout_out,
                 variational, tie, softmax ("full", "adaptive": word level only), cutoffs (a tuple or
                 "2000,10000"; None: chosen from the vocabulary size), div_value;
                 ESN only: units, leak, sr, connectivity, input_scaling, bias_scaling
      training   seq_len, batch, lr, optimizer ("adam", "sgd"), clip, seed
      schedule   lr_schedule ("constant", "plateau", "cosine"), lr_decay, warmup, patience, min_lr
      optimizer  sparse_embedding (Adam: only the embedding rows a batch uses; not with tie)
      budget     steps, epochs, minutes (counted from the checkpoint's step on resume; none given: 3 minutes)
      data       level ("char", "word"), lower, min_count, max_vocab, val_frac, val (a validation file),
                 encoding, errors ("strict", "replace", "ignore")
      run        out (run directory; default models/<corpus>-<cell>-<time>), eval_every, checkpoint_every,
                 sample_length (tokens sampled at each evaluation; 0 for none)
      start      resume (a run directory or checkpoint to continue exactly), init_from (a checkpoint whose
                 weights and vocabulary start a new run), strict_vocab (with init_from: refuse tokens
                 outside its vocabulary)
    Every option passed counts as given: with resume or init_from, one that contradicts the checkpoint
    raises CharlmError naming it. should_stop: called before each step; True stops after saving.

    Yields dicts with an "event" key: note, compiling, compiled, start, step, nonfinite, eval (with the
    learning rate, "lr"), saved and finally done (steps, best_val_bpc, checkpoint, latest, run_dir, reason:
    "budget", "interrupted" or "patience", ...); see charlm.lm.train. Writes
    latest.npz and best.npz into the run directory. Problems raise CharlmError (when iteration starts).

        for ev in charlm.train("book.txt", cell="gru", hidden=128, steps=500):
            if ev["event"] == "eval":
                print(ev["step"], ev["val_bpc"])
    """
    yield from plan(corpus, **options).events(should_stop)


def plan(corpus: str | os.PathLike | Sequence[str | os.PathLike] | None = None, **options) -> Plan:
    """Check the options (those of train(); every one passed counts as given) and decide the run."""
    corpus = _corpus_arg(corpus)
    unknown = sorted(set(options) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown training option(s) {', '.join(unknown)}; the options are {', '.join(DEFAULTS)}")
    given = set(options)
    o = {**DEFAULTS, **options}
    _check_options(o)
    resume_ck = _resume_checkpoint(corpus, o, given) if o["resume"] else None
    init_ck = _init_checkpoint(o, given) if o["init_from"] else None
    ck = resume_ck or init_ck
    level = ck.vocab.level if ck is not None else o["level"]
    if resume_ck is None:
        source, val_source, corpus_name = _sources(corpus, o)
    else:
        source = val_source = None
        corpus_name = resume_ck.corpus
    mcfg = _model_config(o, given, ck, level)
    steps, epochs, minutes = o["steps"], o["epochs"], o["minutes"]
    budget_given = any(v is not None for v in (steps, epochs, minutes))
    tcfg = TrainConfig(seq_len=o["seq_len"], batch=o["batch"], lr=o["lr"], optimizer=o["optimizer"], clip=o["clip"],
                       steps=steps or 0, epochs=epochs or 0.0,
                       minutes=(minutes or 0.0) if budget_given else DEFAULT_MINUTES,
                       val_frac=o["val_frac"], eval_every=o["eval_every"], seed=o["seed"], level=level,
                       lower=o["lower"], min_count=o["min_count"], max_vocab=o["max_vocab"],
                       lr_schedule=o["lr_schedule"], lr_decay=o["lr_decay"], warmup=o["warmup"],
                       patience=o["patience"], min_lr=o["min_lr"], sparse_embedding=o["sparse_embedding"])
    if tcfg.sparse_embedding:
        _check_sparse_embedding(init_ck.model if init_ck else mcfg, tcfg)
    if resume_ck is None and tcfg.lr_schedule == "cosine" and not (tcfg.steps or tcfg.epochs or tcfg.minutes):
        from .schedule import COSINE_NEEDS_STEPS
        raise CharlmError(COSINE_NEEDS_STEPS)  # (before a folder is made; the loop would refuse it too)
    if resume_ck is not None:
        run_dir = Path(resume_ck.path).parent
    else:
        from .memory import check_memory  # before a folder is made or a token read (the vocabulary at its smallest)
        check_memory(init_ck.model if init_ck else mcfg, tcfg)
        named = Path(str(corpus[0])).name if isinstance(corpus, list) else corpus_name  # several: the first
        run_dir = Path(o["out"]) if o["out"] else run_dir_name(named, init_ck.model.cell if init_ck else o["cell"])
    return Plan(model=mcfg, train=tcfg, run_dir=run_dir, corpus_name=corpus_name, source=source,
                val_source=val_source, resume=resume_ck, init_from=init_ck, strict_vocab=o["strict_vocab"],
                checkpoint_every=o["checkpoint_every"], sample_length=o["sample_length"])


def _check_options(o: dict) -> None:
    """The checks that need no file: budgets, counts, and options that exclude each other."""
    for name in ("steps", "epochs", "minutes"):
        v = o[name]
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0
                              or not math.isfinite(v)):
            raise CharlmError(f"--{name} must be positive and finite, got {str(v)[:40]}")
    if o["steps"] is not None and not isinstance(o["steps"], int):
        raise CharlmError(f"--steps must be a whole number, got {o['steps']}")
    if o["sample_length"] < 0:
        raise CharlmError(f"--sample-length must be 0 or positive, got {o['sample_length']}")
    if o["checkpoint_every"] < 0:
        raise CharlmError(f"--checkpoint-every must be 0 (off) or positive, got {o['checkpoint_every']}")
    if o["resume"] and o["init_from"]:
        raise CharlmError("give either --resume or --init-from, not both")
    if o["strict_vocab"] and not o["init_from"]:
        raise CharlmError("--strict-vocab applies only with --init-from (a new run's vocabulary is built from its corpus)")
    if o["cutoffs"] is not None:  # "2000,10000" or a sequence, as the checkpoint states it (a tuple)
        o["cutoffs"] = ModelConfig(cutoffs=o["cutoffs"]).cutoffs


def _resume_checkpoint(corpus, o: dict, given: set):
    """The checkpoint --resume continues, once nothing given contradicts it."""
    from . import checkpoint
    if corpus is not None or o["val"] is not None:
        raise CharlmError("--resume continues with the run's own data; drop the CORPUS / --val arguments")
    ck = checkpoint.load(_latest_of(o["resume"]))
    refuse_contradictions(given & set(_MODEL_FLAGS + _DATA_FLAGS + _RUN_FLAGS), o, ck, "--resume")
    out, own = o["out"], Path(ck.path).parent
    if out is not None and Path(out).resolve() != own.resolve():
        raise CharlmError(f"--out {out} contradicts --resume, which continues in the run's own folder {own}: drop --out")
    return ck


def _init_checkpoint(o: dict, given: set):
    """The checkpoint --init-from starts from, once no architecture option given contradicts it."""
    from . import checkpoint
    ck = checkpoint.load(checkpoint.resolve(o["init_from"], models_dir()))
    refuse_contradictions(given & (set(_MODEL_FLAGS) | {"level", "lower"}), o, ck, "--init-from")
    return ck


def _corpus_arg(corpus):
    """The corpus argument as None, one path (str / PathLike) or a list of two or more."""
    if isinstance(corpus, (list, tuple)):
        paths = [os.fspath(p) for p in corpus]
        return None if not paths else paths[0] if len(paths) == 1 else paths
    return corpus


def _sources(corpus, o: dict):
    """The corpus and validation file to read, checked before anything is read: (source, val_source, name)."""
    from ..data import check_text_file, default_corpus, iter_text
    from ..data.corpus import check_text_files, iter_texts
    from .start import Source
    encoding, errors, val = o["encoding"], o["errors"], o["val"]
    if corpus is None:
        text, corpus_name = default_corpus()
        source = Source.of(text, corpus_name)
    elif str(corpus) == "-":
        corpus_name = "stdin"
        source = _stdin_source(encoding, errors)
    else:
        paths = corpus if isinstance(corpus, list) else [os.fspath(corpus)]
        corpus_name = ", ".join(Path(p).name for p in paths)
        if len(corpus_name) > 200:
            corpus_name = f"{corpus_name[:180].rsplit(', ', 1)[0]} and more ({len(paths)} paths)"
        # fail early on a bad path, an empty directory, '-' among files, without reading the text
        files = check_text_files(paths, encoding, errors)
        source = Source(lambda: iter_texts(files, encoding, errors), corpus_name)
    val_source = None
    if val is not None:
        val = str(val)
        check_text_file(val, encoding, errors, what="validation file")
        val_source = Source(lambda: iter_text(val, encoding, errors, what="validation file"), "validation")
    return source, val_source, corpus_name


def _stdin_source(encoding: str, errors: str):
    """Standard input as a Source that can be read twice: copied (in blocks, lines of bounded length) to
    an anonymous temporary file, then streamed from it like a corpus file, never held in memory whole."""
    from ..data import check_text_file, iter_text
    from ..data.stdin import spool_stdin
    from .start import Source
    check_text_file("-", encoding, errors)
    path = spool_stdin()

    def pieces():
        try:
            yield from iter_text(path, encoding, errors)
        except CharlmError as e:
            raise CharlmError(str(e).replace(path, "standard input")) from None
    return Source(pieces, "stdin")


def _model_config(o: dict, given: set, ck=None, level: str = "char") -> ModelConfig:
    """The architecture the options ask for; the ESN's options and the others exclude each other, and so do
    --cutoffs / --div-value and a full softmax. With a checkpoint (resume, init-from) its cell and softmax
    decide what applies (the options given were checked against it: refuse_contradictions)."""
    cell = ck.model.cell if ck is not None else o["cell"]
    softmax = ck.model.softmax if ck is not None else o["softmax"]
    if cell == "esn":
        wrong = sorted(_flag(p) for p in ["hidden", "layers", "embed", "dropout"] + _WORD_MODEL_FLAGS if p in given)
        if wrong:
            raise CharlmError(f"{', '.join(wrong)} do not apply to --cell esn (one reservoir, no embedding); "
                              f"set its size with --units")
        if ck is not None:
            return ck.model
        return ModelConfig(cell="esn", embed=1, hidden=o["units"], layers=1, leak=o["leak"], sr=o["sr"],
                           connectivity=o["connectivity"], input_scaling=o["input_scaling"],
                           bias_scaling=o["bias_scaling"])
    wrong = sorted(_flag(p) for p in _ESN_FLAGS if p in given)
    if wrong:
        raise CharlmError(f"{', '.join(wrong)} apply only to --cell esn")
    wrong = sorted(_flag(p) for p in ("cutoffs", "div_value") if p in given)
    if wrong and softmax != "adaptive":
        raise CharlmError(f"{', '.join(wrong)} apply only to --softmax adaptive")
    if ck is not None:
        return ck.model
    if softmax == "adaptive" and level == "char":
        raise CharlmError("--softmax adaptive is for large word vocabularies (--level word); a character model's "
                          "softmax is small: drop --softmax adaptive")
    return ModelConfig(cell=o["cell"], embed=o["embed"], hidden=o["hidden"], layers=o["layers"], dropout=o["dropout"],
                       dropout_in=o["dropout_in"], dropout_out=o["dropout_out"], variational=o["variational"],
                       tie=o["tie"], softmax=o["softmax"], cutoffs=o["cutoffs"] or (), div_value=o["div_value"])


def _latest_of(path: str | os.PathLike) -> str:
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


def refuse_contradictions(given: set, values: dict, ck, flag: str) -> None:
    """A given option (name in `given`, value in `values`) that disagrees with the checkpoint is an error."""
    have = {**ck.model.to_dict(), **(ck.train.to_dict() if ck.train else {}),
            "level": ck.vocab.level, "lower": ck.vocab.lower}
    if ck.model.cell == "esn":
        have["units"] = ck.model.hidden
    for name in sorted(given):
        if name in have and have[name] != values[name]:
            opt = _shown(name, values[name]).split()[0]  # (--no-tie for a false switch)
            raise CharlmError(f"{_shown(name, values[name])} contradicts the checkpoint ({_shown(name, have[name])}); "
                              f"{flag} takes the "
                              f"architecture{', data and optimizer settings' if flag == '--resume' else ''} from the "
                              f"checkpoint: drop {opt}")


def _shown(name: str, value) -> str:
    """An option as the command line writes it: --hidden 8, --tie / --no-tie, --cutoffs 2000,10000."""
    if isinstance(value, bool):
        return _flag(name) if value else "--no-" + name.replace("_", "-")
    if isinstance(value, (tuple, list)):
        return f"{_flag(name)} {','.join(map(str, value))}"
    return f"{_flag(name)} {value}"


def run_dir_name(corpus_name: str, cell: str) -> Path:
    """A new folder under models_dir(): <corpus stem>-<cell>-<time>, with -2, -3... if it exists."""
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(corpus_name).stem)[:40] or "corpus"
    base = Path(models_dir()) / f"{stem}-{cell}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, i = base, 1
    while path.exists():
        i += 1
        path = Path(f"{base}-{i}")
    return path
