"""One self-describing checkpoint file, written atomically, loaded without pickle.

File: an uncompressed NumPy .npz (a zip of .npy arrays) holding
    __meta__            uint8 (B,)   UTF-8 JSON, see below
    param/<name>        the model parameters (names and shapes: charlm.model.param_shapes)
    opt/m/<name>, opt/v/<name>   Adam moments (absent for SGD)
    state/h, state/c    (L, N, H) hidden state carried into the next training window
    hist/grad_norm      float32 (step,) the gradient norm before clipping at every training step
The JSON holds: format ("charlm-checkpoint"), version, model (ModelConfig),
train (TrainConfig), vocab, optimizer (name, t, ...), step, epoch, window,
best_val_loss, rng (numpy bit-generator state), history, corpus, data (the
run's token files: name, dtype, token counts, SHA-256), counters (tokens,
train_seconds, clipped), checksum.
checksum is the SHA-256 of every array's name, dtype, shape and bytes in name
order followed by the JSON without the checksum; a file whose content does
not match is refused.

Writing goes to a temporary file in the same folder, flushed and fsynced, then
os.replace()d over the target, so a crash leaves either the old file or the new.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import ModelConfig, TrainConfig
from ..data import Vocab
from ..data.npzfile import read_npz, write_npz
from ..errors import CharlmError

FORMAT = "charlm-checkpoint"
VERSION = 1
LATEST = "latest.npz"
BEST = "best.npz"


@dataclass
class Checkpoint:
    model: ModelConfig
    vocab: Vocab
    params: dict[str, np.ndarray]
    train: TrainConfig | None = None
    optimizer: dict = field(default_factory=dict)
    opt_arrays: dict[str, np.ndarray] = field(default_factory=dict)
    state: dict[str, np.ndarray] = field(default_factory=dict)
    step: int = 0
    epoch: int = 0
    window: int = 0
    best_val_loss: float | None = None
    rng: dict | None = None
    history: list = field(default_factory=list)
    corpus: str = ""
    data: dict = field(default_factory=dict)      # token files of the run: names, dtype, sizes, sha256
    counters: dict = field(default_factory=dict)  # tokens, train_seconds, clipped, ...
    grad_norms: np.ndarray | None = None          # (step,) float32 pre-clip gradient norm of every step
    path: str = ""


def save(ckpt: Checkpoint, path: str | os.PathLike) -> None:
    """Write ckpt to path atomically (see write_npz)."""
    arrays: dict[str, np.ndarray] = {f"param/{n}": a for n, a in ckpt.params.items()}
    arrays.update({f"opt/{n}": a for n, a in ckpt.opt_arrays.items()})
    arrays.update({f"state/{n}": a for n, a in ckpt.state.items()})
    if ckpt.grad_norms is not None:
        arrays["hist/grad_norm"] = np.asarray(ckpt.grad_norms, dtype=np.float32)
    meta = {
        "format": FORMAT, "version": VERSION,
        "model": ckpt.model.to_dict(),
        "train": ckpt.train.to_dict() if ckpt.train else None,
        "vocab": ckpt.vocab.to_dict(),
        "optimizer": ckpt.optimizer,
        "step": ckpt.step, "epoch": ckpt.epoch, "window": ckpt.window,
        "best_val_loss": ckpt.best_val_loss,
        "rng": ckpt.rng, "history": ckpt.history, "corpus": ckpt.corpus,
        "data": ckpt.data, "counters": ckpt.counters,
    }
    write_npz(arrays, meta, path)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files save() leaves behind when its process is killed mid-write
    (.latest.npz.XXXX.tmp ...); they are never read, but each can be as large as a checkpoint.
    Call it only when no other process is saving into folder. Returns the names removed."""
    removed = []
    for name in (LATEST, BEST):
        for p in Path(folder).glob(f".{name}.*.tmp"):
            try:
                p.unlink()
                removed.append(p.name)
            except OSError:
                pass
    return removed


def load(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint. Never unpickles; any damage is a CharlmError naming the file."""
    path = str(path)
    arrays, meta, bad = read_npz(path, FORMAT, VERSION)
    try:
        ckpt = Checkpoint(
            model=ModelConfig.from_dict(meta["model"]),
            vocab=Vocab.from_dict(meta["vocab"]),
            params={n[6:]: a for n, a in arrays.items() if n.startswith("param/")},
            train=TrainConfig.from_dict(meta["train"]) if meta.get("train") else None,
            optimizer=meta.get("optimizer") or {},
            opt_arrays={n[4:]: a for n, a in arrays.items() if n.startswith("opt/")},
            state={n[6:]: a for n, a in arrays.items() if n.startswith("state/")},
            step=int(meta.get("step", 0)), epoch=int(meta.get("epoch", 0)), window=int(meta.get("window", 0)),
            best_val_loss=meta.get("best_val_loss"), rng=meta.get("rng"),
            history=meta.get("history") or [], corpus=meta.get("corpus", ""), path=path,
            data=meta.get("data") or {}, counters=meta.get("counters") or {},
            grad_norms=arrays.get("hist/grad_norm"),
        )
    except (KeyError, TypeError, ValueError, CharlmError) as e:
        raise CharlmError(f"{bad} (metadata: {e})") from None
    from .models import check_params  # late import: the models import kernels (slow) only when needed
    try:
        check_params(ckpt.model, ckpt.params)
    except CharlmError as e:
        raise CharlmError(f"{bad} ({e})") from None
    if ckpt.model.vocab_size != len(ckpt.vocab):
        raise CharlmError(f"{bad} (vocabulary has {len(ckpt.vocab)} tokens, model expects {ckpt.model.vocab_size})")
    return ckpt


def resolve(model: str | None, root: str | os.PathLike = "models") -> str:
    """The checkpoint file a --model value names: a file; a run directory (its best
    checkpoint, else its latest); or, when None, the most recently written run under root."""
    if model:
        p = Path(model)
        if p.is_dir():
            for name in (BEST, LATEST):
                if (p / name).is_file():
                    return str(p / name)
            raise CharlmError(f"no checkpoint ({BEST} or {LATEST}) in directory {p}")
        if not p.exists():
            raise CharlmError(f"model not found: {p}")
        return str(p)
    root = Path(root)
    candidates = []
    if root.is_dir():
        for run in root.iterdir():
            for name in (LATEST, BEST):
                f = run / name
                if f.is_file():
                    candidates.append((f.stat().st_mtime, run))
    if not candidates:
        raise CharlmError(f"no trained model found under {root}/; train one with `charlm train` or pass --model PATH")
    run = max(candidates)[1]
    return str(run / BEST) if (run / BEST).is_file() else str(run / LATEST)
