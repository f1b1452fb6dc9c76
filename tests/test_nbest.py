"""Rescoring (issue 16): Kaldi n-best lists, one line per text for several texts, `score -` read
and printed line by line with flat memory, and texts scored side by side giving the numbers of
one at a time."""
from __future__ import annotations

import json
import os
import queue
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import numpy as np
import pytest

from charlm.config import ModelConfig
from charlm.data import Vocab
from charlm.lm import checkpoint
from charlm.lm.api import LanguageModel
from charlm.lm.model import param_shapes
from helpers import failed, ok

WORDS = ("<eos>", "<unk>", "the", "cat", "sat", "on", "mat", "a", "dog")
NBEST = """utt1-1 the cat sat on the mat
utt1-2 the cat sat on a mat
utt1-3 a dog sat
utt2-1 the zebra
utt2-2
"""


def hand_model(level="word", scale=0.8, seed=0) -> LanguageModel:
    rng = np.random.default_rng(seed)
    vocab = Vocab(WORDS, "word") if level == "word" else Vocab.from_text("the cat sat on a mat\n")
    cfg = ModelConfig(cell="lstm", vocab_size=len(vocab), embed=4, hidden=10, layers=2)
    params = {n: np.ascontiguousarray(scale * rng.standard_normal(s), dtype=np.float32)
              for n, s in param_shapes(cfg).items()}
    return LanguageModel(checkpoint.Checkpoint(model=cfg, vocab=vocab, params=params))


@pytest.fixture(params=["word", "char"])
def lm(request):
    return hand_model(request.param)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "w.npz"
    checkpoint.save(hand_model("word")._ckpt, path)
    return str(path)


def test_side_by_side_gives_the_numbers_of_one_at_a_time(lm):
    lines = ["the cat sat", "", "a dog sat on the mat the cat", "zebra the", "ca t\u2603", "mat"] * 5
    one = [lm.score(t) for t in lines]
    for batch in (1, 4, 64):
        got = list(lm.score_lines(lines, batch=batch))
        assert len(got) == len(lines)
        for g, o in zip(got, one):
            assert "tokens" not in g
            assert (g["n_tokens"], g["oov"]) == (o["n_tokens"], o["oov"])
            assert g["logprob"] == pytest.approx(o["logprob"], rel=1e-6, abs=1e-9)
            assert g["perplexity_excl_oov"] == pytest.approx(o["perplexity_excl_oov"], rel=1e-6)
    no_eos = list(lm.score_lines(lines, eos=False))
    # score() refuses a text with no factor at all (""), score_many() scores each line as the CLI does
    assert [r["n_tokens"] for r in no_eos] == [r["n_tokens"] for r in lm.score_many(lines, eos=False)["texts"]]


def test_rescore_nbest_is_kaldi_cost(lm):
    got = list(lm.rescore_nbest(NBEST.splitlines(), batch=2))
    assert [r["id"] for r in got] == ["utt1-1", "utt1-2", "utt1-3", "utt2-1", "utt2-2"]
    for r, line in zip(got, NBEST.splitlines()):
        text = line.split(None, 1)[1] if " " in line else ""
        assert r["cost"] == pytest.approx(-lm.score(text)["logprob"], rel=1e-6)
        assert r["cost"] > 0


def test_score_nbest_command(run_cli, tmp_path, model_file):
    (tmp_path / "nbest.txt").write_text(NBEST)
    lm = charlm_load(model_file)
    res = ok(run_cli("score", "--nbest", "nbest.txt", "--model", model_file))
    lines = res.stdout.splitlines()
    assert [line.split()[0] for line in lines] == ["utt1-1", "utt1-2", "utt1-3", "utt2-1", "utt2-2"]
    for line, src in zip(lines, NBEST.splitlines()):
        uid, cost = line.split()
        text = src.split(None, 1)[1] if " " in src else ""
        assert float(cost) == pytest.approx(-lm.score(text)["logprob"], abs=1e-4)
        assert cost == f"{float(cost):.4f}"
    piped = ok(run_cli("score", "--nbest", "-", "--model", model_file, input=NBEST)).stdout
    assert piped == res.stdout
    js = [json.loads(line) for line in ok(run_cli("score", "--nbest", "nbest.txt", "--model", model_file,
                                                  "--json")).stdout.splitlines()]
    assert [j["id"] for j in js] == [line.split()[0] for line in lines]
    (tmp_path / "empty.txt").write_text("")
    failed(run_cli("score", "--nbest", "empty.txt", "--model", model_file), "empty")
    failed(run_cli("score", "hi", "--nbest", "nbest.txt", "--model", model_file), "not both")


def charlm_load(path):
    from charlm.lm.api import load
    return load(path)


def test_score_file_prints_one_line_per_text_then_totals(run_cli, tmp_path, model_file):
    (tmp_path / "f.txt").write_text("the cat sat\na zebra\n\n")
    out = ok(run_cli("score", "--file", "f.txt", "--model", model_file)).stdout.splitlines()
    assert out[0].split() == ["ln", "P", "log10", "P", "tokens", "OOV", "perplexity", "text"]
    assert out[1].split()[-3:] == ["the", "cat", "sat"] and out[2].split()[-2:] == ["a", "zebra"]
    assert out[4].startswith("total over 3 texts") and out[5].startswith("Perplexity including OOVs")
    js = json.loads(ok(run_cli("score", "--file", "f.txt", "--model", model_file, "--json")).stdout)
    for line, t in zip(out[1:4], js["texts"]):
        assert float(line.split()[0]) == pytest.approx(t["logprob"], abs=1e-4)
        assert int(line.split()[2]) == t["n_tokens"] and int(line.split()[3]) == t["oov"]
    verbose = ok(run_cli("score", "--file", "f.txt", "--model", model_file, "--verbose")).stdout
    assert verbose.count("Total (log10 P)") == 3
    assert ok(run_cli("score", "-", "--model", model_file, input="the cat sat\na zebra\n\n")).stdout.splitlines() == out


REPO = str(Path(__file__).resolve().parents[1])


def _charlm_cmd(*args):
    """This checkout's charlm (not whichever is installed), as a command line."""
    code = f"import sys; sys.path.insert(0, {REPO!r}); from charlm.cli.app import main; sys.argv[0] = 'charlm'; main()"
    return [sys.executable, "-c", code, *args]


def test_score_stdin_prints_each_line_before_the_next_is_read(tmp_path, model_file):
    env = {**os.environ, "NO_COLOR": "1", "TERM": "dumb"}
    p = subprocess.Popen(_charlm_cmd("score", "-", "--model", model_file), stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=tmp_path)
    lines: queue.Queue = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(x) for x in p.stdout], daemon=True)
    reader.start()
    try:
        p.stdin.write("the cat sat\n")
        p.stdin.flush()
        header = lines.get(timeout=120)
        first = lines.get(timeout=60)  # arrives while standard input is still open
        assert "ln P" in header and first.rstrip().endswith("the cat sat")
        p.stdin.write("a dog\n")
        p.stdin.close()
        p.wait(timeout=60)
        reader.join(timeout=10)
        rest = "".join(lines.get(timeout=5) for _ in range(lines.qsize()))
        assert rest.splitlines()[0].rstrip().endswith("a dog") and "total over 2 texts" in rest
    finally:
        p.kill()
        p.wait()


def _max_rss_mb(tmp_path, model_file, line_chars: int) -> float:
    """Peak resident memory (MB) of `charlm score -` on one line of line_chars characters, measured
    as the largest child of a fresh interpreter (RUSAGE_CHILDREN of this process would include
    every earlier test's children)."""
    big = tmp_path / f"line{line_chars}.txt"
    big.write_text(("the cat sat on a mat " * (line_chars // 21 + 1))[:line_chars] + "\n")
    probe = textwrap.dedent(f"""
        import resource, subprocess, sys
        with open({str(big)!r}, "rb") as f:
            r = subprocess.run({_charlm_cmd("score", "-", "--model", model_file, "--threads", "1")!r},
                               stdin=f, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        assert r.returncode == 0, r.stderr
        sys.stdout.write(r.stdout.decode().splitlines()[1][:40] + "\\n")
        print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    """)
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert res.returncode == 0, res.stderr
    return float(res.stdout.splitlines()[-1])


def test_score_of_one_long_line_from_stdin_keeps_memory_flat(tmp_path):
    """Issue 18 measured 6.7 GB resident for one 10 MB line: per-token dicts of the whole input.
    Only totals are printed now, and they are summed window by window."""
    path = tmp_path / "c.npz"
    checkpoint.save(hand_model("char")._ckpt, path)
    small = _max_rss_mb(tmp_path, str(path), 1_000)
    big = _max_rss_mb(tmp_path, str(path), 2_000_000)
    assert big - small < 120, (small, big)  # the old path: ~1.3 GB more for 2 MB
