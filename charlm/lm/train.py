"""The training loop. train() yields events (dicts); it never prints.

Events (key "event"):
  note       {"message"}                                   something the user should know
  compiling  {}                                            kernels are being compiled (first run only)
  compiled   {"seconds"}
  start      {"run_dir", "n_train", "n_val", "vocab_size", "streams", "windows_per_epoch", "total_steps", "deadline_s", "params"}
  step       {"step", "loss", "grad_norm", "clipped", "tokens_per_s", "epoch", "elapsed_s"}
  nonfinite  {"step", "lr"}                                update skipped, learning rate halved
  eval       {"step", "train_loss", "val_loss", "val_bpc", "val_ppl", "tokens_per_s", "sample", "best"}
  saved      {"path"}
  done       {"steps", "tokens", "seconds", "tokens_per_s", "best_val_bpc", "best_val_ppl", "checkpoint", "latest", "reason"}
"""
from __future__ import annotations

import math
import time
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from . import checkpoint as ckpt_mod
from ..config import ModelConfig, TrainConfig
from ..data import (TOKENS_FILE, VAL_TOKENS_FILE, Batches, Vocab, eval_windows, file_digest, open_tokens,
                   scan_vocab, split_train_val, write_tokens)
from ..errors import CharlmError
from .model import Model, build_model, create_model
from ..optim import clip_scale, grad_norm, make_optimizer
from .score import safe_exp

LN2 = math.log(2.0)
MAX_NONFINITE = 5    # non-finite steps in a row before training stops
MAX_HALVINGS = 10    # learning-rate halvings in one session before training stops (the rate is then 1/1024 of it)


def evaluate(model, ids: np.ndarray, seq_len: int, streams: int) -> float:
    """Mean cross-entropy (nats per token) over ids, `streams` parts side by side."""
    total = 0.0
    count = 0
    state = None
    for x, y in eval_windows(ids, seq_len, streams):
        if state is None or state.h.shape[1] != x.shape[1]:
            state = model.zero_state(x.shape[1])
        loss, state = model.loss(x, y, state)  # the mean over y.size; padding (-1) adds nothing
        total += loss * y.size
        count += int((y >= 0).sum())
    return total / count if count else float("nan")


def _warm_up(model, batches: Batches, with_sampler: bool, vocab: Vocab) -> None:
    """Call every kernel training uses once on a tiny window so Numba compiles
    (or loads from its cache) before the clock starts."""
    x, y = batches.window(0)
    x, y = np.ascontiguousarray(x[:2, :1]), np.ascontiguousarray(y[:2, :1])
    grads = model.zero_grads()
    rng = np.random.default_rng(0)
    model.loss_and_grads(x, y, model.zero_state(1), grads, rng)
    model.loss(x, y, model.zero_state(1))
    opt = make_optimizer("adam", {k: v.copy() for k, v in model.trainable.items()})
    opt.step({k: v.copy() for k, v in model.trainable.items()}, grads, 1e-3, 1.0)
    grad_norm(grads)
    if with_sampler:
        from .sample import generate
        "".join(generate(model, vocab, 2, seed=0))


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


@dataclass
class _Run:
    """Everything that resumes: the loop's position and counters."""
    step: int = 0
    epoch: int = 0
    window: int = 0
    lr: float = 0.0
    best_val: float | None = None
    history: list = field(default_factory=list)
    tokens: int = 0
    train_seconds: float = 0.0
    clipped: int = 0
    grad_norms: array = field(default_factory=lambda: array("f"))  # pre-clip norm of every step (float32 in the checkpoint)


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


def train(corpus, model_cfg: ModelConfig | None, train_cfg: TrainConfig, run_dir: str | Path | None, *,
          val_text=None, resume: ckpt_mod.Checkpoint | None = None,
          init_from: ckpt_mod.Checkpoint | None = None, strict_vocab: bool = False,
          checkpoint_every: int = 0,
          corpus_name: str = "", sample_chars: int = 200, sample_temp: float = 0.8,
          should_stop: Callable[[], bool] = lambda: False,
          clock: Callable[[], float] = time.perf_counter) -> Iterator[dict]:
    """Train a model; write latest.npz / best.npz (and the token files) into run_dir.

    corpus: a str or a Source. Validation: val_text (str or Source) if given, else
    the last train_cfg.val_frac of the corpus.
    resume: continue that checkpoint's run exactly (its configuration, vocabulary,
    token files, weights, optimizer moments, step, learning rate, RNG, data
    position and carried state); train_cfg then only sets the new budget, counted
    from the checkpoint's step.
    init_from: start a new run from that checkpoint's weights and vocabulary
    (fine-tuning); tokens outside the vocabulary are reported (and refused with
    strict_vocab).
    """
    if resume is not None:
        run_dir = Path(resume.path).parent if run_dir is None else Path(run_dir)
        vocab = resume.vocab
        mcfg = resume.model
        base = resume.train or train_cfg
        train_cfg = TrainConfig(**{**base.to_dict(), "steps": train_cfg.steps, "epochs": train_cfg.epochs,
                                   "minutes": train_cfg.minutes})
        train_ids, val_ids = _reopen_tokens(resume, run_dir)
        data = dict(resume.data)
        corpus_name = resume.corpus
    else:
        source = Source.of(corpus, corpus_name)
        val_source = Source.of(val_text, "validation")
        if source is None:
            raise CharlmError("no corpus given")
        run_dir = Path(run_dir)
        if (run_dir / ckpt_mod.LATEST).exists() or (run_dir / ckpt_mod.BEST).exists():
            raise CharlmError(f"{run_dir} already holds a run's checkpoints; continue it with --resume {run_dir}, "
                              f"or give a new --out")
        created = next((p for p in [*reversed(run_dir.absolute().parents), run_dir.absolute()]
                        if not p.exists()), None)  # the first folder this run creates, removed on failure
        try:
            run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CharlmError(f"cannot create output folder {run_dir}: {e.strerror}") from None
        try:
            vocab, train_ids, val_ids, data, oov = _prepare_tokens(
                source, val_source, train_cfg, run_dir, init_from.vocab if init_from else None)
            if len(train_ids) == 0:
                raise CharlmError("the corpus is empty; give a text file with some content")
            Batches(train_ids, train_cfg.seq_len, train_cfg.batch)  # too short: fail before anything is kept
            if oov:
                total = sum(oov.values())
                top = ", ".join(f"{t!r} ×{c}" for t, c in sorted(oov.items(), key=lambda kv: -kv[1])[:10])
                what = "mapped to <unk>" if vocab.level == "word" else "left out"
                if strict_vocab:
                    raise CharlmError(f"{total} tokens of the corpus ({len(oov)} distinct) are not in the vocabulary "
                                      f"of {init_from.path}: {top}; drop --strict-vocab to have them {what}")
        except BaseException:
            if created is not None:
                import shutil
                shutil.rmtree(created, ignore_errors=True)
            raise
        if oov:
            yield {"event": "note", "message": f"{total} tokens ({len(oov)} distinct) are not in the model's "
                                               f"vocabulary and are {what}: {top}"}
        if data.get("val_oov"):
            what = "mapped to <unk>" if vocab.level == "word" else "left out"
            yield {"event": "note", "message": f"{data['val_oov']} tokens of the validation file are not in the "
                                               f"vocabulary and are {what}"}
        if init_from is not None:
            mcfg = init_from.model
        else:
            mcfg = ModelConfig(**{**model_cfg.to_dict(), "vocab_size": len(vocab)})
    ckpt_mod.remove_stale_temporaries(run_dir)  # left by a process of this run killed while saving
    batches = Batches(train_ids, train_cfg.seq_len, train_cfg.batch)
    if batches.N < train_cfg.batch:
        yield {"event": "note", "message": f"the corpus is short: training {batches.N} parallel streams instead of --batch {train_cfg.batch}"}
    if train_cfg.level == "word" and resume is None:
        n_unk = int((train_ids == vocab.unk_id).sum())
        yield {"event": "note", "message": f"word vocabulary: {len(vocab):,} tokens; {n_unk:,} of {len(train_ids):,} "
                                           f"training tokens are <unk>"}
    if len(val_ids) < 2:
        yield {"event": "note", "message": "the corpus is too short to hold out a validation set; reporting training loss only"}

    if resume is not None:
        model = build_model(mcfg, {k: np.array(v) for k, v in resume.params.items()})
    elif init_from is not None:
        model = build_model(mcfg, {k: np.array(v, dtype=np.float32 if v.dtype.kind == "f" else v.dtype)
                                   for k, v in init_from.params.items()})
    else:
        model = create_model(mcfg, seed=train_cfg.seed)
    opt = make_optimizer(train_cfg.optimizer, model.trainable)
    grads = model.zero_grads()
    rng = np.random.default_rng(train_cfg.seed)
    run = _Run(lr=train_cfg.lr)
    state = model.zero_state(batches.N)
    if resume is not None:
        opt.load_state(resume.optimizer, resume.opt_arrays)
        rng.bit_generator.state = resume.rng
        c = resume.counters
        run = _Run(step=resume.step, epoch=resume.epoch, window=resume.window,
                   lr=float(resume.optimizer.get("lr", train_cfg.lr)), best_val=resume.best_val_loss,
                   history=list(resume.history), tokens=int(c.get("tokens", 0)),
                   train_seconds=float(c.get("train_seconds", 0.0)), clipped=int(c.get("clipped", 0)),
                   grad_norms=array("f", [] if resume.grad_norms is None else resume.grad_norms.tolist()))
        if "h" in resume.state and resume.state["h"].shape == state.h.shape:
            state.h[...] = resume.state["h"]
            state.c[...] = resume.state["c"]

    t0 = clock()
    yield {"event": "compiling"}
    _warm_up(model, batches, sample_chars > 0, vocab)
    yield {"event": "compiled", "seconds": clock() - t0}

    wpe = batches.windows_per_epoch
    first_step = run.step
    budget = train_cfg.steps or (int(math.ceil(train_cfg.epochs * wpe)) if train_cfg.epochs else 0)
    total_steps = first_step + budget if budget else 0
    deadline = train_cfg.minutes * 60.0 if train_cfg.minutes else 0.0
    n_params = sum(p.size for p in model.trainable.values())
    yield {"event": "start", "run_dir": str(run_dir), "n_train": int(len(train_ids)), "n_val": int(len(val_ids)),
           "vocab_size": len(vocab), "streams": batches.N, "windows_per_epoch": wpe,
           "first_step": first_step, "total_steps": total_steps or None, "deadline_s": deadline or None,
           "params": int(n_params), "resumed": resume is not None}

    since_eval_loss = 0.0
    since_eval_n = 0
    nonfinite_run = 0
    halvings = 0
    start = clock()
    best_path = run_dir / ckpt_mod.BEST
    latest_path = run_dir / ckpt_mod.LATEST
    reason = "budget"
    snapshot = _snapshot(model, opt, state, run.step)
    tokens_at_start, seconds_at_start = run.tokens, run.train_seconds

    def save(path: Path) -> Iterator[dict]:
        if not all(np.isfinite(p).all() for p in model.params.values()):
            yield {"event": "note", "message": f"not saving {path}: the weights are not finite"}
            return
        ck = ckpt_mod.Checkpoint(
            model=mcfg, vocab=vocab, params=model.params, train=train_cfg,
            optimizer={**opt.state_meta(), "lr": run.lr}, opt_arrays=opt.state_arrays(),
            state={"h": state.h, "c": state.c}, step=run.step, epoch=run.epoch, window=run.window,
            best_val_loss=run.best_val, rng=rng.bit_generator.state, history=run.history, corpus=corpus_name,
            data=data, counters={"tokens": run.tokens, "train_seconds": run.train_seconds, "clipped": run.clipped},
            grad_norms=np.frombuffer(run.grad_norms, dtype=np.float32).copy())
        ckpt_mod.save(ck, path)
        yield {"event": "saved", "path": str(path)}

    def rate() -> float:
        t = run.train_seconds - seconds_at_start
        return (run.tokens - tokens_at_start) / t if t > 0 else 0.0

    def do_eval() -> Iterator[dict]:
        nonlocal since_eval_loss, since_eval_n
        val = evaluate(model, val_ids, train_cfg.seq_len, batches.N) if len(val_ids) >= 2 else float("nan")
        train_loss = since_eval_loss / since_eval_n if since_eval_n else float("nan")
        since_eval_loss, since_eval_n = 0.0, 0
        improved = math.isfinite(val) and (run.best_val is None or val < run.best_val)
        if improved:
            run.best_val = val
        run.history.append({"step": run.step, "train_loss": train_loss if math.isfinite(train_loss) else None,
                            "val_loss": val if math.isfinite(val) else None,
                            "clipped": run.clipped, "lr": run.lr})
        sample = ""
        if sample_chars > 0:
            from .sample import generate
            sample = "".join(generate(model, vocab, sample_chars, temperature=sample_temp, seed=run.step))
        yield {"event": "eval", "step": run.step, "train_loss": train_loss, "val_loss": val,
               "val_bpc": val / LN2, "val_ppl": safe_exp(val) if math.isfinite(val) else float("nan"),
               "tokens_per_s": rate(), "sample": sample, "best": improved}
        yield from save(latest_path)
        if improved or not (best_path.exists() or math.isfinite(val)):
            yield from save(best_path)

    while True:
        if total_steps and run.step >= total_steps:
            break
        if deadline and clock() - start >= deadline:
            break
        if should_stop():
            reason = "interrupted"
            break
        if run.window >= wpe:
            run.window = 0
            run.epoch += 1
            state = model.zero_state(batches.N)
        x, y = batches.window(run.window)
        ts = clock()
        loss, new_state = model.loss_and_grads(x, y, state, grads, rng)
        norm = grad_norm(grads)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            nonfinite_run += 1
            halvings += 1
            run.lr *= 0.5
            state = _restore(snapshot, model, opt, batches.N)
            yield {"event": "nonfinite", "step": run.step, "lr": run.lr, "restored_step": snapshot["step"]}
            if nonfinite_run >= MAX_NONFINITE or halvings >= MAX_HALVINGS:
                yield from save(latest_path)
                what = (f"after {MAX_NONFINITE} tries in a row" if nonfinite_run >= MAX_NONFINITE
                        else f"{MAX_HALVINGS} times (the gradients are exploding)")
                raise CharlmError(f"the loss was not finite {what}, each time with a halved learning rate; "
                                  f"start again with a lower --lr or with clipping (--clip 5), e.g. charlm train CORPUS "
                                  f"--init-from {latest_path} --lr {run.lr:g} (the last good weights are in {latest_path})")
            continue
        nonfinite_run = 0
        if run.step - snapshot["step"] >= SNAPSHOT_EVERY:
            # before the update: these weights just gave a finite loss and gradient (the update
            # itself may overflow them, and a snapshot of those could never be recovered from)
            snapshot = _snapshot(model, opt, state, run.step)
        scale = clip_scale(norm, train_cfg.clip)
        run.clipped += scale < 1.0
        run.grad_norms.append(norm)
        opt.step(model.trainable, grads, run.lr, scale)
        state = new_state
        run.train_seconds += clock() - ts
        run.tokens += x.size
        run.step += 1
        run.window += 1
        since_eval_loss += loss
        since_eval_n += 1
        yield {"event": "step", "step": run.step, "loss": loss, "grad_norm": norm, "clipped": scale < 1.0,
               "tokens_per_s": rate(), "epoch": run.epoch + run.window / wpe, "elapsed_s": clock() - start}
        if run.step % train_cfg.eval_every == 0:
            yield from do_eval()
        elif checkpoint_every and run.step % checkpoint_every == 0:
            yield from save(latest_path)
    if run.step == first_step or not run.history or run.history[-1]["step"] != run.step:
        yield from do_eval()
    yield {"event": "done", "steps": run.step, "tokens": run.tokens - tokens_at_start, "seconds": clock() - start,
           "train_seconds": run.train_seconds - seconds_at_start, "tokens_per_s": rate(),
           "best_val_bpc": run.best_val / LN2 if run.best_val is not None else None,
           "best_val_ppl": safe_exp(run.best_val) if run.best_val is not None else None, "level": train_cfg.level,
           "checkpoint": str(best_path), "latest": str(latest_path), "reason": reason,
           "clipped_fraction": run.clipped / run.step if run.step else 0.0,
           "grad_norm_median": float(np.median(np.frombuffer(run.grad_norms, dtype=np.float32))) if run.grad_norms else None,
           "run_dir": str(run_dir)}


SNAPSHOT_EVERY = 100


def _snapshot(model: Model, opt, state, step: int = 0) -> dict:
    """In-memory copy of the last good weights and optimizer state."""
    return {"step": step, "params": {k: v.copy() for k, v in model.trainable.items()},
            "opt": {k: v.copy() for k, v in opt.state_arrays().items()}, "t": opt.t}


def _restore(snapshot: dict, model: Model, opt, streams: int):
    """Put the snapshot back; returns a zero hidden state for `streams` streams."""
    for k, v in snapshot["params"].items():
        model.params[k][...] = v
    for k, v in opt.state_arrays().items():
        v[...] = snapshot["opt"][k]
    opt.t = snapshot["t"]
    return model.zero_state(streams)
