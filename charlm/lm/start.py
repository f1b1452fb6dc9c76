"""How a run starts: a new run's folder and token files (from scratch or from a checkpoint's
vocabulary), or a resumed run's own token files, checked against their digests. No model here:
the result, a Start, is what the training loop (charlm.lm.train) builds its model and batches from."""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from . import checkpoint as ckpt_mod
from ..config import ModelConfig, TrainConfig
from ..data import (TOKENS_FILE, VAL_TOKENS_FILE, Batches, Vocab, file_digest, open_tokens, scan_vocab,
                    split_train_val, write_tokens)
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
    """The token files a checkpoint's run was trained on, checked against their digests."""
    data = ck.data
    if not data.get("tokens"):
        raise CharlmError(f"{ck.path} records no token files; it cannot be resumed (use --init-from to fine-tune)")
    path = run_dir / data["tokens"]
    if not path.is_file():
        raise CharlmError(f"cannot resume: the run's token file {path} is missing; keep the run directory whole, "
                          f"or start again with --init-from {ck.path}")
    if file_digest(path) != data["sha256"]:
        raise CharlmError(f"cannot resume: {path} does not match the checkpoint (it was changed)")
    ids = open_tokens(path, data["dtype"])
    if data.get("val_tokens"):
        vpath = run_dir / data["val_tokens"]
        if not vpath.is_file() or file_digest(vpath) != data["val_sha256"]:
            raise CharlmError(f"cannot resume: the validation token file {vpath} is missing or changed")
        vals = open_tokens(vpath, data["dtype"])
        return ids, np.concatenate([[ck.vocab.eos_id], vals]).astype(ids.dtype)
    n = data["n_train"]
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


def resumed(ck: ckpt_mod.Checkpoint, train_cfg: TrainConfig, run_dir: str | Path | None) -> Start:
    """A resumed run: the checkpoint's configuration with train_cfg's budget, and its own token files."""
    run_dir = Path(ck.path).parent if run_dir is None else Path(run_dir)
    base = ck.train or train_cfg
    tcfg = TrainConfig(**{**base.to_dict(), "steps": train_cfg.steps, "epochs": train_cfg.epochs,
                          "minutes": train_cfg.minutes})
    train_ids, val_ids = _reopen_tokens(ck, run_dir)
    return Start(run_dir, ck.model, tcfg, ck.vocab, train_ids, val_ids, dict(ck.data), ck.corpus, resume=ck)


def new_run(corpus, model_cfg: ModelConfig | None, train_cfg: TrainConfig, run_dir: str | Path, *, val_text,
             init_from: ckpt_mod.Checkpoint | None, strict_vocab: bool, corpus_name: str):
    """A new run, from scratch or from init_from's weights and vocabulary: its folder and token files.
    A generator: yields notes, returns the Start. A failure removes the folders it created."""
    source = Source.of(corpus, corpus_name)
    val_source = Source.of(val_text, "validation")
    if source is None:
        raise CharlmError("no corpus given")
    run_dir = Path(run_dir)
    created = _create_run_dir(run_dir)
    try:
        vocab, train_ids, val_ids, data, oov = _prepare_tokens(
            source, val_source, train_cfg, run_dir, init_from.vocab if init_from else None)
        if len(train_ids) == 0:
            raise CharlmError("the corpus is empty; give a text file with some content")
        Batches(train_ids, train_cfg.seq_len, train_cfg.batch)  # too short: fail before anything is kept
        oov_note = _oov_note(oov, vocab, strict_vocab, init_from)
    except BaseException:
        if created is not None:
            shutil.rmtree(created, ignore_errors=True)
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
        mcfg = ModelConfig(**{**model_cfg.to_dict(), "vocab_size": len(vocab)})
    return Start(run_dir, mcfg, train_cfg, vocab, train_ids, val_ids, data, corpus_name, init_from=init_from)


def _create_run_dir(run_dir: Path) -> Path | None:
    """Make a new run's folder, refusing one that holds a run; the first folder created (None: it existed)."""
    if (run_dir / ckpt_mod.LATEST).exists() or (run_dir / ckpt_mod.BEST).exists():
        raise CharlmError(f"{run_dir} already holds a run's checkpoints; continue it with --resume {run_dir}, "
                          f"or give a new --out")
    created = next((p for p in [*reversed(run_dir.absolute().parents), run_dir.absolute()]
                    if not p.exists()), None)  # the first folder this run creates, removed on failure
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CharlmError(f"cannot create output folder {run_dir}: {e.strerror}") from None
    return created


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
