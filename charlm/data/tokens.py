"""Token files: a corpus encoded once into a raw id file of the run directory, memory-mapped for training."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import CharlmError
from .npzfile import remove_quietly
from .vocab import Vocab, id_dtype

TOKENS_FILE = "tokens.bin"
VAL_TOKENS_FILE = "val_tokens.bin"


def write_tokens(pieces, vocab: Vocab, path) -> tuple[np.ndarray, dict[str, int]]:
    """Second streaming pass: encode pieces into a raw id file (the smallest
    integer type that holds the vocabulary), written to a temporary file and
    renamed into place. Returns the ids memory-mapped read-only, and the counts of
    out-of-vocabulary tokens (characters are left out, words become <unk>)."""
    from collections import Counter
    import tempfile
    path = Path(path)
    dtype = id_dtype(len(vocab))
    oov: Counter = Counter()
    tmp = None
    try:
        # a name of this process's own: two writers never share (or delete) one temporary file
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as raw:
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
        tmp = None
    except OSError as e:
        raise CharlmError(f"could not write the token file {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None:
            remove_quietly(tmp)
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


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


ID_DTYPES = ("|u1", "<u2", "<u4")  # what write_tokens writes (id_dtype), little-endian
TEMPORARY_PATTERNS = (f".{TOKENS_FILE}.*tmp", f".{VAL_TOKENS_FILE}.*tmp")  # write_tokens' temporaries


def run_file(run_dir: Path, name, what: str, why: str = "cannot resume") -> Path:
    """The file `name` (as a checkpoint records it) inside run_dir, refusing anything that would
    reach outside it: a path with folders, '..', an absolute path, a symbolic link out."""
    if not isinstance(name, str) or not name or name in (".", "..") or "/" in name or "\\" in name \
            or "\0" in name or Path(name).name != name:
        raise CharlmError(f"{why}: the checkpoint names its {what} {str(name)[:100]!r}, which is not a "
                          f"file name inside the run folder {run_dir}")
    path = run_dir / name
    try:
        inside = path.resolve().parent == run_dir.resolve()
    except (OSError, RuntimeError):
        inside = False
    if not inside:
        raise CharlmError(f"{why}: the run's {what} {path} leads outside the run folder {run_dir}")
    return path


def open_run_tokens(path: Path, dtype, sha256, vocab_size: int, what: str = "token file",
                    why: str = "cannot resume") -> np.ndarray:
    """A run's token file memory-mapped, after one pass over its bytes checking everything a kernel
    would trust: a regular file, whole ids of a known type, the recorded SHA-256, every id below
    vocab_size (the kernels index without bounds checks)."""
    import hashlib
    import stat
    if dtype not in ID_DTYPES:
        raise CharlmError(f"{why}: the checkpoint gives its {what} the type {str(dtype)[:20]!r}; "
                          f"token ids are one of {', '.join(ID_DTYPES)}")
    dtype = np.dtype(dtype)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise CharlmError(f"{why}: the run's {what} {path} is missing; keep the run directory whole") from None
    except OSError as e:
        raise CharlmError(f"{why}: cannot read the run's {what} {path}: {e.strerror}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise CharlmError(f"{why}: the run's {what} {path} is not a regular file")
        if st.st_size % dtype.itemsize:
            raise CharlmError(f"{why}: {path} does not match the checkpoint (it was changed)")
        h, top = hashlib.sha256(), -1
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
            if len(block) >= dtype.itemsize:
                top = max(top, int(np.frombuffer(block[:len(block) - len(block) % dtype.itemsize], dtype).max()))
    if h.hexdigest() != sha256:
        raise CharlmError(f"{why}: {path} does not match the checkpoint (it was changed)")
    if top >= vocab_size:
        raise CharlmError(f"{why}: {path} holds token id {top}, outside the vocabulary of {vocab_size} "
                          f"tokens; the run folder was tampered with")
    return open_tokens(path, dtype)


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
