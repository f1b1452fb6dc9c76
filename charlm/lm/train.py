"""The training loop. train() yields events (dicts); it never prints.

train() starts a run (charlm.lm.start: new, resumed, or from a checkpoint's weights), builds the model,
optimizer and batches for it, then hands them to a _Trainer: its step, guard (a non-finite step restores
the last good weights and halves the learning rate), evaluation and save. The options of `charlm train`
are decided in charlm.lm.run.

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
from typing import Callable, Iterator

import numpy as np

from . import checkpoint as ckpt_mod
from ..config import ModelConfig, TrainConfig
from ..data import Batches, Vocab, eval_windows
from ..errors import CharlmError
from ..optim import clip_scale, grad_norm, make_optimizer
from .base import BaseModel
from .models import build_model, create_model
from .score import safe_exp
from .start import Source, Start, build_vocab, new_run, resumed

__all__ = ["train", "evaluate", "Source", "build_vocab", "LN2", "MAX_NONFINITE", "MAX_HALVINGS", "SNAPSHOT_EVERY"]

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
    The run's options as the command line takes them: charlm.lm.run.train().
    """
    if resume is not None:
        start = resumed(resume, train_cfg, run_dir)
    else:
        start = yield from new_run(corpus, model_cfg, train_cfg, run_dir, val_text=val_text, init_from=init_from,
                                    strict_vocab=strict_vocab, corpus_name=corpus_name)
    trainer = yield from _Trainer.begin(start, sample_chars=sample_chars, sample_temp=sample_temp,
                                        checkpoint_every=checkpoint_every, should_stop=should_stop, clock=clock)
    yield from trainer.loop()


def _start_notes(s: Start, batches: Batches) -> Iterator[dict]:
    if batches.N < s.train_cfg.batch:
        yield {"event": "note", "message": f"the corpus is short: training {batches.N} parallel streams instead of --batch {s.train_cfg.batch}"}
    if s.train_cfg.level == "word" and s.resume is None:
        n_unk = int((s.train_ids == s.vocab.unk_id).sum())
        yield {"event": "note", "message": f"word vocabulary: {len(s.vocab):,} tokens; {n_unk:,} of {len(s.train_ids):,} "
                                           f"training tokens are <unk>"}
    if len(s.val_ids) < 2:
        yield {"event": "note", "message": "the corpus is too short to hold out a validation set; reporting training loss only"}


def _initial_model(s: Start) -> BaseModel:
    """The checkpoint's weights (as saved on resume; float32 with init_from), or new ones from the seed."""
    if s.resume is not None:
        return build_model(s.model_cfg, {k: np.array(v) for k, v in s.resume.params.items()})
    if s.init_from is not None:
        return build_model(s.model_cfg, {k: np.array(v, dtype=np.float32 if v.dtype.kind == "f" else v.dtype)
                                         for k, v in s.init_from.params.items()})
    return create_model(s.model_cfg, seed=s.train_cfg.seed)


def _resume_run(ck: ckpt_mod.Checkpoint, opt, rng: np.random.Generator, state, lr: float) -> _Run:
    """Put a checkpoint's optimizer state, RNG and carried state back; its counters as a _Run."""
    opt.load_state(ck.optimizer, ck.opt_arrays)
    rng.bit_generator.state = ck.rng
    c = ck.counters
    run = _Run(step=ck.step, epoch=ck.epoch, window=ck.window, lr=float(ck.optimizer.get("lr", lr)),
               best_val=ck.best_val_loss, history=list(ck.history), tokens=int(c.get("tokens", 0)),
               train_seconds=float(c.get("train_seconds", 0.0)), clipped=int(c.get("clipped", 0)),
               grad_norms=array("f", [] if ck.grad_norms is None else ck.grad_norms.tolist()))
    if "h" in ck.state and ck.state["h"].shape == state.h.shape:
        state.h[...] = ck.state["h"]
        state.c[...] = ck.state["c"]
    return run


class _Trainer:
    """The loop over a prepared start: steps, the guard against non-finite steps, evaluations and saves.
    Its methods are generators of events; the state they share lives on the instance."""

    def __init__(self, s: Start, batches: Batches, model: BaseModel, opt, rng: np.random.Generator, run: _Run, state,
                 *, sample_chars: int, sample_temp: float, checkpoint_every: int,
                 should_stop: Callable[[], bool], clock: Callable[[], float]):
        self.s, self.cfg, self.batches, self.model, self.opt = s, s.train_cfg, batches, model, opt
        self.rng, self.run, self.state = rng, run, state
        self.grads = model.zero_grads()
        self.sample_chars, self.sample_temp, self.checkpoint_every = sample_chars, sample_temp, checkpoint_every
        self.should_stop, self.clock = should_stop, clock
        self.best_path, self.latest_path = s.run_dir / ckpt_mod.BEST, s.run_dir / ckpt_mod.LATEST
        self.wpe = batches.windows_per_epoch
        self.first_step = run.step
        budget = self.cfg.steps or (int(math.ceil(self.cfg.epochs * self.wpe)) if self.cfg.epochs else 0)
        self.total_steps = self.first_step + budget if budget else 0
        self.deadline = self.cfg.minutes * 60.0 if self.cfg.minutes else 0.0
        self.tokens_at_start, self.seconds_at_start = run.tokens, run.train_seconds
        self.since_eval_loss, self.since_eval_n = 0.0, 0
        self.nonfinite_run = self.halvings = 0
        self.reason = "budget"
        self.started = 0.0
        self.snapshot: dict = {}

    @classmethod
    def begin(cls, s: Start, **loop_options):
        """Batches, model, optimizer, RNG and counters for the start (restored on resume).
        A generator: yields notes, returns the _Trainer."""
        ckpt_mod.remove_stale_temporaries(s.run_dir)  # left by a process of this run killed while saving
        batches = Batches(s.train_ids, s.train_cfg.seq_len, s.train_cfg.batch)
        yield from _start_notes(s, batches)
        model = _initial_model(s)
        opt = make_optimizer(s.train_cfg.optimizer, model.trainable)
        rng = np.random.default_rng(s.train_cfg.seed)
        state = model.zero_state(batches.N)
        if s.resume is not None:
            run = _resume_run(s.resume, opt, rng, state, s.train_cfg.lr)
        else:
            run = _Run(lr=s.train_cfg.lr)
        return cls(s, batches, model, opt, rng, run, state, **loop_options)

    def loop(self) -> Iterator[dict]:
        """Compile, announce the start, step until the budget, the deadline or should_stop; evaluate and
        save at the end unless the last step just did."""
        yield from self._start()
        while not self._over():
            yield from self._step()
        run = self.run
        if run.step == self.first_step or not run.history or run.history[-1]["step"] != run.step:
            yield from self._evaluate()
        yield self._done()

    def _start(self) -> Iterator[dict]:
        t0 = self.clock()
        yield {"event": "compiling"}
        _warm_up(self.model, self.batches, self.sample_chars > 0, self.s.vocab)
        yield {"event": "compiled", "seconds": self.clock() - t0}
        s, n_params = self.s, sum(p.size for p in self.model.trainable.values())
        yield {"event": "start", "run_dir": str(s.run_dir), "n_train": int(len(s.train_ids)),
               "n_val": int(len(s.val_ids)), "vocab_size": len(s.vocab), "streams": self.batches.N,
               "windows_per_epoch": self.wpe, "first_step": self.first_step,
               "total_steps": self.total_steps or None, "deadline_s": self.deadline or None,
               "params": int(n_params), "resumed": s.resume is not None}
        self.started = self.clock()
        self.snapshot = _snapshot(self.model, self.opt, self.state, self.run.step)

    def _over(self) -> bool:
        if self.total_steps and self.run.step >= self.total_steps:
            return True
        if self.deadline and self.clock() - self.started >= self.deadline:
            return True
        if self.should_stop():
            self.reason = "interrupted"
            return True
        return False

    def _step(self) -> Iterator[dict]:
        """One truncated-BPTT window: forward, backward, clip, update; evaluate or save when due."""
        run, cfg, model = self.run, self.cfg, self.model
        if run.window >= self.wpe:
            run.window = 0
            run.epoch += 1
            self.state = model.zero_state(self.batches.N)
        x, y = self.batches.window(run.window)
        ts = self.clock()
        loss, new_state = model.loss_and_grads(x, y, self.state, self.grads, self.rng)
        norm = grad_norm(self.grads)
        if not (math.isfinite(loss) and math.isfinite(norm)):
            yield from self._guard()
            return
        self.nonfinite_run = 0
        if run.step - self.snapshot["step"] >= SNAPSHOT_EVERY:
            # before the update: these weights just gave a finite loss and gradient (the update
            # itself may overflow them, and a snapshot of those could never be recovered from)
            self.snapshot = _snapshot(model, self.opt, self.state, run.step)
        scale = clip_scale(norm, cfg.clip)
        run.clipped += scale < 1.0
        run.grad_norms.append(norm)
        self.opt.step(model.trainable, self.grads, run.lr, scale)
        self.state = new_state
        run.train_seconds += self.clock() - ts
        run.tokens += x.size
        run.step += 1
        run.window += 1
        self.since_eval_loss += loss
        self.since_eval_n += 1
        yield {"event": "step", "step": run.step, "loss": loss, "grad_norm": norm, "clipped": scale < 1.0,
               "tokens_per_s": self._rate(), "epoch": run.epoch + run.window / self.wpe,
               "elapsed_s": self.clock() - self.started}
        if run.step % cfg.eval_every == 0:
            yield from self._evaluate()
        elif self.checkpoint_every and run.step % self.checkpoint_every == 0:
            yield from self._save(self.latest_path)

    def _guard(self) -> Iterator[dict]:
        """A non-finite loss or gradient: skip the update, restore the last good weights, halve the
        learning rate; after too many, save and stop with advice."""
        run = self.run
        self.nonfinite_run += 1
        self.halvings += 1
        run.lr *= 0.5
        self.state = _restore(self.snapshot, self.model, self.opt, self.batches.N)
        yield {"event": "nonfinite", "step": run.step, "lr": run.lr, "restored_step": self.snapshot["step"]}
        if self.nonfinite_run >= MAX_NONFINITE or self.halvings >= MAX_HALVINGS:
            latest = self.latest_path
            yield from self._save(latest)
            what = (f"after {MAX_NONFINITE} tries in a row" if self.nonfinite_run >= MAX_NONFINITE
                    else f"{MAX_HALVINGS} times (the gradients are exploding)")
            raise CharlmError(f"the loss was not finite {what}, each time with a halved learning rate; "
                              f"start again with a lower --lr or with clipping (--clip 5), e.g. charlm train CORPUS "
                              f"--init-from {latest} --lr {run.lr:g} (the last good weights are in {latest})")

    def _rate(self) -> float:
        t = self.run.train_seconds - self.seconds_at_start
        return (self.run.tokens - self.tokens_at_start) / t if t > 0 else 0.0

    def _evaluate(self) -> Iterator[dict]:
        """Validation loss, history, a sample; save latest.npz, and best.npz if it improved."""
        run, s = self.run, self.s
        val = evaluate(self.model, s.val_ids, self.cfg.seq_len, self.batches.N) if len(s.val_ids) >= 2 else float("nan")
        train_loss = self.since_eval_loss / self.since_eval_n if self.since_eval_n else float("nan")
        self.since_eval_loss, self.since_eval_n = 0.0, 0
        improved = math.isfinite(val) and (run.best_val is None or val < run.best_val)
        if improved:
            run.best_val = val
        run.history.append({"step": run.step, "train_loss": train_loss if math.isfinite(train_loss) else None,
                            "val_loss": val if math.isfinite(val) else None,
                            "clipped": run.clipped, "lr": run.lr})
        sample = ""
        if self.sample_chars > 0:
            from .sample import generate
            sample = "".join(generate(self.model, s.vocab, self.sample_chars, temperature=self.sample_temp,
                                      seed=run.step))
        yield {"event": "eval", "step": run.step, "train_loss": train_loss, "val_loss": val,
               "val_bpc": val / LN2, "val_ppl": safe_exp(val) if math.isfinite(val) else float("nan"),
               "tokens_per_s": self._rate(), "sample": sample, "best": improved}
        yield from self._save(self.latest_path)
        if improved or not (self.best_path.exists() or math.isfinite(val)):
            yield from self._save(self.best_path)

    def _save(self, path: Path) -> Iterator[dict]:
        model, run, s = self.model, self.run, self.s
        if not all(np.isfinite(p).all() for p in model.params.values()):
            yield {"event": "note", "message": f"not saving {path}: the weights are not finite"}
            return
        ck = ckpt_mod.Checkpoint(
            model=s.model_cfg, vocab=s.vocab, params=model.params, train=self.cfg,
            optimizer={**self.opt.state_meta(), "lr": run.lr}, opt_arrays=self.opt.state_arrays(),
            state={"h": self.state.h, "c": self.state.c}, step=run.step, epoch=run.epoch, window=run.window,
            best_val_loss=run.best_val, rng=self.rng.bit_generator.state, history=run.history,
            corpus=s.corpus_name, data=s.data,
            counters={"tokens": run.tokens, "train_seconds": run.train_seconds, "clipped": run.clipped},
            grad_norms=np.frombuffer(run.grad_norms, dtype=np.float32).copy())
        ckpt_mod.save(ck, path)
        yield {"event": "saved", "path": str(path)}

    def _done(self) -> dict:
        run = self.run
        norms = np.frombuffer(run.grad_norms, dtype=np.float32)
        return {"event": "done", "steps": run.step, "tokens": run.tokens - self.tokens_at_start,
                "seconds": self.clock() - self.started, "train_seconds": run.train_seconds - self.seconds_at_start,
                "tokens_per_s": self._rate(),
                "best_val_bpc": run.best_val / LN2 if run.best_val is not None else None,
                "best_val_ppl": safe_exp(run.best_val) if run.best_val is not None else None,
                "level": self.cfg.level, "checkpoint": str(self.best_path), "latest": str(self.latest_path),
                "reason": self.reason, "clipped_fraction": run.clipped / run.step if run.step else 0.0,
                "grad_norm_median": float(np.median(norms)) if run.grad_norms else None,
                "run_dir": str(self.s.run_dir)}


SNAPSHOT_EVERY = 100


def _snapshot(model: BaseModel, opt, state, step: int = 0) -> dict:
    """In-memory copy of the last good weights and optimizer state."""
    return {"step": step, "params": {k: v.copy() for k, v in model.trainable.items()},
            "opt": {k: v.copy() for k, v in opt.state_arrays().items()}, "t": opt.t}


def _restore(snapshot: dict, model: BaseModel, opt, streams: int):
    """Put the snapshot back; returns a zero hidden state for `streams` streams."""
    for k, v in snapshot["params"].items():
        model.params[k][...] = v
    for k, v in opt.state_arrays().items():
        v[...] = snapshot["opt"][k]
    opt.t = snapshot["t"]
    return model.zero_state(streams)
