"""Sampling and scoring at library level (charlm/sample.py, charlm/score.py) on a tiny
model trained for a few steps on tests/data/tiny.txt."""
import math

import numpy as np
import pytest

from charlm.lm import checkpoint
from charlm.config import ModelConfig
from charlm.data import Vocab
from charlm.errors import CharlmError
from charlm.lm.model import Model
from charlm.lm.sample import generate
from charlm.lm.score import LN2, LN10, corpus_total, score_text
from tests.helpers import tiny_text, train_tiny


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(model, vocab) of a tiny LSTM trained for a few steps, loaded back from its checkpoint."""
    run = tmp_path_factory.mktemp("run")
    events = train_tiny(run, cell="lstm", steps=4)
    done = events[-1]
    assert done["event"] == "done" and done["steps"] == 4
    ck = checkpoint.load(checkpoint.resolve(str(run)))
    return Model(ck.model, ck.params), ck.vocab


def _fresh(cell, seed=0):
    """An untrained model (no training needed) over the tiny text's vocabulary."""
    vocab = Vocab.from_text(tiny_text())
    cfg = ModelConfig(cell=cell, vocab_size=len(vocab), embed=4, hidden=8, layers=2)
    return Model.create(cfg, seed=seed), vocab


def _gen(model, vocab, length, **kw):
    return "".join(generate(model, vocab, length, **kw))


# --------------------------------------------------------------- sample
def test_same_seed_same_text_different_seed_different_text(trained):
    model, vocab = trained
    a = _gen(model, vocab, 60, temperature=1.0, seed=3)
    b = _gen(model, vocab, 60, temperature=1.0, seed=3)
    c = _gen(model, vocab, 60, temperature=1.0, seed=4)
    assert a == b
    assert a != c
    assert set(a) <= set(vocab.tokens)


@pytest.mark.parametrize("length", [1, 2, 17, 64, 65, 130])
def test_length_is_the_number_of_tokens(trained, length):
    model, vocab = trained
    chunks = list(generate(model, vocab, length, seed=0, chunk=16))
    assert len("".join(chunks)) == length
    assert all(0 < len(c) <= 16 for c in chunks)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_chunk_size_does_not_change_the_text(cell):
    """The uniforms are drawn per chunk; a generator's stream must not depend on how it is cut."""
    model, vocab = _fresh(cell)
    ref = _gen(model, vocab, 70, temperature=1.0, seed=11, chunk=64)
    for chunk in (1, 3, 7, 70, 1000):
        assert _gen(model, vocab, 70, temperature=1.0, seed=11, chunk=chunk) == ref, chunk


def test_greedy_ignores_the_seed_and_equals_a_near_zero_temperature(trained):
    model, vocab = trained
    g = _gen(model, vocab, 80, greedy=True, seed=1)
    assert g == _gen(model, vocab, 80, greedy=True, seed=2)
    assert _gen(model, vocab, 80, temperature=1e-4, seed=5) == g


@pytest.mark.parametrize("temperature", [0.5, 1.0, 5.0])
def test_top_k_1_equals_greedy(trained, temperature):
    model, vocab = trained
    g = _gen(model, vocab, 50, greedy=True)
    assert _gen(model, vocab, 50, temperature=temperature, top_k=1, seed=9) == g


@pytest.mark.parametrize("prime", ["", "The ", "pear tree"])
def test_greedy_follows_the_models_argmax(trained, prime):
    """The compiled sampler against the model's own forward pass, token by token."""
    model, vocab = trained
    got = _gen(model, vocab, 25, greedy=True, prime=prime)
    ids, _ = vocab.encode(prime)
    feed = np.array([vocab.eos_id, *ids], dtype=np.int32)[:, None]
    state = model.zero_state(1)
    want = []
    for _ in range(25):
        probs, state = model.probs_last(feed, state)
        tok = int(np.argmax(probs[0]))
        want.append(vocab.tokens[tok])
        feed = np.array([[tok]], dtype=np.int32)
    assert got == "".join(want)


def test_top_k_only_draws_among_the_k_most_likely(trained):
    """After the begin-of-text context, every first token drawn with top_k=3 is one of the
    three most likely first tokens."""
    model, vocab = trained
    probs, _ = model.probs_last(np.array([[vocab.eos_id]], dtype=np.int32), model.zero_state(1))
    allowed = {vocab.tokens[i] for i in np.argsort(probs[0])[-3:]}
    firsts = {_gen(model, vocab, 1, temperature=3.0, top_k=3, seed=s) for s in range(60)}
    assert firsts <= allowed
    assert len(firsts) > 1  # a high temperature does spread over the allowed ones


def test_prime_characters_outside_the_vocabulary_are_skipped(trained):
    model, vocab = trained
    clean = "The old"
    dirty = "\u2603The\U0001F600 old\u00e9"
    assert vocab.encode(dirty)[0].tolist() == vocab.encode(clean)[0].tolist()
    assert _gen(model, vocab, 40, prime=dirty, seed=2) == _gen(model, vocab, 40, prime=clean, seed=2)


def test_the_prime_is_not_repeated(trained):
    model, vocab = trained
    assert len(_gen(model, vocab, 30, prime="The old man", seed=0)) == 30


@pytest.mark.parametrize("kw, match", [
    (dict(length=0), "--length"), (dict(length=-3), "--length"),
    (dict(length=5, temperature=-1.0), "--temp"),
    (dict(length=5, top_k=-1), "--top-k")])
def test_generate_rejects_bad_arguments(trained, kw, match):
    model, vocab = trained
    length = kw.pop("length")
    with pytest.raises(CharlmError, match=match):
        _gen(model, vocab, length, **kw)


def test_greedy_accepts_a_zero_temperature(trained):
    model, vocab = trained
    assert len(_gen(model, vocab, 5, greedy=True, temperature=0.0)) == 5


# ---------------------------------------------------------------- score
TEXT = "The old man laughed."


def test_score_totals_are_consistent(trained):
    model, vocab = trained
    r = score_text(model, vocab, TEXT)
    lps = [t["logprob"] for t in r["tokens"]]
    n = r["n_tokens"]
    assert n == len(TEXT) + 1 == len(lps)
    assert r["logprob"] == pytest.approx(math.fsum(lps), rel=1e-12)
    assert r["logprob"] < 0
    assert r["log10prob"] == pytest.approx(r["logprob"] / math.log(10), rel=1e-12)
    assert r["perplexity"] == pytest.approx(math.exp(-r["logprob"] / n), rel=1e-12)
    assert r["bits_per_token"] == pytest.approx(-r["logprob"] / math.log(2) / n, rel=1e-12)
    for t in r["tokens"]:
        assert t["prob"] == pytest.approx(math.exp(t["logprob"]), rel=1e-12)
        assert 0 < t["prob"] <= 1
        assert vocab.tokens[t["id"]] == t["token"]
    assert LN10 == pytest.approx(math.log(10)) and LN2 == pytest.approx(math.log(2))


def test_score_tokens_are_the_text_then_the_end(trained):
    model, vocab = trained
    r = score_text(model, vocab, TEXT)
    assert "".join(t["token"] for t in r["tokens"]) == TEXT + "\n"
    assert r["tokens"][-1]["token"] == "\n"
    r2 = score_text(model, vocab, TEXT, eos=False)
    assert "".join(t["token"] for t in r2["tokens"]) == TEXT
    assert r2["n_tokens"] == len(TEXT)
    # leaving out the end factor changes nothing before it
    for a, b in zip(r["tokens"], r2["tokens"]):
        assert a["logprob"] == pytest.approx(b["logprob"], rel=1e-12, abs=1e-12)
    assert r2["logprob"] == pytest.approx(r["logprob"] - r["tokens"][-1]["logprob"], rel=1e-9)


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("text", ["The old man laughed.", "a", "pears\nand bread"])
def test_score_equals_minus_the_training_loss(cell, text):
    """log P(text + end) from score_text == -(mean loss * T) of Model.loss on x = [eos] + ids,
    y = ids + [eos], both from the zero state."""
    model, vocab = _fresh(cell, seed=1)
    ids, oov = vocab.encode(text)
    assert not oov
    x = np.array([vocab.eos_id, *ids], dtype=np.int32)[:, None]
    y = np.array([*ids, vocab.eos_id], dtype=np.int32)[:, None]
    T = len(x)
    loss, _ = model.loss(x, y, model.zero_state(1))
    r = score_text(model, vocab, text)
    assert r["n_tokens"] == T
    assert r["logprob"] == pytest.approx(-loss * T, rel=1e-4)


def test_score_equals_minus_the_training_loss_of_the_trained_model(trained):
    model, vocab = trained
    ids, _ = vocab.encode(TEXT)
    x = np.array([vocab.eos_id, *ids], dtype=np.int32)[:, None]
    y = np.array([*ids, vocab.eos_id], dtype=np.int32)[:, None]
    loss, _ = model.loss(x, y, model.zero_state(1))
    assert score_text(model, vocab, TEXT)["logprob"] == pytest.approx(-loss * len(x), rel=1e-4)


@pytest.mark.parametrize("window", [1, 3, 7])
def test_score_does_not_depend_on_the_window(trained, window):
    model, vocab = trained
    a = score_text(model, vocab, TEXT)
    b = score_text(model, vocab, TEXT, window=window)
    np.testing.assert_allclose([t["logprob"] for t in b["tokens"]], [t["logprob"] for t in a["tokens"]],
                               rtol=1e-5, atol=1e-6)


def test_oov_characters_are_counted_and_left_out(trained):
    model, vocab = trained
    dirty = "\u2603The old\U0001F600 man laughed.\u2603"
    assert "\u2603" not in vocab.tokens and "\U0001F600" not in vocab.tokens
    r = score_text(model, vocab, dirty)
    clean = score_text(model, vocab, TEXT)
    assert r["oov"] == 3
    assert r["oov_tokens"] == sorted({"\u2603", "\U0001F600"})
    assert r["n_tokens"] == clean["n_tokens"]
    assert r["logprob"] == pytest.approx(clean["logprob"], rel=1e-12)
    assert clean["oov"] == 0 and clean["oov_tokens"] == []


def test_empty_text_scores_only_the_end_factor(trained):
    model, vocab = trained
    r = score_text(model, vocab, "")
    assert r["n_tokens"] == 1
    assert [t["token"] for t in r["tokens"]] == ["\n"]
    eos = np.array([[vocab.eos_id]], dtype=np.int32)
    lp, _ = model.token_logprobs(eos, eos, model.zero_state(1))
    assert r["logprob"] == pytest.approx(float(lp[0, 0]), rel=1e-9)
    assert r["perplexity"] == pytest.approx(math.exp(-r["logprob"]), rel=1e-12)
    r2 = score_text(model, vocab, "", eos=False)
    assert r2["n_tokens"] == 0 and r2["logprob"] == 0.0 and r2["tokens"] == []


def test_a_likelier_text_scores_higher_after_learning_it():
    """Not a number check: after a model learns a repeated phrase, that phrase outscores its
    reverse (the scorer reads the model's probabilities the right way round)."""
    from charlm.config import TrainConfig
    from charlm.lm.train import train
    import tempfile
    phrase = "abcab cab abc\n"
    with tempfile.TemporaryDirectory() as d:
        events = list(train(phrase * 40, ModelConfig(cell="gru", embed=4, hidden=12, layers=1),
                            TrainConfig(seq_len=8, batch=4, steps=80, lr=1e-2, eval_every=1000), d,
                            sample_chars=0))
        ck = checkpoint.load(events[-1]["latest"])
    model = Model(ck.model, ck.params)
    fwd = score_text(model, ck.vocab, "abcab cab abc")
    rev = score_text(model, ck.vocab, "cba bac bacba")
    assert fwd["n_tokens"] == rev["n_tokens"]
    assert fwd["logprob"] > rev["logprob"]


def test_corpus_total_sums_the_texts(trained):
    model, vocab = trained
    texts = ["The boat.", "", "pears \u2603", "wind"]
    rs = [score_text(model, vocab, t) for t in texts]
    tot = corpus_total(rs)
    n = sum(r["n_tokens"] for r in rs)
    lp = math.fsum(r["logprob"] for r in rs)
    assert tot["n_texts"] == len(texts)
    assert tot["n_tokens"] == n == sum(len(t) for t in texts) - 1 + len(texts)  # one OOV, one end each
    assert tot["oov"] == 1
    assert tot["logprob"] == pytest.approx(lp, rel=1e-12)
    assert tot["log10prob"] == pytest.approx(lp / math.log(10), rel=1e-12)
    assert tot["perplexity"] == pytest.approx(math.exp(-lp / n), rel=1e-12)
    assert tot["bits_per_token"] == pytest.approx(-lp / math.log(2) / n, rel=1e-12)


def test_corpus_total_of_nothing():
    tot = corpus_total([])
    assert tot["n_tokens"] == 0 and tot["n_texts"] == 0 and tot["logprob"] == 0
