"""Reading text: files, standard input or the built-in corpus, streamed in pieces that end at line
boundaries, with errors a person can act on (the file, the byte offset, the flag to pass)."""
from __future__ import annotations

import os
import stat
import sys

from ..errors import CharlmError


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


def corpus_files(paths, what: str = "corpus") -> list[str]:
    """The files a corpus of several paths reads, in order: each file as given, each directory's
    regular files below it (hidden files and folders, a name starting with '.', skipped; links to
    folders not followed) sorted by path. '-' (standard input) only alone. Errors: a path that does not exist, a directory
    with no file to read, a FIFO or device."""
    paths = [os.fspath(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)]
    if not paths:
        raise CharlmError(f"no {what} given")
    if "-" in paths and len(paths) > 1:
        raise CharlmError("'-' (standard input) must be the only corpus; give files and directories without it")
    files: list[str] = []
    for path in paths:
        if path != "-" and os.path.isdir(path):
            found = _files_under(path)
            if not found:
                raise CharlmError(f"the directory {path} holds no file to read (hidden files are skipped); "
                                  f"give a directory of text files")
            files += found
        else:
            files.append(path)
    return files


def _files_under(folder: str) -> list[str]:
    """The regular, non-hidden files below folder (symbolic links followed for files, not for
    folders), sorted by their path's components."""
    def refuse(e: OSError):
        raise CharlmError(f"cannot read the directory {e.filename}: {e.strerror}")
    found = []
    for root, dirs, names in os.walk(folder, onerror=refuse, followlinks=False):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for name in names:
            full = os.path.join(root, name)
            if name.startswith("."):
                continue
            try:
                regular = stat.S_ISREG(os.stat(full).st_mode)
            except OSError:  # a dangling link
                continue
            if regular:
                found.append(full)
    return sorted(found, key=lambda f: os.path.relpath(f, folder).split(os.sep))


def check_text_files(paths, encoding: str = "utf-8", errors: str = "strict", what: str = "corpus") -> list[str]:
    """corpus_files(paths), each checked as check_text_file does (without reading the text)."""
    files = corpus_files(paths, what)
    for f in files:
        check_text_file(f, encoding, errors, what)
    return files


def iter_texts(files, encoding: str = "utf-8", errors: str = "strict", what: str = "corpus"):
    """Stream several text files (compressed or not) one after another, as iter_text does one; a file
    whose text does not end with a newline gets one before the next file, so files never run into
    each other (the last file is left as it is, as a single file is)."""
    last = "\n"  # the last character yielded
    for path in files:
        first = True
        for piece in iter_text(path, encoding, errors, what):
            if not piece:
                continue
            if first and last != "\n":
                yield "\n"
            first = False
            last = piece[-1]
            yield piece


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
        kind = None
    else:
        _check_source(path, what)
        name = path
        f, kind = _open_maybe_compressed(path, what)
        if kind:
            name = f"{path} (decompressed {kind})"
    utf8 = codecs.lookup(encoding).name == "utf-8"
    decoder = codecs.getincrementaldecoder(encoding)(errors=errors)
    fed = 0          # bytes handed to the decoder so far
    carry = ""       # text after the last newline, held for the next piece
    first = True
    try:
        while True:
            try:
                data = f.read(chunk_bytes)
            except (OSError, EOFError, ValueError) as e:  # a damaged or truncated compressed file too
                raise CharlmError(f"cannot read {what} {name}: {getattr(e, 'strerror', None) or e}") from None
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
                looks = _looks_like(path) if fed - buffered + e.start < 4096 and path != "-" else None
                if looks:
                    raise CharlmError(f"{name} is not text: it looks like {looks} (bad byte 0x{bad:02x} at offset "
                                      f"{offset}); give a text file (plain, .gz, .bz2 or .xz), or pass --errors "
                                      f"replace to read it anyway") from None
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


# What a file is by its first bytes: compressed text read transparently, and other formats named
# when they fail to decode (so the error says "it looks like a zip archive", not "pass --encoding").
_COMPRESSED = {b"\x1f\x8b": "gzip", b"BZh": "bzip2", b"\xfd7zXZ\x00": "xz"}
_SIGNATURES = {b"PK\x03\x04": "a zip archive (or .npz, .docx, .xlsx)", b"%PDF": "a PDF document",
               b"\x89PNG": "a PNG image", b"\xff\xd8\xff": "a JPEG image", b"GIF8": "a GIF image",
               b"\x7fELF": "an executable (ELF)", b"7z\xbc\xaf": "a 7-Zip archive",
               b"\x28\xb5\x2f\xfd": "a zstd-compressed file", b"\x93NUMPY": "a NumPy .npy array",
               b"SQLite format 3": "an SQLite database", **{k: f"{v}-compressed data" for k, v in _COMPRESSED.items()}}


def _open_maybe_compressed(path: str, what: str):
    """(binary file object, "gzip" | "bzip2" | "xz" | None): compressed text is decompressed as it is read."""
    try:
        with open(path, "rb") as raw:
            head = raw.read(8)
        kind = next((k for magic, k in _COMPRESSED.items() if head.startswith(magic)), None)
        if kind == "gzip":
            import gzip
            return gzip.open(path, "rb"), kind
        if kind == "bzip2":
            import bz2
            return bz2.open(path, "rb"), kind
        if kind == "xz":
            import lzma
            return lzma.open(path, "rb"), kind
        return open(path, "rb"), None
    except PermissionError:
        raise CharlmError(f"permission denied reading {what} {path}") from None
    except OSError as e:
        raise CharlmError(f"cannot read {what} {path}: {e.strerror}") from None


def _looks_like(path: str) -> str | None:
    """What a file that is not text looks like, from its first bytes (None: not known, or NUL bytes)."""
    try:
        with open(path, "rb") as f:
            head = f.read(16)
    except OSError:
        return None
    return next((name for magic, name in _SIGNATURES.items() if head.startswith(magic)), None)


def iter_lines(path: str, encoding: str = "utf-8", errors: str = "strict", what: str = "input"):
    """Yield the lines of a text file ('-' is standard input) one at a time, without their line
    end, each as soon as it has been read (a pipe is scored as it arrives) and without holding
    more than one line. A UTF-8 byte-order mark is dropped and a CR before the LF too. .gz, .bz2
    and .xz files are decompressed as they are read. Errors as iter_text's (the byte offset of a
    bad byte, what a binary file looks like). The encoding must keep the newline byte as the line
    end (UTF-8, Latin-1, ...)."""
    import codecs
    _check_codec(encoding, errors)
    kind = None
    if path == "-":
        f, name = sys.stdin.buffer, "standard input"
    else:
        _check_source(path, what)
        f, kind = _open_maybe_compressed(path, what)
        name = f"{path} (decompressed {kind})" if kind else path
    offset = 0
    try:
        while True:
            try:
                data = f.readline()
            except (OSError, EOFError, ValueError) as e:  # a damaged or truncated compressed file too
                raise CharlmError(f"cannot read {what} {name}: {getattr(e, 'strerror', None) or e}") from None
            if not data:
                return
            start = offset
            offset += len(data)
            if start == 0 and encoding.lower().replace("_", "-") in ("utf-8", "utf8") and data.startswith(b"\xef\xbb\xbf"):
                data, start = data[3:], 3
            data = data[:-1] if data.endswith(b"\n") else data
            data = data[:-1] if data.endswith(b"\r") else data
            try:
                yield codecs.decode(data, encoding, errors)
            except UnicodeDecodeError as e:
                bad, at = data[e.start], start + e.start
                looks = _looks_like(path) if at < 4096 and path != "-" and not kind else None
                if looks:
                    raise CharlmError(f"{name} is not text: it looks like {looks} (bad byte 0x{bad:02x} at offset "
                                      f"{at}); give a text file (plain, .gz, .bz2 or .xz), or pass --errors "
                                      f"replace to read it anyway") from None
                raise CharlmError(
                    f"{name} is not valid {encoding}: bad byte 0x{bad:02x} at offset {at}; "
                    f"pass --encoding ENCODING, or --errors replace to substitute U+FFFD") from None
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
