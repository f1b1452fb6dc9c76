"""How a run starts: a new run's folder and token files (from scratch or from a checkpoint's
vocabulary), or a resumed run's own token files, checked against their digests. No model here:
the result, a Start, is what the training loop (charlm.lm.train) builds its model and batches from."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from . import checkpoint as ckpt_mod
from ..config import ModelConfig, TrainConfig
from ..data import (TOKENS_FILE, VAL_TOKENS_FILE, Batches, Vocab, file_digest, scan_vocab, split_train_val,
                    write_tokens)
from ..data.lock import RunLock, lock_run_dir
from ..data.tokens import open_run_tokens, run_file
from ..errors import CharlmError


@dataclass
class Source:
    """A corpus to read: pieces() yields its text in pieces and may be called
    twice (vocabulary pass, encoding pass), so a file larger than memory streams."""
    pieces: Callable[[], Iterable[str]]
    name: str = ""

    @classmethod
    def of(cls, text_or_source, name: str = "") -> "Source | None":
        if text_or_source is None or isinstance(text_or_source, Source):
            return text_or_source
        text = text_or_source
        return cls(lambda: [text], name)


def build_vocab(text: str, cfg: TrainConfig, extra_text: str = "") -> Vocab:
    """Characters: every code point of the training (and validation) text.
    Words: from the training text only, by count (cfg.min_count, cfg.max_vocab)."""
    if cfg.level == "word":
        return Vocab.words_from_text(text, min_count=cfg.min_count, max_vocab=cfg.max_vocab, lower=cfg.lower)
    return Vocab.from_text(text + extra_text)


def _prepare_tokens(source: Source, val_source: Source | None, cfg: TrainConfig, run_dir: Path,
                    vocab: Vocab | None) -> tuple[Vocab, np.ndarray, np.ndarray, dict, dict]:
    """Tokenise the corpus (and validation file) into id files in run_dir, streaming."""
    if vocab is None:
        if cfg.level == "word":
            vocab = scan_vocab(source.pieces(), "word", lower=cfg.lower, min_count=cfg.min_count,
                               max_vocab=cfg.max_vocab)
        else:
            pieces = source.pieces() if val_source is None else _chain(source.pieces(), val_source.pieces())
            vocab = scan_vocab(pieces, "char")
        words = [t for t in vocab.tokens if t not in ("<eos>", "<unk>")] if vocab.level == "word" else vocab.tokens
        if all(t.isspace() for t in words):
            raise CharlmError(f"the corpus {source.name} is empty (or only whitespace)"
                              + ("; or --min-count leaves no words" if vocab.level == "word" else "")
                              + ": give a text with some content")
    ids, oov = write_tokens(source.pieces(), vocab, run_dir / TOKENS_FILE)
    data = {"tokens": TOKENS_FILE, "dtype": ids.dtype.str, "n_tokens": int(len(ids)),
            "sha256": file_digest(run_dir / TOKENS_FILE)}
    if val_source is not None:
        vals, val_oov = write_tokens(val_source.pieces(), vocab, run_dir / VAL_TOKENS_FILE)
        data["val_oov"] = int(sum(val_oov.values()))
        val_ids = np.concatenate([[vocab.eos_id], vals]).astype(ids.dtype)
        train_ids = ids
        data.update(val_tokens=VAL_TOKENS_FILE, n_val_file=int(len(vals)),
                    val_sha256=file_digest(run_dir / VAL_TOKENS_FILE))
    else:
        train_ids, val_ids = split_train_val(ids, cfg.val_frac)
    data["n_train"] = int(len(train_ids))
    return vocab, train_ids, val_ids, data, oov


def _chain(*iterables):
    for it in iterables:
        yield from it


def _reopen_tokens(ck: ckpt_mod.Checkpoint, run_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The token files a checkpoint's run was trained on: confined to the run folder, checked against
    their digests and the vocabulary (every id in range) before any kernel sees them."""
    data = ck.data
    if not data.get("tokens"):
        raise CharlmError(f"{ck.path} records no token files; it cannot be resumed (use --init-from to fine-tune)")
    path = run_file(run_dir, data["tokens"], "token file")
    if not path.exists():
        raise CharlmError(f"cannot resume: the run's token file {path} is missing; keep the run directory whole, "
                          f"or start again with --init-from {ck.path}")
    V = len(ck.vocab)
    ids = open_run_tokens(path, data.get("dtype"), data.get("sha256"), V)
    if data.get("val_tokens"):
        vpath = run_file(run_dir, data["val_tokens"], "validation token file")
        vals = open_run_tokens(vpath, data.get("dtype"), data.get("val_sha256"), V, "validation token file")
        return ids, np.concatenate([[ck.vocab.eos_id], vals]).astype(ids.dtype)
    n = data.get("n_train")
    if not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= len(ids):
        raise CharlmError(f"cannot resume: {ck.path} gives n_train {str(n)[:40]}, not a count within the "
                          f"{len(ids)} tokens of {path}")
    return ids[:n], ids[n:]


@dataclass
class Start:
    """What a run starts from, however it was started: new, resumed, or initialised from a checkpoint."""
    run_dir: Path
    model_cfg: ModelConfig
    train_cfg: TrainConfig
    vocab: Vocab
    train_ids: np.ndarray
    val_ids: np.ndarray
    data: dict                  # the run's token files, as its checkpoints record them
    corpus_name: str
    resume: ckpt_mod.Checkpoint | None = None
    init_from: ckpt_mod.Checkpoint | None = None
    lock: RunLock | None = None  # held until the run ends (the training loop releases it)
    notes: list = field(default_factory=list)  # what the user should know, as note messages


def _lock(run_dir: Path) -> RunLock | None:
    """This process's lock on the run folder (rank 0 alone writes, so it alone locks)."""
    from .. import dist
    return lock_run_dir(run_dir) if dist.rank() == 0 else None


def _cleaned(run_dir: Path) -> list[str]:
    """Remove what a killed process of this run left (under the lock: nobody else is writing); the note."""
    removed = ckpt_mod.remove_stale_temporaries(run_dir)
    if not removed:
        return []
    return [f"removed {len(removed)} temporary file{'s' if len(removed) > 1 else ''} left in {run_dir} by an "
            f"interrupted run ({', '.join(removed[:3])}{', ...' if len(removed) > 3 else ''})"]


def resumed(ck: ckpt_mod.Checkpoint, train_cfg: TrainConfig, run_dir: str | Path | None) -> Start:
    """A resumed run: the checkpoint's configuration with train_cfg's budget, and its own token files.
    Locks the run folder first (CharlmError if another process holds it)."""
    from .memory import check_memory
    run_dir = Path(ck.path).parent if run_dir is None else Path(run_dir)
    base = ck.train or train_cfg
    tcfg = TrainConfig(**{**base.to_dict(), "steps": train_cfg.steps, "epochs": train_cfg.epochs,
                          "minutes": train_cfg.minutes})
    check_memory(ck.model, tcfg)
    lock = _lock(run_dir)
    try:
        notes = _cleaned(run_dir) if lock is not None else []  # rank 0 alone writes, so it alone cleans
        train_ids, val_ids = _reopen_tokens(ck, run_dir)
        wpe = Batches(train_ids, tcfg.seq_len, tcfg.batch).windows_per_epoch
        if ck.window > wpe:
            raise CharlmError(f"cannot resume: {ck.path} is at window {ck.window} of an epoch of {wpe} windows")
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    return Start(run_dir, ck.model, tcfg, ck.vocab, train_ids, val_ids, dict(ck.data), ck.corpus, resume=ck,
                 lock=lock, notes=notes)


def new_run(corpus, model_cfg: ModelConfig | None, train_cfg: TrainConfig, run_dir: str | Path, *, val_text,
             init_from: ckpt_mod.Checkpoint | None, strict_vocab: bool, corpus_name: str):
    """A new run, from scratch or from init_from's weights and vocabulary: its folder and token files.
    A generator: yields notes, returns the Start. A failure removes the folders it created."""
    source = Source.of(corpus, corpus_name)
    val_source = Source.of(val_text, "validation")
    if source is None:
        raise CharlmError("no corpus given")
    run_dir = Path(run_dir)
    from .memory import check_memory
    created, lock = _create_run_dir(run_dir)
    try:
        for message in _cleaned(run_dir):
            yield {"event": "note", "message": message}
        vocab, train_ids, val_ids, data, oov = _prepare_tokens(
            source, val_source, train_cfg, run_dir, init_from.vocab if init_from else None)
        if len(train_ids) == 0:
            raise CharlmError("the corpus is empty; give a text file with some content")
        Batches(train_ids, train_cfg.seq_len, train_cfg.batch)  # too short: fail before anything is kept
        oov_note = _oov_note(oov, vocab, strict_vocab, init_from)
        check_memory(init_from.model if init_from else model_cfg.with_vocab(len(vocab)),
                     train_cfg)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
        if lock is not None:
            lock.release()
        raise
    if oov_note:
        yield {"event": "note", "message": oov_note}
    if data.get("val_oov"):
        what = "mapped to <unk>" if vocab.level == "word" else "left out"
        yield {"event": "note", "message": f"{data['val_oov']} tokens of the validation file are not in the "
                                           f"vocabulary and are {what}"}
    if init_from is not None:
        mcfg = init_from.model
    else:
        mcfg = model_cfg.with_vocab(len(vocab))
    return Start(run_dir, mcfg, train_cfg, vocab, train_ids, val_ids, data, corpus_name, init_from=init_from,
                 lock=lock)


def _create_run_dir(run_dir: Path) -> tuple[Path | None, RunLock | None]:
    """Make a new run's folder and lock it, refusing one that holds a run or that another process is
    using; (the first folder created, None if it existed; the lock)."""
    def refuse_a_run():
        if (run_dir / ckpt_mod.LATEST).exists() or (run_dir / ckpt_mod.BEST).exists():
            raise CharlmError(f"{run_dir} already holds a run's checkpoints; continue it with --resume {run_dir}, "
                              f"or give a new --out")
    created = next((p for p in [*reversed(run_dir.absolute().parents), run_dir.absolute()]
                    if not p.exists()), None)  # the first folder this run creates, removed on failure
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CharlmError(f"cannot create output folder {run_dir}: {e.strerror}") from None
    lock = _lock(run_dir)  # refused: another process made or uses the folder; new_run then leaves it alone
    try:
        refuse_a_run()  # under the lock: a run in progress is named by the lock, a finished one here
    except CharlmError:
        if lock is not None:
            lock.release()
        raise
    return created, lock


def _oov_note(oov: dict, vocab: Vocab, strict_vocab: bool, init_from: ckpt_mod.Checkpoint | None) -> str | None:
    """The note on corpus tokens outside a given vocabulary (an error with strict_vocab); None if there are none."""
    if not oov:
        return None
    total = sum(oov.values())
    top = ", ".join(f"{t!r} ×{c}" for t, c in sorted(oov.items(), key=lambda kv: -kv[1])[:10])
    what = "mapped to <unk>" if vocab.level == "word" else "left out"
    if strict_vocab:
        raise CharlmError(f"{total} tokens of the corpus ({len(oov)} distinct) are not in the vocabulary "
                          f"of {init_from.path}: {top}; drop --strict-vocab to have them {what}")
    return f"{total} tokens ({len(oov)} distinct) are not in the model's vocabulary and are {what}: {top}"
