"""The question-answering model file: one self-describing .npz, written atomically, no pickle.

    __meta__        uint8 (B,)  UTF-8 JSON: format ("charlm-qa-checkpoint"), version,
                    config (QAConfig), vocab (words, id 0 = padding), answers (answer
                    classes), train (training settings and results), checksum
    param/<name>    the parameters (names and shapes: charlm.qa.model.param_shapes)

checksum: SHA-256 over every array's name, dtype, shape and bytes (name order) and
the JSON without it; a file that does not match is refused. Written and read by
charlm.data.npzfile.s write_npz / read_npz (temporary file, fsync, os.replace).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..data.npzfile import read_npz, write_npz
from ..errors import CharlmError
from .model import QAConfig, check_params

FORMAT = "charlm-qa-checkpoint"
VERSION = 1
BEST = "best.npz"


@dataclass
class QACheckpoint:
    config: QAConfig
    vocab: list[str]
    answers: list[str]
    params: dict[str, np.ndarray]
    train: dict = field(default_factory=dict)
    path: str = ""


def save(ck: QACheckpoint, path: str | os.PathLike) -> None:
    """Write ck to path atomically (charlm.checkpoint.write_npz)."""
    arrays = {f"param/{n}": np.ascontiguousarray(a) for n, a in ck.params.items()}
    meta = {"format": FORMAT, "version": VERSION, "config": ck.config.to_dict(), "vocab": list(ck.vocab),
            "answers": list(ck.answers), "train": ck.train}
    write_npz(arrays, meta, path, what="model")


def load(path: str | os.PathLike) -> QACheckpoint:
    """Read and verify a QA model file (or a run folder: its best.npz). Never unpickles."""
    p = Path(path)
    if p.is_dir():
        p = p / BEST
    try:
        arrays, meta, bad = read_npz(p, FORMAT, VERSION, what="charlm QA model")
    except CharlmError as e:
        if "(format is 'charlm-checkpoint')" in str(e):
            raise CharlmError(f"{p} is a charlm language model, not a QA model (use charlm sample / score)") from None
        raise
    try:
        cfg = QAConfig.from_dict(meta["config"])
        vocab, answers = list(meta["vocab"]), list(meta["answers"])
        params = {n[6:]: a for n, a in arrays.items() if n.startswith("param/")}
        check_params(cfg, params)
        if len(vocab) != cfg.vocab_size or len(answers) != cfg.n_answers:
            raise CharlmError("vocabulary sizes do not match the configuration")
    except (KeyError, TypeError, ValueError, CharlmError) as e:
        raise CharlmError(f"{bad} ({e})") from None
    return QACheckpoint(cfg, vocab, answers, params, meta.get("train") or {}, str(p))
