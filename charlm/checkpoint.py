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

import hashlib
import io
import json
import os
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .config import ModelConfig, TrainConfig
from .data import Vocab
from .errors import CharlmError

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


def _digest(arrays: dict[str, np.ndarray], meta_bytes: bytes) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    h.update(meta_bytes)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_npz(arrays: dict[str, np.ndarray], meta: dict, path: str | os.PathLike, what: str = "checkpoint") -> None:
    """Write arrays plus meta (JSON, with its checksum added) to path as one .npz, atomically:
    a temporary file in the same folder, fsynced, os.replace()d over path, the folder fsynced.
    Any failure leaves the previous file as it was (CharlmError)."""
    path = Path(path)
    arrays = dict(arrays)
    meta = dict(meta)
    body = json.dumps(meta, sort_keys=True, allow_nan=False).encode()
    meta["checksum"] = _digest(arrays, body)
    arrays["__meta__"] = np.frombuffer(json.dumps(meta, sort_keys=True, allow_nan=False).encode(), dtype=np.uint8)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        try:  # make the rename itself durable
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    except OSError as e:
        raise CharlmError(f"could not write {what} {path}: {e.strerror or e}; the previous {what} is unchanged") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


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


def read_npz(path: str | os.PathLike, fmt: str = FORMAT, version: int = VERSION,
             what: str = "charlm checkpoint") -> tuple[dict[str, np.ndarray], dict, str]:
    """Read a file write_npz wrote and verify its format, version and checksum; returns
    (arrays, meta without the checksum, the message prefix for a damaged file). Never
    unpickles; any damage is a CharlmError naming the file."""
    path = str(path)
    bad = f"{path} is not a {what}, or it is truncated or damaged"
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CharlmError(f"{what.split()[-1]} not found: {path}") from None
    except IsADirectoryError:
        raise CharlmError(f"{path} is a directory; give a {what.split()[-1]} file or a run directory") from None
    except OSError as e:
        raise CharlmError(f"cannot read {what.split()[-1]} {path}: {e.strerror}") from None
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError, zipfile.LargeZipFile) as e:
        raise CharlmError(f"{bad} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
    except Exception as e:  # zlib errors, struct errors from a damaged archive
        raise CharlmError(f"{bad} ({type(e).__name__})") from None
    if "__meta__" not in arrays or arrays["__meta__"].dtype != np.uint8:
        raise CharlmError(f"{bad} (no charlm metadata)")
    try:
        meta = json.loads(arrays.pop("__meta__").tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CharlmError(f"{bad} (unreadable metadata)") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise CharlmError(f"{bad} (format is {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != version:
        raise CharlmError(f"{path} is a {what} of format version {meta.get('version')}; "
                          f"this charlm reads version {version}: use the charlm release that wrote it")
    checksum = meta.pop("checksum", None)
    if checksum != _digest(arrays, json.dumps(meta, sort_keys=True, allow_nan=False).encode()):
        raise CharlmError(f"{path} fails its checksum: the file is damaged; use another {what.split()[-1]}")
    return arrays, meta, bad


def load(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint. Never unpickles; any damage is a CharlmError naming the file."""
    path = str(path)
    arrays, meta, bad = read_npz(path)
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
    from .model import check_params  # late import: model imports kernels (slow) only when needed
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
