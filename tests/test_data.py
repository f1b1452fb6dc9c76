"""Vocabulary, corpus reading and BPTT windows (charlm/data.py)."""
import io
import os
import sys

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from charlm.data import EOS_CHAR, Batches, Vocab, eval_windows, read_text, split_train_val
from charlm.errors import CharlmError
from tests.helpers import tiny_text


# ------------------------------------------------------------------ Vocab
@pytest.mark.parametrize("text", ["", "a", "abc", "no newline here", "x\ny\n", "\n"])
def test_vocab_always_contains_newline(text):
    v = Vocab.from_text(text)
    assert EOS_CHAR in v.tokens
    assert v.tokens[v.eos_id] == "\n"
    assert set(v.tokens) == set(text) | {"\n"}
    assert len(v) == len(set(text) | {"\n"})


def test_vocab_ids_are_indices_and_order_is_deterministic():
    a = Vocab.from_text("banana\n")
    b = Vocab.from_text("nab\nanana")
    assert a.tokens == b.tokens  # the same set of characters gives the same ids
    for i, t in enumerate(a.tokens):
        assert a.id_of(t) == i
    assert a.id_of("z") is None


def test_encode_decode_round_trip():
    text = tiny_text()
    v = Vocab.from_text(text)
    ids, oov = v.encode(text)
    assert oov == []
    assert ids.dtype == np.int32
    assert len(ids) == len(text)
    assert v.decode(ids) == text
    assert [v.tokens[i] for i in ids[:20]] == list(text[:20])


def test_oov_characters_are_reported_with_offsets_and_left_out():
    v = Vocab.from_text("abc")
    text = "a\u00e9b\U0001F600cxa"
    ids, oov = v.encode(text)
    assert oov == [(1, "\u00e9"), (3, "\U0001F600"), (5, "x")]
    assert v.decode(ids) == "abca"
    assert len(ids) == len(text) - len(oov)


def test_encode_corpus_equals_encode_and_uses_uint8():
    text = tiny_text()
    v = Vocab.from_text(text)
    ids = v.encode_corpus(text)
    assert ids.dtype == np.uint8
    np.testing.assert_array_equal(ids.astype(np.int64), v.encode(text)[0].astype(np.int64))


def _chars(n, start=0x100):
    return "".join(chr(start + i) for i in range(n))


@pytest.mark.parametrize("n_tokens, dtype", [(256, np.uint8), (257, np.uint16), (300, np.uint16)])
def test_encode_corpus_uses_the_smallest_id_dtype(n_tokens, dtype):
    text = _chars(n_tokens - 1) + "\n"  # n_tokens - 1 distinct characters plus the newline
    v = Vocab.from_text(text)
    assert len(v) == n_tokens
    ids = v.encode_corpus(text[::-1] + text)
    assert ids.dtype == dtype
    assert ids.max() == n_tokens - 1  # the largest id still fits
    np.testing.assert_array_equal(ids.astype(np.int64), v.encode(text[::-1] + text)[0])


def test_encode_corpus_handles_astral_characters():
    text = "a\U0001F600b\U00010348\n\U0001F600"
    v = Vocab.from_text(text)
    np.testing.assert_array_equal(v.encode_corpus(text), v.encode(text)[0])


@pytest.mark.parametrize("bad", ["z", "\U0001F600", "\u00e9"])
def test_encode_corpus_refuses_characters_outside_the_vocabulary(bad):
    v = Vocab.from_text("abc")
    with pytest.raises(CharlmError):
        v.encode_corpus("ab" + bad + "c")


def test_vocab_dict_round_trip():
    v = Vocab.from_text("h\u00e9llo \U0001F600 world")
    d = v.to_dict()
    assert d["level"] == "char"
    w = Vocab.from_dict(d)
    assert w == v
    assert w.tokens == v.tokens and w.eos_id == v.eos_id


@pytest.mark.parametrize("d", [{}, {"tokens": 5}, {"tokens": ["a", "a", "\n"]}, {"tokens": ["a"], "level": "word"}])
def test_malformed_vocab_dict_is_a_charlm_error(d):
    with pytest.raises(CharlmError):
        Vocab.from_dict(d)


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_round_trip_of_arbitrary_unicode(text):
    v = Vocab.from_text(text)
    ids, oov = v.encode(text)
    assert oov == []
    assert v.decode(ids) == text
    np.testing.assert_array_equal(v.encode_corpus(text).astype(np.int64), ids)


@settings(max_examples=50, deadline=None)
@given(st.text(alphabet=st.characters(min_codepoint=0x10000, max_codepoint=0x10FFFF), min_size=1))
def test_round_trip_of_astral_text(text):
    v = Vocab.from_text(text)
    assert v.decode(v.encode(text)[0]) == text


# ------------------------------------------------------------- read_text
def test_read_text_missing_file(tmp_path):
    p = tmp_path / "nope.txt"
    with pytest.raises(CharlmError, match="not found") as e:
        read_text(str(p))
    assert str(p) in str(e.value)


def test_read_text_directory(tmp_path):
    with pytest.raises(CharlmError, match="directory"):
        read_text(str(tmp_path))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs on this platform")
def test_read_text_fifo_is_refused_without_blocking(tmp_path):
    p = tmp_path / "pipe"
    os.mkfifo(p)
    with pytest.raises(CharlmError, match="not a regular file"):
        read_text(str(p))


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root can read a chmod 000 file; the permission check cannot be exercised")
def test_read_text_permission_denied(tmp_path):
    p = tmp_path / "secret.txt"
    p.write_text("hidden")
    p.chmod(0)
    try:
        with pytest.raises(CharlmError, match="permission denied"):
            read_text(str(p))
    finally:
        p.chmod(0o600)


def test_read_text_invalid_utf8_names_the_offset_and_the_way_out(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"hello \xff world")
    with pytest.raises(CharlmError) as e:
        read_text(str(p))
    msg = str(e.value)
    assert "offset 6" in msg
    assert "0xff" in msg
    assert "--encoding" in msg and "--errors replace" in msg
    assert "\n" not in msg


def test_read_text_invalid_utf8_offset_counts_a_leading_bom(tmp_path):
    """The offset is a position in the file, which a person checks with a hex viewer:
    the dropped byte-order mark must still be counted."""
    data = b"\xef\xbb\xbfab\xfe"
    p = tmp_path / "bom_bad.txt"
    p.write_bytes(data)
    bad_at = data.index(b"\xfe")
    with pytest.raises(CharlmError) as e:
        read_text(str(p))
    assert f"offset {bad_at}" in str(e.value)


def test_read_text_errors_replace_and_ignore(tmp_path):
    p = tmp_path / "bad.txt"
    p.write_bytes(b"ab\xffcd")
    assert read_text(str(p), errors="replace") == "ab\ufffdcd"
    assert read_text(str(p), errors="ignore") == "abcd"


def test_read_text_bad_errors_or_encoding_value(tmp_path):
    p = tmp_path / "ok.txt"
    p.write_text("ok")
    with pytest.raises(CharlmError, match="--errors"):
        read_text(str(p), errors="explode")
    with pytest.raises(CharlmError, match="--encoding"):
        read_text(str(p), encoding="no-such-codec")


def test_read_text_other_encoding(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("caf\u00e9\n".encode("latin-1"))
    assert read_text(str(p), encoding="latin-1") == "caf\u00e9\n"


def test_read_text_strips_utf8_bom(tmp_path):
    p = tmp_path / "bom.txt"
    p.write_bytes(b"\xef\xbb\xbfhello\n")
    assert read_text(str(p)) == "hello\n"
    # a BOM-like sequence later in the text is content, not a mark
    p.write_bytes(b"a\xef\xbb\xbfb")
    assert read_text(str(p)) == "a\ufeffb"


def test_read_text_normalises_line_ends(tmp_path):
    p = tmp_path / "crlf.txt"
    p.write_bytes(b"one\r\ntwo\rthree\n\r\nfour")
    assert read_text(str(p)) == "one\ntwo\nthree\n\nfour"


def test_read_text_stdin(monkeypatch):
    class FakeStdin:
        buffer = io.BytesIO(b"\xef\xbb\xbffrom\r\nstdin")
    monkeypatch.setattr(sys, "stdin", FakeStdin())
    assert read_text("-") == "from\nstdin"


# ------------------------------------------------------------ splitting
@pytest.mark.parametrize("n, frac", [(100, 0.05), (1000, 0.1), (37, 0.2), (10, 0.01)])
def test_split_train_val_holds_out_the_tail(n, frac):
    ids = np.arange(n)
    tr, va = split_train_val(ids, frac)
    np.testing.assert_array_equal(np.concatenate([tr, va]), ids)
    assert len(va) >= 2
    assert len(va) == max(2, round(n * frac))


@pytest.mark.parametrize("n", [0, 1, 2, 3])
def test_split_train_val_too_short_keeps_everything_for_training(n):
    ids = np.arange(n)
    tr, va = split_train_val(ids, 0.05)
    np.testing.assert_array_equal(tr, ids)
    assert len(va) == 0


# -------------------------------------------------------------- batches
@pytest.mark.parametrize("n, T, N", [(200, 8, 4), (101, 5, 3), (64, 7, 2), (9, 8, 1), (50, 3, 16)])
def test_batches_tile_each_stream_contiguously(n, T, N):
    ids = np.arange(n, dtype=np.uint16) * 3 + 1  # distinct values, not equal to positions
    b = Batches(ids, T, N)
    assert 1 <= b.N <= N
    assert b.windows_per_epoch >= 1
    xs, ys = zip(*(b.window(k) for k in range(b.windows_per_epoch)))
    for x, y in zip(xs, ys):
        assert x.shape == (T, b.N) and y.shape == (T, b.N)
        assert x.dtype == np.int32 and y.dtype == np.int32
    X = np.concatenate(xs)  # (wpe*T, N): each column is one stream read front to back
    Y = np.concatenate(ys)
    for s in range(b.N):
        start = s * b.L
        np.testing.assert_array_equal(X[:, s], ids[start:start + len(X)])
        np.testing.assert_array_equal(Y[:, s], ids[start + 1:start + 1 + len(X)])
        assert start + len(X) <= (s + 1) * b.L  # a stream never reads into the next one's inputs
    for k in range(len(xs) - 1):  # window k+1 continues window k
        np.testing.assert_array_equal(xs[k + 1][0], ys[k][-1])
    # streams are disjoint and every window stays inside the corpus
    assert (b.N - 1) * b.L + len(X) < n


@pytest.mark.parametrize("n, T", [(0, 4), (1, 4), (8, 8), (64, 64)])
def test_batches_corpus_shorter_than_one_window(n, T):
    with pytest.raises(CharlmError, match="--seq-len"):
        Batches(np.arange(n), T, 4)


def test_batches_exactly_one_window():
    b = Batches(np.arange(9), 8, 4)
    assert b.N == 1 and b.windows_per_epoch == 1
    x, y = b.window(0)
    np.testing.assert_array_equal(x[:, 0], np.arange(8))
    np.testing.assert_array_equal(y[:, 0], np.arange(1, 9))


def test_short_corpus_reduces_the_number_of_streams():
    T = 8
    b = Batches(np.arange(3 * T + 1), T, 32)
    assert b.N == 3
    assert b.windows_per_epoch == 1
    b = Batches(np.arange(3 * T), T, 32)  # one token fewer: only two full streams
    assert b.N == 2


@st.composite
def eval_case(draw):
    n = draw(st.integers(0, 200))
    return n, draw(st.integers(1, 20)), draw(st.integers(1, 8))


@settings(max_examples=150, deadline=None)
@given(eval_case())
def test_eval_windows_score_every_target_once_per_part(case):
    n, T, streams = case
    ids = (np.arange(n) * 2 + 5).astype(np.uint16)  # unsigned, as the token files store them
    wins = list(eval_windows(ids, T, streams))
    if n < 2:
        assert wins == []
        return
    S = wins[0][0].shape[1]
    assert 1 <= S <= streams
    X = np.concatenate([x for x, _ in wins])
    Y = np.concatenate([y for _, y in wins])
    assert all(x.shape == y.shape and x.shape[0] <= T for x, y in wins)
    L = -(-(n - 1) // S)
    assert X.shape == (L, S)
    for s in range(S):  # part s, read in order across windows (state carried), then padding
        k = max(0, min(L, n - 1 - s * L))
        np.testing.assert_array_equal(X[:k, s], ids[s * L:s * L + k])
        np.testing.assert_array_equal(Y[:k, s], ids[s * L + 1:s * L + k + 1])
        assert (Y[k:, s] == -1).all()
    targets = Y[Y >= 0]
    np.testing.assert_array_equal(np.sort(targets), ids[1:])  # every target of the text, once


def test_eval_windows_single_stream_covers_the_whole_text():
    ids = np.arange(23)
    Y = np.concatenate([y for _, y in eval_windows(ids, 5, 1)])
    np.testing.assert_array_equal(Y[:, 0], ids[1:])
