"""Decoding (issue 16): top-p, repetition penalty, stop strings, several samples side by side,
temperature 0, beam search (against greedy and against exhaustive search), and `charlm sample`'s
new flags. The draw kernel is checked against a plain NumPy reference."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest

from charlm.config import ModelConfig
from charlm.data import Vocab
from charlm.errors import CharlmError
from charlm.kernels import layers
from charlm.lm import checkpoint
from charlm.lm.api import LanguageModel
from charlm.lm.model import param_shapes
from helpers import failed, ok

V = 7


# ------------------------------------------------------------------ NumPy reference of the draw
def ref_probs(logits, temperature=1.0, top_k=0, top_p=1.0, penalty=1.0, seen=()):
    """HF's order: repetition penalty, temperature, top-k, top-p; the distribution drawn from."""
    x = np.asarray(logits, dtype=np.float64).copy()
    for v in seen:
        x[v] = x[v] * penalty if x[v] < 0 else x[v] / penalty
    if 0 < top_k < len(x):
        x = np.where(x >= np.sort(x)[len(x) - top_k], x, -np.inf)
    e = np.exp((x - x.max()) / temperature)
    p = e / e.sum()
    if top_p < 1:
        order = np.argsort(-p, kind="stable")
        csum = np.cumsum(p[order])
        n_keep = int(np.searchsorted(csum, top_p - 1e-12)) + 1
        keep = np.zeros(len(p), bool)
        keep[p >= p[order[n_keep - 1]]] = True
        p = np.where(keep, p, 0.0)
        p /= p.sum()
    return p


def pick(logits, temperature=1.0, top_k=0, top_p=1.0, penalty=1.0, seen=(), greedy=False, u=0.5):
    s = np.zeros(len(logits), np.uint8)
    s[list(seen)] = 1
    Vn = len(logits)
    return layers.pick_token(np.asarray(logits, np.float32), s, temperature, top_k, top_p, penalty, greedy, u,
                             np.empty(Vn), np.empty(Vn))


@pytest.mark.parametrize("temperature,top_k,top_p,penalty", [
    (1.0, 0, 0.5, 1.0), (0.7, 0, 0.9, 1.0), (1.0, 4, 0.8, 1.0), (1.0, 0, 1.0, 1.8), (0.8, 5, 0.7, 1.3)])
def test_pick_token_matches_the_reference_distribution(rng, temperature, top_k, top_p, penalty):
    logits = (1.5 * rng.standard_normal(V)).astype(np.float32)
    seen = (0, 2, 5)
    n = 4000
    counts = np.zeros(V)
    for u in (np.arange(n) + 0.5) / n:  # stratified: each bin's count is off by at most 1
        counts[pick(logits, temperature, top_k, top_p, penalty, seen, u=u)[0]] += 1
    expected = ref_probs(logits, temperature, top_k, top_p, penalty, seen)
    np.testing.assert_allclose(counts / n, expected, rtol=0, atol=1.5 / n)


def test_pick_token_logprob_is_the_unmodified_models_and_marks_seen(rng):
    logits = rng.standard_normal(V).astype(np.float32)
    s = np.zeros(V, np.uint8)
    tok, lp = layers.pick_token(logits, s, 0.5, 2, 0.5, 1.5, False, 0.3, np.empty(V), np.empty(V))
    x = logits.astype(np.float64)
    assert lp == pytest.approx(x[tok] - x.max() - np.log(np.exp(x - x.max()).sum()), rel=1e-12)
    assert s[tok] == 1 and s.sum() == 1


def test_repetition_penalty_changes_greedy_choice():
    logits = np.array([2.0, 1.9, -1.0, 0.5, 0.0, -3.0, 1.0], np.float32)
    assert pick(logits, greedy=True)[0] == 0
    assert pick(logits, greedy=True, penalty=1.2, seen=(0,))[0] == 1      # 2.0 / 1.2 < 1.9
    assert pick(logits, greedy=True, penalty=1.2, seen=(0, 1))[0] == 0    # 1.667 > 1.583


def test_top_p_tiny_keeps_only_the_most_likely(rng):
    logits = rng.standard_normal(V).astype(np.float32)
    best = int(np.argmax(logits))
    assert {pick(logits, top_p=1e-6, u=u)[0] for u in (0.0, 0.5, 0.999)} == {best}


# ------------------------------------------------------------------ models built by hand
def hand_model(cell="lstm", text="abcd\n", hidden=6, layers=1, scale=1.0, seed=0) -> LanguageModel:
    rng = np.random.default_rng(seed)
    vocab = Vocab.from_text(text)
    cfg = ModelConfig(cell=cell, vocab_size=len(vocab), embed=3, hidden=hidden, layers=layers)
    params = {n: np.ascontiguousarray(scale * rng.standard_normal(s), dtype=np.float32)
              for n, s in param_shapes(cfg).items()}
    return LanguageModel(checkpoint.Checkpoint(model=cfg, vocab=vocab, params=params))


@pytest.fixture(scope="module", params=["rnn", "gru", "lstm"])
def lm(request):
    return hand_model(request.param, text="the quick brown fox\n", hidden=16, layers=2, scale=0.8)


def test_temperature_zero_is_greedy(lm):
    assert lm.generate("th", 40, temperature=0) == lm.generate("th", 40, greedy=True)


def test_same_seed_same_samples(lm):
    kw = dict(prime="the", length=30, temperature=1.0, seed=5, top_p=0.9, repetition_penalty=1.3)
    assert lm.generate(**kw) == lm.generate(**kw)
    assert lm.sample(**kw, num_samples=4) == lm.sample(**kw, num_samples=4)
    assert lm.sample(**kw)[0]["text"] == lm.generate(**kw)  # one sample is generate's text


def test_sample_logprob_is_the_score_of_its_tokens(lm):
    for n in (1, 3):
        for r in lm.sample(length=25, temperature=1.5, seed=2, num_samples=n):
            assert r["n_tokens"] == 25 == len(r["tokens"]) == len(r["ids"])
            assert "".join(r["tokens"]) == r["text"]
            s = lm.score(r["text"], eos=False)
            assert r["logprob"] == pytest.approx(s["logprob"], rel=1e-4, abs=1e-4)


def test_several_samples_differ_and_follow_the_distribution(lm):
    rs = lm.sample(length=20, temperature=1.0, seed=0, num_samples=8)
    assert len(rs) == 8 and len({r["text"] for r in rs}) > 1
    # greedy samples side by side are all the greedy text
    g = lm.generate(length=20, greedy=True)
    assert {r["text"] for r in lm.sample(length=20, greedy=True, num_samples=3)} == {g}


@pytest.mark.parametrize("n", [1, 4])
def test_stop_strings_end_the_text(lm, n):
    rs = lm.sample(length=200, temperature=1.5, seed=3, stop=["o", "x"], num_samples=n)
    for r in rs:
        t = r["text"]
        assert not set(t[:-1]) & {"o", "x"}
        assert t[-1] in "ox" or r["n_tokens"] == 200
        assert "".join(r["tokens"]) == t
    text = lm.generate(length=200, temperature=1.5, seed=3, stop="o")
    assert "o" not in text[:-1] and (text.endswith("o") or len(text) == 200)


def test_stop_string_spanning_tokens_and_chunks():
    lm = hand_model(text="ab\n", scale=0.1)
    full = lm.generate(length=300, temperature=1.0, seed=1)
    i = full.find("ab", 70)  # ends past the first chunk of 64 tokens
    assert i > 0
    stop = full[i - 3:i + 2]
    first = full.find(stop)
    assert lm.generate(length=300, temperature=1.0, seed=1, stop=stop) == full[:first + len(stop)]


def test_bad_decoding_arguments_are_charlm_errors(lm):
    for kw in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(repetition_penalty=0),
               dict(top_k=-1), dict(stop=[""]), dict(num_samples=0)):
        with pytest.raises(CharlmError):
            lm.sample(length=5, **kw)
    with pytest.raises(CharlmError):
        lm.beam_search(length=5, beam=2, nbest=3)


# ------------------------------------------------------------------ beam search
def test_beam_one_is_greedy(lm):
    g = lm.sample(length=30, greedy=True)[0]
    b = lm.beam_search(length=30, beam=1)[0]
    assert b["text"] == g["text"]
    assert b["logprob"] == pytest.approx(g["logprob"], rel=1e-5)


@pytest.mark.parametrize("prime", ["", "the q"])
def test_beam_is_at_least_as_likely_as_greedy(lm, prime):
    g = lm.sample(prime, 25, greedy=True)[0]
    for k in (2, 4, 8):
        best = lm.beam_search(prime, 25, beam=k, nbest=min(k, 3))
        assert best[0]["logprob"] >= g["logprob"] - 1e-4  # float32 sums of two code paths
        assert [r["logprob"] for r in best] == sorted((r["logprob"] for r in best), reverse=True)
        assert len({r["text"] for r in best}) == len(best)


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_wide_beam_equals_exhaustive_search(cell):
    """Every continuation of 4 tokens over a vocabulary of 5, scored by the chain rule: a beam of
    125 keeps every prefix, so its top 3 are the exhaustive top 3."""
    lm = hand_model(cell, text="abcd\n", scale=1.5, seed=3)
    vocab, L = lm.vocab, 4
    seqs = list(itertools.product(range(len(vocab)), repeat=L))
    lps = [_chain(lm, seq) for seq in seqs]
    order = np.argsort(-np.array(lps), kind="stable")
    best = lm.beam_search("", L, beam=125, nbest=3)
    assert [r["ids"] for r in best] == [list(seqs[i]) for i in order[:3]]
    np.testing.assert_allclose([r["logprob"] for r in best], [lps[i] for i in order[:3]], rtol=1e-5)
    assert lm.beam_search("", L, beam=2)[0]["logprob"] <= best[0]["logprob"] + 1e-6


def _chain(lm, seq):
    """ln P of token ids seq after the begin context, by the model's own forward pass."""
    m = lm._model
    x = np.array([lm.vocab.eos_id, *seq[:-1]], dtype=np.int32)[:, None]
    y = np.array(seq, dtype=np.int32)[:, None]
    lp, _ = m.token_logprobs(x, y, m.zero_state(1))
    return float(lp.sum())


def test_beam_with_stop_strings_and_length_penalty(lm):
    rs = lm.beam_search("", 30, beam=6, nbest=4, stop=" ")
    assert 1 <= len(rs) <= 4
    for r in rs:
        assert r["text"].endswith(" ") or r["n_tokens"] == 30
        assert r["score"] == r["logprob"]
    lp = lm.beam_search("", 30, beam=6, nbest=4, stop=" ", length_penalty=1.0)
    assert all(r["score"] == pytest.approx(r["logprob"] / r["n_tokens"]) for r in lp)
    assert [r["score"] for r in lp] == sorted((r["score"] for r in lp), reverse=True)


# ------------------------------------------------------------------ the command line
@pytest.fixture
def model_file(tmp_path):
    lm = hand_model("gru", text="the quick brown fox\n", hidden=16, layers=1, scale=0.8)
    path = tmp_path / "m.npz"
    checkpoint.save(lm._ckpt, path)
    return str(path)


def test_sample_json_several_and_beam(run_cli, model_file):
    res = ok(run_cli("sample", "--model", model_file, "--length", "12", "--seed", "4", "--json", "-n", "3",
                     "--top-p", "0.9", "--repetition-penalty", "1.2", "--threads", "1"))
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert len(lines) == 3
    for r in lines:
        assert set(r) == {"text", "tokens", "ids", "logprob", "n_tokens"} and r["n_tokens"] == 12
    plain = ok(run_cli("sample", "--model", model_file, "--length", "12", "--seed", "4", "-n", "3",
                       "--top-p", "0.9", "--repetition-penalty", "1.2")).stdout
    assert plain.count("--- sample ") == 3
    for r in lines:
        assert f"ln P = {r['logprob']:.4f}, 12 tokens" in plain and r["text"] + "\n" in plain
    one = json.loads(ok(run_cli("sample", "--model", model_file, "--length", "12", "--seed", "4", "--json")).stdout)
    assert one["text"] + "\n" == ok(run_cli("sample", "--model", model_file, "--length", "12", "--seed", "4")).stdout
    beam = ok(run_cli("sample", "--model", model_file, "--length", "10", "--beam", "4", "--nbest", "2",
                      "--prime", "the")).stdout
    assert beam.count("--- continuation ") == 2 and beam.count("\nthe") + beam.startswith("the") >= 2
    greedy = ok(run_cli("sample", "--model", model_file, "--length", "10", "--greedy")).stdout
    assert ok(run_cli("sample", "--model", model_file, "--length", "10", "--temp", "0")).stdout == greedy
    stop = ok(run_cli("sample", "--model", model_file, "--length", "100", "--seed", "1", "--temp", "2",
                      "--stop", "o", "--stop", "\\n")).stdout
    assert stop.endswith(("o\n", "\n\n")) or len(stop) == 101


@pytest.mark.parametrize("args, needle", [
    (["--top-p", "0"], "--top-p"), (["--top-p", "1.5"], "--top-p"), (["--repetition-penalty", "0"], "--repetition-penalty"),
    (["-n", "0"], "--num-samples"), (["--beam", "-1"], "--beam"), (["--beam", "2", "--nbest", "3"], "--nbest"),
    (["--beam", "2", "-n", "2"], "not both")])
def test_sample_rejects_bad_decoding_flags(run_cli, model_file, args, needle):
    failed(run_cli("sample", "--model", model_file, *args), needle)
