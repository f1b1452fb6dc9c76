"""Checkpoint files (charlm/checkpoint.py): exact round trip, atomic writes, refusal of
damaged or foreign files without ever unpickling, and resolving --model."""
import errno
import io
import json
import os
import pickle
import zipfile

import numpy as np
import pytest

from charlm.lm import checkpoint
from charlm.errors import CharlmError
from tests.helpers import make_checkpoint, meta_array, read_npz, rewrite_with_meta, write_npz


def _same_bits(a, b):
    assert a.dtype == b.dtype
    assert a.shape == b.shape
    assert a.tobytes() == b.tobytes()


@pytest.fixture
def saved(tmp_path):
    ck = make_checkpoint()
    path = tmp_path / "run" / "latest.npz"
    checkpoint.save(ck, path)
    return ck, path


# ------------------------------------------------------------ round trip
@pytest.mark.parametrize("cell, layers, dtype", [("lstm", 2, np.float32), ("gru", 1, np.float64), ("rnn", 3, np.float32)])
def test_save_load_round_trips_every_bit(tmp_path, cell, layers, dtype):
    ck = make_checkpoint(cell=cell, layers=layers, dtype=dtype)
    path = tmp_path / "ck.npz"
    checkpoint.save(ck, path)
    back = checkpoint.load(path)
    assert back.path == str(path)
    for group in ("params", "opt_arrays", "state"):
        a, b = getattr(ck, group), getattr(back, group)
        assert sorted(a) == sorted(b), group
        for name in a:
            _same_bits(a[name], b[name])
    assert back.model == ck.model
    assert back.train == ck.train
    assert back.vocab == ck.vocab
    assert back.optimizer == ck.optimizer
    assert (back.step, back.epoch, back.window) == (ck.step, ck.epoch, ck.window)
    assert back.best_val_loss == ck.best_val_loss
    assert back.history == ck.history
    assert back.corpus == ck.corpus
    assert back.rng == ck.rng
    # the restored generator continues exactly where the saved one stopped
    g1 = np.random.default_rng()
    g1.bit_generator.state = ck.rng
    g2 = np.random.default_rng()
    g2.bit_generator.state = back.rng
    np.testing.assert_array_equal(g1.random(5), g2.random(5))


def test_round_trip_of_a_checkpoint_without_train_config(tmp_path):
    ck = make_checkpoint()
    ck.train = None
    ck.opt_arrays = {}
    ck.best_val_loss = None
    checkpoint.save(ck, tmp_path / "ck.npz")
    back = checkpoint.load(tmp_path / "ck.npz")
    assert back.train is None and back.opt_arrays == {} and back.best_val_loss is None


def test_round_trip_of_unicode_vocabulary(tmp_path):
    ck = make_checkpoint(text="caf\u00e9 \U0001F600 \u4e2d\u6587\n\t\"\\")
    checkpoint.save(ck, tmp_path / "ck.npz")
    assert checkpoint.load(tmp_path / "ck.npz").vocab == ck.vocab


# --------------------------------------------------------------- atomic
def test_save_leaves_no_temporary_files(saved):
    _, path = saved
    assert sorted(os.listdir(path.parent)) == ["latest.npz"]


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_checkpoint_gets_the_permissions_of_an_ordinary_file(tmp_path, umask):
    """Not mkstemp's 0600: a checkpoint is shared like any file the user writes (their umask decides)."""
    old = os.umask(umask)
    try:
        checkpoint.save(make_checkpoint(), tmp_path / "a.npz")
    finally:
        os.umask(old)
    assert (tmp_path / "a.npz").stat().st_mode & 0o777 == 0o666 & ~umask


def test_save_replaces_an_existing_file(saved):
    ck, path = saved
    first = path.read_bytes()
    ck.step = 99
    ck.params["decoder.bias"] = ck.params["decoder.bias"] + 1
    checkpoint.save(ck, path)
    assert path.read_bytes() != first
    back = checkpoint.load(path)
    assert back.step == 99
    _same_bits(back.params["decoder.bias"], ck.params["decoder.bias"])
    assert sorted(os.listdir(path.parent)) == ["latest.npz"]


def test_save_creates_missing_folders(tmp_path):
    path = tmp_path / "a" / "b" / "c.npz"
    checkpoint.save(make_checkpoint(), path)
    assert checkpoint.load(path).step == 7


def test_a_failed_write_keeps_the_previous_checkpoint(saved, monkeypatch):
    """A crash half way through writing (here: disk full) leaves the old file byte for byte."""
    ck, path = saved
    before = path.read_bytes()

    def savez_then_disk_full(f, **arrays):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.np, "savez", savez_then_disk_full)
    ck.step = 1234
    with pytest.raises(CharlmError) as e:
        checkpoint.save(ck, path)
    assert str(path) in str(e.value)
    assert "No space left" in str(e.value)
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == ["latest.npz"]  # the temporary file is cleaned up
    monkeypatch.undo()
    assert checkpoint.load(path).step == 7


def test_a_failed_rename_keeps_the_previous_checkpoint(saved, monkeypatch):
    ck, path = saved
    before = path.read_bytes()

    def no_replace(src, dst):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(checkpoint.os, "replace", no_replace)
    with pytest.raises(CharlmError, match="previous checkpoint is unchanged"):
        checkpoint.save(ck, path)
    assert path.read_bytes() == before
    assert sorted(os.listdir(path.parent)) == ["latest.npz"]


def test_save_under_a_regular_file_is_a_charlm_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    target = blocker / "ck.npz"
    with pytest.raises(CharlmError) as e:
        checkpoint.save(make_checkpoint(), target)
    assert str(target) in str(e.value)
    assert blocker.read_text() == "not a folder"


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root can write into a read-only folder; the check cannot be exercised")
def test_save_into_a_read_only_folder_keeps_the_previous_checkpoint(saved):
    ck, path = saved
    before = path.read_bytes()
    path.parent.chmod(0o500)
    try:
        with pytest.raises(CharlmError):
            checkpoint.save(ck, path)
    finally:
        path.parent.chmod(0o700)
    assert path.read_bytes() == before


# -------------------------------------------------------------- refusal
def _refused(path) -> str:
    with pytest.raises(CharlmError) as e:
        checkpoint.load(path)
    msg = str(e.value)
    assert str(path) in msg
    assert "\n" not in msg
    return msg


def test_truncated_files_are_refused(saved, tmp_path):
    _, path = saved
    raw = path.read_bytes()
    cut = tmp_path / "cut.npz"
    for n in sorted({0, 1, 4, 30, 100, len(raw) // 3, len(raw) // 2, len(raw) - 100, len(raw) - 22, len(raw) - 1}):
        cut.write_bytes(raw[:n])
        _refused(cut)


@pytest.mark.parametrize("where", [0.25, 0.5, 0.75])
def test_a_flipped_byte_is_refused_or_harmless(saved, tmp_path, where):
    """A flipped byte inside any array's data or the metadata is refused (next test). A byte
    the zip reader never uses (a local header's size fields, which it takes from the central
    directory) may be flipped without effect: then the checksum proves the content unchanged."""
    ck, path = saved
    raw = bytearray(path.read_bytes())
    raw[int(len(raw) * where)] ^= 0xFF
    bad = tmp_path / "flipped.npz"
    bad.write_bytes(bytes(raw))
    try:
        got = checkpoint.load(bad)
    except CharlmError as e:
        assert "flipped.npz" in str(e)
        return
    for n, a in ck.params.items():
        assert got.params[n].tobytes() == a.tobytes()
    assert got.step == ck.step and got.vocab == ck.vocab


@pytest.mark.parametrize("member", ["param/decoder.weight", "__meta__", "state/h"])
def test_a_flipped_byte_inside_any_array_is_refused(saved, tmp_path, member):
    _, path = saved
    raw = bytearray(path.read_bytes())
    with zipfile.ZipFile(io.BytesIO(bytes(raw))) as z:
        info = z.getinfo(member + ".npy")
    # data starts after the 30-byte local header, the name and the extra field
    local = raw[info.header_offset:info.header_offset + 30]
    name_len = int.from_bytes(local[26:28], "little")
    extra_len = int.from_bytes(local[28:30], "little")
    data_start = info.header_offset + 30 + name_len + extra_len
    raw[data_start + info.file_size - 3] ^= 0x01  # the data, not the .npy header
    bad = tmp_path / "flipped.npz"
    bad.write_bytes(bytes(raw))
    _refused(bad)


def test_a_changed_array_in_a_valid_zip_fails_the_checksum(saved, tmp_path):
    """The zip's own CRC is fine here; only charlm's checksum can notice."""
    _, path = saved
    arrays = read_npz(path)
    arrays["param/embedding.weight"] = arrays["param/embedding.weight"].copy()
    arrays["param/embedding.weight"][0, 0] += 1
    bad = tmp_path / "changed.npz"
    write_npz(bad, arrays)
    assert "checksum" in _refused(bad)


def test_changed_metadata_fails_the_checksum(saved, tmp_path):
    _, path = saved
    arrays = read_npz(path)
    meta = json.loads(arrays["__meta__"].tobytes().decode())
    meta["step"] += 1
    arrays["__meta__"] = meta_array(meta)
    bad = tmp_path / "changed.npz"
    write_npz(bad, arrays)
    assert "checksum" in _refused(bad)


def test_a_missing_array_fails_the_checksum(saved, tmp_path):
    _, path = saved
    arrays = read_npz(path)
    del arrays["opt/m/decoder.bias"]
    bad = tmp_path / "missing.npz"
    write_npz(bad, arrays)
    _refused(bad)


def test_a_plain_text_file_is_refused(tmp_path):
    p = tmp_path / "notes.npz"
    p.write_text("this is not a checkpoint\n" * 20)
    _refused(p)


def test_a_plain_npy_file_is_refused(tmp_path):
    p = tmp_path / "array.npz"
    with open(p, "wb") as f:
        np.save(f, np.arange(10))
    _refused(p)


def test_an_npz_without_metadata_is_refused(tmp_path):
    p = tmp_path / "weights.npz"
    write_npz(p, {"param/embedding.weight": np.zeros((3, 4), np.float32)})
    assert "metadata" in _refused(p)


def test_metadata_of_the_wrong_dtype_is_refused(tmp_path):
    p = tmp_path / "weights.npz"
    write_npz(p, {"__meta__": np.frombuffer(b'{"format": "charlm-checkpoint"}', np.uint8).astype(np.int64)})
    _refused(p)


def test_an_npz_of_another_format_is_refused(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "other.npz"
    rewrite_with_meta(path, bad, lambda meta, arrays: meta.update(format="something-else"))
    assert "something-else" in _refused(bad)


@pytest.fixture
def no_unpickling(monkeypatch):
    """Record any attempt to unpickle. (Raising alone would not do: load turns every
    exception into a CharlmError, so the test would pass even if pickle were called.)"""
    calls = []

    def forbidden(*args, **kwargs):
        calls.append(args)
        raise AssertionError("pickle must never be used to load a checkpoint")

    for name in ("load", "loads", "Unpickler"):
        monkeypatch.setattr(pickle, name, forbidden)
    return calls


class _Boom:
    """Unpickling this would run code."""
    def __reduce__(self):
        return (os.system, ("echo pwned > /dev/null",))


def _object_npy_bytes(obj_array) -> bytes:
    buf = io.BytesIO()
    np.save(buf, obj_array, allow_pickle=True)
    return buf.getvalue()


@pytest.mark.parametrize("member", ["__meta__", "param/embedding.weight"])
def test_an_object_array_inside_a_checkpoint_is_never_unpickled(saved, tmp_path, no_unpickling, member):
    _, path = saved
    good = read_npz(path)
    bad = tmp_path / "latest.npz"
    with zipfile.ZipFile(bad, "w") as z:
        for name, a in good.items():
            if name == member:
                z.writestr(name + ".npy", _object_npy_bytes(np.array([_Boom(), {"a": 1}], dtype=object)))
            else:
                buf = io.BytesIO()
                np.save(buf, a, allow_pickle=False)
                z.writestr(name + ".npy", buf.getvalue())
    _refused(bad)
    assert no_unpickling == [], "checkpoint.load tried to unpickle"


def test_a_pickle_file_is_never_unpickled(tmp_path, no_unpickling):
    p = tmp_path / "best.npz"
    p.write_bytes(_object_npy_bytes(np.array([_Boom()], dtype=object)))
    _refused(p)
    p.write_bytes(b"\x80\x04" + b"raw pickle stream")  # pickle protocol header
    _refused(p)
    assert no_unpickling == [], "checkpoint.load tried to unpickle"


def test_a_newer_format_version_is_refused_with_a_version_message(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "future.npz"
    rewrite_with_meta(path, bad, lambda meta, arrays: meta.update(version=checkpoint.VERSION + 1))
    msg = _refused(bad)
    assert "version" in msg
    assert str(checkpoint.VERSION + 1) in msg
    assert "checksum" not in msg


def test_the_rewrite_helper_itself_produces_a_loadable_file(saved, tmp_path):
    """Guards the version test: the only difference it makes must be the version."""
    _, path = saved
    same = tmp_path / "same.npz"
    rewrite_with_meta(path, same, lambda meta, arrays: None)
    assert checkpoint.load(same).step == 7


def test_a_vocabulary_that_does_not_match_the_model_is_refused(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "vocab.npz"
    rewrite_with_meta(path, bad, lambda meta, arrays: meta["vocab"]["tokens"].append("\u2603"))
    assert "vocabulary" in _refused(bad)


def test_a_parameter_of_the_wrong_shape_is_refused_naming_the_file(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "shape.npz"

    def edit(meta, arrays):
        arrays["param/decoder.bias"] = np.zeros(3, np.float32)

    rewrite_with_meta(path, bad, edit)
    assert "decoder.bias" in _refused(bad)


def test_unknown_config_fields_are_refused_naming_the_file(saved, tmp_path):
    _, path = saved
    bad = tmp_path / "fields.npz"
    rewrite_with_meta(path, bad, lambda meta, arrays: meta["model"].update(colour="blue"))
    _refused(bad)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CharlmError, match="not found"):
        checkpoint.load(tmp_path / "nope.npz")
    with pytest.raises(CharlmError, match="directory"):
        checkpoint.load(tmp_path)


# --------------------------------------------------------------- resolve
def _touch_run(root, name, files=("latest.npz",), mtime=None):
    run = root / name
    run.mkdir(parents=True)
    for f in files:
        (run / f).write_bytes(b"x")
        if mtime is not None:
            os.utime(run / f, (mtime, mtime))
    return run


def test_resolve_a_file(tmp_path):
    f = tmp_path / "some.npz"
    f.write_bytes(b"x")
    assert checkpoint.resolve(str(f), tmp_path / "unused") == str(f)


def test_resolve_a_missing_path(tmp_path):
    with pytest.raises(CharlmError, match="not found"):
        checkpoint.resolve(str(tmp_path / "missing"), tmp_path)


def test_resolve_a_run_directory_prefers_best(tmp_path):
    run = _touch_run(tmp_path, "run", ("latest.npz", "best.npz"))
    assert checkpoint.resolve(str(run)) == str(run / "best.npz")


def test_resolve_a_run_directory_with_only_latest(tmp_path):
    run = _touch_run(tmp_path, "run", ("latest.npz",))
    assert checkpoint.resolve(str(run)) == str(run / "latest.npz")


def test_resolve_an_empty_directory(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CharlmError, match="no checkpoint") as e:
        checkpoint.resolve(str(tmp_path / "empty"))
    assert "empty" in str(e.value)


def test_resolve_most_recent_run_under_root(tmp_path):
    root = tmp_path / "models"
    old = _touch_run(root, "a-old", ("latest.npz", "best.npz"), mtime=1_000_000)
    new = _touch_run(root, "b-new", ("latest.npz",), mtime=2_000_000)
    (root / "not-a-run").mkdir()
    (root / "stray.txt").write_text("x")
    assert checkpoint.resolve(None, root) == str(new / "latest.npz")
    for f in ("latest.npz", "best.npz"):  # now the other run was written last
        os.utime(old / f, (3_000_000, 3_000_000))
    assert checkpoint.resolve(None, root) == str(old / "best.npz")


def test_resolve_picks_the_run_not_the_name_order(tmp_path):
    root = tmp_path / "models"
    _touch_run(root, "z-old", mtime=1_000_000)
    a = _touch_run(root, "a-new", mtime=2_000_000)
    assert checkpoint.resolve(None, root) == str(a / "latest.npz")


@pytest.mark.parametrize("make_root", [False, True])
def test_resolve_without_runs_says_how_to_get_one(tmp_path, make_root):
    root = tmp_path / "models"
    if make_root:
        (root / "empty-run").mkdir(parents=True)
    with pytest.raises(CharlmError) as e:
        checkpoint.resolve(None, root)
    assert "charlm train" in str(e.value)
    assert "--model" in str(e.value)
