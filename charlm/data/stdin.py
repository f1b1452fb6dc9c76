"""Standard input as a corpus: copied once to an anonymous temporary file, so that it can be read
twice (vocabulary pass, encoding pass) without holding it in memory. Memory stays flat whatever
arrives; a "line" longer than MAX_LINE_BYTES (e.g. `< /dev/zero`, which has no newline at all) is
refused, since the corpus reader must hold one line at a time."""
from __future__ import annotations

import os
import sys
import tempfile

from ..errors import CharlmError

MAX_LINE_BYTES = 256 << 20
BLOCK = 1 << 20


def spool_stdin(stream=None, max_line: int = MAX_LINE_BYTES) -> str:
    """Copy the stream (default: standard input's bytes) to a temporary file that is already
    unlinked (nothing is left behind, whatever happens to this process); returns a path that reads
    it for as long as the process lives (/proc/self/fd/N; elsewhere a named file removed at exit)."""
    stream = stream if stream is not None else sys.stdin.buffer
    fd, name = tempfile.mkstemp(prefix="charlm-stdin-", suffix=".txt")
    path = f"/proc/self/fd/{fd}"
    if os.path.exists(path):
        os.unlink(name)  # the descriptor keeps the data; the name is no longer needed
    else:  # no /proc: keep the name, remove it at exit
        import atexit
        path = name
        atexit.register(lambda: os.path.exists(name) and os.unlink(name))
    line = 0  # bytes since the last line end
    try:
        while True:
            block = stream.read(BLOCK)
            if not block:
                break
            end = max(block.rfind(b"\n"), block.rfind(b"\r"))
            line = len(block) - end - 1 if end >= 0 else line + len(block)
            if line > max_line:
                raise CharlmError(f"standard input has a line longer than {max_line >> 20} MiB (no line end): "
                                  f"not a text corpus; give a file, or text with line ends")
            _write_all(fd, block)
    except BaseException as e:
        os.close(fd)
        if isinstance(e, OSError):
            raise CharlmError(f"cannot copy standard input to a temporary file in {tempfile.gettempdir()}: "
                              f"{e.strerror}") from None
        raise
    return path


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
