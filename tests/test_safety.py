"""Never lose work: --resume continues bit for bit, --init-from fine-tunes keeping the vocabulary,
Ctrl-C / SIGTERM stop cleanly, kill -9 at any moment leaves a loadable checkpoint, a failing write
keeps the previous checkpoint, an exploding loss is caught, and training is deterministic.

The subprocess tests run `python -m charlm` for real (signals cannot be tested in-process); every
other test goes through train() or the CliRunner, in the deterministic single-thread mode
(--threads 1 / model.compute_threads(1))."""
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import charlm.lm.train as train_mod
from charlm.lm import checkpoint
from charlm.config import ModelConfig, TrainConfig
from charlm.errors import CharlmError
from charlm.runtime import compute_threads
from tests.helpers import DATA, TINY, env_plain, failed, ok, tiny_text

ROOT = Path(__file__).resolve().parents[1]
WORDS = DATA / "words.txt"

# a tiny model; batch 4 x seq-len 8 over tests/data/tiny.txt gives 80 windows per epoch
SMALL = ["--hidden", "8", "--embed", "4", "--seq-len", "8", "--batch", "4", "--threads", "1", "--json"]


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def arrays_of(path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as z:
        return {n: z[n] for n in z.files}


def all_finite(ck: checkpoint.Checkpoint) -> bool:
    return all(np.isfinite(a).all() for d in (ck.params, ck.opt_arrays, ck.state) for a in d.values())


def assert_same_bits(a: dict, b: dict, what: str):
    assert sorted(a) == sorted(b), what
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, (what, k)
        assert a[k].tobytes() == b[k].tobytes(), f"{what}: {k} differs"


def assert_same_training_state(x: checkpoint.Checkpoint, y: checkpoint.Checkpoint):
    """Everything a continued run depends on: weights, optimizer moments and counters,
    learning rate, RNG, data position and the carried hidden state."""
    assert (x.step, x.epoch, x.window) == (y.step, y.epoch, y.window)
    assert_same_bits(x.params, y.params, "weights")
    assert_same_bits(x.opt_arrays, y.opt_arrays, "optimizer moments")
    assert_same_bits(x.state, y.state, "carried state")
    assert x.optimizer == y.optimizer  # name, t, betas, eps and the current lr
    assert x.rng == y.rng
    assert x.counters["tokens"] == y.counters["tokens"] and x.counters["clipped"] == y.counters["clipped"]
    assert x.grad_norms is not None and len(x.grad_norms) == x.step  # one pre-clip norm per step, across resumes
    assert x.grad_norms.tobytes() == y.grad_norms.tobytes()
    assert (x.model, x.vocab, x.data) == (y.model, y.vocab, y.data)
    budget = ("steps", "epochs", "minutes")  # the budget of the last session, not a setting of the run
    assert ({k: v for k, v in x.train.to_dict().items() if k not in budget}
            == {k: v for k, v in y.train.to_dict().items() if k not in budget})


# ------------------------------------------------------------------ --resume
@pytest.mark.parametrize("cell, layers, dropout, optimizer", [
    ("lstm", 1, "0", "adam"), ("gru", 2, "0.3", "adam"), ("rnn", 2, "0.5", "sgd")])
def test_resume_continues_bit_for_bit(run_cli, tmp_path, cell, layers, dropout, optimizer):
    """50 steps then --resume for 60 equals 110 steps in one go, with evaluations (every 30 steps)
    inside both parts, an epoch boundary (80 windows) inside the second, and dropout drawing on the
    saved RNG."""
    args = [TINY, *SMALL, "--cell", cell, "--layers", layers, "--dropout", dropout, "--optimizer", optimizer,
            "--eval-every", "30", "--clip", "1"]
    ok(run_cli("train", *args, "--steps", "110", "--out", "one"))
    ok(run_cli("train", *args, "--steps", "50", "--out", "split"))
    assert checkpoint.load(tmp_path / "split" / "latest.npz").step == 50
    res = ok(run_cli("train", "--resume", "split", "--steps", "60", "--threads", "1", "--json"))
    assert json_lines(res.stdout)[-1]["steps"] == 110

    one = checkpoint.load(tmp_path / "one" / "latest.npz")
    split = checkpoint.load(tmp_path / "split" / "latest.npz")
    assert one.step == 110 and one.epoch == 1
    assert_same_training_state(one, split)
    # the validation history goes on: every evaluation of the single run is in the resumed one, equal
    assert [h["step"] for h in one.history] == [30, 60, 90, 110]
    assert [h["step"] for h in split.history] == [30, 50, 60, 90, 110]  # 50: the evaluation at the stop
    got = {h["step"]: h["val_loss"] for h in split.history}
    for h in one.history:
        assert got[h["step"]] == h["val_loss"], h["step"]
    assert split.history[0] == one.history[0]


def test_resume_from_a_checkpoint_file_and_twice_in_a_row(run_cli, tmp_path):
    args = [TINY, *SMALL, "--cell", "lstm", "--layers", "1", "--eval-every", "7"]
    ok(run_cli("train", *args, "--steps", "20", "--out", "one"))
    ok(run_cli("train", *args, "--steps", "5", "--out", "split"))
    ok(run_cli("train", "--resume", "split/latest.npz", "--steps", "6", "--threads", "1", "--json"))
    ok(run_cli("train", "--resume", "split", "--steps", "9", "--threads", "1", "--json"))
    assert_same_training_state(checkpoint.load(tmp_path / "one" / "latest.npz"),
                               checkpoint.load(tmp_path / "split" / "latest.npz"))


def test_resume_at_the_end_of_an_epoch(run_cli, tmp_path):
    """Stopped after the last window of an epoch (80 windows): the resumed run starts the next
    epoch from the zero state, as the single run does."""
    args = [TINY, *SMALL, "--cell", "gru", "--layers", "1", "--eval-every", "1000"]
    ok(run_cli("train", *args, "--steps", "85", "--out", "one"))
    ok(run_cli("train", *args, "--steps", "80", "--out", "split"))
    ck = checkpoint.load(tmp_path / "split" / "latest.npz")
    assert (ck.epoch, ck.window) == (0, 80)
    ok(run_cli("train", "--resume", "split", "--steps", "5", "--threads", "1", "--json"))
    assert_same_training_state(checkpoint.load(tmp_path / "one" / "latest.npz"),
                               checkpoint.load(tmp_path / "split" / "latest.npz"))


def test_resuming_from_an_older_best_does_not_destroy_latest(run_cli, tmp_path):
    ok(run_cli("train", TINY, *SMALL, "--layers", "1", "--steps", "4", "--eval-every", "2", "--out", "run"))
    run = tmp_path / "run"
    # make step 2 the best, so best.npz is older than latest.npz (step 4)
    ok(run_cli("train", TINY, *SMALL, "--layers", "1", "--steps", "2", "--eval-every", "2", "--out", "older"))
    (run / "best.npz").write_bytes((tmp_path / "older" / "latest.npz").read_bytes())
    res = run_cli("train", "--resume", "run/best.npz", "--steps", "1", "--threads", "1", "--json")
    assert res.exit_code != 0 or checkpoint.load(run / "latest.npz").step >= 4


def test_resume_in_process_equals_one_run(tmp_path):
    """The library path (train(resume=...)) without the CLI, on one thread as --threads 1 runs."""
    text = tiny_text()
    mcfg = ModelConfig(cell="gru", embed=4, hidden=8, layers=2, dropout=0.25)

    def cfg(steps):
        return TrainConfig(seq_len=8, batch=4, steps=steps, eval_every=9, seed=3)

    with compute_threads(1):
        list(train_mod.train(text, mcfg, cfg(25), tmp_path / "one", sample_chars=0))
        list(train_mod.train(text, mcfg, cfg(10), tmp_path / "split", sample_chars=0))
        ck = checkpoint.load(tmp_path / "split" / "latest.npz")
        events = list(train_mod.train(None, None, cfg(15), None, resume=ck, sample_chars=0))
    start = next(e for e in events if e["event"] == "start")
    assert start["resumed"] and start["first_step"] == 10 and start["total_steps"] == 25
    assert [e["step"] for e in events if e["event"] == "step"] == list(range(11, 26))
    assert_same_training_state(checkpoint.load(tmp_path / "one" / "latest.npz"),
                               checkpoint.load(tmp_path / "split" / "latest.npz"))


def test_training_records_every_pre_clip_gradient_norm(tmp_path):
    """The checkpoint keeps the norm of every step before clipping; the steps above --clip are
    exactly the ones counted as clipped, and the step events report the same norms."""
    mcfg = ModelConfig(cell="rnn", embed=4, hidden=8, layers=1)
    cfg = TrainConfig(seq_len=8, batch=4, steps=30, eval_every=1000, seed=1, clip=0.5)
    with compute_threads(1):
        events = list(train_mod.train(tiny_text(), mcfg, cfg, tmp_path / "run", sample_chars=0))
    ck = checkpoint.load(tmp_path / "run" / "latest.npz")
    norms = [e["grad_norm"] for e in events if e["event"] == "step"]
    assert ck.grad_norms.dtype == np.float32 and len(ck.grad_norms) == 30
    np.testing.assert_allclose(ck.grad_norms, norms, rtol=1e-6)
    assert ck.counters["clipped"] == sum(n > 0.5 for n in norms)
    assert 0 < ck.counters["clipped"] < 30  # the threshold sits inside the range seen, so both kinds occur
    done = events[-1]
    assert done["clipped_fraction"] == ck.counters["clipped"] / 30
    assert done["grad_norm_median"] == pytest.approx(float(np.median(ck.grad_norms)))


@pytest.mark.parametrize("flag, value, needle", [
    ("--cell", "gru", "--cell gru contradicts the checkpoint (--cell lstm)"),
    ("--hidden", "16", "--hidden 16 contradicts the checkpoint (--hidden 8)"),
    ("--layers", "2", "--layers"), ("--seq-len", "16", "--seq-len"), ("--batch", "2", "--batch"),
    ("--dropout", "0.5", "--dropout"), ("--level", "word", "--level"), ("--seed", "5", "--seed"),
    ("--optimizer", "sgd", "--optimizer"), ("--lr", "0.1", "--lr 0.1 contradicts the checkpoint"),
    ("--clip", "1", "--clip"), ("--eval-every", "3", "--eval-every")])
def test_resume_refuses_a_contradicting_flag(run_cli, tmp_path, flag, value, needle):
    ok(run_cli("train", TINY, *SMALL, "--layers", "1", "--steps", "2", "--out", "run"))
    before = (tmp_path / "run" / "latest.npz").read_bytes()
    err = failed(run_cli("train", "--resume", "run", "--steps", "2", flag, value), needle, "drop " + flag)
    assert "--resume" in err
    assert (tmp_path / "run" / "latest.npz").read_bytes() == before


def test_resume_accepts_flags_that_agree_with_the_checkpoint(run_cli, tmp_path):
    ok(run_cli("train", TINY, *SMALL, "--layers", "1", "--cell", "gru", "--steps", "2", "--out", "run"))
    ok(run_cli("train", "--resume", "run", "--steps", "1", "--cell", "gru", "--hidden", "8", "--json"))
    assert checkpoint.load(tmp_path / "run" / "latest.npz").step == 3


@pytest.mark.parametrize("extra, needle", [
    (["CORPUS"], "drop the CORPUS"), (["--val", "CORPUS"], "drop the CORPUS"),
    (["--init-from", "run"], "not both"), (["--out", "elsewhere"], "--out elsewhere contradicts --resume")])
def test_resume_refuses_arguments_it_would_ignore(run_cli, tmp_path, extra, needle):
    ok(run_cli("train", TINY, *SMALL, "--layers", "1", "--steps", "2", "--out", "run"))
    extra = [str(TINY) if e == "CORPUS" else e for e in extra]
    failed(run_cli("train", "--resume", "run", "--steps", "2", *extra), needle)
    assert not (tmp_path / "elsewhere").exists()
    assert checkpoint.load(tmp_path / "run" / "latest.npz").step == 2


def test_resume_of_nothing(run_cli, tmp_path):
    failed(run_cli("train", "--resume", "nowhere"), "nothing to resume", "nowhere")
    (tmp_path / "empty").mkdir()
    failed(run_cli("train", "--resume", "empty"), "no latest.npz", "empty")


@pytest.mark.parametrize("damage", ["missing", "changed"])
def test_resume_checks_the_runs_token_file(run_cli, tmp_path, damage):
    ok(run_cli("train", TINY, *SMALL, "--layers", "1", "--steps", "2", "--out", "run"))
    tokens = tmp_path / "run" / "tokens.bin"
    if damage == "missing":
        tokens.unlink()
        failed(run_cli("train", "--resume", "run", "--steps", "1"), "tokens.bin", "missing", "--init-from")
    else:
        raw = bytearray(tokens.read_bytes())
        raw[100] ^= 1
        tokens.write_bytes(bytes(raw))
        failed(run_cli("train", "--resume", "run", "--steps", "1"), "tokens.bin", "changed")


# --------------------------------------------------------------- --init-from
def test_init_from_fine_tunes_from_the_checkpoint_keeping_its_vocabulary(run_cli, tmp_path):
    ok(run_cli("train", TINY, *SMALL, "--layers", "1", "--cell", "gru", "--steps", "3", "--out", "base"))
    base = checkpoint.load(tmp_path / "base" / "latest.npz")
    new = tmp_path / "new.txt"
    new.write_text("the old man and the boat and the grey water\n" * 30, encoding="utf-8")
    res = ok(run_cli("train", new, "--init-from", "base", "--steps", "2", "--out", "tuned", "--threads", "1",
                     "--json", "--lr", "0.01", "--eval-every", "50"))
    assert "not in the model's vocabulary" not in res.stderr
    tuned = checkpoint.load(tmp_path / "tuned" / "latest.npz")
    assert tuned.vocab == base.vocab and tuned.model == base.model
    assert tuned.step == 2 and tuned.corpus == "new.txt"
    assert tuned.train.lr == 0.01  # training settings are free with --init-from
    assert any(not np.array_equal(tuned.params[k], base.params[k]) for k in base.params)  # it trained


def test_init_from_reports_unknown_tokens_of_the_validation_file_too(run_cli, tmp_path):
    ok(run_cli("train", TINY, *SMALL, "--layers", "1", "--steps", "2", "--out", "base"))
    assert "\u2603" not in checkpoint.load(tmp_path / "base" / "latest.npz").vocab.tokens
    val = tmp_path / "val.txt"
    val.write_text("the old \u2603 man \u2603\n", encoding="utf-8")
    res = ok(run_cli("train", TINY, "--init-from", "base", "--val", val, "--steps", "1", "--out", "tuned",
                     "--threads", "1", "--json"))
    assert "2 tokens of the validation file are not in the vocabulary and are left out" in res.stderr


def test_init_from_leaves_out_unknown_characters_and_counts_them(run_cli, tmp_path):
    ok(run_cli("train", TINY, *SMALL, "--layers", "1", "--steps", "2", "--out", "base"))
    vocab = checkpoint.load(tmp_path / "base" / "latest.npz").vocab
    assert "Z" not in vocab.tokens and "\u2603" not in vocab.tokens and "a" in vocab.tokens
    new = tmp_path / "new.txt"
    new.write_text(("ZaZ bat\u2603 " * 20 + "\n") * 5, encoding="utf-8")
    res = ok(run_cli("train", new, "--init-from", "base", "--steps", "1", "--out", "tuned", "--json"))
    note = res.stderr
    assert "300 tokens (2 distinct)" in note and "left out" in note
    assert "'Z' ×200" in note and "'\u2603' ×100" in note
    tuned = checkpoint.load(tmp_path / "tuned" / "latest.npz")
    n_kept = len(new.read_text(encoding="utf-8")) - 300
    assert tuned.data["n_tokens"] == n_kept  # the characters were left out, not mapped

    err = failed(run_cli("train", new, "--init-from", "base", "--strict-vocab", "--steps", "1", "--out", "strict"),
                 "300 tokens", "2 distinct", "'Z' ×200", "--strict-vocab")
    assert "left out" in err
    assert not (tmp_path / "strict").exists()  # nothing kept of a refused run


def test_init_from_maps_unknown_words_to_unk_and_counts_them(run_cli, tmp_path):
    ok(run_cli("train", WORDS, *SMALL, "--layers", "1", "--level", "word", "--seq-len", "4", "--steps", "2",
               "--out", "base"))
    vocab = checkpoint.load(tmp_path / "base" / "latest.npz").vocab
    known = [t for t in vocab.tokens if t not in ("<eos>", "<unk>")][:3]
    new = tmp_path / "new.txt"
    new.write_text((" ".join(known) + " zyzzyva quux zyzzyva\n") * 10, encoding="utf-8")
    res = ok(run_cli("train", new, "--init-from", "base", "--steps", "1", "--out", "tuned", "--json",
                     "--seq-len", "4"))
    assert "30 tokens (2 distinct)" in res.stderr and "mapped to <unk>" in res.stderr
    assert "'zyzzyva' ×20" in res.stderr and "'quux' ×10" in res.stderr
    tuned = checkpoint.load(tmp_path / "tuned" / "latest.npz")
    assert tuned.vocab == vocab
    ids = np.fromfile(tmp_path / "tuned" / "tokens.bin", dtype=tuned.data["dtype"])
    assert int((ids == vocab.unk_id).sum()) == 30
    failed(run_cli("train", new, "--init-from", "base", "--strict-vocab", "--steps", "1", "--out", "strict",
                   "--seq-len", "4"), "30 tokens", "'zyzzyva' ×20", "<unk>")
    assert not (tmp_path / "strict").exists()


def test_init_from_refuses_a_contradicting_architecture(run_cli, tmp_path):
    ok(run_cli("train", TINY, *SMALL, "--layers", "1", "--cell", "lstm", "--steps", "2", "--out", "base"))
    failed(run_cli("train", TINY, "--init-from", "base", "--cell", "gru", "--steps", "1"),
           "--cell gru contradicts the checkpoint (--cell lstm)", "--init-from")
    failed(run_cli("train", WORDS, "--init-from", "base", "--level", "word", "--steps", "1"), "--level")
    assert not (tmp_path / "models").exists()


def test_strict_vocab_needs_init_from(run_cli, tmp_path):
    failed(run_cli("train", TINY, *SMALL, "--steps", "1", "--strict-vocab"), "--strict-vocab", "--init-from")


# -------------------------------------------------------- --checkpoint-every
def test_checkpoint_every_saves_latest_every_n_steps(tmp_path):
    tcfg = TrainConfig(seq_len=8, batch=2, steps=10, eval_every=4)
    saved_at = []
    step = 0
    for ev in train_mod.train(tiny_text(), ModelConfig(cell="rnn", embed=4, hidden=8, layers=1), tcfg,
                              tmp_path / "run", checkpoint_every=3, sample_chars=0):
        if ev["event"] == "step":
            step = ev["step"]
        elif ev["event"] == "saved" and ev["path"].endswith("latest.npz"):
            saved_at.append(step)
            assert checkpoint.load(ev["path"]).step == step
    assert saved_at == [3, 4, 6, 8, 9, 10]  # every 3 steps, and at each evaluation (4, 8) and the end


def test_checkpoint_every_must_not_be_negative(run_cli):
    failed(run_cli("train", TINY, *SMALL, "--steps", "1", "--checkpoint-every", "-1"), "--checkpoint-every")


# ------------------------------------------------------------- a failing write
def _fail_second(real, match=lambda *a: True):
    calls = []

    def flaky(*args, **kwargs):
        if match(*args):
            calls.append(args)
            if len(calls) == 2:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)
    return flaky


def _patch_second_save(monkeypatch, where: str):
    if where == "savez":
        monkeypatch.setattr(checkpoint.np, "savez", _fail_second(np.savez))
    else:  # the rename into place (the token file is renamed with os.replace too: not that one)
        monkeypatch.setattr(checkpoint.os, "replace",
                            _fail_second(os.replace, lambda src, dst: str(dst).endswith(".npz")))


@pytest.mark.parametrize("where", ["savez", "replace"])
def test_a_failing_save_stops_training_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, where):
    _patch_second_save(monkeypatch, where)
    tcfg = TrainConfig(seq_len=8, batch=2, steps=6, eval_every=100)
    events = []
    with pytest.raises(CharlmError) as e:
        for ev in train_mod.train(tiny_text(), ModelConfig(cell="lstm", embed=4, hidden=8, layers=1), tcfg,
                                  tmp_path / "run", checkpoint_every=1, sample_chars=0):
            events.append(ev)
    msg = str(e.value)
    assert "\n" not in msg
    assert "latest.npz" in msg and os.strerror(errno.ENOSPC) in msg and "previous checkpoint is unchanged" in msg
    assert [ev["step"] for ev in events if ev["event"] == "step"] == [1, 2]
    ck = checkpoint.load(tmp_path / "run" / "latest.npz")  # the save of step 1, intact
    assert ck.step == 1
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["latest.npz", "tokens.bin"]  # no temp file


@pytest.mark.parametrize("where", ["savez", "replace"])
def test_a_failing_save_is_one_error_line_on_the_command_line(run_cli, tmp_path, monkeypatch, where):
    _patch_second_save(monkeypatch, where)
    res = run_cli("train", TINY, *SMALL, "--layers", "1", "--steps", "5", "--checkpoint-every", "1", "--out", "run")
    assert res.exit_code == 1
    err = res.stderr.strip().splitlines()
    assert err[-1].startswith("error: could not write checkpoint run/latest.npz: No space left on device")
    assert "previous checkpoint is unchanged" in err[-1]
    assert "Traceback" not in res.output
    assert all(json.loads(line) for line in res.stdout.splitlines())  # stdout stays JSON
    assert checkpoint.load(tmp_path / "run" / "latest.npz").step == 1


def test_a_failing_token_file_write_is_one_error_line_and_leaves_no_folder(run_cli, tmp_path, monkeypatch):
    real = os.replace

    def replace(src, dst):
        if str(dst).endswith("tokens.bin"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(src, dst)
    monkeypatch.setattr(os, "replace", replace)
    failed(run_cli("train", TINY, *SMALL, "--steps", "2", "--out", "new/run"),
           "could not write the token file new/run/tokens.bin", "No space left on device")
    assert not (tmp_path / "new").exists()


# ------------------------------------------------------------ exploding loss
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_an_absurd_learning_rate_trips_the_nonfinite_guard(run_cli, tmp_path, optimizer):
    """A vanilla RNN, no clipping and --lr 1e38: updates overflow float32 (--lr 1e6 does not: the
    loss grows to ~1e6 nats and stays finite, the tanh units being saturated). Every
    non-finite step is skipped, the last good weights restored and the rate halved (a JSON
    event); whatever happens, no checkpoint on disk holds a non-finite number."""
    res = run_cli("train", TINY, *SMALL, "--cell", "rnn", "--layers", "1", "--optimizer", optimizer, "--lr", "1e38",
                  "--clip", "0", "--steps", "40", "--eval-every", "10", "--checkpoint-every", "1", "--out", "run")
    assert "Traceback" not in res.output
    lines = json_lines(res.stdout)
    nonfinite = [e for e in lines if e["event"] == "nonfinite"]
    assert nonfinite, "the learning rate did not make the loss overflow"
    assert all(set(e) == {"event", "step", "lr"} for e in nonfinite)
    lrs = [e["lr"] for e in nonfinite]
    assert lrs == [1e38 / 2 ** (k + 1) for k in range(len(lrs))]  # halved at each one
    assert "non-finite loss: update skipped, learning rate halved" in res.stderr
    if res.exit_code == 0:
        assert lines[-1]["event"] == "done" and lines[-1]["steps"] == 40
    else:  # five failures in a row: the last good weights are kept and the way out named
        failed_line = res.stderr.strip().splitlines()[-1]
        assert failed_line.startswith("error:") and "--lr" in failed_line and "--clip" in failed_line
    for name in ("latest.npz", "best.npz"):
        if (tmp_path / "run" / name).exists():
            assert all_finite(checkpoint.load(tmp_path / "run" / name)), name


def test_the_progress_display_reports_a_nonfinite_step(run_cli, tmp_path, monkeypatch):
    _always_nonfinite_after(monkeypatch, 2)
    res = run_cli("train", TINY, "--hidden", "8", "--embed", "4", "--seq-len", "8", "--batch", "4", "--layers", "1",
                  "--steps", "5", "--out", "run", "--sample-length", "0", "--lr", "0.004")
    assert res.exit_code == 1
    for k in range(1, 6):
        assert f"step 2: loss is not finite; update skipped, learning rate halved to {0.004 / 2 ** k:g}" in res.stderr


def _always_nonfinite_after(monkeypatch, good_steps: int):
    """From training step good_steps + 1 on, the gradient norm is NaN (the warm-up, charlm.lm.precompile,
    does not come here)."""
    calls = []
    real = train_mod.grad_norm

    def norm(grads, rows=None):
        calls.append(1)
        return float("nan") if len(calls) > good_steps else real(grads, rows)
    monkeypatch.setattr(train_mod, "grad_norm", norm)


def test_consecutive_nonfinite_steps_stop_with_advice_and_finite_weights_on_disk(tmp_path, monkeypatch):
    _always_nonfinite_after(monkeypatch, 3)
    events = []
    with pytest.raises(CharlmError) as e:
        for ev in train_mod.train(tiny_text(), ModelConfig(cell="rnn", embed=4, hidden=8, layers=1),
                                  TrainConfig(seq_len=8, batch=2, steps=20, eval_every=100, lr=0.01),
                                  tmp_path / "run", sample_chars=0):
            events.append(ev)
    bad = [ev for ev in events if ev["event"] == "nonfinite"]
    assert [ev["step"] for ev in bad] == [3] * train_mod.MAX_NONFINITE
    assert [ev["lr"] for ev in bad] == pytest.approx([0.01 / 2 ** k for k in range(1, 6)])
    msg = str(e.value)
    assert "--lr" in msg and "--clip" in msg and "latest.npz" in msg and "\n" not in msg
    ck = checkpoint.load(tmp_path / "run" / "latest.npz")
    assert ck.step == 3 and all_finite(ck)
    assert ck.optimizer["lr"] == pytest.approx(0.01 / 32)


def test_consecutive_nonfinite_steps_on_the_command_line(run_cli, tmp_path, monkeypatch):
    _always_nonfinite_after(monkeypatch, 2)
    res = run_cli("train", TINY, *SMALL, "--layers", "1", "--steps", "9", "--out", "run", "--lr", "0.004")
    assert res.exit_code == 1
    lines = json_lines(res.stdout)
    assert lines == [{"event": "nonfinite", "step": 2, "lr": 0.004 / 2 ** k} for k in range(1, 6)]
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the loss was not finite after 5 tries in a row") and "--lr" in last and "--clip" in last
    assert all_finite(checkpoint.load(tmp_path / "run" / "latest.npz"))


def test_an_update_that_overflows_the_weights_is_rolled_back_to_good_weights(tmp_path, monkeypatch):
    """The loss and gradient of a step are finite but the update itself overflows the weights
    (SGD with a huge step does that). The in-memory snapshot must hold good weights, not these:
    restoring the overflowed ones could never recover and ended the run."""
    monkeypatch.setattr(train_mod, "SNAPSHOT_EVERY", 2)
    real = train_mod.make_optimizer
    poisoned = []

    def make(name, params, **kw):
        opt = real(name, params, **kw)
        step = opt.step

        def poisoning_step(params, grads, lr, gscale=1.0, rows=None):
            step(params, grads, lr, gscale, rows)
            if opt.t == 4 and not poisoned:  # the 4th update: a snapshot is due at that step
                poisoned.append(1)
                params["decoder.bias"][0] = np.inf
        opt.step = poisoning_step
        return opt
    monkeypatch.setattr(train_mod, "make_optimizer", make)
    events = list(train_mod.train(tiny_text(), ModelConfig(cell="rnn", embed=4, hidden=8, layers=1),
                                  TrainConfig(seq_len=8, batch=2, steps=8, eval_every=100, lr=0.01),
                                  tmp_path / "run", sample_chars=0))
    bad = [ev for ev in events if ev["event"] == "nonfinite"]
    assert len(bad) == 1 and bad[0]["step"] == 4
    assert bad[0]["restored_step"] < 4
    assert events[-1]["event"] == "done" and events[-1]["steps"] == 8
    ck = checkpoint.load(tmp_path / "run" / "latest.npz")
    assert ck.step == 8 and all_finite(ck) and ck.optimizer["lr"] == 0.005


# ------------------------------------------------------------------ determinism
def test_same_flags_and_seed_give_bit_identical_checkpoints(run_cli, tmp_path):
    args = [TINY, *SMALL, "--cell", "lstm", "--layers", "2", "--dropout", "0.2", "--steps", "30",
            "--eval-every", "12", "--seed", "11"]
    ok(run_cli("train", *args, "--out", "a"))
    ok(run_cli("train", *args, "--out", "b"))
    for name in ("latest.npz", "best.npz"):
        a, b = arrays_of(tmp_path / "a" / name), arrays_of(tmp_path / "b" / name)
        meta_a, meta_b = (json.loads(x.pop("__meta__").tobytes()) for x in (a, b))
        assert_same_bits(a, b, name)
        for m in (meta_a, meta_b):
            m.pop("checksum")  # it covers the timing counter
            assert m["counters"].pop("train_seconds") > 0
        assert meta_a == meta_b
    ok(run_cli("train", *args[:-1], "12", "--out", "c"))  # guard: another seed gives other weights
    assert arrays_of(tmp_path / "c" / "latest.npz")["param/decoder.weight"].tobytes() != \
        arrays_of(tmp_path / "a" / "latest.npz")["param/decoder.weight"].tobytes()


# ---------------------------------------------------------- real processes
def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CHARLM_DEBUG"}
    env.update({k: v for k, v in env_plain().items() if v is not None})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(extra)
    return env


def _start(args, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "charlm", *map(str, args)], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, encoding="utf-8")


def _wait_for(proc: subprocess.Popen, cond, timeout: float = 60.0, what: str = "", poll: float = 0.005):
    t0 = time.monotonic()
    while not cond():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"charlm exited ({proc.returncode}) before {what}: {err[-2000:]}")
        if time.monotonic() - t0 > timeout:
            proc.kill()
            proc.communicate()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(poll)


def _finish(proc: subprocess.Popen, timeout: float = 60.0) -> tuple[str, str]:
    try:
        return proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        pytest.fail("charlm did not stop")


TINY_RUN = [TINY, "--hidden", "8", "--embed", "4", "--layers", "1", "--seq-len", "8", "--batch", "2", "--json",
            "--threads", "1"]
KEEP_TRAINING = [*TINY_RUN, "--minutes", "5", "--checkpoint-every", "1", "--eval-every", "40"]


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_finishes_the_step_saves_and_says_how_to_resume(run_cli, tmp_path, signum, code):
    proc = _start(["train", *KEEP_TRAINING, "--out", "run"], tmp_path)
    latest = tmp_path / "run" / "latest.npz"
    _wait_for(proc, latest.exists, what="the first checkpoint")
    time.sleep(0.2)
    proc.send_signal(signum)
    out, err = _finish(proc)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    name = signal.Signals(signum).name
    m = re.search(rf"stopped by {name} at step (\d+); checkpoint saved to run/latest.npz\. "
                  r"Continue with: charlm train --resume run", err)
    assert m, err
    step = int(m.group(1))
    done = json_lines(out)[-1]
    assert done["event"] == "done" and done["steps"] == step > 0
    ck = checkpoint.load(latest)
    assert ck.step == step and ck.history[-1]["step"] == step  # evaluated and saved at the stop
    assert sorted(p.name for p in latest.parent.iterdir()) == ["best.npz", "latest.npz", "tokens.bin"]
    ok(run_cli("train", "--resume", "run", "--steps", "2", "--json", "--threads", "1"))
    assert checkpoint.load(latest).step == step + 2


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_signal_stops_at_once_and_loses_nothing_saved(tmp_path, signum):
    proc = _start(["train", *KEEP_TRAINING, "--out", "run"], tmp_path)
    latest = tmp_path / "run" / "latest.npz"
    _wait_for(proc, latest.exists, what="the first checkpoint")
    proc.send_signal(signum)
    time.sleep(0.01)
    proc.send_signal(signum)
    out, err = _finish(proc)
    # 128 + signum, or killed by the second signal itself if it came while Python was already
    # exiting (handlers are reset then), which a shell shows as 128 + signum too
    assert proc.returncode in (128 + signum, -signum), err
    assert "Traceback" not in err
    checkpoint.load(latest)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_second_signal_after_the_run_has_stopped_exits_quietly(tmp_path, signum):
    """The second signal of the test above can come after training has stopped (a loaded machine
    delays the first one's delivery): while the stop is reported or Python shuts down. It must end
    the process with 128 + signum and no traceback, not raise KeyboardInterrupt into shutdown code."""
    script = f"""
import os, signal, time, weakref
from charlm.cli.common import StopFlag
class Held: pass
held = Held()
weakref.finalize(held, time.sleep, 0.5)   # shutdown code the second signal lands in
with StopFlag() as stop:
    os.kill(os.getpid(), {int(signum)})
    while not stop():
        time.sleep(0.001)
os.kill(os.getpid(), {int(signum)})      # after the run: the old handlers would raise here
time.sleep(5)
raise SystemExit(0)
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=60, cwd=tmp_path, env=_env())
    assert proc.returncode == 128 + signum, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"interrupted by a second {signal.Signals(signum).name}" in proc.stderr


def test_ctrl_c_while_python_shuts_down_after_a_command_is_no_traceback(tmp_path):
    """A command has finished (here `charlm --version`) and Python is running its exit-time code (a
    weakref finalizer that takes a while, as Numba's dispatchers have) when Ctrl-C comes: exit 130 with
    what was printed kept, and no KeyboardInterrupt traceback from inside the finalizer."""
    script = """
import sys, time, weakref
class Held: pass
held = Held()
weakref.finalize(held, time.sleep, 5)
sys.argv = ["charlm", "--version"]
from charlm._entry import main
main()
"""
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=tmp_path, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    first = proc.stdout.readline()  # the command's output: it is done, the finalizer runs next
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    rest, err = proc.communicate(timeout=60)
    assert "charlm" in first + rest
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err


def test_kill_9_at_random_moments_always_leaves_a_loadable_checkpoint(tmp_path):
    """SIGKILL a training process (one save per step, so many moments are inside a checkpoint
    write) at 20 random moments, restarting it with --resume each time: after every kill the last
    complete latest.npz loads, never goes back in steps, and the temporary files of interrupted
    writes neither disturb loading nor outlive the next run."""
    rnd = random.Random(1234)
    run = tmp_path / "run"
    latest = run / "latest.npz"
    allowed = re.compile(r"(latest\.npz|best\.npz|tokens\.bin|\.(latest|best)\.npz\.\w+\.tmp|\.tokens\.bin\.tmp)$")

    # first a run that is not killed, so the kernels are compiled and cached for the restarts
    proc = _start(["train", *TINY_RUN, "--steps", "2", "--out", "run"], tmp_path)
    _finish(proc, timeout=300)
    assert proc.returncode == 0
    last_step = checkpoint.load(latest).step
    kills = 0
    mid_run = 0
    interrupted_writes = set()  # temporary files seen after a kill: writes the kill cut short

    def temporaries():
        return {n for n in os.listdir(run) if n.endswith(".tmp")}
    while kills < 20:
        proc = _start(["train", "--resume", "run", "--minutes", "5", "--json", "--threads", "1",
                       "--checkpoint-every", "1"], tmp_path)
        if kills % 4 == 3:  # anywhere, the start-up included
            time.sleep(rnd.uniform(0.0, 1.5))
        elif kills % 4 == 1:  # as soon as a checkpoint write has begun
            stale = temporaries()
            _wait_for(proc, lambda: temporaries() - stale, what="a checkpoint write", poll=0)
        else:  # once this process writes checkpoints: mostly inside a write
            first = latest.stat().st_ino
            _wait_for(proc, lambda: latest.stat().st_ino != first, what="a new checkpoint")
            time.sleep(rnd.uniform(0.0, 0.05))
        mid_run += proc.poll() is None
        proc.kill()
        proc.communicate(timeout=60)
        kills += 1
        ck = checkpoint.load(latest)
        assert ck.step >= last_step
        assert all_finite(ck)
        last_step = ck.step
        if (run / "best.npz").exists():
            checkpoint.load(run / "best.npz")
        names = [p.name for p in run.iterdir()]
        assert all(allowed.fullmatch(n) for n in names), names
        interrupted_writes |= temporaries()
    assert mid_run == 20
    assert last_step > 2  # the restarts did train
    proc = _start(["train", "--resume", "run", "--steps", "3", "--json", "--threads", "1"], tmp_path)
    out, err = _finish(proc)
    assert proc.returncode == 0, err
    assert checkpoint.load(latest).step == last_step + 3
    assert sorted(os.listdir(run)) == ["best.npz", "latest.npz", "tokens.bin"]  # the temporaries are gone
    print(f"{len(interrupted_writes)} of 20 kills interrupted a checkpoint write")
