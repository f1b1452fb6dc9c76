"""Never trust input: unusual and hostile corpora, paths, command-line bytes and checkpoints give a
clear one-line error or are handled correctly; never a traceback, never a hang (anything that could
block runs in a subprocess with a timeout). Property tests: score and sample take any string.

What test_cli.py / test_data.py / test_checkpoint.py already cover is not repeated here: an empty,
whitespace or BOM-only corpus, invalid UTF-8 in the corpus, a directory, a missing file, a corpus
shorter than one window, --out under a regular file; read_text on FIFOs and unreadable files;
damaged, truncated and pickled checkpoints."""
import contextlib
import json
import math
import os
import signal
import stat
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from charlm.lm import checkpoint
from charlm.config import ModelConfig
from charlm.data import Vocab
from charlm.lm.model import Model
from charlm.lm.sample import generate
from charlm.lm.score import score_text
from tests.helpers import DATA, TINY, env_plain, failed, make_checkpoint, ok, rewrite_with_meta, tiny_text, train_tiny

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ["--steps", "2", "--hidden", "8", "--layers", "1", "--embed", "4", "--seq-len", "8", "--batch", "2",
         "--json", "--threads", "1"]
MIXED = ("Der Fluß — Ελληνικά, русский текст, 日本語のテキスト, العربية, हिन्दी, 한국어.\n"
         "Emoji: 😀🎉👍🏽 👩\u200d💻 🇳🇿 and astral math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢, e\u0301 combining.\n")


def json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def run_ids(run: Path) -> tuple[checkpoint.Checkpoint, np.ndarray]:
    ck = checkpoint.load(run / "latest.npz")
    return ck, np.fromfile(run / "tokens.bin", dtype=ck.data["dtype"])


# ------------------------------------------------------------- odd corpora
@pytest.mark.parametrize("text", ["\n" * 10_000, "\u3000\u00a0\u2028 \t\n" * 300, "\r\n" * 500, "\x0b\x0c\x1c\x85"],
                         ids=["newlines", "unicode-spaces", "crlf", "control-spaces"])
def test_whitespace_only_corpora_are_empty(run_cli, tmp_path, text):
    (tmp_path / "blank.txt").write_text(text, encoding="utf-8", newline="")
    failed(run_cli("train", "blank.txt", *TRAIN), "empty")
    assert not (tmp_path / "models").exists()


def test_a_single_repeated_character_trains(run_cli, tmp_path):
    (tmp_path / "a.txt").write_text("a" * 5000)
    ok(run_cli("train", "a.txt", *TRAIN, "--out", "run"))
    ck, ids = run_ids(tmp_path / "run")
    assert ck.vocab.tokens == ("\n", "a")
    assert len(ids) == 5000
    text = ok(run_cli("sample", "--model", "run", "--length", "50", "--seed", "0")).stdout
    assert len(text) == 51 and set(text) <= {"a", "\n"}
    r = json.loads(ok(run_cli("score", "aaaa", "--model", "run", "--json")).stdout)
    assert r["n_tokens"] == 5 and r["oov"] == 0 and math.isfinite(r["logprob"]) and r["logprob"] < 0


def test_the_shortest_corpus_that_trains(run_cli, tmp_path):
    """seq-len 8: two tokens go to validation, the rest must hold one window of 8 + 1."""
    (tmp_path / "eleven.txt").write_text("abcdefghij\n")
    ok(run_cli("train", "eleven.txt", *TRAIN, "--out", "run"))
    assert checkpoint.load(tmp_path / "run" / "latest.npz").step == 2
    (tmp_path / "ten.txt").write_text("abcdefghi\n")
    failed(run_cli("train", "ten.txt", *TRAIN, "--out", "short"), "8 tokens", "--seq-len 8")
    assert not (tmp_path / "short").exists()


@pytest.mark.skipif(not os.path.isfile("/bin/ls"), reason="needs an ELF binary at /bin/ls")
def test_a_binary_file_is_refused_unless_errors_replace(run_cli, tmp_path):
    raw = Path("/bin/ls").read_bytes()
    with pytest.raises(UnicodeDecodeError) as e:
        raw.decode("utf-8")
    err = failed(run_cli("train", "/bin/ls", *TRAIN, "--out", "run"), "/bin/ls is not text: it looks like an executable",
                 f"bad byte 0x{raw[e.value.start]:02x} at offset {e.value.start}", "--errors replace")
    assert len(err) < 300
    assert not (tmp_path / "run").exists()
    ok(run_cli("train", "/bin/ls", *TRAIN, "--out", "run", "--errors", "replace"))
    ck = checkpoint.load(tmp_path / "run" / "latest.npz")
    assert {"\ufffd", "\x00", "E", "L", "F"} <= set(ck.vocab.tokens)
    ok(run_cli("sample", "--model", "run", "--length", "20", "--seed", "0"))


def test_invalid_utf8_in_the_validation_file(run_cli, tmp_path):
    (tmp_path / "val.txt").write_bytes(b"fine text\nthen \xc3\x28 broken\n")
    failed(run_cli("train", TINY, *TRAIN, "--val", "val.txt", "--out", "run"),
           "val.txt is not valid utf-8", "0xc3 at offset 15")
    assert not (tmp_path / "run").exists()


def test_bom_crlf_and_cr_line_ends_are_normalised(run_cli, tmp_path):
    body = "line one\r\nline two\rline three\n" * 40
    (tmp_path / "dos.txt").write_bytes(b"\xef\xbb\xbf" + body.encode())
    ok(run_cli("train", "dos.txt", *TRAIN, "--out", "run"))
    ck, ids = run_ids(tmp_path / "run")
    assert "\r" not in ck.vocab.tokens and "\ufeff" not in ck.vocab.tokens
    assert ck.vocab.decode(ids) == body.replace("\r\n", "\n").replace("\r", "\n")


def test_a_crlf_split_across_read_chunks_is_one_line_end(tmp_path):
    """The streaming reader cuts the file into pieces; a CR at the end of one and its LF at the
    start of the next must still be one line end."""
    from charlm.data import iter_text
    p = tmp_path / "dos.txt"
    p.write_bytes(b"ab\r\ncd\r\n" * 3)
    for chunk in range(1, 9):
        assert "".join(iter_text(str(p), chunk_bytes=chunk)) == "ab\ncd\n" * 3, chunk


def test_nul_bytes_are_ordinary_characters(run_cli, tmp_path):
    text = "ab\x00cd\x00\x00 ef\n" * 200
    (tmp_path / "nul.txt").write_text(text)
    ok(run_cli("train", "nul.txt", *TRAIN, "--out", "run"))
    ck, ids = run_ids(tmp_path / "run")
    assert "\x00" in ck.vocab.tokens
    assert ck.vocab.decode(ids) == text
    (tmp_path / "q.txt").write_text("a\x00b\n\x00\n")
    r = json.loads(ok(run_cli("score", "--file", "q.txt", "--model", "run", "--json")).stdout)
    assert [t["n_tokens"] for t in r["texts"]] == [4, 2] and r["total"]["oov"] == 0
    assert "".join(t["token"] for t in r["texts"][0]["tokens"]) == "a\x00b\n"
    out = ok(run_cli("sample", "--model", "run", "--length", "30", "--seed", "1", "--temp", "2")).stdout
    assert set(out) <= set(ck.vocab.tokens)


def test_mixed_scripts_and_emoji_train_sample_and_score(run_cli, tmp_path):
    text = MIXED * 20
    (tmp_path / "mixed.txt").write_text(text, encoding="utf-8")
    ok(run_cli("train", "mixed.txt", *TRAIN, "--out", "run"))
    ck, ids = run_ids(tmp_path / "run")
    assert set(ck.vocab.tokens) == set(MIXED)
    assert ck.vocab.decode(ids) == text
    out = ok(run_cli("sample", "--model", "run", "--length", "200", "--seed", "3", "--temp", "3")).stdout
    assert len(out) == 201 and set(out) <= set(MIXED)
    primed = ok(run_cli("sample", "--model", "run", "--length", "5", "--seed", "3", "--prime", "🇳🇿👩\u200d💻")).stdout
    assert primed.startswith("🇳🇿👩\u200d💻") and len(primed) == 5 + 5 + 1
    for line in MIXED.splitlines():
        r = json.loads(ok(run_cli("score", line, "--model", "run", "--json")).stdout)
        assert "".join(t["token"] for t in r["tokens"]) == line + "\n"
        assert r["oov"] == 0 and r["n_tokens"] == len(line) + 1
        assert r["logprob"] == pytest.approx(math.fsum(t["logprob"] for t in r["tokens"]), rel=1e-9)
    e = json.loads(ok(run_cli("eval", "mixed.txt", "--model", "run", "--json")).stdout)
    assert e["n_tokens"] == len(text) and e["oov"] == 0


def _one_long_line(path: Path, n: int):
    unit = "the quick brown fox jumps over the lazy dog; " * 1000
    with open(path, "w", encoding="ascii") as f:
        for _ in range(n // len(unit)):
            f.write(unit)
        f.write(unit[: n % len(unit)])


def _train_a_long_line(run_cli, tmp_path, n: int):
    """Train two steps on one line of n characters; the Python heap must stay within a small
    multiple of the text (the reader holds a piece of it while decoding; encoding goes by blocks)."""
    _one_long_line(tmp_path / "line.txt", n)
    ok(run_cli("train", TINY, *TRAIN, "--out", "warm-up"))  # imports and kernels: not part of the measure
    tracemalloc.start()
    try:
        with time_limit(60 + n / 1e6):
            res = run_cli("train", "line.txt", "--steps", "2", "--hidden", "8", "--layers", "1", "--embed", "4",
                          "--seq-len", "64", "--batch", "32", "--val-frac", "0.01", "--json", "--threads", "1",
                          "--out", "run")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    ok(res)
    assert json_lines(res.stdout)[-1]["steps"] == 2
    ck = checkpoint.load(tmp_path / "run" / "latest.npz")
    assert ck.data["n_tokens"] == n
    assert peak < 3 * n, f"peak Python memory {peak / n:.1f} x the text"
    print(f"peak Python memory: {peak / n:.2f} x the text")


@contextlib.contextmanager
def time_limit(seconds: float):
    """Fail (instead of hanging the test run) if the block takes longer than seconds."""
    def expired(signum, frame):
        raise TimeoutError(f"took more than {seconds:g} s")
    old = signal.signal(signal.SIGALRM, expired)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_a_100_mb_single_line_trains_without_copies_of_the_text(run_cli, tmp_path):
    _train_a_long_line(run_cli, tmp_path, 100_000_000)


# --------------------------------------------------------- paths that are not files
def _charlm(*args, cwd, timeout=60, env=None, input=None) -> subprocess.CompletedProcess:
    """python -m charlm in a subprocess: a hang fails the test instead of freezing it."""
    e = {k: v for k, v in os.environ.items() if k != "CHARLM_DEBUG"}
    e.update({k: v for k, v in env_plain().items() if v is not None})
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "charlm", *args], cwd=cwd, env=e, capture_output=True,
                          timeout=timeout, input=input)


def one_error_line(res: subprocess.CompletedProcess, *needles) -> str:
    assert res.returncode == 1
    err = res.stderr.decode().strip()
    assert "\n" not in err and err.startswith("error:"), err
    for n in needles:
        assert n in err, (n, err)
    return err


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_a_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "run").mkdir()
    checkpoint.save(make_checkpoint(), tmp_path / "run" / "best.npz")
    for args in (["train", "pipe", *TRAIN], ["train", str(TINY), *TRAIN, "--val", "pipe"],
                 ["score", "--file", "pipe", "--model", "run"], ["eval", "pipe", "--model", "run"]):
        one_error_line(_charlm(*args, cwd=tmp_path), "pipe", "not a regular file")
    assert not (tmp_path / "models").exists()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads any file")
def test_an_unreadable_corpus_or_validation_file(run_cli, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text(tiny_text())
    secret.chmod(0)
    try:
        failed(run_cli("train", "secret.txt", *TRAIN), "permission denied", "secret.txt")
        failed(run_cli("train", TINY, *TRAIN, "--val", "secret.txt"), "permission denied", "secret.txt")
        assert not (tmp_path / "models").exists()
    finally:
        secret.chmod(stat.S_IRUSR | stat.S_IWUSR)


def test_an_output_folder_that_is_a_file_or_cannot_be_made(run_cli, tmp_path):
    (tmp_path / "taken").write_text("not a folder")
    failed(run_cli("train", TINY, *TRAIN, "--out", "taken"), "cannot create output folder taken")
    assert (tmp_path / "taken").read_text() == "not a folder"
    if os.path.isdir("/proc/self"):  # nobody, root included, can make folders in /proc
        failed(run_cli("train", TINY, *TRAIN, "--out", "/proc/charlm-test/run"),
               "cannot create output folder /proc/charlm-test/run")


def test_a_new_run_does_not_overwrite_another_runs_checkpoints(run_cli, tmp_path):
    ok(run_cli("train", TINY, *TRAIN, "--out", "run"))
    before = (tmp_path / "run" / "latest.npz").read_bytes()
    (tmp_path / "other.txt").write_text("another text entirely, to learn instead\n" * 20)
    failed(run_cli("train", "other.txt", *TRAIN, "--out", "run"), "run", "--resume")
    assert (tmp_path / "run" / "latest.npz").read_bytes() == before


# ------------------------------------------------------- sample and score input
@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    run = tmp_path_factory.mktemp("model")
    train_tiny(run, cell="gru", steps=3)
    return run


def test_a_prime_of_only_unknown_characters(run_cli, model_dir):
    res = ok(run_cli("sample", "--model", model_dir, "--length", "10", "--seed", "0", "--prime", "ZQ☃😀"))
    assert res.stdout.startswith("ZQ☃😀") and len(res.stdout) == 4 + 10 + 1
    assert "4 prime character(s) not in the model's vocabulary were skipped" in res.stderr
    plain = ok(run_cli("sample", "--model", model_dir, "--length", "10", "--seed", "0")).stdout
    assert res.stdout[4:] == plain  # nothing of the prime was fed: the same text as without one


def test_an_empty_prime(run_cli, model_dir):
    res = ok(run_cli("sample", "--model", model_dir, "--length", "7", "--seed", "0", "--prime", ""))
    assert len(res.stdout) == 8 and res.stderr == ""


def test_score_of_only_unknown_characters_and_of_the_empty_string(run_cli, model_dir):
    r = json.loads(ok(run_cli("score", "ZQ☃😀", "--model", model_dir, "--json")).stdout)
    empty = json.loads(ok(run_cli("score", "", "--model", model_dir, "--json")).stdout)
    assert r["oov"] == 4 and r["n_tokens"] == 1 and [t["token"] for t in r["tokens"]] == ["\n"]
    assert r["logprob"] == empty["logprob"] and empty["n_tokens"] == 1 and empty["oov"] == 0
    # no factor at all is no perplexity (not a perfect 1.0), as eval says of an empty file (issue 18)
    failed(run_cli("score", "", "--model", model_dir, "--json", "--no-eos"), "nothing to score")
    table = ok(run_cli("score", "☃", "--model", model_dir)).stdout
    assert "OOV = 1" in table


def test_eval_of_a_file_with_nothing_to_score(run_cli, model_dir, tmp_path):
    """An empty file has no perplexity (it is not a perfect 1.0)."""
    (tmp_path / "empty.txt").write_bytes(b"")
    failed(run_cli("eval", "empty.txt", "--model", model_dir, "--json"), "nothing to evaluate", "empty.txt is empty")
    # a line of unknown characters still has its end of line to score (one <eos> per line)
    (tmp_path / "oov.txt").write_text("ZQZ")
    r = json.loads(ok(run_cli("eval", "oov.txt", "--model", model_dir, "--json")).stdout)
    assert (r["n_tokens"], r["oov"]) == (1, 3)


@pytest.mark.parametrize("command", [["score", "--file", "bad.txt"], ["eval", "bad.txt"]])
def test_invalid_utf8_at_score_and_eval_time(run_cli, model_dir, tmp_path, command):
    (tmp_path / "bad.txt").write_bytes(b"good\nbad \xff\n")
    failed(run_cli(*command, "--model", model_dir), "bad.txt is not valid utf-8", "0xff at offset 9")


@pytest.mark.parametrize("n", [100_000, pytest.param(1_000_000, marks=pytest.mark.slow)], ids=["100kB", "1MB"])
def test_score_and_eval_of_a_long_line(run_cli, model_dir, tmp_path, n):
    """One line of n characters. (1 MB is slow only because single-stream scoring runs at
    ~30 us/token on two Numba threads, against ~0.3 us/token on one: see the report.)"""
    text = (tiny_text().replace("\n", " ") * (n // 2000 + 1))[:n]
    (tmp_path / "big.txt").write_text(text + "\n")
    with time_limit(600):
        r = json.loads(ok(run_cli("score", "--file", "big.txt", "--model", model_dir, "--json")).stdout)
        e = json.loads(ok(run_cli("eval", "big.txt", "--model", model_dir, "--json")).stdout)
    assert r["n_tokens"] == n + 1 and r["oov"] == 0 and len(r["tokens"]) == n + 1
    assert math.isfinite(r["logprob"])
    assert e["n_tokens"] == n + 1
    assert e["logprob"] == pytest.approx(r["logprob"], rel=1e-6)


def test_score_of_a_model_with_extreme_weights_is_not_a_crash(run_cli, tmp_path):
    """make_checkpoint puts float32 max into a decoder bias: log-probabilities near -3.4e38. The
    perplexity overflows a float; that is an infinite perplexity, not an OverflowError."""
    checkpoint.save(make_checkpoint(), tmp_path / "hand.npz")
    r = json.loads(ok(run_cli("score", "hello", "--model", "hand.npz", "--json")).stdout)
    assert r["perplexity"] is None and r["logprob"] < -1e38  # infinite: null in strict JSON
    assert "perplexity = inf" in ok(run_cli("score", "hello", "--model", "hand.npz")).stdout
    (tmp_path / "h.txt").write_text("hello\n")
    # --json stays strict JSON: a non-finite number is null
    assert json.loads(ok(run_cli("eval", "h.txt", "--model", "hand.npz", "--json")).stdout)["perplexity"] is None


def test_command_line_bytes_that_are_not_utf8(tmp_path):
    """Undecodable argv bytes reach Python as lone surrogates; echoing the prime and listing OOV
    characters must not crash, even where stdout is strict UTF-8 (e.g. an en_US.UTF-8 locale)."""
    checkpoint.save(make_checkpoint(), tmp_path / "hand.npz")
    strict = {"PYTHONIOENCODING": "utf-8:strict"}
    res = _charlm(b"sample", b"--model", b"hand.npz", b"--prime", b"h\xffe", b"--length", b"3", b"--seed", b"0",
                  cwd=tmp_path, env=strict)
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(b"h\xffe") and len(res.stdout) == 3 + 3 + 1
    assert b"skipped" in res.stderr
    res = _charlm(b"score", b"ab\xffc", b"--model", b"hand.npz", cwd=tmp_path, env=strict)
    assert res.returncode == 0, res.stderr
    assert b"OOV = 4" in res.stdout


@pytest.fixture
def future_checkpoint(tmp_path) -> Path:
    """A trained run whose latest and best checkpoints claim format version 2."""
    run = tmp_path / "future"
    train_tiny(run, steps=2)
    for name in ("latest.npz", "best.npz"):
        rewrite_with_meta(run / name, run / name, lambda meta, arrays: meta.update(version=2))
    return run


@pytest.mark.parametrize("command", [
    ["sample"], ["score", "hello"], ["eval", str(TINY)]])
def test_a_checkpoint_of_another_format_version_at_sample_and_score_time(run_cli, future_checkpoint, command):
    failed(run_cli(*command, "--model", future_checkpoint), "format version 2", "this charlm reads version 1")


@pytest.mark.parametrize("flags", [["--resume", "future"], [str(TINY), "--init-from", "future"]])
def test_a_checkpoint_of_another_format_version_for_training(run_cli, future_checkpoint, flags):
    failed(run_cli("train", *flags, "--steps", "1"), "format version 2", "this charlm reads version 1")


# ------------------------------------------------------------- properties
def _char_model(cell: str) -> tuple[Model, Vocab]:
    vocab = Vocab.from_text(tiny_text() + "😀")
    cfg = ModelConfig(cell=cell, vocab_size=len(vocab), embed=4, hidden=8, layers=2)
    return Model.create(cfg, seed=1), vocab


def _word_model() -> tuple[Model, Vocab]:
    vocab = Vocab.words_from_text((DATA / "words.txt").read_text(encoding="utf-8"))
    cfg = ModelConfig(cell="lstm", vocab_size=len(vocab), embed=4, hidden=8, layers=1)
    return Model.create(cfg, seed=1), vocab


MODELS = {"char-gru": _char_model("gru"), "char-rnn": _char_model("rnn"), "word-lstm": _word_model()}
QUICK = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@QUICK
@given(name=st.sampled_from(sorted(MODELS)), text=st.text(), eos=st.booleans())
def test_score_takes_any_string(name, text, eos):
    model, vocab = MODELS[name]
    r = score_text(model, vocab, text, eos=eos)
    ids, oov = vocab.encode(text)
    assert r["n_tokens"] == len(ids) + eos == len(r["tokens"])
    assert r["oov"] == len(oov)
    assert all(math.isfinite(t["logprob"]) and t["logprob"] <= 0 for t in r["tokens"])
    assert r["logprob"] == pytest.approx(math.fsum(t["logprob"] for t in r["tokens"]), rel=1e-9, abs=1e-9)
    assert r["perplexity"] >= 1.0 or r["n_tokens"] == 0


@QUICK
@given(name=st.sampled_from(sorted(MODELS)), prime=st.text(), length=st.integers(1, 70),
       seed=st.integers(0, 2 ** 32 - 1), greedy=st.booleans(), top_k=st.integers(0, 5))
def test_sample_takes_any_prime(name, prime, length, seed, greedy, top_k):
    model, vocab = MODELS[name]
    kw = dict(prime=prime, seed=seed, greedy=greedy, top_k=top_k)
    out = "".join(generate(model, vocab, length, **kw))
    assert out == "".join(generate(model, vocab, length, **kw))  # the seed decides
    if vocab.level == "char":
        assert len(out) == length and set(out) <= set(vocab.tokens)
    else:
        assert len(out.split()) + out.count("\n") == length
