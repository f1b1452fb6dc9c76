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
import json
import math
import os
import stat
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


def _mode_for(path: Path) -> int:
    """The permissions of the file being replaced (a resume must not loosen a 0600 checkpoint), else
    those of an ordinary new file (mkstemp makes 0600; the umask decides)."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except OSError:
        return 0o666 & ~_umask()


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
        os.fchmod(fd, _mode_for(path))
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
            remove_quietly(tmp)


# Bounds on what a file may make charlm allocate, checked before anything is read in full.
MAX_MEMBERS = 100_000          # arrays in one file
MAX_META_BYTES = 256 << 20     # the JSON record
MAX_JSON_DEPTH = 32            # nesting of the JSON record (charlm writes at most 4)
COMPRESSION_ALLOWANCE = 4      # compressed members may hold up to 4x the file (+ 64 MiB): no zip bombs
_ARRAY_KINDS = "biuf"          # bool, integers, floats: nothing else is ever written


def _open_regular(path: str, what: str):
    """The file opened for reading, if it is a regular file (never blocks on a FIFO, never reads a
    device); (file object, size in bytes)."""
    noun = what.split()[-1]
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CharlmError(f"{noun} not found: {path}") from None
    except IsADirectoryError:
        raise CharlmError(f"{path} is a directory; give a {noun} file or a run directory") from None
    except OSError as e:
        raise CharlmError(f"cannot read {noun} {path}: {e.strerror}") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        os.close(fd)
        if stat.S_ISDIR(st.st_mode):
            raise CharlmError(f"{path} is a directory; give a {noun} file or a run directory")
        raise CharlmError(f"{path} is not a regular file (a FIFO, socket or device); give a {noun} file")
    return os.fdopen(fd, "rb"), st.st_size


def _member_header(zf: zipfile.ZipFile, info: zipfile.ZipInfo):
    """The .npy header of a member: (shape, fortran_order, dtype), read without its data."""
    from numpy.lib import format as npy
    with zf.open(info) as m:
        version = npy.read_magic(m)
        if version == (1, 0):
            return npy.read_array_header_1_0(m)
        if version == (2, 0):
            return npy.read_array_header_2_0(m)
        raise ValueError(f"unsupported .npy version {version}")


def _read_arrays(f, size: int, bad: str) -> dict[str, np.ndarray]:
    """Every array of the .npz in f, each header checked before its data is read: a plain numeric
    dtype, data no larger than the member, members no larger in all than the file allows."""
    from numpy.lib import format as npy
    zf = zipfile.ZipFile(f)
    infos = [i for i in zf.infolist() if not i.is_dir()]
    if len(infos) > MAX_MEMBERS:
        raise CharlmError(f"{bad} ({len(infos)} arrays)")
    declared = sum(i.file_size for i in infos)
    if declared > COMPRESSION_ALLOWANCE * size + (64 << 20):
        raise CharlmError(f"{bad} (its arrays would take {declared / 2**30:.1f} GiB unpacked from a "
                          f"{size / 2**20:.1f} MiB file)")
    arrays = {}
    for info in infos:
        if not info.filename.endswith(".npy"):
            raise CharlmError(f"{bad} (unexpected member {info.filename[:80]!r})")
        shape, _, dtype = _member_header(zf, info)
        if dtype.hasobject or dtype.kind not in _ARRAY_KINDS or dtype.fields is not None:
            raise CharlmError(f"{bad} (array {info.filename[:-4][:80]} has dtype {dtype.str}, not a plain number type)")
        if math.prod(shape) * dtype.itemsize > info.file_size:
            raise CharlmError(f"{bad} (array {info.filename[:-4][:80]} is shorter than its shape {shape})")
        with zf.open(info) as m:
            a = npy.read_array(m, allow_pickle=False)
        arrays[info.filename[:-4]] = np.ascontiguousarray(a)  # Fortran order would compile new kernels
    return arrays


def _json_depth(obj) -> int:
    depth, level = 0, [obj]
    while level:
        depth += 1
        level = [v for o in level if isinstance(o, (dict, list))
                 for v in (o.values() if isinstance(o, dict) else o)]
    return depth - 1


def _parse_meta(raw: np.ndarray, bad: str) -> dict:
    """The JSON record, refusing what charlm never writes: NaN / Infinity, deep nesting, huge size."""
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise CharlmError(f"{bad} (no charlm metadata)")
    if raw.size > MAX_META_BYTES:
        raise CharlmError(f"{bad} (metadata of {raw.size / 2**20:.0f} MiB)")

    def not_json(token):
        raise CharlmError(f"{bad} (metadata holds {token}, which is not a JSON number)")

    def finite(text):
        x = float(text)
        return x if math.isfinite(x) else not_json(text[:20])
    try:
        meta = json.loads(raw.tobytes().decode(), parse_constant=not_json, parse_float=finite)
    except RecursionError:
        raise CharlmError(f"{bad} (metadata nested too deeply)") from None
    except (UnicodeDecodeError, ValueError):
        raise CharlmError(f"{bad} (unreadable metadata)") from None
    if _json_depth(meta) > MAX_JSON_DEPTH:
        raise CharlmError(f"{bad} (metadata nested more than {MAX_JSON_DEPTH} levels deep)")
    return meta


def read_npz(path: str | os.PathLike, fmt: str, version: int,
             what: str = "charlm checkpoint") -> tuple[dict[str, np.ndarray], dict, str]:
    """Read a file write_npz wrote and verify its format, version and checksum; returns
    (arrays, meta without the checksum, the message prefix for a damaged file). Never
    unpickles; refuses anything but a regular file (a FIFO would block, a device never end);
    bounds what it unpacks by the file's size; arrays come back C-contiguous. Any damage is a
    CharlmError naming the file."""
    path = str(path)
    bad = f"{path} is not a {what}, or it is truncated or damaged"
    f, size = _open_regular(path, what)
    with f:
        try:
            arrays = _read_arrays(f, size, bad)
        except CharlmError:
            raise
        except (ValueError, OSError, zipfile.BadZipFile, EOFError, KeyError, zipfile.LargeZipFile) as e:
            raise CharlmError(f"{bad} ({type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else 'unreadable'})") from None
        except Exception as e:  # zlib errors, struct errors, MemoryError from a damaged archive
            raise CharlmError(f"{bad} ({type(e).__name__})") from None
    if "__meta__" not in arrays:
        raise CharlmError(f"{bad} (no charlm metadata)")
    meta = _parse_meta(arrays.pop("__meta__"), bad)
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        raise CharlmError(f"{bad} (format is {repr(meta.get('format') if isinstance(meta, dict) else None)[:80]})")
    if meta.get("version") != version:
        raise CharlmError(f"{path} is a {what} of format version {str(meta.get('version'))[:20]}; "
                          f"this charlm reads version {version}: use the charlm release that wrote it")
    checksum = meta.pop("checksum", None)
    if checksum != digest(arrays, json.dumps(meta, sort_keys=True, allow_nan=False).encode()):
        raise CharlmError(f"{path} fails its checksum: the file is damaged; use another {what.split()[-1]}")
    return arrays, meta, bad


def remove_quietly(path) -> None:
    """Delete a temporary file a failed write left, if it is there; a failure to delete is not an error
    worth hiding the write's own error behind."""
    try:
        os.unlink(path)
    except OSError:
        pass
