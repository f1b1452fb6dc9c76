"""Dynamic evaluation (charlm.lm.dynamic, `charlm eval --dynamic`): each window scored with the current
weights, then learned from; lr 0 is static evaluation exactly; the model and the checkpoint file are left
as they were; the command's flags and errors."""
import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import charlm
from charlm.errors import CharlmError
from charlm.lm import dynamic
from charlm.lm.score import evaluate_text as static_evaluate_text
from tests.helpers import DATA, TINY, env_plain, failed, ok, option_blocks, tiny_text, train_tiny, train_tiny_words

ROOT = Path(__file__).resolve().parents[1]
WORDS = DATA / "words.txt"
CHAR_REPEAT = "the old man watched the sky\n" * 40
WORD_REPEAT = "the cat sat on the mat\n" * 40


@pytest.fixture(scope="module")
def char_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("dyn") / "run"
    train_tiny(run, steps=3)
    return run


@pytest.fixture(scope="module")
def word_run(tmp_path_factory):
    run = tmp_path_factory.mktemp("dyn") / "wrun"
    train_tiny_words(run)
    return run


@pytest.fixture(params=["char", "word"])
def run(request, char_run, word_run):
    return char_run if request.param == "char" else word_run


def _text(lm) -> str:
    return tiny_text() if lm.level == "char" else WORDS.read_text(encoding="utf-8")


def _weights(lm) -> dict:
    return {n: a.copy() for n, a in lm._model.params.items()}


def _same_weights(lm, before: dict) -> bool:
    now = lm._model.params
    return set(now) == set(before) and all(now[n].tobytes() == before[n].tobytes() for n in before)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ------------------------------------------------------------ the numbers
def test_lr_0_is_static_evaluation_exactly(run):
    lm = charlm.load(run)
    text = _text(lm) + "\n"
    T = lm._ckpt.train.seq_len
    dyn = lm.evaluate_text(text, dynamic=True, dynamic_lr=0.0, details=True)
    assert dyn["dynamic"] is True and dyn["dynamic_lr"] == 0.0 and dyn["seq_len"] == T and dyn["streams"] == 1
    # static evaluation in windows of the same length adds the same float64 numbers in the same order
    static = static_evaluate_text(lm._model, lm.vocab, text, window=T)
    for k in ("n_tokens", "logprob", "perplexity", "perplexity_excl_oov", "bits_per_token", "oov"):
        assert dyn[k] == static[k], k
    # what `charlm eval` prints (windows of 256): the same factors, summed in another order
    plain = lm.evaluate_text(text)
    assert dyn["logprob"] == pytest.approx(plain["logprob"], rel=1e-13, abs=0)
    # a window that does not divide the text, and a decay with nothing to pull back
    dyn = lm.evaluate_text(text, dynamic=True, dynamic_lr=0.0, seq_len=7, dynamic_decay=0.5)
    static = static_evaluate_text(lm._model, lm.vocab, text, window=7)
    assert dyn["logprob"] == static["logprob"]
    assert dyn["perplexity_excl_oov"] == static["perplexity_excl_oov"]


def test_the_first_window_is_scored_before_it_is_learned_from(run):
    lm = charlm.load(run)
    model, vocab, T = lm._model, lm.vocab, 8
    ids, _ = vocab.encode(_text(lm))
    full = np.concatenate([[vocab.eos_id], ids]).astype(np.int32)
    lr = 0.5
    first = dynamic.dynamic_logprob(model, full[:T + 1], T, lr)
    x, y = full[:T].reshape(T, 1), full[1:T + 1].reshape(T, 1)
    static_first = float(model.token_logprobs(x, y, model.zero_state(1))[0].sum())
    assert first.count == T and first.logprob == static_first
    # the whole text: the later windows see learned weights, so the total differs from static
    whole = dynamic.dynamic_logprob(model, full, T, lr)
    static = static_evaluate_text(model, vocab, _text(lm))
    assert whole.count == static["n_tokens"]
    assert whole.logprob != pytest.approx(static["logprob"], rel=1e-6)
    # two windows: the second is scored by the weights after one step, not by the loaded ones
    two = dynamic.dynamic_logprob(model, full[:2 * T + 1], T, lr)
    zero = dynamic.dynamic_logprob(model, full[:2 * T + 1], T, 0.0)
    assert two.logprob != zero.logprob


@pytest.mark.parametrize("level", ["char", "word"])
def test_a_text_that_repeats_itself_is_learned(level, char_run, word_run):
    lm = charlm.load(char_run if level == "char" else word_run)
    text = CHAR_REPEAT if level == "char" else WORD_REPEAT
    static = lm.evaluate_text(text)["perplexity"]
    dyn = lm.evaluate_text(text, dynamic=True)  # the default lr
    assert dyn["dynamic_lr"] == dynamic.DEFAULT_LR
    assert dyn["perplexity"] < 0.8 * static, (dyn["perplexity"], static)
    # a bigger step learns it faster
    assert lm.evaluate_text(text, dynamic=True, dynamic_lr=1.0)["perplexity"] < dyn["perplexity"]
    # decay pulls the weights back: less of the text is kept
    assert lm.evaluate_text(text, dynamic=True, dynamic_decay=0.5)["perplexity"] > dyn["perplexity"]


# ------------------------------------------------------------ nothing changes
def test_the_model_is_unchanged_after_dynamic_evaluation(run, tmp_path):
    lm = charlm.load(run)
    before = _weights(lm)
    static = lm.evaluate_text(_text(lm))
    r = lm.evaluate_text(_text(lm), dynamic=True, dynamic_lr=1.0, dynamic_decay=0.1)
    assert r["logprob"] != static["logprob"]
    assert _same_weights(lm, before)
    assert lm.evaluate_text(_text(lm)) == static
    # also when it stops half-way (Ctrl-C, a progress callback that raises)
    def stop(done, total):
        if done > total // 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        lm.evaluate_text(_text(lm), dynamic=True, dynamic_lr=1.0, progress=stop)
    assert _same_weights(lm, before)
    # evaluate (a file) gives the same numbers as evaluate_text
    path = tmp_path / "t.txt"
    path.write_text(_text(lm), encoding="utf-8")
    assert lm.evaluate(path, dynamic=True, dynamic_lr=1.0, dynamic_decay=0.1) == r


def test_the_checkpoint_file_is_never_written(run_cli, char_run, tmp_path):
    ckpt = char_run / "best.npz"
    before, mtime = _sha(ckpt), os.stat(ckpt).st_mtime_ns
    files = sorted(p.name for p in char_run.iterdir())
    ok(run_cli("eval", TINY, "--model", char_run, "--dynamic", "--dynamic-lr", 1))
    charlm.load(char_run).evaluate(TINY, dynamic=True, dynamic_lr=1.0)
    assert _sha(ckpt) == before and os.stat(ckpt).st_mtime_ns == mtime
    assert sorted(p.name for p in char_run.iterdir()) == files


# ------------------------------------------------------------ the command
def test_eval_dynamic_json_is_what_the_library_returns(run_cli, run):
    lm = charlm.load(run)
    corpus = TINY if lm.level == "char" else WORDS
    cli = json.loads(ok(run_cli("eval", corpus, "--model", run, "--json", "--dynamic", "--dynamic-lr", 0.3,
                                "--seq-len", 16)).stdout)
    assert cli["dynamic"] is True and cli["dynamic_lr"] == 0.3 and cli["seq_len"] == 16 and cli["dynamic_decay"] == 0
    assert cli == lm.evaluate(corpus, dynamic=True, dynamic_lr=0.3, seq_len=16)
    static = json.loads(ok(run_cli("eval", corpus, "--model", run, "--json")).stdout)
    assert "dynamic" not in static and static["n_tokens"] == cli["n_tokens"]
    default = json.loads(ok(run_cli("eval", corpus, "--model", run, "--json", "--dynamic")).stdout)
    assert default["dynamic_lr"] == dynamic.DEFAULT_LR and default["seq_len"] == lm._ckpt.train.seq_len
    human = ok(run_cli("eval", corpus, "--model", run, "--dynamic")).stdout
    assert "dynamic evaluation" in human and f"lr {dynamic.DEFAULT_LR:g}" in human


@pytest.mark.parametrize("flags, message", [
    (["--dynamic-lr", "-0.1"], "--dynamic-lr must be a finite number >= 0"),
    (["--dynamic-lr", "nan"], "--dynamic-lr must be a finite number >= 0"),
    (["--dynamic-lr", "inf"], "--dynamic-lr must be a finite number >= 0"),
    (["--dynamic-lr", "-inf"], "--dynamic-lr must be a finite number >= 0"),
    (["--dynamic-decay", "1"], "--dynamic-decay must be in [0, 1)"),
    (["--dynamic-decay", "nan"], "--dynamic-decay must be in [0, 1)"),
    (["--seq-len", "0"], "--seq-len must be positive"),
    (["--streams", "4"], "one stream"),
])
def test_bad_dynamic_flags_are_one_line_errors(run_cli, char_run, flags, message):
    failed(run_cli("eval", TINY, "--model", char_run, "--dynamic", *flags), message)


def test_dynamic_flags_without_dynamic_are_refused(run_cli, char_run):
    for flags in (["--dynamic-lr", "0.1"], ["--dynamic-decay", "0.1"], ["--seq-len", "8"]):
        failed(run_cli("eval", TINY, "--model", char_run, *flags), flags[0], "--dynamic")


def test_the_library_refuses_what_the_command_refuses(char_run):
    lm = charlm.load(char_run)
    for kwargs, word in [({"dynamic_lr": -1.0}, "dynamic_lr"), ({"dynamic_lr": float("nan")}, "dynamic_lr"),
                         ({"dynamic_lr": float("inf")}, "dynamic_lr"), ({"dynamic_lr": True}, "dynamic_lr"),
                         ({"dynamic_decay": 1.0}, "dynamic_decay"), ({"seq_len": 0}, "seq_len"),
                         ({"seq_len": 2.5}, "seq_len")]:
        with pytest.raises(CharlmError, match=f"^{word} must be"):
            lm.evaluate_text("abc", dynamic=True, **kwargs)
    with pytest.raises(CharlmError, match="one stream"):
        lm.evaluate_text("abc", 2, dynamic=True)
    with pytest.raises(CharlmError, match="give dynamic=True"):
        lm.evaluate_text("abc", dynamic_lr=0.1)
    with pytest.raises(CharlmError, match="nothing to evaluate"):
        lm.evaluate_text("", dynamic=True)


def test_help_says_dynamic_evaluation_is_one_stream(run_cli):
    blocks = option_blocks(ok(run_cli("eval", "--help")).stdout)
    assert "one stream" in blocks["--dynamic"] and "never changed" in blocks["--dynamic"]
    assert f"Default: {dynamic.DEFAULT_LR:g}." in blocks["--dynamic-lr"]
    assert f"norm {dynamic.DEFAULT_CLIP:g}" in blocks["--dynamic-lr"]


# ------------------------------------------------------------ more than one process
def _why_no_mpi() -> str | None:
    if not shutil.which("mpiexec"):
        return "mpiexec is not on PATH"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed"
    return None


@pytest.mark.skipif(_why_no_mpi() is not None, reason=str(_why_no_mpi()))
def test_dynamic_evaluation_is_refused_under_mpiexec(char_run):
    env = {k: v for k, v in os.environ.items() if k != "CHARLM_DEBUG"}
    env.update({k: v for k, v in env_plain().items() if v is not None})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    cmd = [shutil.which("mpiexec"), "-n", "2", sys.executable, "-m", "charlm", "eval", str(TINY), "--model",
           str(char_run), "--dynamic", "--threads", "1"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=240, cwd=ROOT)
    except subprocess.TimeoutExpired:
        pytest.skip("mpiexec -n 2 did not finish in time on this machine")
    if "There are not enough slots" in res.stderr or "mpi4py" in res.stderr and "not installed" in res.stderr:
        pytest.skip(res.stderr.strip().splitlines()[0])
    assert res.returncode != 0
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == ["error: --dynamic is sequential and runs in one process: run it without mpiexec"], res.stderr
    assert res.stdout == ""
