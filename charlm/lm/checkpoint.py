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
train_seconds, clipped; the learning-rate schedule's evals_since_best,
schedule_best_val, cosine_steps, absent from older files), checksum. The
optimizer's lr is the schedule's base rate (charlm.lm.train.scheduled_lr).
checksum is the SHA-256 of every array's name, dtype, shape and bytes in name
order followed by the JSON without the checksum; a file whose content does
not match is refused.

Writing goes to a temporary file in the same folder, flushed and fsynced, then
os.replace()d over the target, so a crash leaves either the old file or the new.
"""
from __future__ import annotations

import math
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
    guard: dict = field(default_factory=dict)     # the divergence guard: step, t of its snapshot; halvings, ...
    guard_arrays: dict[str, np.ndarray] = field(default_factory=dict)  # its snapshot: param/<n>, opt/m/<n>, ...
    path: str = ""


def save(ckpt: Checkpoint, path: str | os.PathLike) -> None:
    """Write ckpt to path atomically (see write_npz)."""
    arrays: dict[str, np.ndarray] = {f"param/{n}": a for n, a in ckpt.params.items()}
    arrays.update({f"opt/{n}": a for n, a in ckpt.opt_arrays.items()})
    arrays.update({f"state/{n}": a for n, a in ckpt.state.items()})
    if ckpt.grad_norms is not None:
        arrays["hist/grad_norm"] = np.asarray(ckpt.grad_norms, dtype=np.float32)
    arrays.update({f"guard/{n}": a for n, a in ckpt.guard_arrays.items()})
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
    if ckpt.guard:
        meta["guard"] = ckpt.guard
    write_npz(arrays, meta, path)


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Delete the temporary files save() leaves behind when its process is killed mid-write
    (.latest.npz.XXXX.tmp ...); they are never read, but each can be as large as a checkpoint.
    Call it only when no other process is saving into folder. Returns the names removed."""
    from ..data.tokens import TEMPORARY_PATTERNS
    removed = []
    for pattern in (f".{LATEST}.*.tmp", f".{BEST}.*.tmp", *TEMPORARY_PATTERNS):
        for p in Path(folder).glob(pattern):
            try:
                p.unlink()
                removed.append(p.name)
            except OSError:
                pass
    return removed


class CleanupNote(UserWarning):
    """What resolve() cleaned up in a run folder (the CLI prints it as a note: line on stderr)."""
    prefix = "note"


class CompileNote(UserWarning):
    """Kernels are being compiled for a float type this machine has not used before (a note: line)."""
    prefix = "note"


def _stale_temporaries(folder: Path) -> list[Path]:
    from ..data.tokens import TEMPORARY_PATTERNS
    return [p for pattern in (f".{LATEST}.*.tmp", f".{BEST}.*.tmp", *TEMPORARY_PATTERNS) for p in folder.glob(pattern)]


def tidy(folder: str | os.PathLike) -> list[str]:
    """At a use of a run folder (sample, score, eval, info, resume ...): delete the temporary files a
    killed process left there, if no live process holds the folder's lock (a running training's
    temporary files are never touched), and say so with a CleanupNote warning. The names removed."""
    folder = Path(folder)
    if not _stale_temporaries(folder):
        return []
    from ..data.lock import lock_run_dir
    try:
        lock = lock_run_dir(folder)
    except CharlmError:
        return []  # a training run is alive: its temporary files are its own
    with lock:
        if not lock.held:
            return []  # no locks on this file system: nothing tells a live run from a dead one
        removed = remove_stale_temporaries(folder)
    if removed:
        import warnings
        warnings.warn(cleaned_note(folder, removed), CleanupNote, stacklevel=3)
    return removed


def cleaned_note(folder, removed: list[str]) -> str:
    return (f"removed {len(removed)} temporary file{'s' if len(removed) > 1 else ''} left in {folder} by an "
            f"interrupted run ({', '.join(removed[:3])}{', ...' if len(removed) > 3 else ''})")


class _Float64Watch:
    """Warns (CompileNote) before the first float64 kernel compiles after a float64 checkpoint was
    loaded: such a compile takes about a minute and used to say nothing. Cached kernels load without a
    compile, so the note appears only when one really happens (a numba compile-event listener)."""
    armed = False
    installed = False

    @classmethod
    def arm(cls) -> None:
        if not cls.installed:
            from numba.core import event

            class Listener(event.Listener):
                def on_start(self, ev):
                    cls.started(ev)

                def on_end(self, ev):
                    pass
            event.register("numba:compile", Listener())
            cls.installed = True
        cls.armed = True

    @classmethod
    def started(cls, ev) -> None:
        if not cls.armed:
            return
        import numba
        if any(getattr(a, "dtype", None) == numba.float64 for a in (ev.data or {}).get("args") or ()):
            cls.armed = False
            import warnings
            warnings.warn("this checkpoint is float64: compiling float64 kernels (first time only, ~1 min)",
                          CompileNote, stacklevel=2)


def load(path: str | os.PathLike) -> Checkpoint:
    """Read and verify a checkpoint: every field of its metadata against the schema, every array's
    shape, type and finiteness, before anything else trusts them. Never unpickles; any damage is a
    CharlmError naming the file."""
    path = str(path)
    arrays, meta, bad = read_npz(path, FORMAT, VERSION)
    ckpt = _from_meta(path, arrays, meta, bad)
    from .models import check_params  # late import: the models import kernels (slow) only when needed
    try:
        check_params(ckpt.model, ckpt.params)
        if ckpt.model.vocab_size != len(ckpt.vocab):
            raise CharlmError(f"vocabulary has {len(ckpt.vocab)} tokens, model expects {ckpt.model.vocab_size}")
        _check_training_state(ckpt)
    except CharlmError as e:
        raise CharlmError(f"{bad} ({e})") from None
    if any(a.dtype == np.float64 for a in ckpt.params.values()):
        _Float64Watch.arm()  # arrays are C-contiguous already (read_npz): no new layout to compile
    return ckpt


def _from_meta(path: str, arrays: dict, meta: dict, bad: str) -> Checkpoint:
    """The Checkpoint the metadata and arrays describe, every metadata field of the type it must have."""
    try:
        _check_schema(meta)
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
            grad_norms=arrays.get("hist/grad_norm"), guard=meta.get("guard") or {},
            guard_arrays={n[6:]: a for n, a in arrays.items() if n.startswith("guard/")},
        )
    except (KeyError, TypeError, ValueError, AttributeError, CharlmError) as e:
        raise CharlmError(f"{bad} (metadata: {str(e)[:300]})") from None
    return ckpt


def _count(d: dict, key: str, required: bool = False) -> None:
    v = d.get(key, 0 if not required else None)
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise CharlmError(f"{key} must be a whole number, 0 or more, got {str(v)[:40]}")


def _number(v, what: str, optional: bool = True) -> None:
    if (v is None and optional) or (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)):
        return
    raise CharlmError(f"{what} must be a finite number, got {str(v)[:40]}")


def _check_schema(meta: dict) -> None:
    """The metadata's fields have the types save() writes (before any of them sizes an allocation)."""
    for key, kind in (("model", dict), ("vocab", dict), ("train", (dict, type(None))), ("optimizer", (dict, type(None))),
                      ("rng", (dict, type(None))), ("history", (list, type(None))), ("corpus", (str, type(None))),
                      ("data", (dict, type(None))), ("counters", (dict, type(None))), ("guard", (dict, type(None)))):
        if not isinstance(meta.get(key), kind):
            raise CharlmError(f"{key} is a {type(meta.get(key)).__name__}")
    for key in ("step", "epoch", "window"):
        _count(meta, key)
    _number(meta.get("best_val_loss"), "best_val_loss")
    opt = meta.get("optimizer") or {}
    _count(opt, "t")
    for key in ("lr", "beta1", "beta2", "eps"):
        _number(opt.get(key), f"optimizer {key}")
    for key, v in (meta.get("counters") or {}).items():
        _number(v, f"counter {key}", optional=False)
    if not all(isinstance(h, dict) and all(v is None or isinstance(v, (int, float)) for v in h.values())
               for h in meta.get("history") or []):
        raise CharlmError("history must be a list of records of numbers")
    guard = meta.get("guard") or {}
    for key in guard:
        _count(guard, key)
    if meta.get("rng") is not None:
        try:
            np.random.PCG64().state = meta["rng"]
        except (TypeError, ValueError, KeyError, OverflowError) as e:
            raise CharlmError(f"rng is not a NumPy PCG64 state ({str(e)[:100]})") from None


def _same_as(arrays: dict, names: list[str], like: dict, what: str, nonnegative: tuple = ()) -> None:
    """arrays holds exactly names, each with the shape and dtype of like[name] and finite values."""
    if sorted(arrays) != sorted(names):
        extra = sorted(set(arrays) ^ set(names))
        raise CharlmError(f"{what} arrays do not match the model's parameters ({', '.join(extra[:3])[:200]})")
    for n in names:
        a, ref = arrays[n], like[n.rpartition("/")[2] if "/" in n else n]
        if a.shape != ref.shape or a.dtype != ref.dtype:
            raise CharlmError(f"{what} array {n} has shape {a.shape} {a.dtype}, expected {ref.shape} {ref.dtype}")
        if not np.isfinite(a).all() or (n.startswith(nonnegative) and (a < 0).any()):
            raise CharlmError(f"{what} array {n} is not finite")


def _check_training_state(ck: Checkpoint) -> None:
    """The optimizer moments, carried state, guard snapshot and history fit the (checked) parameters."""
    from .models import trainable_names
    names = trainable_names(ck.model)
    params = ck.params
    moments = [f"{k}/{n}" for k in ("m", "v") for n in names]
    if ck.opt_arrays or (ck.optimizer.get("name") == "adam" and ck.train is not None):
        _same_as(ck.opt_arrays, moments, params, "optimizer", nonnegative=("v/",))
    if ck.train is not None and ck.optimizer.get("name", ck.train.optimizer) != ck.train.optimizer:
        raise CharlmError(f"optimizer {str(ck.optimizer.get('name'))[:20]!r} is not the one trained with")
    if ck.state:
        h = ck.state.get("h")
        L = 1 if ck.model.cell == "esn" else ck.model.layers
        dtype = params["decoder.bias" if "decoder.bias" in params else "decoder.head.weight"].dtype
        if sorted(ck.state) != ["c", "h"] or h.ndim != 3 or h.shape[0] != L or h.shape[2] != ck.model.hidden \
                or ck.state["c"].shape != h.shape or h.dtype != dtype or ck.state["c"].dtype != dtype:
            raise CharlmError(f"the carried state has shape {None if h is None else h.shape}, expected ({L}, N, "
                              f"{ck.model.hidden}) {dtype}")
        if not (np.isfinite(h).all() and np.isfinite(ck.state["c"]).all()):
            raise CharlmError("the carried state is not finite")
    g = ck.grad_norms
    if g is not None and (g.ndim != 1 or g.dtype != np.float32 or len(g) > ck.step or not np.isfinite(g).all()):
        raise CharlmError(f"hist/grad_norm must be float32 (step,) and finite, got {g.dtype} {g.shape}")
    if ck.guard_arrays:
        want = [f"param/{n}" for n in names] + [f"opt/{m}" for m in (moments if ck.opt_arrays else [])]
        _same_as(ck.guard_arrays, want, params, "guard snapshot", nonnegative=("opt/v/",))
        if ck.guard.get("step", 0) > ck.step:
            raise CharlmError("the guard snapshot is newer than the checkpoint")


def resolve(model: str | None, root: str | os.PathLike = "models") -> str:
    """The checkpoint file a --model value names: a file; a run directory (its best
    checkpoint, else its latest); or, when None, the most recently written run under root."""
    if model:
        p = Path(model)
        if p.is_dir():
            for name in (BEST, LATEST):
                if (p / name).is_file():
                    tidy(p)
                    return str(p / name)
            from ..data.lock import busy
            pid = busy(p)
            if pid:
                raise CharlmError(f"no checkpoint in {p} yet: a training run{f' (PID {pid})' if pid is not True else ''}"
                                  f" is still preparing it; wait for its first save")
            if any((p / n).exists() for n in ("tokens.bin", "val_tokens.bin")) or any(p.glob(".*.tmp")):
                raise CharlmError(f"no checkpoint in {p}: its training stopped before the first save; train again "
                                  f"with --out {p} (what it left is cleaned up then)")
            raise CharlmError(f"no checkpoint ({BEST} or {LATEST}) in directory {p}")
        if not p.exists():
            raise CharlmError(f"model not found: {p}")
        if p.name in (BEST, LATEST) and p.is_file():
            tidy(p.parent)
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
    tidy(run)
    return str(run / BEST) if (run / BEST).is_file() else str(run / LATEST)
