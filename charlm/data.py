"""Vocabulary, corpus loading, and (T, N) windows for truncated BPTT.

Character level: a token is one Unicode code point. The newline character is
always in the vocabulary: it ends a line (the end-of-sentence token) and, fed
as the first input from the zero state, it is the begin-of-text context (like
KenLM's <s>) for sampling and scoring. Word level: the same with <eos>.
"""
from __future__ import annotations

import os
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CharlmError

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
            return cls(tuple(d["tokens"]), d.get("level", "char"), bool(d.get("lower", False)))
        except (KeyError, TypeError) as e:
            raise CharlmError(f"malformed vocabulary in checkpoint: {e}") from None


def default_corpus() -> tuple[str, str]:
    """The English documentation text every CPython installation carries
    (pydoc_data.topics, ~460 KB): a corpus that needs no download."""
    try:
        from pydoc_data.topics import topics
    except ImportError:  # pragma: no cover - stripped Python builds
        raise CharlmError("this Python has no pydoc_data module; give a corpus file: charlm train FILE") from None
    return "\n".join(topics[k] for k in sorted(topics)), "pydoc-topics"


def _check_source(path: str, what: str) -> None:
    """Refuse missing files, directories, FIFOs and devices with a clear message."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CharlmError(f"{what} not found: {path}") from None
    except OSError as e:
        raise CharlmError(f"cannot read {what} {path}: {e.strerror}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CharlmError(f"{path} is a directory; give a text file")
    if not stat.S_ISREG(st.st_mode):
        raise CharlmError(f"{path} is not a regular file (a FIFO, socket or device); give a text file")


def _check_codec(encoding: str, errors: str) -> None:
    import codecs
    try:
        codecs.lookup(encoding)
    except LookupError:
        raise CharlmError(f"unknown --encoding {encoding!r}") from None
    if errors not in ("strict", "replace", "ignore"):
        raise CharlmError(f"--errors must be strict, replace or ignore, got {errors!r}")


def check_text_file(path: str, encoding: str = "utf-8", errors: str = "strict", what: str = "corpus") -> None:
    """The checks iter_text makes before it reads (codec, --errors value, a readable
    regular file), done at once and without reading: iter_text is a generator and
    runs them only when first iterated."""
    _check_codec(encoding, errors)
    if path == "-":
        return
    _check_source(path, what)
    try:
        open(path, "rb").close()
    except PermissionError:
        raise CharlmError(f"permission denied reading {what} {path}") from None
    except OSError as e:
        raise CharlmError(f"cannot read {what} {path}: {e.strerror}") from None


def iter_text(path: str, encoding: str = "utf-8", errors: str = "strict", what: str = "corpus",
              chunk_bytes: int = 1 << 24):
    """Stream a text file ('-' is standard input) as str pieces that end at line
    boundaries (all but the last), decoding incrementally, so a corpus larger
    than memory can be read. A UTF-8 byte-order mark is dropped and CRLF / CR
    line ends become LF. Errors name the problem and the byte offset."""
    import codecs
    _check_codec(encoding, errors)
    if path == "-":
        f = sys.stdin.buffer
        name = "standard input"
    else:
        _check_source(path, what)
        name = path
        try:
            f = open(path, "rb")
        except PermissionError:
            raise CharlmError(f"permission denied reading {what} {path}") from None
        except OSError as e:
            raise CharlmError(f"cannot read {what} {path}: {e.strerror}") from None
    utf8 = codecs.lookup(encoding).name == "utf-8"
    decoder = codecs.getincrementaldecoder(encoding)(errors=errors)
    fed = 0          # bytes handed to the decoder so far
    carry = ""       # text after the last newline, held for the next piece
    first = True
    try:
        while True:
            try:
                data = f.read(chunk_bytes)
            except OSError as e:
                raise CharlmError(f"cannot read {what} {name}: {e.strerror}") from None
            final = not data
            if first and utf8 and data.startswith(b"\xef\xbb\xbf"):
                data = data[3:]
                fed += 3
            first = False
            buffered = len(decoder.getstate()[0]) if hasattr(decoder, "getstate") else 0
            try:
                text = decoder.decode(data, final=final)
            except UnicodeDecodeError as e:
                offset = fed - buffered + e.start
                bad = e.object[e.start] if e.start < len(e.object) else 0
                raise CharlmError(
                    f"{name} is not valid {encoding}: bad byte 0x{bad:02x} at offset {offset}; "
                    f"pass --encoding ENCODING, or --errors replace to substitute U+FFFD") from None
            fed += len(data)
            text, carry = carry + text, ""  # drop the old carry now: it can be most of a long line
            if final:
                if text:
                    yield _normalize_newlines(text)
                return
            cut = text.rfind("\n")
            if cut < 0:
                carry = text
                continue
            carry = text[cut + 1:]
            yield _normalize_newlines(text[:cut + 1])
    finally:
        if f is not sys.stdin.buffer:
            f.close()


def _normalize_newlines(text: str) -> str:
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    return text


def read_text(path: str, encoding: str = "utf-8", errors: str = "strict", what: str = "corpus") -> str:
    """Read a whole text file ('-' is standard input) with errors a person can act on.

    A UTF-8 byte-order mark is dropped and CRLF / CR line ends become LF.
    """
    return "".join(iter_text(path, encoding, errors, what))


def split_train_val(ids: np.ndarray, val_frac: float) -> tuple[np.ndarray, np.ndarray]:
    """The last val_frac of the tokens is held out (at least 2 tokens, if the corpus allows)."""
    n_val = max(2, int(round(len(ids) * val_frac)))
    if len(ids) - n_val < 2:
        return ids, ids[:0]
    return ids[:-n_val], ids[-n_val:]


class Batches:
    """N parallel contiguous streams over the training ids, cut into windows of T.

    Stream s reads ids[s*L : (s+1)*L + 1]. Window k gives inputs x (T, N) and
    targets y (T, N) at offsets k*T .. k*T+T-1 of every stream; the hidden state
    is carried from window k to k+1 and reset when an epoch wraps.
    """

    def __init__(self, ids: np.ndarray, seq_len: int, batch: int):
        if len(ids) < seq_len + 1:
            raise CharlmError(
                f"the training text has {len(ids)} tokens, fewer than one window of --seq-len {seq_len} + 1; "
                f"give a longer corpus or a smaller --seq-len")
        self.ids = ids
        self.T = seq_len
        self.N = min(batch, (len(ids) - 1) // seq_len)
        self.L = (len(ids) - 1) // self.N
        self.windows_per_epoch = self.L // self.T
        self._offsets = (np.arange(self.N) * self.L)[None, :] + np.arange(self.T)[:, None]  # (T, N)

    def window(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self._offsets + k * self.T
        return self.ids[idx].astype(np.int32), self.ids[idx + 1].astype(np.int32)


def eval_windows(ids: np.ndarray, seq_len: int, streams: int):
    """Cut ids into `streams` contiguous parts scored side by side (state reset at
    each part); yield (x, y) windows of at most seq_len steps, carrying state in
    between. Every target of ids[1:] is scored exactly once: the parts have
    ceil(n / streams) targets and the last one(s) are padded with target -1
    (not scored; input 0)."""
    n = len(ids) - 1
    if n < 1:
        return
    S = max(1, min(streams, n // max(1, seq_len)))
    L = -(-n // S)
    offs = np.arange(S) * L
    for start in range(0, L, seq_len):
        T = min(seq_len, L - start)
        pos = offs[None, :] + start + np.arange(T)[:, None]  # (T, S) input positions
        valid = pos < n
        # int32 before the -1: ids are often uint8/uint16 (a memory map), where -1 would wrap
        x = np.where(valid, ids[np.minimum(pos, n - 1)].astype(np.int32), 0)
        y = np.where(valid, ids[np.minimum(pos + 1, n)].astype(np.int32), -1)
        yield x.astype(np.int32), y.astype(np.int32)


# ----------------------------------------------------------------- corpora on disk
TOKENS_FILE = "tokens.bin"
VAL_TOKENS_FILE = "val_tokens.bin"


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


def write_tokens(pieces, vocab: Vocab, path) -> tuple[np.ndarray, dict[str, int]]:
    """Second streaming pass: encode pieces into a raw id file (the smallest
    integer type that holds the vocabulary), written to a temporary file and
    renamed into place. Returns the ids memory-mapped read-only, and the counts of
    out-of-vocabulary tokens (characters are left out, words become <unk>)."""
    from collections import Counter
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    dtype = id_dtype(len(vocab))
    oov: Counter = Counter()
    try:
        with open(tmp, "wb") as raw:
            for piece in _bounded(pieces, vocab.level):
                if _has_oov(vocab, piece):
                    ids, bad = vocab.encode(piece)
                    oov.update(tok for _, tok in bad)
                else:
                    ids = vocab.encode_corpus(piece)
                raw.write(np.asarray(ids, dtype=dtype).tobytes())
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise CharlmError(f"could not write the token file {path}: {e.strerror or e}") from None
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass
    return open_tokens(path, dtype), dict(oov)


ENCODE_BLOCK = 1 << 18  # characters encoded at a time: encode_corpus needs ~14 bytes per character


def _bounded(pieces, level: str):
    """Character level: the pieces cut into blocks of at most ENCODE_BLOCK characters,
    so one very long line does not need many times its size in memory. (Words stay
    whole: a cut could split a word.)"""
    for piece in pieces:
        if level != "char" or len(piece) <= ENCODE_BLOCK:
            yield piece
            continue
        for i in range(0, len(piece), ENCODE_BLOCK):
            yield piece[i:i + ENCODE_BLOCK]


def open_tokens(path, dtype) -> np.ndarray:
    """A raw id file memory-mapped read-only (an empty file gives an empty array)."""
    path = Path(path)
    dtype = np.dtype(dtype)
    if path.stat().st_size == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r")


def _has_oov(vocab: Vocab, piece: str) -> bool:
    if vocab.level == "word":
        index = vocab._index
        return any(w not in index for w in (piece.lower() if vocab.lower else piece).split())
    index = vocab._index
    return any(c not in index for c in set(piece))


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes, read in blocks."""
    import hashlib
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()
