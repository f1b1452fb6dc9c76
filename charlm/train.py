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
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from . import checkpoint as ckpt_mod
from .config import ModelConfig, TrainConfig
from .data import Batches, Vocab, eval_windows, split_train_val
from .errors import CharlmError
from .model import Model
from .optim import clip_scale, grad_norm, make_optimizer

LN2 = math.log(2.0)
MAX_NONFINITE = 5


def evaluate(model: Model, ids: np.ndarray, seq_len: int, streams: int) -> float:
    """Mean cross-entropy (nats per token) over ids, `streams` parts side by side."""
    total = 0.0
    count = 0
    state = None
    for x, y in eval_windows(ids, seq_len, streams):
        if state is None or state.h.shape[1] != x.shape[1]:
            state = model.zero_state(x.shape[1])
        loss, state = model.loss(x, y, state)
        total += loss * y.size
        count += y.size
    return total / count if count else float("nan")


def _warm_up(model: Model, batches: Batches, with_sampler: bool, vocab: Vocab) -> None:
    """Call every kernel training uses once on a tiny window so Numba compiles
    (or loads from its cache) before the clock starts."""
    x, y = batches.window(0)
    x, y = np.ascontiguousarray(x[:2, :1]), np.ascontiguousarray(y[:2, :1])
    grads = model.zero_grads()
    rng = np.random.default_rng(0)
    model.loss_and_grads(x, y, model.zero_state(1), grads, rng)
    model.loss(x, y, model.zero_state(1))
    opt = make_optimizer("adam", {k: v.copy() for k, v in model.params.items()})
    opt.step({k: v.copy() for k, v in model.params.items()}, grads, 1e-3, 1.0)
    grad_norm(grads)
    if with_sampler:
        from .sample import generate
        "".join(generate(model, vocab, 2, seed=0))


def build_vocab(text: str, cfg: TrainConfig, extra_text: str = "") -> Vocab:
    """Characters: every code point of the training (and validation) text.
    Words: from the training text only, by count (cfg.min_count, cfg.max_vocab)."""
    if cfg.level == "word":
        return Vocab.words_from_text(text, min_count=cfg.min_count, max_vocab=cfg.max_vocab, lower=cfg.lower)
    return Vocab.from_text(text + extra_text)


def train(text: str, model_cfg: ModelConfig, train_cfg: TrainConfig, run_dir: str | Path, *,
          val_text: str | None = None,
          corpus_name: str = "", sample_chars: int = 200, sample_temp: float = 0.8,
          should_stop: Callable[[], bool] = lambda: False,
          clock: Callable[[], float] = time.perf_counter) -> Iterator[dict]:
    """Train a new model on text; write latest.npz / best.npz into run_dir.

    Validation: val_text if given, else the last train_cfg.val_frac of text."""
    if not text:
        raise CharlmError("the corpus is empty; give a text file with some content")
    vocab = build_vocab(text, train_cfg, val_text or "")
    ids = vocab.encode_corpus(text)
    if val_text is not None:
        train_ids = ids
        val_ids = np.concatenate([[vocab.eos_id], vocab.encode_corpus(val_text)]).astype(ids.dtype)
    else:
        train_ids, val_ids = split_train_val(ids, train_cfg.val_frac)
    batches = Batches(train_ids, train_cfg.seq_len, train_cfg.batch)
    if batches.N < train_cfg.batch:
        yield {"event": "note", "message": f"the corpus is short: training {batches.N} parallel streams instead of --batch {train_cfg.batch}"}
    if train_cfg.level == "word":
        n_unk = int((train_ids == vocab.unk_id).sum())
        yield {"event": "note", "message": f"word vocabulary: {len(vocab):,} tokens; {n_unk:,} of {len(train_ids):,} "
                                           f"training tokens are <unk>"}
    if len(val_ids) < 2:
        yield {"event": "note", "message": "the corpus is too short to hold out a validation set; reporting training loss only"}
    mcfg = ModelConfig(**{**model_cfg.to_dict(), "vocab_size": len(vocab)})
    model = Model.create(mcfg, seed=train_cfg.seed)
    opt = make_optimizer(train_cfg.optimizer, model.params)
    grads = model.zero_grads()
    rng = np.random.default_rng(train_cfg.seed)
    run_dir = Path(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CharlmError(f"cannot create output folder {run_dir}: {e.strerror}") from None

    t0 = clock()
    yield {"event": "compiling"}
    _warm_up(model, batches, sample_chars > 0, vocab)
    yield {"event": "compiled", "seconds": clock() - t0}

    wpe = batches.windows_per_epoch
    total_steps = train_cfg.steps or (int(math.ceil(train_cfg.epochs * wpe)) if train_cfg.epochs else 0)
    deadline = train_cfg.minutes * 60.0 if train_cfg.minutes else 0.0
    n_params = sum(p.size for p in model.params.values())
    yield {"event": "start", "run_dir": str(run_dir), "n_train": int(len(train_ids)), "n_val": int(len(val_ids)),
           "vocab_size": len(vocab), "streams": batches.N, "windows_per_epoch": wpe,
           "total_steps": total_steps or None, "deadline_s": deadline or None, "params": int(n_params)}

    state = model.zero_state(batches.N)
    step = epoch = window = 0
    lr = train_cfg.lr
    best_val = None
    history: list[dict] = []
    train_seconds = 0.0
    tokens = 0
    since_eval_loss = 0.0
    since_eval_n = 0
    n_clipped = 0
    nonfinite_run = 0
    start = clock()
    best_path = run_dir / ckpt_mod.BEST
    latest_path = run_dir / ckpt_mod.LATEST
    reason = "budget"

    def save(path: Path):
        ck = ckpt_mod.Checkpoint(
            model=mcfg, vocab=vocab, params=model.params, train=train_cfg,
            optimizer={**opt.state_meta(), "lr": lr}, opt_arrays=opt.state_arrays(),
            state={"h": state.h, "c": state.c}, step=step, epoch=epoch, window=window,
            best_val_loss=best_val, rng=rng.bit_generator.state, history=history, corpus=corpus_name)
        ckpt_mod.save(ck, path)

    def do_eval() -> Iterator[dict]:
        nonlocal best_val, since_eval_loss, since_eval_n
        val = evaluate(model, val_ids, train_cfg.seq_len, batches.N) if len(val_ids) >= 2 else float("nan")
        train_loss = since_eval_loss / since_eval_n if since_eval_n else float("nan")
        since_eval_loss, since_eval_n = 0.0, 0
        improved = math.isfinite(val) and (best_val is None or val < best_val)
        if improved:
            best_val = val
        history.append({"step": step, "train_loss": train_loss if math.isfinite(train_loss) else None,
                        "val_loss": val if math.isfinite(val) else None,
                        "clipped": n_clipped, "lr": lr})
        sample = ""
        if sample_chars > 0:
            from .sample import generate
            sample = "".join(generate(model, vocab, sample_chars, temperature=sample_temp, seed=step))
        yield {"event": "eval", "step": step, "train_loss": train_loss, "val_loss": val,
               "val_bpc": val / LN2, "val_ppl": math.exp(val) if math.isfinite(val) else float("nan"),
               "tokens_per_s": tokens / train_seconds if train_seconds else 0.0,
               "sample": sample, "best": improved}
        save(latest_path)
        yield {"event": "saved", "path": str(latest_path)}
        if improved or not math.isfinite(val):
            save(best_path)
            yield {"event": "saved", "path": str(best_path)}

    while True:
        if total_steps and step >= total_steps:
            break
        if deadline and clock() - start >= deadline:
            break
        if should_stop():
            reason = "interrupted"
            break
        if window >= wpe:
            window = 0
            epoch += 1
            state = model.zero_state(batches.N)
        x, y = batches.window(window)
        ts = clock()
        loss, new_state = model.loss_and_grads(x, y, state, grads, rng)
        norm = grad_norm(grads)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            nonfinite_run += 1
            lr *= 0.5
            state = model.zero_state(batches.N)
            yield {"event": "nonfinite", "step": step, "lr": lr}
            if nonfinite_run >= MAX_NONFINITE:
                raise CharlmError(f"the loss is not finite after {MAX_NONFINITE} tries with a halved learning rate; "
                                  f"train with a lower --lr or with --clip 5")
            continue
        nonfinite_run = 0
        scale = clip_scale(norm, train_cfg.clip)
        n_clipped += scale < 1.0
        opt.step(model.params, grads, lr, scale)
        state = new_state
        train_seconds += clock() - ts
        tokens += x.size
        step += 1
        window += 1
        since_eval_loss += loss
        since_eval_n += 1
        yield {"event": "step", "step": step, "loss": loss, "grad_norm": norm, "clipped": scale < 1.0,
               "tokens_per_s": tokens / train_seconds, "epoch": epoch + window / wpe,
               "elapsed_s": clock() - start}
        if step % train_cfg.eval_every == 0:
            yield from do_eval()
    if step == 0 or not history or history[-1]["step"] != step:
        yield from do_eval()
    yield {"event": "done", "steps": step, "tokens": tokens, "seconds": clock() - start,
           "train_seconds": train_seconds, "tokens_per_s": tokens / train_seconds if train_seconds else 0.0,
           "best_val_bpc": best_val / LN2 if best_val is not None else None,
           "best_val_ppl": math.exp(best_val) if best_val is not None else None, "level": train_cfg.level,
           "checkpoint": str(best_path), "latest": str(latest_path), "reason": reason,
           "clipped_fraction": n_clipped / step if step else 0.0}
