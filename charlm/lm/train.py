"""The training loop. train() yields events (dicts); it never prints.

train() starts a run (charlm.lm.start: new, resumed, or from a checkpoint's weights), builds the model,
optimizer and batches for it, then hands them to a _Trainer: its step, guard (a non-finite step restores
the last good weights and halves the learning rate), evaluation and save. The options of `charlm train`
are decided in charlm.lm.run; the learning rate of each step in charlm.lm.schedule (run.lr is its base rate).

Events (key "event"):
  note       {"message"}                                   something the user should know
  compiling  {}                                            kernels are being compiled (first run only)
  compiled   {"seconds"}
  start      {"run_dir", "n_train", "n_val", "vocab_size", "streams", "windows_per_epoch", "total_steps", "deadline_s", "params"}
  step       {"step", "loss", "grad_norm", "clipped", "tokens_per_s", "epoch", "elapsed_s", "lr"}  lr: this step's
  nonfinite  {"step", "lr"}                                update skipped, learning rate halved
  eval       {"step", "train_loss", "val_loss", "val_bpc", "val_ppl", "tokens_per_s", "sample", "best", "lr", "lr_next",
              "lr_decayed", "evals_since_best"}   lr: the last step's rate (as in the history); lr_next: the next one's
  saved      {"path"}
  done       {"steps", "tokens", "seconds", "tokens_per_s", "best_val_bpc", "best_val_ppl", "checkpoint", "latest", "reason",
              "best_step", "val_absurd", "lr", "patience", "threads"}   val_absurd: the best validation loss is over twice
              a uniform guess's; reason: "budget", "interrupted" or "patience"; lr: the rate the next step would take;
              threads: runtime.thread_report() (None outside compute_threads)
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
from .info import done_validation
from . import shard
from .. import dist
from ..config import ModelConfig, TrainConfig
from ..data import Batches, eval_windows
from ..errors import CharlmError
from ..optim import clip_scale, grad_norm, make_optimizer
from .base import BaseModel
from .models import build_model, create_model
from ..runtime import thread_report
from .schedule import Schedule, scheduled_lr
from .score import safe_exp
from .guard import guard_of as _guard_of, guard_record, restore as _restore, snapshot as _snapshot
from .warmup import warm_up
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
    sched: Schedule = field(default_factory=Schedule)  # the learning-rate schedule's state (lr is its base rate)


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
        start = resumed(resume, train_cfg, run_dir)  # locks the run folder, as new_run does
    else:
        begin = shard.new_run if dist.size() > 1 else new_run  # under MPI rank 0 alone tokenises
        start = yield from begin(corpus, model_cfg, train_cfg, run_dir, val_text=val_text, init_from=init_from,
                                 strict_vocab=strict_vocab, corpus_name=corpus_name)
    try:
        for message in start.notes:
            yield {"event": "note", "message": message}
        trainer = yield from _Trainer.begin(start, sample_chars=sample_chars, sample_temp=sample_temp,
                                            checkpoint_every=checkpoint_every, should_stop=should_stop, clock=clock)
        yield from trainer.loop()
    finally:
        if start.lock is not None:
            start.lock.release()  # the kernel would on exit; a library caller may start another run


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


def _resume_run(ck: ckpt_mod.Checkpoint, opt, rng: np.random.Generator, state, lr: float, batches: Batches) -> _Run:
    """Put a checkpoint's optimizer state, RNG and carried state back; its counters as a _Run."""
    opt.load_state(ck.optimizer, ck.opt_arrays)
    rng.bit_generator.state = ck.rng
    c = ck.counters
    run = _Run(step=ck.step, epoch=ck.epoch, window=ck.window, lr=float(ck.optimizer.get("lr", lr)),
               best_val=ck.best_val_loss, history=list(ck.history), tokens=int(c.get("tokens", 0)),
               train_seconds=float(c.get("train_seconds", 0.0)), clipped=int(c.get("clipped", 0)),
               grad_norms=array("f", [] if ck.grad_norms is None else ck.grad_norms.tolist()),
               sched=Schedule.of_counters(c, ck.best_val_loss))
    if "h" in ck.state and ck.state["h"].shape[1:] == (batches.N, state.h.shape[2]):  # all streams, whatever K
        state.h[...] = ck.state["h"][:, batches.lo:batches.hi]
        state.c[...] = ck.state["c"][:, batches.lo:batches.hi]
    return run


class _Trainer:
    """The loop over a prepared start: steps, the guard against non-finite steps, evaluations and saves.
    Its methods are generators of events; the state they share lives on the instance."""

    def __init__(self, s: Start, batches: Batches, model: BaseModel, opt, rng: np.random.Generator, run: _Run, state,
                 *, sample_chars: int, sample_temp: float, checkpoint_every: int,
                 should_stop: Callable[[], bool], clock: Callable[[], float]):
        self.s, self.cfg, self.batches, self.model, self.opt = s, s.train_cfg, batches, model, opt
        self.rng, self.run, self.state = rng, run, state
        # more than one process: the gradients live in one flat buffer, summed over the ranks each step
        self.sync = shard.GradSync(model, batches.local / batches.N) if dist.size() > 1 else None
        self.grads = self.sync.grads if self.sync else model.zero_grads()
        # one process: the embedding's gradient is written in the rows a window uses only (BaseModel.touched);
        # under MPI the summed gradient has every rank's rows, so it is zeroed whole
        model.sparse_grads = self.sync is None
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
        self.patience_out = False  # --patience evaluations in a row did not improve: stop
        self.started = 0.0
        self.snapshot: dict = {}
        self.sampler_job = None  # the child compiling the sampler (charlm.lm.warmup), until joined

    @classmethod
    def begin(cls, s: Start, **loop_options):
        """Batches, model, optimizer, RNG and counters for the start (restored on resume).
        A generator: yields notes, returns the _Trainer."""
        batches = Batches(s.train_ids, s.train_cfg.seq_len, s.train_cfg.batch)
        if dist.size() > 1:
            batches.shard(*shard.check_streams(batches.N, s.train_cfg.batch))  # this rank's streams
        yield from _start_notes(s, batches)
        model = _initial_model(s)
        opt = make_optimizer(s.train_cfg.optimizer, model.trainable, lazy=s.train_cfg.sparse_embedding)
        rng = np.random.default_rng(s.train_cfg.seed)
        state = model.zero_state(batches.local)
        if s.resume is not None:
            run = _resume_run(s.resume, opt, rng, state, s.train_cfg.lr, batches)
        else:
            run = _Run(lr=s.train_cfg.lr)
        trainer = cls(s, batches, model, opt, rng, run, state, **loop_options)
        for message in run.sched.begin(s.train_cfg, run.lr, run.step, trainer.total_steps, len(s.val_ids) >= 2,
                                       trainer.deadline):
            yield {"event": "note", "message": message}
        return trainer

    def loop(self) -> Iterator[dict]:
        """Compile, announce the start, step until the budget, the deadline or should_stop; evaluate and
        save at the end unless the last step just did."""
        try:
            yield from self._start()
            while not self._over():
                yield from self._step()
            if not all(np.isfinite(p).all() for p in self.model.trainable.values()):
                yield from self._guard()  # the last update overflowed the weights: back to the last good ones
            run = self.run
            if run.step == self.first_step or not run.history or run.history[-1]["step"] != run.step:
                yield from self._evaluate()
            yield self._done()
        finally:
            if self.sampler_job is not None:  # left before the first sample (an error, Ctrl-C)
                self.sampler_job.stop()

    def _start(self) -> Iterator[dict]:
        t0 = self.clock()
        yield {"event": "compiling"}
        # The sampler is first needed at the first evaluation: a child process compiles it meanwhile
        # (charlm.lm.warmup), on the other core, unless several processes already share the cores
        sampler_later = self.sample_chars > 0 and dist.size() == 1
        warm_up(self.model, self.batches, self.sample_chars > 0 and not sampler_later, self.s.vocab,
                lazy=self.cfg.sparse_embedding)
        if sampler_later:
            from .warmup import sampler_in_background
            self.sampler_job = sampler_in_background(self.model, self.s.vocab)
        yield {"event": "compiled", "seconds": self.clock() - t0}
        s, n_params = self.s, sum(p.size for p in self.model.trainable.values())
        yield {"event": "start", "run_dir": str(s.run_dir), "n_train": int(len(s.train_ids)),
               "n_val": int(len(s.val_ids)), "vocab_size": len(s.vocab), "streams": self.batches.N,
               "windows_per_epoch": self.wpe, "first_step": self.first_step,
               "total_steps": self.total_steps or None, "deadline_s": self.deadline or None,
               "params": int(n_params), "resumed": s.resume is not None}
        self.started = self.clock()
        self.snapshot = _snapshot(self.model, self.opt, self.state, self.run.step)
        if s.resume is not None and s.resume.guard:  # the guard as it was: resume stays exact through it
            self.snapshot, self.halvings, self.nonfinite_run = _guard_of(s.resume, self.snapshot)

    def _over(self) -> bool:
        if self.total_steps and self.run.step >= self.total_steps:
            return True
        if self.patience_out:  # every rank alike: it follows from the validation loss, which they share
            return True
        if self.sync is not None:  # the ranks agree: the flags were summed with the last step's gradients
            self.reason = "interrupted" if self.sync.stop and not self.sync.deadline else self.reason
            return self.sync.stop or self.sync.deadline
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
            self.state = model.zero_state(self.batches.local)
        x, y = self.batches.window(run.window)
        ts = self.clock()
        # dropout masks by stream and step, never by rank: K processes draw what one draws
        dropout = model.cfg.dropout > 0 or model.cfg.dropout_in > 0 or model.cfg.dropout_out > 0
        noise = shard.StreamDropout(cfg.seed, run.step, self.batches.lo) if dropout else self.rng
        loss, new_state = model.loss_and_grads(x, y, self.state, self.grads, noise)
        if self.sync is not None:
            late = bool(self.deadline) and self.clock() - self.started >= self.deadline
            loss = self.sync.reduce(loss, x.size, self.should_stop(), late)
        rows = model.touched()
        norm = grad_norm(self.grads, rows)
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
        lr = self._lr(run.step)
        self.opt.step(model.trainable, self.grads, lr, scale, rows)  # Adam uses rows with --sparse-embedding only
        self.state = new_state
        run.train_seconds += self.clock() - ts
        run.tokens += x.shape[0] * self.batches.N  # the global batch's
        run.step += 1
        run.window += 1
        self.since_eval_loss += loss
        self.since_eval_n += 1
        yield {"event": "step", "step": run.step, "loss": loss, "grad_norm": norm, "clipped": scale < 1.0,
               "tokens_per_s": self._rate(), "epoch": run.epoch + run.window / self.wpe,
               "elapsed_s": self.clock() - self.started, "lr": lr}
        if run.step % cfg.eval_every == 0:
            yield from self._calibrate()
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
        self.state = _restore(self.snapshot, self.model, self.opt, self.batches.local)
        yield {"event": "nonfinite", "step": run.step, "lr": run.lr, "restored_step": self.snapshot["step"]}
        if self.nonfinite_run >= MAX_NONFINITE or self.halvings >= MAX_HALVINGS:
            latest = self.latest_path
            yield from self._save(latest)
            what = (f"after {MAX_NONFINITE} tries in a row" if self.nonfinite_run >= MAX_NONFINITE
                    else f"{MAX_HALVINGS} times (the gradients are exploding)")
            raise CharlmError(f"the loss was not finite {what}, each time with a halved learning rate; "
                              f"start again with a lower --lr {'or with clipping (--clip 5)' if not self.cfg.clip else f'(clipping at --clip {self.cfg.clip:g} did not prevent it)'}, e.g. charlm train CORPUS "
                              f"--init-from {latest} --lr {run.lr:g} (the last good weights are in {latest})")

    def _rate(self) -> float:
        t = self.run.train_seconds - self.seconds_at_start
        return (self.run.tokens - self.tokens_at_start) / t if t > 0 else 0.0

    def _evaluate(self) -> Iterator[dict]:
        """Validation loss, history, a sample; save latest.npz, and best.npz if it improved."""
        run, s = self.run, self.s
        score = shard.evaluate if self.sync else evaluate  # more than one process: the streams split over ranks
        val = score(self.model, s.val_ids, self.cfg.seq_len, self.batches.N) if len(s.val_ids) >= 2 else float("nan")
        train_loss = self.since_eval_loss / self.since_eval_n if self.since_eval_n else float("nan")
        self.since_eval_loss, self.since_eval_n = 0.0, 0
        improved = math.isfinite(val) and (run.best_val is None or val < run.best_val)
        if improved:
            run.best_val = val
        lr, before = self._lr(max(run.step - 1, 0)), run.lr  # the last step's rate; the base before this evaluation
        # the schedule follows the evaluations due by --eval-every only (charlm.lm.schedule)
        if len(s.val_ids) >= 2 and run.step % self.cfg.eval_every == 0 and run.step != self.first_step:
            run.lr, self.patience_out = run.sched.evaluated(self.cfg, run.lr, val)
            self.reason = "patience" if self.patience_out else self.reason
        run.history.append({"step": run.step, "train_loss": train_loss if math.isfinite(train_loss) else None,
                            "val_loss": val if math.isfinite(val) else None,
                            "clipped": run.clipped, "lr": lr})
        sample = ""
        if self.sample_chars > 0 and dist.rank() == 0:
            from .sample import generate
            if self.sampler_job is not None:  # still compiling the sampler: wait, off the training clock
                self.started += self.sampler_job.wait()
                self.sampler_job = None
            sample = "".join(generate(self.model, s.vocab, self.sample_chars, temperature=self.sample_temp,
                                      seed=run.step))
        yield {"event": "eval", "step": run.step, "train_loss": train_loss, "val_loss": val,
               "val_bpc": val / LN2, "val_ppl": safe_exp(val) if math.isfinite(val) else float("nan"),
               "tokens_per_s": self._rate(), "sample": sample, "best": improved, "lr": lr,
               "lr_next": self._lr(run.step), "lr_decayed": run.lr != before,
               "evals_since_best": run.sched.evals_since_best}
        yield from self._save(self.latest_path)
        need_best = improved or not (self.best_path.exists() or math.isfinite(val))
        if dist.bcast(need_best) if self.sync else need_best:  # rank 0's files decide
            yield from self._save(self.best_path)

    def _calibrate(self) -> Iterator[dict]:
        """A cosine schedule over a --minutes budget: fix its last step from the speed so far, at a
        scheduled evaluation once a tenth of the budget has passed (charlm.lm.schedule). Every rank
        takes rank 0's estimate (scheduled evaluations come at the same steps on all of them)."""
        sched = self.run.sched
        if not sched.timed:
            return
        horizon = sched.horizon_of_time(self.run.step, self.run.step - self.first_step,
                                        self.clock() - self.started, self.deadline)
        if self.sync is not None:
            horizon = dist.bcast(horizon)
        if horizon:
            sched.horizon, sched.timed = horizon, False
            yield {"event": "note", "message": f"cosine schedule: the {self.cfg.minutes:g}-minute budget is "
                                               f"estimated at {horizon - self.first_step:,} steps; the rate anneals "
                                               f"to {self.cfg.min_lr:g} by step {horizon:,}"}

    def _lr(self, step: int) -> float:
        return scheduled_lr(self.cfg, self.run.lr, step, self.run.sched.horizon)

    def _guard_record(self) -> dict:
        return guard_record(self.snapshot, self.halvings, self.nonfinite_run, self.run.step, self.opt.t)

    def _save(self, path: Path) -> Iterator[dict]:
        model, run, s = self.model, self.run, self.s
        if not all(np.isfinite(p).all() for p in model.params.values()):
            yield {"event": "note", "message": f"not saving {path}: the weights are not finite"}
            return
        state = shard.full_state(self.state, self.batches.N) if self.sync else self.state  # every stream's
        if state is None:
            return  # not rank 0: rank 0 alone writes files
        ck = ckpt_mod.Checkpoint(
            model=s.model_cfg, vocab=s.vocab, params=model.params, train=self.cfg,
            optimizer={**self.opt.state_meta(), "lr": run.lr}, opt_arrays=self.opt.state_arrays(),
            state={"h": state.h, "c": state.c}, step=run.step, epoch=run.epoch, window=run.window,
            best_val_loss=run.best_val, rng=self.rng.bit_generator.state, history=run.history,
            corpus=s.corpus_name, data=s.data,
            counters={"tokens": run.tokens, "train_seconds": run.train_seconds, "clipped": run.clipped,
                      **run.sched.counters()},
            grad_norms=np.frombuffer(run.grad_norms, dtype=np.float32).copy(), **self._guard_record())
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
                "level": self.cfg.level,  # never a file that was not written (the weights may never have been finite)
                "checkpoint": str(self.best_path) if self.best_path.exists() else None,
                "latest": str(self.latest_path) if self.latest_path.exists() else None,
                "reason": self.reason, "clipped_fraction": run.clipped / run.step if run.step else 0.0,
                "lr": self._lr(run.step), "patience": self.cfg.patience,
                "grad_norm_median": float(np.median(norms)) if run.grad_norms else None,
                "run_dir": str(self.s.run_dir), "threads": thread_report(),
                **done_validation(run.history, run.best_val, len(self.s.vocab))}


SNAPSHOT_EVERY = 100
