"""The learning-rate schedule and early stopping (--lr-schedule, --lr-decay, --warmup, --patience,
--min-lr), and the word-model flags of `charlm train` (--dropout-in, --dropout-out, --variational, --tie,
--softmax, --cutoffs, --div-value) on their way to the checkpoint.

The rates: scheduled_lr() against its formula. Resume: N steps in one go and N1 steps stopped by a
signal + N - N1 resumed give bit-identical weights, optimizer state and learning-rate history, for the
plateau schedule (with divisions on both sides of the stop, and an evaluation closing the first session
off the --eval-every grid), cosine with warm-up, and an old checkpoint without schedule state. Under
`mpiexec -n 2` the ranks take the same rates and stop at the same step."""
from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from charlm.config import ModelConfig, TrainConfig
from charlm.errors import CharlmError
from charlm.lm import checkpoint, run
from charlm.lm import train as train_mod
from charlm.lm.schedule import Schedule, scheduled_lr
from charlm.runtime import compute_threads
from tests.helpers import DATA, TINY, env_plain, failed, ok, rewrite_with_meta, tiny_text

WORDS = DATA / "words.txt"
GRU = ModelConfig(cell="gru", embed=4, hidden=8, layers=1)


def refused(*needles, corpus=TINY, **options) -> str:
    with pytest.raises(CharlmError) as e:
        run.plan(corpus, **options)
    for needle in needles:
        assert needle in str(e.value), str(e.value)
    return str(e.value)


# ------------------------------------------------------------------ the rates
def test_constant_without_warmup_is_the_base_rate_itself():
    cfg = TrainConfig(lr=0.003)
    assert [scheduled_lr(cfg, 0.003, s, 100) for s in (0, 7, 10**6)] == [0.003] * 3
    assert scheduled_lr(cfg, 0.0015, 3) == 0.0015  # the guard's halving is the base's


def test_warmup_rises_linearly_from_lr_over_steps_to_lr():
    cfg = TrainConfig(lr=0.01, warmup=4)
    got = [scheduled_lr(cfg, 0.01, s) for s in range(6)]
    assert got == pytest.approx([0.0025, 0.005, 0.0075, 0.01, 0.01, 0.01], rel=1e-12)
    assert TrainConfig(lr=0.01, lr_schedule="plateau", warmup=4).lr_schedule == "plateau"
    assert scheduled_lr(TrainConfig(lr=0.01, lr_schedule="plateau", warmup=4), 0.005, 1) == pytest.approx(0.0025)


def test_cosine_anneals_to_min_lr_over_the_horizon_and_composes_with_warmup():
    cfg = TrainConfig(lr=0.01, lr_schedule="cosine", min_lr=0.001)
    assert scheduled_lr(cfg, 0.01, 0, 100) == 0.01
    assert scheduled_lr(cfg, 0.01, 50, 100) == pytest.approx(0.0055, rel=1e-12)
    assert scheduled_lr(cfg, 0.01, 25, 100) == pytest.approx(0.001 + 0.009 * 0.5 * (1 + math.cos(math.pi / 4)))
    assert scheduled_lr(cfg, 0.01, 100, 100) == pytest.approx(0.001) == scheduled_lr(cfg, 0.01, 500, 100)
    rates = [scheduled_lr(cfg, 0.01, s, 100) for s in range(101)]
    assert all(a > b for a, b in zip(rates, rates[1:]))
    # the guard halved the base below --min-lr: the floor never raises it
    assert scheduled_lr(cfg, 0.0005, 50, 100) == 0.0005
    warm = TrainConfig(lr=0.01, lr_schedule="cosine", warmup=10)
    assert scheduled_lr(warm, 0.01, 4, 100) == pytest.approx(0.5 * 0.01 * 0.5 * (1 + math.cos(math.pi * 0.04)))


@pytest.mark.parametrize("options, needle", [
    (dict(lr_schedule="linear"), "--lr-schedule must be one of constant, plateau, cosine"),
    (dict(lr_decay=1.0), "--lr-decay must be over 1"),
    (dict(lr_decay=float("nan")), "--lr-decay must be a finite number"),
    (dict(warmup=-1), "--warmup must be a whole number"),
    (dict(patience=2.5), "--patience must be a whole number"),
    (dict(min_lr=-1e-4), "--min-lr must be a finite number, 0 or more"),
    (dict(lr=1e-3, min_lr=1e-3), "--min-lr must be below --lr"),
])
def test_bad_schedule_options_are_refused(options, needle):
    refused(needle, steps=5, out="x", **options)


def test_cosine_needs_a_budget_and_a_minutes_budget_is_enough(tmp_path):
    assert run.plan(TINY, lr_schedule="cosine", minutes=1.0, out="x").train.minutes == 1.0
    assert run.plan(TINY, lr_schedule="cosine", out="x").train.minutes == run.DEFAULT_MINUTES  # the default budget
    assert run.plan(TINY, lr_schedule="cosine", epochs=2.0, minutes=1.0, out="x").train.epochs == 2.0
    with compute_threads(1), pytest.raises(CharlmError, match="give --steps, --epochs or --minutes"):
        list(train_mod.train(tiny_text(), GRU, TrainConfig(seq_len=8, batch=2, minutes=0.0, lr_schedule="cosine"),
                             tmp_path / "run", sample_chars=0, should_stop=lambda: True))
    assert not (tmp_path / "run" / "latest.npz").exists()


class _Clock:
    """A clock that advances `tick` seconds each time it is read: the trainer's time, made exact."""

    def __init__(self, tick: float):
        self.t, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.t += self.tick
        return self.t


def test_timed_schedule_estimates_its_horizon_after_a_tenth_of_the_budget():
    s = Schedule(timed=True)
    assert s.horizon_of_time(step=40, steps_done=40, elapsed=5.9, deadline=60.0) == 0  # under 10 %
    assert s.horizon_of_time(step=40, steps_done=40, elapsed=6.0, deadline=60.0) == 40 + 360  # 54 s at 40 / 6 s
    assert s.horizon_of_time(step=140, steps_done=40, elapsed=10.0, deadline=60.0) == 140 + 200  # a resumed session
    assert Schedule().horizon_of_time(step=40, steps_done=40, elapsed=30.0, deadline=60.0) == 0  # not timed


def test_cosine_over_minutes_fixes_its_horizon_from_the_speed_and_anneals_to_zero(tmp_path):
    """A fake clock makes the speed exact: the horizon lands where the deadline would, the rate is the
    base rate until then and anneals to 0 by the end; the checkpoint keeps the horizon for resume."""
    cfg = TrainConfig(seq_len=8, batch=2, minutes=0.5, eval_every=5, lr=0.01, lr_schedule="cosine")
    with compute_threads(1):
        events = list(train_mod.train(tiny_text(), GRU, cfg, tmp_path / "run", sample_chars=0, clock=_Clock(0.05)))
    notes = [e["message"] for e in events if e["event"] == "note"]
    assert any("anneals over the steps the budget is estimated to hold" in n for n in notes), notes
    fixed = [n for n in notes if n.startswith("cosine schedule: the 0.5-minute budget is estimated at")]
    assert len(fixed) == 1, notes
    steps = [e for e in events if e["event"] == "step"]
    ck = checkpoint.load(tmp_path / "run" / "latest.npz")
    horizon = ck.counters["cosine_steps"]
    first_eval_after = next(e["step"] for e in events if e["event"] == "eval" and e["step"] >= horizon * 0.1 - 5)
    assert all(e["lr"] == 0.01 for e in steps[:first_eval_after])  # before the estimate: the base rate
    assert steps[-1]["lr"] < 0.001
    assert abs(steps[-1]["step"] - horizon) <= 0.1 * horizon  # the budget ran out about when the rate reached 0
    assert all(a["lr"] >= b["lr"] for a, b in zip(steps, steps[1:]))


# ------------------------------------------------------------------ resume is exact
def _train(run_dir, cfg: TrainConfig, stop_after: int | None = None) -> list[dict]:
    """Train GRU on tiny.txt; stop_after: a should_stop that stops after that many steps (as Ctrl-C)."""
    calls = [0]

    def should_stop():
        calls[0] += 1
        return stop_after is not None and calls[0] > stop_after
    with compute_threads(1):
        return list(train_mod.train(tiny_text(), GRU, cfg, run_dir, sample_chars=0, should_stop=should_stop))


def _resume(run_dir, steps: int) -> list[dict]:
    ck = checkpoint.load(Path(run_dir) / "latest.npz")
    with compute_threads(1):
        return list(train_mod.train(None, None, TrainConfig(seq_len=8, batch=2, steps=steps), None, resume=ck,
                                    sample_chars=0))


def _same_run(a_dir, b_dir, eval_every: int) -> list[float]:
    """The two runs' last checkpoints are the same bit for bit (weights, optimizer, schedule state); the
    learning rates of their evaluations on the --eval-every grid are the same. Those rates."""
    a, b = (checkpoint.load(Path(d) / "latest.npz") for d in (a_dir, b_dir))
    assert a.step == b.step and a.optimizer == b.optimizer
    for name in a.params:
        assert a.params[name].tobytes() == b.params[name].tobytes(), name
    for name in a.opt_arrays:
        assert a.opt_arrays[name].tobytes() == b.opt_arrays[name].tobytes(), name
    schedule = ("evals_since_best", "schedule_best_val", "cosine_steps")
    assert {k: a.counters.get(k) for k in schedule} == {k: b.counters.get(k) for k in schedule}
    on_grid = [[(h["step"], h["lr"]) for h in ck.history if h["step"] % eval_every == 0] for ck in (a, b)]
    assert on_grid[0] == on_grid[1] and len(on_grid[0]) >= 3
    return [lr for _, lr in on_grid[0]]


@pytest.mark.parametrize("eval_every, split", [(1, 5), (2, 9)], ids=["every-step", "off-grid-stop"])
def test_plateau_resumes_exactly(tmp_path, eval_every, split):
    """lr 0.2 on the tiny text: the validation loss rises and falls, so the rate is divided before and
    after the stop. With --eval-every 2 the first session ends with an evaluation at step 9 (no better
    than the best: it would divide the rate if it counted), which must
    not count for the schedule (the run that never stopped made none there)."""
    cfg = TrainConfig(seq_len=8, batch=2, steps=14, eval_every=eval_every, lr=0.2, lr_schedule="plateau",
                      lr_decay=2.0, min_lr=0.004)
    one = _train(tmp_path / "one", cfg)
    first = _train(tmp_path / "split", cfg, stop_after=split)
    assert first[-1]["reason"] == "interrupted" and first[-1]["steps"] == split
    ck = checkpoint.load(tmp_path / "split" / "latest.npz")
    assert ck.optimizer["lr"] < 0.2 and "evals_since_best" in ck.counters  # divided before the stop, and saved
    _resume(tmp_path / "split", 14 - split)
    rates = _same_run(tmp_path / "one", tmp_path / "split", eval_every)
    decays = [e["step"] for e in one if e["event"] == "eval" and e["lr_decayed"]]
    assert any(s <= split for s in decays) and any(s > split for s in decays), decays
    assert min(rates) >= 0.004 and rates[0] == 0.2
    for e in one:  # every division is by --lr-decay, down to --min-lr
        if e["event"] == "eval" and e["lr_decayed"]:
            assert e["lr_next"] == pytest.approx(max(e["lr"] / 2.0, 0.004)) and e["evals_since_best"] >= 1


def test_cosine_with_warmup_resumes_exactly(tmp_path):
    cfg = TrainConfig(seq_len=8, batch=2, steps=12, eval_every=1, lr=0.02, lr_schedule="cosine", warmup=3,
                      min_lr=0.001)
    one = _train(tmp_path / "one", cfg)
    _train(tmp_path / "split", cfg, stop_after=5)
    split = checkpoint.load(tmp_path / "split" / "latest.npz")
    assert split.counters["cosine_steps"] == 12  # the first session's budget
    _resume(tmp_path / "split", 7)
    rates = _same_run(tmp_path / "one", tmp_path / "split", 1)
    assert rates == [scheduled_lr(cfg, 0.02, s, 12) for s in range(12)]  # the rate of the step before each evaluation
    assert rates[0] == pytest.approx(0.02 / 3) and max(rates) == rates[2] and rates[-1] > 0.001
    steps = [e["lr"] for e in one if e["event"] == "step"]
    assert steps == rates


def test_warmup_resumes_exactly_from_a_budget_split(tmp_path):
    cfg = TrainConfig(seq_len=8, batch=2, steps=10, eval_every=2, lr=0.01, warmup=6)
    _train(tmp_path / "one", cfg)
    _train(tmp_path / "split", TrainConfig(**{**cfg.to_dict(), "steps": 4}))
    _resume(tmp_path / "split", 6)
    rates = _same_run(tmp_path / "one", tmp_path / "split", 2)
    assert rates == pytest.approx([0.01 * s / 6 for s in (2, 4)] + [0.01] * 3)


def test_extending_a_finished_cosine_run_says_so_and_a_minutes_only_resume_is_refused(tmp_path):
    _train(tmp_path / "run", TrainConfig(seq_len=8, batch=2, steps=4, eval_every=2, lr=0.01, lr_schedule="cosine"))
    events = _resume(tmp_path / "run", 4)
    notes = [e["message"] for e in events if e["event"] == "note"]
    assert any("which ended at step 4, now ends at step 8" in n for n in notes), notes
    ck = checkpoint.load(tmp_path / "run" / "latest.npz")
    assert ck.counters["cosine_steps"] == 8 and ck.step == 8
    with compute_threads(1), pytest.raises(CharlmError, match="ended at step 8 with a learning rate of 0"):
        list(train_mod.train(None, None, TrainConfig(seq_len=8, batch=2, minutes=0.01), None, resume=ck,
                             sample_chars=0))


def test_an_old_checkpoint_without_schedule_state_resumes_as_before(tmp_path):
    """A checkpoint from before the schedule (no schedule counters, no schedule fields in its training
    configuration) loads, resumes with a constant rate, and gives what the new format gives."""
    cfg = TrainConfig(seq_len=8, batch=2, steps=4, eval_every=2, lr=0.01)
    _train(tmp_path / "new", cfg)
    shutil.copytree(tmp_path / "new", tmp_path / "old")

    def strip(meta, arrays):
        for key in ("evals_since_best", "schedule_best_val", "cosine_steps"):
            meta["counters"].pop(key, None)
        for key in ("lr_schedule", "lr_decay", "warmup", "patience", "min_lr"):
            meta["train"].pop(key)
    rewrite_with_meta(tmp_path / "new" / "latest.npz", tmp_path / "old" / "latest.npz", strip)
    old = checkpoint.load(tmp_path / "old" / "latest.npz")
    assert "evals_since_best" not in old.counters and old.train.lr_schedule == "constant"
    for d in ("new", "old"):
        _resume(tmp_path / d, 3)
    a, b = (checkpoint.load(tmp_path / d / "latest.npz") for d in ("new", "old"))
    assert all(a.params[n].tobytes() == b.params[n].tobytes() for n in a.params)
    assert [h["lr"] for h in b.history] == [0.01] * 4


# ------------------------------------------------------------------ early stopping
def test_patience_stops_after_n_evaluations_without_improvement(tmp_path):
    cfg = TrainConfig(seq_len=8, batch=2, steps=60, eval_every=1, lr=0.2, patience=2)
    events = _train(tmp_path / "run", cfg)
    done = events[-1]
    assert done["reason"] == "patience" and done["patience"] == 2 and done["steps"] < 60
    evals = [e for e in events if e["event"] == "eval"]
    assert evals[-1]["step"] == done["steps"] and evals[-1]["evals_since_best"] == 2
    assert not evals[-1]["best"] and not evals[-2]["best"]
    assert all(e["evals_since_best"] < 2 for e in evals[:-1])  # it did not stop at an earlier chance
    assert all(e["lr"] == 0.2 for e in evals)  # constant schedule: patience alone changes no rate
    assert checkpoint.load(tmp_path / "run" / "latest.npz").step == done["steps"]


def test_patience_ignores_the_evaluation_closing_a_session(tmp_path):
    """Off the --eval-every grid, the last evaluation of a session neither counts nor stops."""
    cfg = TrainConfig(seq_len=8, batch=2, steps=3, eval_every=2, lr=0.2, patience=1)
    events = _train(tmp_path / "run", cfg)
    evals = [e for e in events if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [2, 3] and evals[-1]["evals_since_best"] == 0
    assert events[-1]["reason"] == "budget"


def test_the_command_line_reports_the_rate_and_why_it_stopped(run_cli):
    args = ["train", TINY, "--hidden", "8", "--layers", "1", "--embed", "4", "--seq-len", "8", "--batch", "2",
            "--steps", "60", "--eval-every", "1", "--lr", "0.2", "--patience", "2", "--lr-schedule", "plateau",
            "--lr-decay", "2", "--sample-length", "0", "--threads", "1"]
    res = ok(run_cli(*args, "--out", "a", "--json"))
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    evals = [e for e in lines if e["event"] == "eval"]
    assert evals[0]["lr"] == 0.2 and min(e["lr"] for e in evals) < 0.2
    assert lines[-1]["event"] == "done" and lines[-1]["reason"] == "patience"
    assert "(--lr-schedule plateau)" in res.stderr
    table = ok(run_cli(*args, "--out", "b")).stdout
    assert "stopped early" in table and "--patience 2" in table and "learning rate" in table
    ck = checkpoint.load(Path("b") / "latest.npz")
    assert (ck.train.lr_schedule, ck.train.lr_decay, ck.train.patience) == ("plateau", 2.0, 2)


def test_resume_refuses_another_schedule_and_init_from_takes_one(tmp_path):
    _train(tmp_path / "run", TrainConfig(seq_len=8, batch=2, steps=2, eval_every=2))
    msg = refused("--lr-schedule cosine contradicts the checkpoint (--lr-schedule constant)", corpus=None,
                  resume=tmp_path / "run", lr_schedule="cosine", steps=2)
    assert msg.endswith("drop --lr-schedule")
    refused("--patience 3 contradicts the checkpoint (--patience 0)", corpus=None, resume=tmp_path / "run", patience=3)
    p = run.plan(TINY, init_from=tmp_path / "run", lr_schedule="cosine", warmup=5, steps=10, out="x")
    assert (p.train.lr_schedule, p.train.warmup) == ("cosine", 5)


# ------------------------------------------------------------------ the word-model flags
def test_model_flags_reach_the_checkpoint(tmp_path):
    small = dict(layers=2, seq_len=8, batch=2, steps=2, eval_every=2, sample_length=0)
    with compute_threads(1):
        list(run.train(TINY, out=tmp_path / "char", hidden=8, embed=8, dropout_in=0.1, dropout_out=0.2,
                       variational=True, tie=True, **small))
        list(run.train(WORDS, out=tmp_path / "word", level="word", hidden=8, embed=4, softmax="adaptive",
                       cutoffs="20,40", div_value=2.0, **small))
        list(run.train(WORDS, out=tmp_path / "auto", level="word", hidden=8, embed=4, softmax="adaptive", **small))
    m = checkpoint.load(tmp_path / "char" / "latest.npz").model
    assert (m.dropout_in, m.dropout_out, m.variational, m.tie, m.softmax) == (0.1, 0.2, True, True, "full")
    m = checkpoint.load(tmp_path / "word" / "latest.npz").model
    assert (m.softmax, m.cutoffs, m.div_value, m.tie, m.dropout_in) == ("adaptive", (20, 40), 2.0, False, 0.0)
    m = checkpoint.load(tmp_path / "auto" / "latest.npz").model  # no --cutoffs: chosen from the vocabulary
    assert m.softmax == "adaptive" and m.cutoffs == ModelConfig(softmax="adaptive").with_vocab(m.vocab_size).cutoffs
    assert m.cutoffs and m.cutoffs[-1] < m.vocab_size
    # given with --resume: agreeing is fine, disagreeing is refused by name
    p = run.plan(None, resume=tmp_path / "word", softmax="adaptive", cutoffs=[20, 40], div_value=2.0, steps=1)
    assert p.model.cutoffs == (20, 40)
    refused("--cutoffs 10,40 contradicts the checkpoint (--cutoffs 20,40)", corpus=None,
            resume=tmp_path / "word", cutoffs="10,40")
    msg = refused("--no-tie contradicts the checkpoint (--tie)", corpus=None, resume=tmp_path / "char", tie=False)
    assert msg.endswith("drop --no-tie")
    refused("--dropout-in 0.3 contradicts the checkpoint", "--init-from", init_from=tmp_path / "char", dropout_in=0.3)


@pytest.mark.parametrize("options, needles", [
    (dict(softmax="adaptive"), ("--softmax adaptive is for large word vocabularies", "drop --softmax adaptive")),
    (dict(level="word", cutoffs="100,50"), ("--cutoffs must be positive and ascending",)),
    (dict(level="word", cutoffs="2000"), ("--cutoffs apply only to --softmax adaptive",)),
    (dict(level="word", div_value=2.0, cutoffs="5"), ("--cutoffs, --div-value apply only to --softmax adaptive",)),
    (dict(level="word", softmax="adaptive", cutoffs="a,b"), ("--cutoffs must be whole numbers separated by commas",)),
    (dict(softmax="sampled"), ("--softmax must be one of full, adaptive",)),
    (dict(tie=True, embed=4, hidden=8), ("--tie", "needs --embed equal to --hidden",)),
    (dict(dropout_in=1.0), ("--dropout-in must be in [0, 1)",)),
    (dict(cell="esn", tie=True), ("--tie do not apply to --cell esn",)),
    (dict(cell="esn", dropout_out=0.1, variational=True), ("--dropout-out, --variational do not apply to --cell esn",)),
])
def test_bad_model_flags_are_refused(options, needles):
    refused(*needles, steps=2, out="x", **options)


def test_model_flags_on_the_command_line(run_cli):
    base = ["train", TINY, "--layers", "1", "--seq-len", "8", "--batch", "2", "--sample-length", "0", "--json",
            "--threads", "1"]
    args = [*base, "--steps", "1"]
    ok(run_cli(*args, "--hidden", "8", "--embed", "8", "--tie", "--dropout-in", "0.25", "--variational", "--out", "r"))
    m = checkpoint.load(Path("r") / "latest.npz").model
    assert (m.tie, m.dropout_in, m.variational) == (True, 0.25, True)
    failed(run_cli(*args, "--softmax", "adaptive", "--out", "s"), "--softmax adaptive is for large word vocabularies")
    failed(run_cli(*args, "--tie", "--out", "t"), "needs --embed equal to --hidden")
    assert not any(Path(d).exists() for d in "st")


def test_help_states_each_default(run_cli):
    from tests.helpers import option_blocks
    blocks = option_blocks(ok(run_cli("train", "--help")).stdout)
    for flag, default in [("--lr-schedule", "plateau"), ("--lr-decay", "4.0"), ("--warmup", "0"), ("--patience", "0"),
                          ("--min-lr", "0.0"), ("--dropout-in", "0.0"), ("--dropout-out", "0.2"), ("--dropout", "0.2"),
                          ("--variational", "no-variational"), ("--tie", "no-tie"), ("--softmax", "full"),
                          ("--div-value", "4.0")]:
        assert f"[default: {default}]" in blocks[flag], (flag, blocks.get(flag))
    assert "2000,10000,50000 below the vocabulary size" in blocks["--cutoffs"]
    assert "with a time budget alone, over the steps it is estimated to hold" in blocks["--lr-schedule"]


# ------------------------------------------------------------------ more than one process
def _mpi_why_not() -> str | None:
    if not shutil.which("mpiexec"):
        return "mpiexec is not on PATH"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed"
    return None


MPI_TRAIN = textwrap.dedent("""
    import json, sys, zlib
    import charlm
    from charlm import dist
    from charlm.lm import train as T
    from charlm.runtime import compute_threads
    crc = {}
    done = T._Trainer._done
    def spy(self):  # every rank's weights and base rate
        crc["w"] = zlib.crc32(b"".join(self.model.params[k].tobytes() for k in sorted(self.model.params)))
        crc["lr"] = self.run.lr
        return done(self)
    T._Trainer._done = spy
    with compute_threads(1):
        events = list(charlm.train(sys.argv[1], out=sys.argv[2], **json.loads(sys.argv[3])))
    rates = [e["lr"] for e in events if e["event"] == "eval"]
    out = dist.allgather([crc["w"], crc["lr"], rates, events[-1]["steps"], events[-1]["reason"]])
    if dist.rank() == 0:
        print(json.dumps(out))
""")


@pytest.mark.skipif(_mpi_why_not() is not None, reason=_mpi_why_not() or "")
def test_two_ranks_take_the_same_rates_and_stop_together(tmp_path):
    """Plateau, warm-up and patience under mpiexec -n 2: both ranks end with the same weights, base rate,
    rates and step (the schedule follows the reduced validation loss), as one process does."""
    options = dict(hidden=8, embed=4, layers=1, seq_len=8, batch=4, steps=40, eval_every=1, lr=0.2, warmup=2,
                   lr_schedule="plateau", lr_decay=2.0, patience=3, sample_length=0, seed=1)
    env = {k: v for k, v in os.environ.items() if k != "CHARLM_DEBUG"}
    env.update({k: v for k, v in env_plain().items() if v is not None})
    root = Path(__file__).resolve().parents[1]
    env["PYTHONPATH"] = os.pathsep.join([str(root), *filter(None, [os.environ.get("PYTHONPATH")])])
    cmd = [shutil.which("mpiexec"), "-n", "2", sys.executable, "-c", MPI_TRAIN, str(TINY), str(tmp_path / "two"),
           json.dumps(options)]
    try:
        res = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail("mpiexec -n 2 did not finish in 300 s (the ranks disagree on when to stop?)")
    if res.returncode != 0 and "not enough slots" in (res.stderr + res.stdout).lower():
        pytest.skip("mpiexec cannot start two ranks here")
    assert res.returncode == 0, res.stderr[-3000:]
    (w0, lr0, rates0, steps0, why0), (w1, lr1, rates1, steps1, why1) = json.loads(res.stdout.strip().splitlines()[-1])
    assert (w0, lr0, rates0, steps0, why0) == (w1, lr1, rates1, steps1, why1)
    assert lr0 < 0.2 and rates0[0] == pytest.approx(0.1) and len(set(rates0)) >= 3  # step 1 of 2 of warm-up
    import charlm
    with compute_threads(1):
        events = list(charlm.train(TINY, out=tmp_path / "one", **options))
    one = [e["lr"] for e in events if e["event"] == "eval"]
    assert (events[-1]["steps"], events[-1]["reason"]) == (steps0, why0)
    assert one == rates0
