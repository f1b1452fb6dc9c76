"""The vocabulary: tokens and their ids, encoding and decoding, and the first pass over a corpus.

Character level: a token is one Unicode code point. The newline character is
always in the vocabulary: it ends a line (the end-of-sentence token) and, fed
as the first input from the zero state, it is the begin-of-text context (like
KenLM's <s>) for sampling and scoring. Word level: the same with <eos>.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CharlmError

EOS_CHAR = "\n"
EOS_WORD = "<eos>"
UNK_WORD = "<unk>"


def id_dtype(vocab_size: int) -> np.dtype:
    """Smallest unsigned integer type that holds every id."""
    if vocab_size <= 1 << 8:
        return np.dtype(np.uint8)
    if vocab_size <= 1 << 16:
        return np.dtype(np.uint16)
    return np.dtype(np.uint32)


@dataclass(frozen=True)
class Vocab:
    """An ordered token list; a token's id is its index.

    level "char": a token is a code point; "\n" is the end-of-line token and
    characters outside the vocabulary are left out (and reported).
    level "word": tokens are whitespace-separated words (the convention of PTB
    and WikiText, which come pre-tokenised); every line ends with "<eos>";
    words outside the vocabulary become "<unk>" (and are reported). lower:
    the text is lower-cased before tokenising.
    """
    tokens: tuple[str, ...]
    level: str = "char"
    lower: bool = False

    def __post_init__(self):
        if self.level not in ("char", "word"):
            raise CharlmError(f"unknown vocabulary level {self.level!r}")
        if not all(isinstance(t, str) and t for t in self.tokens):
            raise CharlmError("vocabulary tokens must be non-empty strings")
        if self.level == "char" and any(len(t) != 1 for t in self.tokens):
            bad = next(t for t in self.tokens if len(t) != 1)
            raise CharlmError(f"a character vocabulary holds one character per token, not {bad[:20]!r}")
        if self.level == "word" and any(len(t.split()) != 1 or t.strip() != t for t in self.tokens):
            bad = next(t for t in self.tokens if len(t.split()) != 1 or t.strip() != t)
            raise CharlmError(f"a word vocabulary holds words without spaces, not {bad[:20]!r}")
        if len(set(self.tokens)) != len(self.tokens):
            raise CharlmError("vocabulary has duplicate tokens")
        index = {t: i for i, t in enumerate(self.tokens)}
        if self.level == "char" and EOS_CHAR not in index:
            raise CharlmError("a character vocabulary must contain the newline character")
        if self.level == "word" and not (EOS_WORD in index and UNK_WORD in index):
            raise CharlmError(f"a word vocabulary must contain {EOS_WORD} and {UNK_WORD}")
        object.__setattr__(self, "_index", index)

    @classmethod
    def from_text(cls, text: str) -> "Vocab":
        """Character vocabulary: every code point of text, plus the newline, in code-point order."""
        return cls(tuple(sorted(set(text) | {EOS_CHAR})), "char")

    @classmethod
    def words_from_text(cls, text: str, *, min_count: int = 1, max_vocab: int = 50_000,
                        lower: bool = False) -> "Vocab":
        """Word vocabulary: <eos>, <unk>, then the words seen at least min_count
        times, most frequent first (ties alphabetical), max_vocab tokens in all."""
        from collections import Counter
        return cls.words_from_counts(Counter((text.lower() if lower else text).split()),
                                     min_count=min_count, max_vocab=max_vocab, lower=lower)

    @classmethod
    def words_from_counts(cls, counts, *, min_count: int = 1, max_vocab: int = 50_000,
                          lower: bool = False) -> "Vocab":
        """Word vocabulary from a Counter of words (see words_from_text)."""
        if min_count < 1:
            raise CharlmError(f"--min-count must be at least 1, got {min_count}")
        if max_vocab < 3:
            raise CharlmError(f"--max-vocab must be at least 3, got {max_vocab}")
        counts = dict(counts)
        counts.pop(EOS_WORD, None)
        counts.pop(UNK_WORD, None)
        kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls((EOS_WORD, UNK_WORD, *kept[:max_vocab - 2]), "word", lower)

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def eos_id(self) -> int:
        return self._index[EOS_CHAR if self.level == "char" else EOS_WORD]

    @property
    def unk_id(self) -> int | None:
        return self._index.get(UNK_WORD) if self.level == "word" else None

    def id_of(self, token: str) -> int | None:
        return self._index.get(token)

    def split(self, text: str) -> list[str]:
        """The text as tokens: characters, or words with <eos> between lines
        (a line end gives <eos>; no <eos> is added after the last line)."""
        if self.level == "char":
            return list(text)
        if self.lower:
            text = text.lower()
        lines = text.split("\n")
        out: list[str] = []
        for k, line in enumerate(lines):
            out.extend(line.split())
            if k < len(lines) - 1:
                out.append(EOS_WORD)
        return out

    def encode(self, text: str) -> tuple[np.ndarray, list[tuple[int, str]]]:
        """ids (int32) of the text's tokens and the (position, token) of each token
        outside the vocabulary. Characters: left out of ids, position = character
        offset. Words: mapped to <unk>, position = index in ids."""
        index = self._index
        ids = []
        oov = []
        unk = self.unk_id
        for pos, tok in enumerate(self.split(text)):
            i = index.get(tok)
            if i is None:
                if unk is None:
                    oov.append((pos, tok))
                    continue
                oov.append((len(ids), tok))
                i = unk
            ids.append(i)
        return np.array(ids, dtype=np.int32), oov

    def encode_corpus(self, text: str) -> np.ndarray:
        """Ids of a whole corpus in the smallest integer type. Characters must all
        be in the vocabulary; words outside it become <unk>."""
        if self.level == "word":
            index, unk = self._index, self.unk_id
            return np.fromiter((index.get(t, unk) for t in self.split(text)), dtype=id_dtype(len(self)))
        table = np.full(max(map(ord, self.tokens)) + 2, -1, dtype=np.int64)
        for i, t in enumerate(self.tokens):
            table[ord(t)] = i
        cps = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
        cps = np.minimum(cps, len(table) - 1)
        ids = table[cps]
        if (ids < 0).any():
            raise CharlmError("the corpus has characters outside the vocabulary")
        return ids.astype(id_dtype(len(self)))

    def decode(self, ids) -> str:
        """Text of ids: characters joined; words joined by spaces with <eos> as a newline."""
        if self.level == "char":
            toks = self.tokens
            return "".join(toks[int(i)] for i in ids)
        return self.decode_words(ids, True)[0]

    def decode_words(self, ids, at_line_start: bool) -> tuple[str, bool]:
        """Streaming word decoding: the text of ids and whether it ends at a line start."""
        parts = []
        eos = self.eos_id
        for i in ids:
            i = int(i)
            if i == eos:
                parts.append("\n")
                at_line_start = True
            else:
                parts.append(self.tokens[i] if at_line_start else " " + self.tokens[i])
                at_line_start = False
        return "".join(parts), at_line_start

    def to_dict(self) -> dict:
        return {"level": self.level, "tokens": list(self.tokens), "lower": self.lower}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        try:
            if not isinstance(d["tokens"], list) or not 0 < len(d["tokens"]) < 1 << 32:
                raise TypeError("tokens is not a list of 1 to 2**32 - 1 tokens")
            return cls(tuple(d["tokens"]), d.get("level", "char"), bool(d.get("lower", False)))
        except (KeyError, TypeError, AttributeError) as e:
            raise CharlmError(f"malformed vocabulary in checkpoint: {e}") from None


def scan_vocab(pieces, level: str, *, lower: bool = False, min_count: int = 1,
               max_vocab: int = 50_000) -> Vocab:
    """First streaming pass: the vocabulary of a corpus given as text pieces."""
    if level == "word":
        from collections import Counter
        counts: Counter = Counter()
        for piece in pieces:
            counts.update((piece.lower() if lower else piece).split())
        return Vocab.words_from_counts(counts, min_count=min_count, max_vocab=max_vocab, lower=lower)
    chars: set[str] = set()
    for piece in pieces:
        chars.update(piece)
    return Vocab(tuple(sorted(chars | {EOS_CHAR})), "char")
