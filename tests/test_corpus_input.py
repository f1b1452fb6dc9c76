"""Corpus input (issue 16): .gz, .bz2 and .xz read transparently, streamed like plain files; a
binary file is named for what it looks like; n-best / score files read line by line; several files
and directories as one corpus, in the order the help states."""
from __future__ import annotations

import bz2
import gzip
import lzma
import os

import numpy as np
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


# ------------------------------------------------------------ several files and directories
TRAIN_TINY = ("--steps", "1", "--hidden", "8", "--layers", "1", "--embed", "4", "--seq-len", "8", "--batch", "2",
              "--eval-every", "1", "--json", "--sample-length", "0")


def _tree(root):
    """root/b.txt, root/a.txt.gz, root/sub/c.txt (no final newline), root/sub/.hidden.txt, root/.git/x.txt,
    root/sub2/d.txt.bz2; the files a corpus of root reads, in order."""
    (root / "sub").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "sub2").mkdir()
    (root / "b.txt").write_text("bee\n")
    with gzip.open(root / "a.txt.gz", "wb") as f:
        f.write("ay\n".encode())
    (root / "sub" / "c.txt").write_text("sea")
    (root / "sub" / ".hidden.txt").write_text("HIDDEN\n")
    (root / ".git" / "x.txt").write_text("GIT\n")
    with bz2.open(root / "sub2" / "d.txt.bz2", "wb") as f:
        f.write("dee\n".encode())
    return [root / "a.txt.gz", root / "b.txt", root / "sub" / "c.txt", root / "sub2" / "d.txt.bz2"]


def test_corpus_files_order_and_what_is_skipped(tmp_path):
    from charlm.data.corpus import corpus_files
    expected = _tree(tmp_path / "d")
    os.mkfifo(tmp_path / "d" / "sub" / "fifo")            # not a regular file: skipped in a directory
    (tmp_path / "d" / "sub" / "gone").symlink_to(tmp_path / "nowhere")  # a dangling link too
    (tmp_path / "d" / "loop").symlink_to(tmp_path / "d")  # a linked folder is not followed
    (tmp_path / "z.txt").write_text("zed\n")
    assert corpus_files([tmp_path / "d"]) == [str(p) for p in expected]
    # the arguments in the order given, a directory expanded where it stands
    got = corpus_files([str(tmp_path / "z.txt"), str(tmp_path / "d"), str(tmp_path / "z.txt")])
    assert got == [str(tmp_path / "z.txt")] + [str(p) for p in expected] + [str(tmp_path / "z.txt")]


def test_several_files_read_as_one_text_each_ending_a_line(tmp_path):
    from charlm.data.corpus import corpus_files, iter_texts
    _tree(tmp_path / "d")
    (tmp_path / "last.txt").write_text("no newline at the end")
    text = "".join(iter_texts(corpus_files([tmp_path / "d", tmp_path / "last.txt"])))
    assert text == "ay\nbee\nsea\ndee\nno newline at the end"  # c.txt ends a line; the last file is as it is
    (tmp_path / "empty.txt").write_text("")
    assert "".join(iter_texts([str(tmp_path / "last.txt"), str(tmp_path / "empty.txt"),
                               str(tmp_path / "last.txt")])).count("\n") == 1


@pytest.mark.parametrize("setup, args, needles", [
    (lambda p: (p / "empty").mkdir(), ["empty"], ["empty", "holds no file"]),
    (lambda p: ((p / "hid").mkdir(), (p / "hid" / ".x").write_text("x\n")), ["hid"], ["hid", "hidden"]),
    (lambda p: (p / "a.txt").write_text("a\n"), ["a.txt", "-"], ["'-'", "only"]),
    (lambda p: (p / "a.txt").write_text("a\n"), ["a.txt", "missing.txt"], ["missing.txt", "not found"]),
])
def test_bad_corpus_lists_are_one_line_errors(run_cli, tmp_path, setup, args, needles):
    from helpers import failed
    setup(tmp_path)
    failed(run_cli("train", *args, *TRAIN_TINY, "--out", "run"), *needles)
    assert not (tmp_path / "run").exists()


def test_a_binary_file_in_a_directory_is_named(run_cli, tmp_path):
    from helpers import failed
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("some text\n" * 20)
    (tmp_path / "d" / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    failed(run_cli("train", "d", *TRAIN_TINY, "--out", "run"), "b.png", "PNG")
    assert not (tmp_path / "run").exists()


def test_train_on_files_and_a_directory_equals_their_concatenation(run_cli, tmp_path):
    from charlm.lm import checkpoint
    from helpers import TINY, ok
    text = TINY.read_text(encoding="utf-8")
    half = len(text) // 2
    cut = text.index("\n", half) + 1
    (tmp_path / "one.txt").write_text(text[:cut])
    (tmp_path / "more").mkdir()
    with gzip.open(tmp_path / "more" / "2.txt.gz", "wb") as f:
        f.write(text[cut:].encode())
    (tmp_path / "all.txt").write_text(text)
    ok(run_cli("train", "one.txt", "more", *TRAIN_TINY, "--out", "many"))
    ok(run_cli("train", "all.txt", *TRAIN_TINY, "--out", "single"))
    many, single = (checkpoint.load(tmp_path / r / "latest.npz") for r in ("many", "single"))
    assert many.vocab.tokens == single.vocab.tokens and many.data["n_tokens"] == single.data["n_tokens"]
    assert many.corpus == "one.txt, more"
    a, b = (np.fromfile(tmp_path / r / many.data["tokens"], dtype=many.data["dtype"]) for r in ("many", "single"))
    assert np.array_equal(a, b)


def test_library_train_takes_a_list_of_paths(tmp_path):
    import charlm
    from helpers import TINY
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "t.txt").write_text(TINY.read_text(encoding="utf-8"))
    events = list(charlm.train([TINY, tmp_path / "d"], steps=1, hidden=8, layers=1, embed=4, seq_len=8, batch=2,
                               eval_every=1, sample_length=0, out=str(tmp_path / "run")))
    assert events[-1]["event"] == "done"


def test_train_help_states_the_order(run_cli):
    from helpers import ok
    shown = " ".join(ok(run_cli("train", "--help")).stdout.replace("│", " ").split())
    assert "in the order given" in shown and "sorted path order" in shown and "hidden ones skipped" in shown


@pytest.mark.parametrize("suffix, opener", [(".gz", gzip.open), (".bz2", bz2.open), (".xz", lzma.open)])
def test_iter_lines_reads_compressed_files(tmp_path, suffix, opener):
    """`score --file F.gz` and `--nbest F.gz` read through iter_lines: decompressed, line by line."""
    packed = tmp_path / f"l.txt{suffix}"
    with opener(packed, "wb") as f:
        f.write(TEXT.encode())
    assert list(iter_lines(str(packed))) == TEXT.replace("\r\n", "\n").splitlines()


def test_iter_lines_names_a_binary_file(tmp_path):
    f = tmp_path / "img.txt"
    f.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)))
    with pytest.raises(CharlmError, match="img.txt is not text: it looks like a PNG image"):
        list(iter_lines(str(f)))
