"""Word-level language models: the vocabulary (charlm/data.py), chain-rule scoring and OOV
perplexities (charlm/score.py), whole-file evaluation with streams, word sampling, training
round trips and the word options of the command line. Corpus: tests/data/words.txt."""
import json
import math
import re

import numpy as np
import pytest

from charlm.lm import checkpoint
from charlm.config import ModelConfig, TrainConfig
from charlm.data import EOS_WORD, UNK_WORD, Vocab
from charlm.errors import CharlmError
from charlm.lm.model import Model, param_shapes
from charlm.lm.sample import generate
from charlm.lm.score import corpus_total, evaluate_text, score_text
from tests.helpers import DATA, SCORE_KEYS, failed, ok, option_blocks, tiny_text

WORDS = DATA / "words.txt"
TOKEN_KEYS = {"token", "id", "prob", "logprob", "oov"}


def words_text() -> str:
    return WORDS.read_text(encoding="utf-8")


# ---------------------------------------------------------- a hand-made model
ABV = Vocab((EOS_WORD, UNK_WORD, "a", "b"), "word")  # V = 4


def hand_model(cell: str, seed: int = 0) -> Model:
    """V = 4, E = 3, H = 2, one layer, float64, every weight drawn from an rng."""
    cfg = ModelConfig(cell=cell, vocab_size=len(ABV), embed=3, hidden=2, layers=1)
    rng = np.random.default_rng(seed)
    params = {n: rng.standard_normal(s) for n, s in param_shapes(cfg).items()}
    return Model(cfg, params)


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def chain_rule_by_hand(model: Model, inputs, targets) -> list[float]:
    """ln P(targets[t] | inputs[..t]) written out from the equations, from the zero state."""
    p, cell, H = model.params, model.cfg.cell, model.cfg.hidden
    Wi, Wh, bi, bh = p["rnn.weight_ih_l0"], p["rnn.weight_hh_l0"], p["rnn.bias_ih_l0"], p["rnn.bias_hh_l0"]
    h = np.zeros(H)
    c = np.zeros(H)
    out = []
    for x, y in zip(inputs, targets):
        e = p["embedding.weight"][x]
        if cell == "rnn":
            h = np.tanh(Wi @ e + bi + Wh @ h + bh)
        elif cell == "gru":
            ax, ah = Wi @ e + bi, Wh @ h + bh
            r = sigmoid(ax[:H] + ah[:H])
            z = sigmoid(ax[H:2 * H] + ah[H:2 * H])
            n = np.tanh(ax[2 * H:] + r * ah[2 * H:])
            h = z * h + (1 - z) * n
        else:
            a = Wi @ e + bi + Wh @ h + bh
            i, f, g, o = sigmoid(a[:H]), sigmoid(a[H:2 * H]), np.tanh(a[2 * H:3 * H]), sigmoid(a[3 * H:])
            c = f * c + i * g
            h = o * np.tanh(c)
        logits = p["decoder.weight"] @ h + p["decoder.bias"]
        m = logits.max()
        out.append(float(logits[y] - m - np.log(np.exp(logits - m).sum())))
    return out


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("text, words", [("a b a", ["a", "b", "a"]), ("a zebra b", ["a", UNK_WORD, "b"])])
def test_chain_rule_by_hand(cell, text, words):
    model = hand_model(cell)
    eos = ABV.id_of(EOS_WORD)
    ids = [ABV.id_of(w) for w in words]
    targets = ids + [eos]
    want = chain_rule_by_hand(model, [eos] + ids, targets)  # <eos> fed first; the <eos> factor last

    r = score_text(model, ABV, text)
    assert r["n_tokens"] == 4
    assert [t["id"] for t in r["tokens"]] == targets
    assert [t["token"] for t in r["tokens"]] == text.split() + [EOS_WORD]
    np.testing.assert_allclose([t["logprob"] for t in r["tokens"]], want, rtol=1e-10)
    assert r["logprob"] == pytest.approx(math.fsum(want), rel=1e-10)
    np.testing.assert_allclose([t["prob"] for t in r["tokens"]], np.exp(want), rtol=1e-10)

    r2 = score_text(model, ABV, text, eos=False)
    assert r2["n_tokens"] == 3
    assert [t["id"] for t in r2["tokens"]] == ids
    np.testing.assert_allclose([t["logprob"] for t in r2["tokens"]], want[:3], rtol=1e-10)
    assert r2["logprob"] == pytest.approx(math.fsum(want[:3]), rel=1e-10)


# --------------------------------------------------------------------- OOV
def test_oov_words_and_the_two_perplexities():
    model = hand_model("lstm", seed=1)
    r = score_text(model, ABV, "a zebra b yak a")
    toks = r["tokens"]
    n = 6  # five words and the <eos> factor
    oov_positions = [1, 3]
    assert r["n_tokens"] == n == len(toks)
    assert r["oov"] == 2
    assert r["oov_tokens"] == ["yak", "zebra"]
    assert [t["oov"] for t in toks] == [k in oov_positions for k in range(n)]
    assert [toks[k]["token"] for k in oov_positions] == ["zebra", "yak"]
    assert all(toks[k]["id"] == ABV.unk_id for k in oov_positions)
    lps = [t["logprob"] for t in toks]
    lp = math.fsum(lps)
    lp_oov = math.fsum(lps[k] for k in oov_positions)
    assert r["logprob"] == pytest.approx(lp, rel=1e-12)
    assert r["perplexity"] == pytest.approx(math.exp(-lp / n), rel=1e-12)
    assert r["perplexity_excl_oov"] == pytest.approx(math.exp(-(lp - lp_oov) / (n - 2)), rel=1e-12)
    assert r["bits_per_token"] == pytest.approx(-lp / (n * math.log(2)), rel=1e-12)
    assert r["perplexity_excl_oov"] != pytest.approx(r["perplexity"], rel=1e-6)

    # an in-vocabulary <unk> typed by the user is not an OOV word
    lit = score_text(model, ABV, "a <unk> b yak a")
    assert lit["oov"] == 1 and lit["oov_tokens"] == ["yak"]
    assert lit["logprob"] == pytest.approx(r["logprob"], rel=1e-12)


def test_corpus_total_agrees_with_all_the_tokens():
    model = hand_model("gru", seed=2)
    texts = ["a b a", "", "zebra", "b yak b zebra", "a a b"]
    rs = [score_text(model, ABV, t) for t in texts]
    tot = corpus_total(rs)
    toks = [t for r in rs for t in r["tokens"]]
    n = len(toks)
    assert n == sum(len(t.split()) + 1 for t in texts)
    lp = math.fsum(t["logprob"] for t in toks)
    oov_lps = [t["logprob"] for t in toks if t["token"] in ("zebra", "yak")]
    assert len(oov_lps) == 3
    assert tot["n_tokens"] == n and tot["n_texts"] == len(texts) and tot["oov"] == 3
    assert tot["logprob"] == pytest.approx(lp, rel=1e-12)
    assert tot["perplexity"] == pytest.approx(math.exp(-lp / n), rel=1e-12)
    assert tot["perplexity_excl_oov"] == pytest.approx(math.exp(-(lp - math.fsum(oov_lps)) / (n - 3)), rel=1e-12)
    assert tot["bits_per_token"] == pytest.approx(-lp / (n * math.log(2)), rel=1e-12)


# --------------------------------------------------------------- vocabulary
def test_min_count_drops_singletons_to_unk():
    v = Vocab.words_from_text("x y y z z z\nw y", min_count=2)
    assert v.tokens == (EOS_WORD, UNK_WORD, "y", "z")  # y 3 times and z 3 times: tie, alphabetical
    assert (v.level, v.lower) == ("word", False)
    ids, oov = v.encode("x y w")
    assert ids.tolist() == [v.unk_id, v.id_of("y"), v.unk_id]
    assert oov == [(0, "x"), (2, "w")]
    assert Vocab.words_from_text("x y y z z z\nw y").tokens == (EOS_WORD, UNK_WORD, "y", "z", "w", "x")


def test_max_vocab_keeps_the_most_frequent_and_counts_eos_and_unk():
    text = "d c c c b b a a e e e e"
    assert Vocab.words_from_text(text, max_vocab=3).tokens == (EOS_WORD, UNK_WORD, "e")
    assert Vocab.words_from_text(text, max_vocab=4).tokens == (EOS_WORD, UNK_WORD, "e", "c")
    assert Vocab.words_from_text(text, max_vocab=5).tokens == (EOS_WORD, UNK_WORD, "e", "c", "a")  # a, b tie
    assert Vocab.words_from_text(text, max_vocab=100).tokens == (EOS_WORD, UNK_WORD, "e", "c", "a", "b", "d")
    for bad in (dict(max_vocab=2), dict(min_count=0)):
        with pytest.raises(CharlmError):
            Vocab.words_from_text(text, **bad)


def test_a_literal_unk_or_eos_in_the_corpus_is_not_duplicated():
    v = Vocab.words_from_text("<unk> a <unk> b <unk> <eos> a", min_count=1)
    assert v.tokens == (EOS_WORD, UNK_WORD, "a", "b")
    assert v.tokens.count(UNK_WORD) == 1 and v.tokens.count(EOS_WORD) == 1


def test_lower_applies_to_the_vocabulary_and_to_encode():
    v = Vocab.words_from_text("The the THE Cat cat", lower=True)
    assert v.tokens == (EOS_WORD, UNK_WORD, "the", "cat")
    assert v.lower
    ids, oov = v.encode("THE Cat tHe")
    assert ids.tolist() == [v.id_of("the"), v.id_of("cat"), v.id_of("the")] and oov == []
    np.testing.assert_array_equal(v.encode_corpus("THE CAT\n"), [2, 3, 0])
    keep = Vocab.words_from_text("The the THE Cat cat")
    assert set(keep.tokens) == {EOS_WORD, UNK_WORD, "The", "the", "THE", "Cat", "cat"}
    assert keep.encode("THE")[1] == [] and keep.encode("tHe")[1] == [(0, "tHe")]


def test_split_puts_eos_between_lines():
    v = Vocab((EOS_WORD, UNK_WORD, "x", "y", "z"), "word")
    assert v.split("x  y\tx\nz") == ["x", "y", "x", EOS_WORD, "z"]
    assert v.split("x y\nz\n") == ["x", "y", EOS_WORD, "z", EOS_WORD]
    assert v.split("\n\nx") == [EOS_WORD, EOS_WORD, "x"]
    ids = v.encode_corpus("x y\nz\n")
    assert ids.tolist() == [2, 3, 0, 4, 0]
    assert ids[-1] == v.eos_id
    assert v.encode_corpus("x q\n").tolist() == [2, v.unk_id, v.eos_id]


def test_decode_renders_eos_as_newline_and_words_with_spaces():
    v = Vocab((EOS_WORD, UNK_WORD, "x", "y", "z"), "word")
    ids = [2, 3, 0, 4, 0, 0, 1, 2]
    assert v.decode(ids) == "x y\nz\n\n<unk> x"
    assert v.decode([]) == ""
    assert v.decode(v.encode_corpus("x y\nz\n")) == "x y\nz\n"


@pytest.mark.parametrize("cuts", [[], [1], [2], [3], [1, 2, 3], [4, 6], list(range(1, 10))])
def test_streaming_decode_words_equals_decode_of_the_whole(cuts):
    v = Vocab((EOS_WORD, UNK_WORD, "x", "y", "z"), "word")
    ids = [2, 3, 0, 4, 0, 0, 1, 2, 0, 3]
    whole = v.decode(ids)
    parts, at_start = [], True
    for a, b in zip([0, *cuts], [*cuts, len(ids)]):
        text, at_start = v.decode_words(ids[a:b], at_start)
        parts.append(text)
    assert "".join(parts) == whole
    assert at_start is False
    assert v.decode_words([0], False) == ("\n", True)
    assert v.decode_words([2], False) == (" x", False)


def test_vocab_dict_round_trip():
    v = Vocab.words_from_text("b a a c\nc c", lower=True)
    d = v.to_dict()
    assert d == {"level": "word", "tokens": [EOS_WORD, UNK_WORD, "c", "a", "b"], "lower": True}
    back = Vocab.from_dict(json.loads(json.dumps(d)))
    assert back == v
    assert (back.level, back.tokens, back.lower) == ("word", v.tokens, True)
    assert back.eos_id == 0 and back.unk_id == 1


@pytest.mark.parametrize("tokens", [("a", UNK_WORD), (EOS_WORD, "a"), ("\n", "a"), (EOS_WORD, UNK_WORD, "a", "a")])
def test_word_vocab_needs_eos_and_unk(tokens):
    with pytest.raises(CharlmError):
        Vocab(tokens, "word")
    with pytest.raises(CharlmError):
        Vocab.from_dict({"level": "word", "tokens": list(tokens)})


@pytest.mark.parametrize("n_words, dtype", [(254, np.uint8), (255, np.uint16), (400, np.uint16)])
def test_id_dtype_of_a_word_vocab(n_words, dtype):
    words = [f"w{k}" for k in range(n_words)]
    v = Vocab((EOS_WORD, UNK_WORD, *words), "word")
    assert len(v) == n_words + 2
    text = " ".join(words[::-1]) + "\nnever\n"
    ids = v.encode_corpus(text)
    assert ids.dtype == dtype
    assert ids.tolist() == [*range(n_words + 1, 1, -1), 0, 1, 0]  # no wrap-around of large ids
    assert v.decode(ids) == " ".join(words[::-1]) + "\n<unk>\n"


# ------------------------------------------------------- training round trip
def test_train_and_checkpoint_keep_the_word_vocab(tmp_path):
    from charlm.lm.train import build_vocab, train
    text = words_text().upper()  # lower=True must lower-case it back
    tcfg = TrainConfig(level="word", lower=True, min_count=2, steps=3, seq_len=4, batch=2, eval_every=2)
    events = list(train(text, ModelConfig(cell="gru", embed=4, hidden=8, layers=1), tcfg, tmp_path / "run",
                        val_text="the zebra sat on the cat\n", sample_chars=5))
    kinds = [e["event"] for e in events]
    assert kinds.count("eval") == 2 and kinds[-1] == "done"
    for e in events:
        if e["event"] == "eval":
            assert e["val_ppl"] == pytest.approx(math.exp(e["val_loss"]), rel=1e-12)
            assert len(e["sample"].split()) <= 5 and e["sample"].count("\n") + len(e["sample"].split()) == 5
    done = events[-1]
    assert done["level"] == "word"
    assert done["best_val_ppl"] == pytest.approx(min(math.exp(e["val_loss"]) for e in events if e["event"] == "eval"))

    want = Vocab.words_from_text(words_text(), min_count=2)  # the lower-case corpus: the same words
    assert build_vocab(text, tcfg) == Vocab(want.tokens, "word", True)
    assert "zebra" not in want.tokens  # validation words do not enter a word vocabulary
    for name in ("latest.npz", "best.npz"):
        ck = checkpoint.load(tmp_path / "run" / name)
        assert (ck.vocab.level, ck.vocab.tokens, ck.vocab.lower) == ("word", want.tokens, True)
        assert ck.model.vocab_size == len(want)
        assert (ck.train.level, ck.train.lower, ck.train.min_count) == ("word", True, 2)


# -------------------------------------------------------- whole-file evaluation
def float64_model(vocab: Vocab, cell: str, seed: int = 0) -> Model:
    cfg = ModelConfig(cell=cell, vocab_size=len(vocab), embed=4, hidden=8, layers=2)
    return Model.create(cfg, seed=seed, dtype=np.float64)


def word_vocab() -> Vocab:
    return Vocab.words_from_text(words_text(), min_count=2)


@pytest.mark.parametrize("level", ["char", "word"])
def test_eval_of_one_line_equals_score_of_that_line(level):
    vocab = Vocab.from_text(tiny_text()) if level == "char" else word_vocab()
    model = float64_model(vocab, "lstm")
    line = "the old man sat by the zebra" if level == "word" else "the old man sat \u2603by the boat"
    s = score_text(model, vocab, line)
    e = evaluate_text(model, vocab, line + "\n")
    assert e["n_tokens"] == s["n_tokens"]
    assert e["oov"] == s["oov"] == 1
    assert e["logprob"] == pytest.approx(s["logprob"], rel=1e-10)
    assert e["perplexity"] == pytest.approx(s["perplexity"], rel=1e-10)
    assert e["perplexity_excl_oov"] == pytest.approx(s["perplexity_excl_oov"], rel=1e-10)
    assert e["bits_per_token"] == pytest.approx(s["bits_per_token"], rel=1e-10)


# 4 lines of 5 words: 24 tokens, so 2, 3, 4, 6 streams cut it into equal parts
EVAL_TEXT = "the cat sat on zebra\nthe dog ran home today\na bird sang yak song\nwe went to the park\n"


def _tokens(vocab, text):
    ids, _ = vocab.encode(text)
    return np.concatenate([[vocab.eos_id], ids]).astype(np.int32)  # input full[t] -> target full[t + 1]


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_eval_with_one_stream_carries_the_state_through_the_file(cell):
    vocab = word_vocab()
    model = float64_model(vocab, cell, seed=3)
    full = _tokens(vocab, EVAL_TEXT)
    T = len(full) - 1
    assert T == 24
    loss, _ = model.loss(full[:-1, None], full[1:, None], model.zero_state(1))
    r = evaluate_text(model, vocab, EVAL_TEXT, streams=1)
    assert (r["n_tokens"], r["oov"], r["streams"]) == (24, 2, 1)
    assert r["logprob"] == pytest.approx(-loss * T, rel=1e-10)
    # not the sum of independent per-line scores: the state crosses the line ends
    per_line = math.fsum(score_text(model, vocab, line)["logprob"] for line in EVAL_TEXT.splitlines())
    assert per_line != pytest.approx(r["logprob"], rel=1e-9)


@pytest.mark.parametrize("K", [2, 3, 4, 6])
def test_eval_with_k_streams_scores_each_part_from_the_zero_state(K):
    vocab = word_vocab()
    model = float64_model(vocab, "lstm", seed=4)
    full = _tokens(vocab, EVAL_TEXT)
    n = len(full) - 1
    L = n // K
    want = 0.0
    for k in range(K):  # part k: targets full[kL+1 .. (k+1)L], its first input the token before it
        seg = full[k * L:(k + 1) * L + 1]
        loss, _ = model.loss(seg[:-1, None], seg[1:, None], model.zero_state(1))
        want -= loss * L
    one = evaluate_text(model, vocab, EVAL_TEXT, streams=1)
    r = evaluate_text(model, vocab, EVAL_TEXT, streams=K, window=5)
    assert r["n_tokens"] == one["n_tokens"] == n and r["streams"] == K and r["oov"] == 2
    assert r["logprob"] == pytest.approx(want, rel=1e-10)
    assert r["logprob"] != one["logprob"]
    assert abs(r["logprob"] - one["logprob"]) < 0.05 * abs(one["logprob"])


def test_eval_with_one_stream_per_token_restarts_at_every_token():
    vocab = word_vocab()
    model = float64_model(vocab, "gru", seed=5)
    full = _tokens(vocab, EVAL_TEXT)
    n = len(full) - 1
    hand = math.fsum(float(model.token_logprobs(full[t:t + 1, None], full[t + 1:t + 2, None],
                                                model.zero_state(1))[0][0, 0]) for t in range(n))
    r = evaluate_text(model, vocab, EVAL_TEXT, streams=n)
    assert r["n_tokens"] == n and r["streams"] == n
    assert r["logprob"] == pytest.approx(hand, rel=1e-10)
    more = evaluate_text(model, vocab, EVAL_TEXT, streams=1000)  # more streams than tokens: one each
    assert more["streams"] == n and more["logprob"] == pytest.approx(hand, rel=1e-10)


@pytest.mark.parametrize("K", [5, 7, 11])
def test_eval_with_uneven_parts_scores_every_token_once(K):
    """24 tokens in 5, 7 or 11 parts (the last ones shorter or empty): n_tokens is unchanged,
    progress reaches every token, and the total stays close to the exact one."""
    vocab = word_vocab()
    model = float64_model(vocab, "rnn", seed=6)
    one = evaluate_text(model, vocab, EVAL_TEXT, streams=1)
    r = evaluate_text(model, vocab, EVAL_TEXT, streams=K, window=3)
    assert r["n_tokens"] == one["n_tokens"] == 24
    assert r["oov"] == 2
    assert abs(r["logprob"] - one["logprob"]) < 0.05 * abs(one["logprob"])
    seen = []
    evaluate_text(model, vocab, EVAL_TEXT, streams=K, window=3, progress=lambda d, n: seen.append((d, n)))
    assert seen[-1] == (24, 24) and all(n == 24 for _, n in seen)
    assert [d for d, _ in seen] == sorted(d for d, _ in seen)


# ------------------------------------------------------------------ sampling
def _check_word_text(text: str, vocab: Vocab, length: int):
    words = [w for line in text.split("\n") for w in line.split(" ") if w]
    assert len(words) + text.count("\n") == length
    assert set(words) <= set(vocab.tokens) - {EOS_WORD}
    for line in text.split("\n"):
        assert not line.startswith(" ") and not line.endswith(" ") and "  " not in line, repr(line)


def test_sampled_words_are_space_separated_with_newlines_for_eos():
    model = hand_model("lstm", seed=7)  # four tokens: <eos> comes often, also twice in a row
    text = "".join(generate(model, ABV, 200, temperature=1.0, seed=3))
    _check_word_text(text, ABV, 200)
    assert text.count("\n") >= 10
    for chunk in (1, 3, 7, 200):  # the line-start state survives the chunk boundaries
        assert "".join(generate(model, ABV, 200, temperature=1.0, seed=3, chunk=chunk)) == text
    assert "".join(generate(model, ABV, 200, temperature=1.0, seed=4)) != text


def test_sampling_a_word_prime_with_unknown_words():
    model = hand_model("gru", seed=8)
    go = lambda prime, seed=5: "".join(generate(model, ABV, 30, temperature=1.0, seed=seed, prime=prime))
    assert go("a zebra") == go("a <unk>") == go("a yak")
    assert go("a zebra") != go("a b")
    cont = go("a zebra")
    assert cont[0] in " \n"  # continues the prime's line
    _check_word_text(cont.lstrip(" "), ABV, 30)
    fresh = go("a zebra\n")
    assert not fresh.startswith(" ")  # after a line end: no leading space
    _check_word_text(fresh, ABV, 30)
    spaced = go("a zebra ")
    assert not spaced.startswith(" ")  # the prime's own trailing space separates the first word
    assert spaced == cont.lstrip(" ")


@pytest.fixture(scope="module")
def trained_word(tmp_path_factory):
    from charlm.lm.train import train
    run = tmp_path_factory.mktemp("wordrun")
    tcfg = TrainConfig(level="word", min_count=2, steps=3, seq_len=4, batch=2, eval_every=2)
    list(train(words_text(), ModelConfig(cell="lstm", embed=4, hidden=8, layers=1), tcfg, run, sample_chars=0))
    ck = checkpoint.load(run / "latest.npz")
    return Model(ck.model, ck.params), ck.vocab


def test_sampling_a_trained_word_model(trained_word):
    model, vocab = trained_word
    a = "".join(generate(model, vocab, 40, temperature=1.5, seed=1))
    assert a == "".join(generate(model, vocab, 40, temperature=1.5, seed=1, chunk=6))
    _check_word_text(a, vocab, 40)
    assert set(a.split()) <= set(vocab.tokens) - {EOS_WORD}
    b = "".join(generate(model, vocab, 40, temperature=1.5, seed=1, prime="the little zebra"))
    _check_word_text(b.lstrip(" "), vocab, 40)


# ------------------------------------------------------------- command line
TRAIN_WORD = ["--level", "word", "--min-count", "2", "--steps", "3", "--hidden", "8", "--layers", "1",
              "--embed", "4", "--seq-len", "4", "--batch", "2", "--eval-every", "2", "--sample-length", "5"]
EVAL_JSON_KEYS = {"n_tokens", "logprob", "perplexity", "bits_per_token", "oov"}


def _json_lines(stdout: str) -> list[dict]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def test_cli_word_chain(run_cli, tmp_path):
    res = ok(run_cli("train", WORDS, *TRAIN_WORD, "--out", "RUN", "--json"))
    lines = _json_lines(res.stdout)
    evals = [e for e in lines if e["event"] == "eval"]
    assert [e["step"] for e in evals] == [2, 3]
    for e in evals:
        assert e["val_ppl"] > 1
        assert e["val_ppl"] == pytest.approx(2.0 ** e["val_bpc"], rel=1e-9)
    done = lines[-1]
    assert done["event"] == "done" and done["steps"] == 3
    assert done["best_val_ppl"] == pytest.approx(min(e["val_ppl"] for e in evals), rel=1e-9)
    ck = checkpoint.load(tmp_path / "RUN" / "latest.npz")
    assert ck.vocab == Vocab.words_from_text(words_text(), min_count=2)

    # score one sentence (with an OOV word)
    r = json.loads(ok(run_cli("score", "the cat sat on zebra", "--model", "RUN", "--json")).stdout)
    assert set(r) == SCORE_KEYS
    assert r["n_tokens"] == 6 == len(r["tokens"]) and r["oov"] == 1
    for t in r["tokens"]:
        assert set(t) == TOKEN_KEYS
    assert [t["token"] for t in r["tokens"]] == ["the", "cat", "sat", "on", "zebra", EOS_WORD]
    assert [t["id"] for t in r["tokens"]] == [ck.vocab.id_of(w) for w in ["the", "cat", "sat", "on", UNK_WORD, EOS_WORD]]
    assert [t["oov"] for t in r["tokens"]] == [False] * 4 + [True, False]
    lps = [t["logprob"] for t in r["tokens"]]
    assert r["perplexity_excl_oov"] == pytest.approx(math.exp(-(math.fsum(lps) - lps[4]) / 5), rel=1e-9)

    # score a file of several lines: the table names both perplexities, with the JSON's values
    (tmp_path / "F.txt").write_text("the cat sat\nthe zebra ran home\na dog sang\n", encoding="utf-8")
    table = ok(run_cli("score", "--file", "F.txt", "--model", "RUN")).stdout
    total = json.loads(ok(run_cli("score", "--file", "F.txt", "--model", "RUN", "--json")).stdout)["total"]
    assert total["n_tokens"] == 3 + 4 + 3 + 3 and total["oov"] == 1
    m_in = re.search(r"Perplexity including OOVs: ([\d.]+)", table)
    m_ex = re.search(r"Perplexity excluding OOVs: ([\d.]+)", table)
    assert m_in and m_ex, table
    assert float(m_in.group(1)) == pytest.approx(total["perplexity"], abs=1e-4)
    assert float(m_ex.group(1)) == pytest.approx(total["perplexity_excl_oov"], abs=1e-4)

    # eval of the file: one token per word and one <eos> per line
    e = json.loads(ok(run_cli("eval", "F.txt", "--model", "RUN", "--json")).stdout)
    assert EVAL_JSON_KEYS <= set(e)
    assert e["n_tokens"] == 10 + 3 and e["oov"] == 1
    assert e["perplexity"] == pytest.approx(math.exp(-e["logprob"] / 13), rel=1e-9)
    assert e["bits_per_token"] == pytest.approx(-e["logprob"] / (13 * math.log(2)), rel=1e-9)
    e2 = json.loads(ok(run_cli("eval", "F.txt", "--model", "RUN", "--json", "--streams", "2")).stdout)
    assert e2["n_tokens"] == 13 and e2["logprob"] != e["logprob"]
    human = ok(run_cli("eval", "F.txt", "--model", "RUN")).stdout
    assert "perplexity" in human and "tokens = 13" in human

    # eval of a one-line file equals score of that line
    (tmp_path / "one.txt").write_text("the cat sat on zebra\n", encoding="utf-8")
    one = json.loads(ok(run_cli("eval", "one.txt", "--model", "RUN", "--json")).stdout)
    assert one["n_tokens"] == r["n_tokens"]
    assert one["logprob"] == pytest.approx(r["logprob"], rel=1e-6)

    # sample with an unknown prime word: a warning, fed as <unk>
    s = ok(run_cli("sample", "--model", "RUN", "--prime", "unknownword", "--length", "6", "--seed", "1"))
    assert "<unk>" in s.stderr and "unknownword" in s.stderr and "warning" in s.stderr
    assert s.stdout.startswith("unknownword")
    _check_word_text(s.stdout[len("unknownword"):-1].lstrip(" "), ck.vocab, 6)


def test_cli_word_training_display_and_spaced_prime(run_cli, tmp_path):
    res = ok(run_cli("train", WORDS, *TRAIN_WORD, "--out", "RUN"))
    assert "best val perplexity" in res.stdout and "best val bits/token" in res.stdout
    assert "ppl" in res.stderr and "word vocabulary" in res.stderr
    head, sample = res.stdout.split("Sample (temperature 0.8):\n")
    vocab = checkpoint.load(tmp_path / "RUN" / "best.npz").vocab
    assert sample.endswith("\n")
    _check_word_text(sample[:-1], vocab, 5)  # the final sample: 5 tokens, then one line end
    s = ok(run_cli("sample", "--model", "RUN", "--prime", "the cat ", "--length", "8", "--seed", "2")).stdout
    assert s.startswith("the cat ") and "  " not in s


def test_cli_train_with_a_validation_file(run_cli, tmp_path):
    # 9 words + 3 <eos> after the leading <eos>: 12 scored targets, 2 streams of 6 (windows of 4 + 2),
    # which evaluate_text(streams=2) cuts the same way
    (tmp_path / "VAL.txt").write_text("the cat sat\nthe dog ran\nthe zebra ran\n", encoding="utf-8")
    lines = _json_lines(ok(run_cli("train", WORDS, *TRAIN_WORD, "--val", "VAL.txt", "--out", "RUN", "--json")).stdout)
    last = [e for e in lines if e["event"] == "eval"][-1]
    assert last["step"] == 3
    ck = checkpoint.load(tmp_path / "RUN" / "latest.npz")  # saved right after that evaluation
    r = evaluate_text(Model(ck.model, ck.params), ck.vocab, (tmp_path / "VAL.txt").read_text(), streams=2)
    assert r["n_tokens"] == 12
    assert last["val_ppl"] == pytest.approx(r["perplexity"], rel=1e-4)


def test_cli_eval_failures_and_help(run_cli):
    failed(run_cli("eval", "nope.txt", "--streams", "0"), "--streams")
    failed(run_cli("eval", "nope.txt", "--streams", "-2"), "--streams")
    failed(run_cli("eval", "nope.txt"), "not found", "nope.txt")
    blocks = option_blocks(ok(run_cli("eval", "--help")).stdout)
    assert "--streams" in blocks
    assert "restarts from the zero state" in blocks["--streams"]


@pytest.mark.parametrize("option, value", [("--level", "sentence"), ("--min-count", "0"), ("--max-vocab", "2")])
def test_cli_train_rejects_bad_word_options(run_cli, tmp_path, option, value):
    failed(run_cli("train", WORDS, *TRAIN_WORD, option, value), option)
    assert not (tmp_path / "models").exists()
