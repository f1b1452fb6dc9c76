"""Self-describing .npz files, written atomically and read without pickle.

write_npz: arrays plus a JSON metadata record (with a SHA-256 checksum of every array's
name, dtype, shape and bytes in name order, followed by the JSON without the checksum)
into a temporary file in the same folder, flushed and fsynced, then os.replace()d over
the target, so a crash leaves either the old file or the new. read_npz: the reverse,
refusing a file whose format, version or checksum does not match. Language-model
checkpoints (charlm.lm.checkpoint) and QA model files (charlm.qa.checkpoint) are both
made of these.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from ..errors import CharlmError


def digest(arrays: dict[str, np.ndarray], meta_bytes: bytes) -> str:
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}|{a.dtype.str}|{a.shape}|".encode())
        h.update(a.tobytes())
    h.update(meta_bytes)
    return h.hexdigest()


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_npz(arrays: dict[str, np.ndarray], meta: dict, path: str | os.PathLike, what: str = "checkpoint") -> None:
    """Write arrays plus meta (JSON, with its checksum added) to path as one .npz, atomically:
    a temporary file in the same folder, fsynced, os.replace()d over path, the folder fsynced.
    Any failure leaves the previous file as it was (CharlmError)."""
    path = Path(path)
    arrays = dict(arrays)
    meta = dict(meta)
    body = json.dumps(meta, sort_keys=True, allow_nan=False).encode()
    meta["checksum"] = digest(arrays, body)
    arrays["__meta__"] = np.frombuffer(json.dumps(meta, sort_keys=True, allow_nan=False).encode(), dtype=np.uint8)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp makes 0600; a checkpoint is an ordinary file
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        tmp = None
        try:  # make the rename itself durable
            dfd = os.open(path.parent, os.O_RDONLY)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError:
            pass
    except OSError as e:
        raise CharlmError(f"could not write {what} {path}: {e.strerror or e}; the previous {what} is unchanged") from None
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def read_npz(path: str | os.PathLike, fmt: str, version: int,
             what: str = "charlm checkpoint") -> tuple[dict[str, np.ndarray], dict, str]:
    """Read a file write_npz wrote and verify its format, version and checksum; returns
    (arrays, meta without the checksum, the message prefix for a damaged file). Never
    unpickles; any damage is a CharlmError naming the file."""
    path = str(path)
    bad = f"{path} is not a {what}, or it is truncated or damaged"
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise CharlmError(f"{what.split()[-1]} not found: {path}") from None
    except IsADirectoryError:
        raise CharlmError(f"{path} is a directory; give a {what.split()[-1]} file or a run directory") from None
    except OSError as e:
        raise CharlmError(f"cannot read {what.split()[-1]} {path}: {e.strerror}") from None
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            arrays = {name: z[name] for name in z.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError, zipfile.LargeZipFile) as e:
        raise CharlmError(f"{bad} ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
    except Exception as e:  # zlib errors, struct errors from a damaged archive
        raise CharlmError(f"{bad} ({type(e).__name__})") from None
    if "__meta__" not in arrays or arrays["__meta__"].dtype != np.uint8:
        raise CharlmError(f"{bad} (no charlm metadata)")
    try:
        meta = json.loads(arrays.pop("__meta__").tobytes().decode())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CharlmError(f"{bad} (unreadable metadata)") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise CharlmError(f"{bad} (format is {meta.get('format') if isinstance(meta, dict) else None!r})")
    if meta.get("version") != version:
        raise CharlmError(f"{path} is a {what} of format version {meta.get('version')}; "
                          f"this charlm reads version {version}: use the charlm release that wrote it")
    checksum = meta.pop("checksum", None)
    if checksum != digest(arrays, json.dumps(meta, sort_keys=True, allow_nan=False).encode()):
        raise CharlmError(f"{path} fails its checksum: the file is damaged; use another {what.split()[-1]}")
    return arrays, meta, bad
