"""Token files: a corpus encoded once into a raw id file of the run directory, memory-mapped for training."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import CharlmError
from .vocab import Vocab, id_dtype

TOKENS_FILE = "tokens.bin"
VAL_TOKENS_FILE = "val_tokens.bin"


def write_tokens(pieces, vocab: Vocab, path) -> tuple[np.ndarray, dict[str, int]]:
    """Second streaming pass: encode pieces into a raw id file (the smallest
    integer type that holds the vocabulary), written to a temporary file and
    renamed into place. Returns the ids memory-mapped read-only, and the counts of
    out-of-vocabulary tokens (characters are left out, words become <unk>)."""
    from collections import Counter
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    dtype = id_dtype(len(vocab))
    oov: Counter = Counter()
    try:
        with open(tmp, "wb") as raw:
            for piece in _bounded(pieces, vocab.level):
                if _has_oov(vocab, piece):
                    ids, bad = vocab.encode(piece)
                    oov.update(tok for _, tok in bad)
                else:
                    ids = vocab.encode_corpus(piece)
                raw.write(np.asarray(ids, dtype=dtype).tobytes())
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise CharlmError(f"could not write the token file {path}: {e.strerror or e}") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return open_tokens(path, dtype), dict(oov)


ENCODE_BLOCK = 1 << 18  # characters encoded at a time: encode_corpus needs ~14 bytes per character


def _bounded(pieces, level: str):
    """Character level: the pieces cut into blocks of at most ENCODE_BLOCK characters,
    so one very long line does not need many times its size in memory. (Words stay
    whole: a cut could split a word.)"""
    for piece in pieces:
        if level != "char" or len(piece) <= ENCODE_BLOCK:
            yield piece
            continue
        for i in range(0, len(piece), ENCODE_BLOCK):
            yield piece[i:i + ENCODE_BLOCK]


def open_tokens(path, dtype) -> np.ndarray:
    """A raw id file memory-mapped read-only (an empty file gives an empty array)."""
    path = Path(path)
    dtype = np.dtype(dtype)
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _has_oov(vocab: Vocab, piece: str) -> bool:
    if vocab.level == "word":
        index = vocab._index
        return any(w not in index for w in (piece.lower() if vocab.lower else piece).split())
    index = vocab._index
    return any(c not in index for c in set(piece))


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
