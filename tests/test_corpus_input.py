"""Corpus input (issue 16): .gz, .bz2 and .xz read transparently, streamed like plain files; a
binary file is named for what it looks like; n-best / score files read line by line."""
from __future__ import annotations

import bz2
import gzip
import lzma

import pytest

from charlm.data import iter_text, read_text
from charlm.data.corpus import iter_lines
from charlm.errors import CharlmError

TEXT = "first line\r\nsecond ☃ line\nthird\n" * 50


@pytest.mark.parametrize("suffix, opener", [(".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open)])
def test_compressed_text_reads_as_the_plain_text(tmp_path, suffix, opener):
    plain = tmp_path / "c.txt"
    plain.write_bytes(TEXT.encode())
    packed = tmp_path / f"c.txt{suffix}"
    with opener(packed, "wb") as f:
        f.write(TEXT.encode())
    assert read_text(str(packed)) == read_text(str(plain)) == TEXT.replace("\r\n", "\n")
    pieces = list(iter_text(str(packed), chunk_bytes=64))  # streamed in pieces ending at line ends
    assert len(pieces) > 5 and "".join(pieces) == TEXT.replace("\r\n", "\n")


@pytest.mark.parametrize("head, name", [(b"PK\x03\x04", "zip"), (b"%PDF-1.4", "PDF"), (b"\x89PNG\r\n", "PNG"),
                                        (b"\x7fELF\x02", "ELF")])
def test_binary_input_is_named(tmp_path, head, name):
    f = tmp_path / "data.txt"
    f.write_bytes(head + bytes(range(256)) * 4)
    with pytest.raises(CharlmError, match=f"looks like .*{name}"):
        read_text(str(f))


def test_truncated_gzip_is_one_clear_error(tmp_path):
    f = tmp_path / "t.txt.gz"
    f.write_bytes(gzip.compress(TEXT.encode())[:40])
    with pytest.raises(CharlmError, match="t.txt.gz"):
        read_text(str(f))


def test_iter_lines_yields_lines_with_offsets_in_errors(tmp_path):
    f = tmp_path / "l.txt"
    f.write_bytes(b"\xef\xbb\xbfone\r\ntwo\n\nlast")
    assert list(iter_lines(str(f))) == ["one", "two", "", "last"]
    f.write_bytes(b"good\nbad \xff\n")
    with pytest.raises(CharlmError, match="0xff at offset 9"):
        list(iter_lines(str(f)))


def test_train_reads_a_gzip_corpus(run_cli, tmp_path):
    from helpers import TINY, ok
    with gzip.open(tmp_path / "tiny.txt.gz", "wb") as f:
        f.write(TINY.read_bytes())
    ok(run_cli("train", "tiny.txt.gz", "--steps", "2", "--hidden", "8", "--layers", "1", "--embed", "4",
               "--seq-len", "8", "--batch", "2", "--eval-every", "2", "--out", "run", "--json", "--sample-length", "0"))
    assert (tmp_path / "run" / "best.npz").exists()
