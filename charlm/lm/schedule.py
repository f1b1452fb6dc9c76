"""The learning-rate schedule and early stopping of a training run (--lr-schedule, --lr-decay, --warmup,
--patience, --min-lr; their meaning for users: `charlm train --help` and the README).

The rate of update number `step` is scheduled_lr(): a base rate (--lr, divided by --lr-decay by the plateau
schedule and halved by the divergence guard of charlm.lm.train) times the warm-up and cosine factors,
which depend on the step alone. The plateau schedule and --patience follow the evaluations due by
--eval-every only (not the one closing a session, which a run that never stopped would not have made),
compared with the best of them. Their state (Schedule) goes into the checkpoint's counters and the base
rate into its optimizer record, so a resumed run takes the rates of one that never stopped; under MPI
every rank computes the same (the validation loss is reduced over the ranks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import TrainConfig
from ..errors import CharlmError

COSINE_NEEDS_STEPS = "--lr-schedule cosine anneals over the run's budget: give --steps, --epochs or --minutes"
CALIBRATE_AFTER = 0.1  # a --minutes cosine schedule fixes its last step once this share of the budget has passed


def scheduled_lr(cfg: TrainConfig, base: float, step: int, horizon: int = 0) -> float:
    """The learning rate of update number `step` (0 for the first).

    base: the rate before the step-dependent factors. --lr-schedule cosine anneals it to --min-lr by
    0.5 (1 - cos(pi step / horizon)) of the difference, horizon being the run's step budget (the rate
    stays at --min-lr past it); --warmup W multiplies the first W steps' rate by (step + 1) / W.
    Constant without warm-up, and step 0 of cosine without warm-up: base itself."""
    rate = base
    if cfg.lr_schedule == "cosine" and horizon > 0:
        floor = min(cfg.min_lr, base)  # the guard may have halved base below --min-lr: never raise it
        rate = base - (base - floor) * 0.5 * (1.0 - math.cos(math.pi * min(step / horizon, 1.0)))
    if cfg.warmup and step < cfg.warmup:
        rate *= (step + 1) / cfg.warmup
    return rate


@dataclass
class Schedule:
    """What the schedule keeps besides the base rate: scheduled evaluations in a row without improving on
    the best of them (best), and the last step of the cosine schedule (0: not cosine, or not fixed yet).

    timed: a cosine schedule over a --minutes budget whose last step is still to be estimated (see
    horizon_of_time); until then the rate is the base rate (the cosine factor at step 0)."""
    evals_since_best: int = 0
    best: float | None = None
    horizon: int = 0
    timed: bool = False

    @classmethod
    def of_counters(cls, counters: dict, best_val_loss: float | None) -> "Schedule":
        """The schedule a checkpoint's counters saved; an older checkpoint has none: its best validation
        loss is the nearest."""
        if "evals_since_best" not in counters:
            return cls(best=best_val_loss)
        return cls(evals_since_best=int(counters["evals_since_best"]), best=counters.get("schedule_best_val"),
                   horizon=int(counters.get("cosine_steps", 0)))

    def counters(self) -> dict:
        """For the checkpoint's counters (finite numbers only)."""
        c = {"evals_since_best": self.evals_since_best}
        if self.best is not None:
            c["schedule_best_val"] = self.best
        if self.horizon:
            c["cosine_steps"] = self.horizon
        return c

    def begin(self, cfg: TrainConfig, base: float, step: int, total_steps: int, has_val: bool,
              deadline: float = 0.0) -> list[str]:
        """Fix the cosine schedule's last step for a session starting at `step` with the budget ending at
        total_steps (0: no step budget): a resume keeps the run's, unless its budget goes further. With
        only a time budget (deadline seconds) and no last step yet, the schedule is `timed`: the trainer
        estimates the last step once CALIBRATE_AFTER of the budget has passed (horizon_of_time). Notes
        on what the schedule cannot do here; CharlmError if cosine has nothing to anneal over."""
        notes = []
        if not has_val and (cfg.lr_schedule == "plateau" or cfg.patience):
            notes.append("there is no validation set: --lr-schedule plateau and --patience have nothing to watch "
                         "and do nothing")
        if cfg.lr_schedule != "cosine":
            return notes
        end = max(self.horizon, total_steps)
        if not end and deadline > 0:
            self.timed = True
            notes.append(f"--lr-schedule cosine over a {deadline / 60:g}-minute budget: the rate anneals over the "
                         f"steps the budget is estimated to hold, from the speed measured over its first "
                         f"{CALIBRATE_AFTER:.0%} (fixed then, and kept by the checkpoint)")
            return notes
        if not end:
            raise CharlmError(COSINE_NEEDS_STEPS)
        if step >= end and not cfg.min_lr:
            raise CharlmError(f"the cosine schedule of this run ended at step {self.horizon:,} with a learning "
                              f"rate of 0; give --steps or --epochs to anneal again over them")
        if self.horizon and end > self.horizon:
            notes.append(f"the cosine schedule, which ended at step {self.horizon:,}, now ends at step {end:,}: the "
                         f"learning rate goes back up to {scheduled_lr(cfg, base, step, end):.3g}")
        self.horizon = end
        return notes

    def horizon_of_time(self, step: int, steps_done: int, elapsed: float, deadline: float) -> int:
        """The last step of a timed cosine schedule, estimated at `step` after steps_done steps in
        elapsed seconds of a deadline-second budget (evaluations and saves included, at the share they
        will keep): 0 while less than CALIBRATE_AFTER of the budget has passed."""
        if not self.timed or steps_done <= 0 or elapsed < CALIBRATE_AFTER * deadline:
            return 0
        return step + max(1, int((deadline - elapsed) * steps_done / elapsed))

    def evaluated(self, cfg: TrainConfig, base: float, val: float) -> tuple[float, bool]:
        """After a scheduled evaluation with validation loss val (NaN/inf: no improvement): (the base rate,
        divided by --lr-decay if the plateau schedule says so, never below --min-lr unless it already is;
        True if --patience evaluations in a row have now not improved)."""
        if math.isfinite(val) and (self.best is None or val < self.best):
            self.best, self.evals_since_best = val, 0
            return base, False
        self.evals_since_best += 1
        if cfg.lr_schedule == "plateau":
            base = max(base / cfg.lr_decay, min(cfg.min_lr, base))
        return base, bool(cfg.patience) and self.evals_since_best >= cfg.patience
