"""Trust nothing from disk or flags (issue 18): every case a hostile tester found, each a clean one-line
error or the right behaviour. Token files and checkpoints are checked at the boundary (ids in range,
shapes, finiteness, a schema for the metadata, bounded unpacking), the paths a checkpoint names stay in
its run folder, one process at a time writes a run folder (an OS lock), memory is estimated before it is
allocated, every float flag is finite, and the divergence guard's state survives a resume.

Anything that could crash, hang or eat the machine's memory runs in a subprocess with a timeout and, for
the memory cases, an address-space limit; those cases assert the child's peak resident memory
(ru_maxrss of RUSAGE_CHILDREN, measured by a wrapper process whose only child is charlm)."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from charlm.config import ModelConfig, TrainConfig
from charlm.errors import CharlmError
from charlm.lm import checkpoint
from charlm.lm import train as train_mod
from charlm.runtime import compute_threads
from tests.helpers import DATA, TINY, env_plain, failed, make_checkpoint, ok, rewrite_with_meta, tiny_text, train_tiny

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["--hidden", "8", "--embed", "4", "--layers", "1", "--seq-len", "8", "--batch", "2", "--json",
         "--threads", "1", "--sample-length", "0"]
MiB = 1 << 20


def _env() -> dict:
    e = {k: v for k, v in os.environ.items() if k != "CHARLM_DEBUG"}
    e.update({k: v for k, v in env_plain().items() if v is not None})
    e["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return e


def _charlm(*args, cwd, timeout=120, stdin=None) -> subprocess.CompletedProcess:
    """python -m charlm in a subprocess: a crash or a hang fails the test, not the test run."""
    return subprocess.run([sys.executable, "-m", "charlm", *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout, stdin=stdin)


def _start(*args, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "charlm", *map(str, args)], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def one_error_line(res, *needles) -> str:
    """Exit code 1 (never a signal), one line on stderr starting with error:, no traceback."""
    assert res.returncode == 1, (res.returncode, res.stderr[-2000:])
    err = res.stderr.strip()
    assert "\n" not in err and err.startswith("error:") and "internal error" not in err, err[:2000]
    assert len(err) < 1000, f"{len(err)} characters"
    for n in needles:
        assert n in err, (n, err)
    return err


_WRAPPER = """
import json, resource, subprocess, sys
args, stdin, limit = json.loads(sys.argv[1])
def cap():
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
with open(stdin, "rb") if stdin else open("/dev/null", "rb") as f:
    try:
        r = subprocess.run([sys.executable, "-m", "charlm", *args], stdin=f, capture_output=True, text=True,
                           timeout=120, preexec_fn=cap)
        code, err = r.returncode, r.stderr
    except subprocess.TimeoutExpired:
        code, err = "timeout", ""
print(json.dumps({"code": code, "stderr": err,
                  "maxrss_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


def _peak(args, cwd, stdin=None, limit=3 << 30) -> tuple[subprocess.CompletedProcess, int]:
    """Run charlm under an address-space limit (so a regression fails instead of exhausting the
    machine); (the result, its peak resident memory in bytes)."""
    w = subprocess.run([sys.executable, "-c", _WRAPPER, json.dumps([list(map(str, args)), stdin, limit])],
                       cwd=cwd, env=_env(), capture_output=True, text=True, timeout=300)
    r = json.loads(w.stdout)
    res = subprocess.CompletedProcess(args, -999 if r["code"] == "timeout" else r["code"], "", r["stderr"])
    return res, r["maxrss_kib"] * 1024


def _rewrite_data(run: Path, edit):
    """Rewrite latest.npz of a run with its data record changed by edit(data), checksum re-signed."""
    rewrite_with_meta(run / "latest.npz", run / "latest.npz", lambda meta, arrays: edit(meta["data"]))


@pytest.fixture
def run(tmp_path) -> Path:
    """A trained tiny run (in tmp_path/run): latest.npz, best.npz, tokens.bin."""
    ok_events = train_tiny(tmp_path / "run", steps=2)
    assert ok_events[-1]["event"] == "done"
    return tmp_path / "run"


# ---------------------------------------------------------- 1. token ids outside the vocabulary
def test_two_new_runs_into_one_folder_never_corrupt_memory(tmp_path):
    """Started together on one --out: one trains, the other is refused in one line (the folder is
    locked, or by then holds a run); never a signal (segfault, heap abort), never both."""
    for k in range(3):
        out = f"run{k}"
        procs = [_start("train", TINY, *SMALL, "--steps", "30", "--out", out, cwd=tmp_path) for _ in range(2)]
        outs = [p.communicate(timeout=180) for p in procs]
        results = [(p.returncode, o, e) for p, (o, e) in zip(procs, outs)]
        codes = sorted(r[0] for r in results)
        assert codes == [0, 1], [(c, e[-500:]) for c, _, e in results]
        loser = next(e for c, _, e in results if c == 1).strip()
        assert loser.startswith("error:") and "\n" not in loser
        assert "in use by another charlm process" in loser or "already holds a run" in loser, loser
        assert sorted(os.listdir(tmp_path / out)) == ["best.npz", "latest.npz", "tokens.bin"]
        assert checkpoint.load(tmp_path / out / "latest.npz").step == 30


def _sign_tokens(run: Path, ids: np.ndarray):
    ids.tofile(run / "tokens.bin")
    digest = hashlib.sha256((run / "tokens.bin").read_bytes()).hexdigest()
    _rewrite_data(run, lambda d: d.update(sha256=digest))


def test_a_token_file_with_ids_outside_the_vocabulary_is_refused(run, tmp_path):
    ck = checkpoint.load(run / "latest.npz")
    ids = np.fromfile(run / "tokens.bin", dtype=ck.data["dtype"])
    ids[len(ids) // 2] = len(ck.vocab)  # one past the last id, the checksum made to match
    _sign_tokens(run, ids)
    one_error_line(_charlm("train", "--resume", "run", "--steps", "1", "--threads", "1", cwd=tmp_path),
                   "token id", "outside the vocabulary")


@pytest.mark.parametrize("dtype", ["|O", "<f8", "<i8", 7])
def test_a_token_file_of_an_unknown_type_is_refused(run, run_cli, dtype):
    _rewrite_data(run, lambda d: d.update(dtype=dtype))
    failed(run_cli("train", "--resume", "run", "--steps", "1"), "token ids are one of")


def test_a_forged_train_count_is_refused(run, run_cli):
    _rewrite_data(run, lambda d: d.update(n_train=10 ** 12))
    failed(run_cli("train", "--resume", "run", "--steps", "1"), "n_train")


# ---------------------------------------------------------- 2. paths a checkpoint names
@pytest.mark.parametrize("name", ["/etc/passwd", "../outside.bin", "sub/tokens.bin", "..", ""])
def test_the_token_file_a_checkpoint_names_stays_in_its_run_folder(run, run_cli, tmp_path, name):
    target = Path(name) if name.startswith("/") else tmp_path / "outside.bin"
    if not target.is_file():
        target.write_bytes(bytes(range(1, 10)) * 50)
    digest = hashlib.sha256(target.read_bytes()).hexdigest()
    _rewrite_data(run, lambda d: d.update(tokens=name, sha256=digest, dtype="|u1"))
    err = failed(run_cli("train", "--resume", "run", "--steps", "1"))
    assert "cannot resume" in err or "no token files" in err, err


def test_a_token_file_that_links_outside_the_run_folder_is_refused(run, run_cli, tmp_path):
    outside = tmp_path / "elsewhere.bin"
    outside.write_bytes((run / "tokens.bin").read_bytes())
    (run / "tokens.bin").unlink()
    (run / "tokens.bin").symlink_to(outside)
    failed(run_cli("train", "--resume", "run", "--steps", "1"), "leads outside the run folder")


# ---------------------------------------------------------- 3. one writer per run folder
def test_a_running_run_folder_is_locked_against_a_second_writer(tmp_path):
    proc = _start("train", TINY, *SMALL, "--minutes", "5", "--checkpoint-every", "1", "--out", "run", cwd=tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "run" / "latest.npz").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[1][-2000:]
            time.sleep(0.02)
        for args in (["train", TINY, *SMALL, "--steps", "2", "--out", "run"],
                     ["train", "--resume", "run", "--steps", "2", "--threads", "1"]):
            one_error_line(_charlm(*args, cwd=tmp_path), "in use by another charlm process", f"PID {proc.pid}")
        assert proc.poll() is None  # the first run goes on, its temporary files untouched
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    step = checkpoint.load(tmp_path / "run" / "latest.npz").step
    res = _charlm("train", "--resume", "run", "--steps", "1", "--threads", "1", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr  # the lock went with the process
    assert checkpoint.load(tmp_path / "run" / "latest.npz").step == step + 1


def test_the_lock_is_released_when_a_library_run_ends(tmp_path):
    from charlm.data.lock import lock_run_dir
    train_tiny(tmp_path / "run", steps=1)
    lock_run_dir(tmp_path / "run").release()  # free again
    with lock_run_dir(tmp_path / "run"):
        with pytest.raises(CharlmError, match="in use by another charlm process"):
            list(train_mod.train(None, None, TrainConfig(steps=1), None,
                                 resume=checkpoint.load(tmp_path / "run" / "latest.npz"), sample_chars=0))


# ---------------------------------------------------------- 4, 5. flags
@pytest.mark.parametrize("flag, value", [
    ("--clip", "inf"), ("--clip", "nan"), ("--minutes", "inf"), ("--minutes", "nan"), ("--epochs", "inf"),
    ("--epochs", "nan"), ("--lr", "inf"), ("--lr", "nan"), ("--dropout", "nan"), ("--val-frac", "nan"),
    ("--seed", "-1"), ("--hidden", "100000000"), ("--layers", "1000000")])
def test_a_non_finite_or_out_of_range_flag_is_refused_before_anything_is_made(run_cli, tmp_path, flag, value):
    failed(run_cli("train", TINY, *SMALL, flag, value, "--out", "run"), flag)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("flag", ["--clip", "--lr", "--minutes", "--noise", "--seed"])
def test_qa_train_refuses_non_finite_flags_before_training(run_cli, flag):
    res = run_cli("qa", "train", DATA / "qa_tiny_train.txt", "--epochs", "2", flag, "-1" if flag == "--seed" else "nan",
                  "--json", "--out", "qa")
    failed(res, flag)


def test_a_last_update_that_overflows_the_weights_leaves_good_checkpoints(tmp_path):
    """SGD with --lr 1e300 makes the one step's update overflow float32: training ends on non-finite
    weights. The guard puts the last good ones back, they are saved, and the done event names only
    files that exist."""
    with compute_threads(1):
        events = list(train_mod.train(tiny_text(), ModelConfig(cell="rnn", embed=4, hidden=8, layers=1),
                                      TrainConfig(seq_len=8, batch=2, steps=1, lr=1e300, clip=0, optimizer="sgd"),
                                      tmp_path / "run", sample_chars=0))
    done = events[-1]
    assert done["event"] == "done" and any(e["event"] == "nonfinite" for e in events)
    for key in ("checkpoint", "latest"):
        ck = checkpoint.load(done[key])  # written, and loads: finite weights
        assert ck.step == 1


# ---------------------------------------------------------- 6. memory and hangs
def test_stdin_without_line_ends_is_refused_in_flat_memory(tmp_path):
    res, peak = _peak(["train", "-", *SMALL, "--out", "run"], tmp_path, stdin="/dev/zero")
    one_error_line(res, "standard input", "line")
    assert peak < 400 * MiB, f"{peak / MiB:.0f} MiB"
    assert not (tmp_path / "run").exists()


def test_a_large_stdin_corpus_trains_in_bounded_memory(tmp_path):
    """20 MB through standard input: streamed to a temporary file, never held as one string."""
    line = (tiny_text().replace("\n", " ") + "\n").encode()
    (tmp_path / "big.txt").write_bytes(line * (20 * MiB // len(line)))
    res, peak = _peak(["train", "-", *SMALL, "--steps", "1", "--out", "run"], tmp_path, stdin="big.txt")
    assert res.returncode == 0, res.stderr[-2000:]
    assert peak < 500 * MiB, f"{peak / MiB:.0f} MiB"
    assert checkpoint.load(tmp_path / "run" / "latest.npz").data["n_tokens"] == 20 * MiB // len(line) * len(line)


@pytest.mark.parametrize("kind", ["device", "fifo"])
def test_a_model_that_is_a_device_or_a_fifo_is_refused_at_once(tmp_path, kind):
    path = "/dev/zero" if kind == "device" else tmp_path / "pipe"
    if kind == "fifo":
        os.mkfifo(path)
    for args in (["sample", "--model", path, "--length", "5"], ["train", "--resume", path, "--steps", "1"],
                 ["train", TINY, "--init-from", path, "--steps", "1"]):
        one_error_line(_charlm(*args, cwd=tmp_path, timeout=60), "not a regular file")


def test_a_zip_bomb_checkpoint_is_refused_in_flat_memory(tmp_path):
    good = tmp_path / "good.npz"
    checkpoint.save(make_checkpoint(), good)
    bomb = tmp_path / "bomb.npz"
    with zipfile.ZipFile(good) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as z:
        for name in src.namelist():
            z.writestr(name, src.read(name))
        header = b"\x93NUMPY\x01\x00" + b"{'descr': '<f4', 'fortran_order': False, 'shape': (100000000,), }".ljust(
            118) + b"\n"
        with z.open("param/extra.npy", "w", force_zip64=True) as m:
            m.write(header)
            zeros = bytes(16 * MiB)
            for _ in range(25):
                m.write(zeros)
    assert bomb.stat().st_size < 5 * MiB
    res, peak = _peak(["sample", "--model", bomb, "--length", "5"], tmp_path)
    one_error_line(res, "bomb.npz", "GiB unpacked")
    assert peak < 400 * MiB, f"{peak / MiB:.0f} MiB"


def test_a_forged_layer_count_is_a_short_error(tmp_path, run_cli):
    path = tmp_path / "ck.npz"
    checkpoint.save(make_checkpoint(), path)
    for layers in (10 ** 6, 1000):
        rewrite_with_meta(path, tmp_path / "forged.npz", lambda meta, arrays: meta["model"].update(layers=layers))
        err = failed(run_cli("sample", "--model", "forged.npz", "--length", "3"), "forged.npz")
        assert len(err) < 500


@pytest.mark.parametrize("args", [["--hidden", "12000"], ["--cell", "esn", "--units", "16000000"],
                                  ["--batch", "100000", "--seq-len", "100000", "--hidden", "64"]])
def test_a_model_larger_than_the_machine_is_refused_before_allocating(tmp_path, args):
    res, peak = _peak(["train", TINY, "--steps", "1", "--out", "run", *args], tmp_path)
    one_error_line(res, "needs ~", "GiB", "address-space limit")
    assert peak < 400 * MiB, f"{peak / MiB:.0f} MiB"
    assert not (tmp_path / "run").exists()


def test_qa_train_refuses_a_model_larger_than_the_machine(tmp_path):
    res, peak = _peak(["qa", "train", DATA / "qa_tiny_train.txt", "--dim", "100000000", "--out", "qa"], tmp_path)
    one_error_line(res, "needs ~", "GiB")
    assert peak < 400 * MiB, f"{peak / MiB:.0f} MiB"


# ---------------------------------------------------------- 7. the guard across a resume
def test_resume_is_exact_through_a_guard_restore_after_the_resume_point(tmp_path, monkeypatch):
    """A poisoned update at optimizer step 6 (deterministic: t is in the checkpoint) makes step 7's loss
    NaN; the guard restores its snapshot of step 4. Run 5 + 5 steps with a resume in between: the same
    weights, moments and learning rate as 10 in one go (before, the resumed run's snapshot was step 5)."""
    monkeypatch.setattr(train_mod, "SNAPSHOT_EVERY", 2)
    real = train_mod.make_optimizer

    def make(name, params, **kw):
        opt = real(name, params, **kw)
        step = opt.step

        def poisoning_step(params, grads, lr, gscale=1.0, rows=None):
            step(params, grads, lr, gscale, rows)
            if opt.t == 6 and np.isfinite(params["decoder.bias"]).all() and lr == 0.01:
                params["decoder.bias"][0] = np.inf
        opt.step = poisoning_step
        return opt
    monkeypatch.setattr(train_mod, "make_optimizer", make)
    mcfg = ModelConfig(cell="gru", embed=4, hidden=8, layers=1)

    def cfg(steps):
        return TrainConfig(seq_len=8, batch=2, steps=steps, eval_every=5, lr=0.01)
    with compute_threads(1):
        one = list(train_mod.train(tiny_text(), mcfg, cfg(10), tmp_path / "one", sample_chars=0))
        list(train_mod.train(tiny_text(), mcfg, cfg(5), tmp_path / "split", sample_chars=0))
        ck = checkpoint.load(tmp_path / "split" / "latest.npz")
        assert ck.guard["step"] == 4 and ck.guard_arrays  # the snapshot travels with the checkpoint
        two = list(train_mod.train(None, None, cfg(5), None, resume=ck, sample_chars=0))
    for events in (one, two):
        assert [e["restored_step"] for e in events if e["event"] == "nonfinite"] == [4]
    a, b = (checkpoint.load(tmp_path / r / "latest.npz") for r in ("one", "split"))
    assert a.step == b.step == 10 and a.optimizer == b.optimizer
    for name in a.params:
        assert a.params[name].tobytes() == b.params[name].tobytes(), name
    for name in a.opt_arrays:
        assert a.opt_arrays[name].tobytes() == b.opt_arrays[name].tobytes(), name
    assert a.guard == b.guard


# ---------------------------------------------------------- 8. non-finite weights on disk
@pytest.mark.parametrize("value", [np.nan, np.inf])
def test_a_checkpoint_with_non_finite_weights_is_refused(tmp_path, run_cli, value):
    path = tmp_path / "ck.npz"
    checkpoint.save(make_checkpoint(), path)

    def poison(meta, arrays):
        arrays["param/rnn.weight_hh_l0"][0, 0] = value
    rewrite_with_meta(path, tmp_path / "bad.npz", poison)
    for command in (["sample", "--length", "5"], ["score", "hello"]):
        failed(run_cli(*command, "--model", "bad.npz"), "bad.npz", "not finite")


@pytest.mark.parametrize("member, value", [("opt/v/decoder.bias", -1.0), ("opt/m/decoder.bias", np.nan),
                                           ("state/h", np.inf)])
def test_a_checkpoint_with_a_non_finite_training_state_is_refused(tmp_path, member, value):
    path = tmp_path / "ck.npz"
    checkpoint.save(make_checkpoint(), path)

    def poison(meta, arrays):
        arrays[member].reshape(-1)[0] = value
    rewrite_with_meta(path, tmp_path / "bad.npz", poison)
    with pytest.raises(CharlmError, match="bad.npz"):
        checkpoint.load(tmp_path / "bad.npz")


# ---------------------------------------------------------- 9. forged metadata, one-line errors
def _forge(tmp_path, edit) -> Path:
    path = tmp_path / "ck.npz"
    checkpoint.save(make_checkpoint(), path)
    rewrite_with_meta(path, tmp_path / "forged.npz", edit)
    return tmp_path / "forged.npz"


FORGERIES = {
    "bad rng state": lambda m, a: m.update(rng={"bit_generator": "PCG64", "state": {"state": "x", "inc": 1}}),
    "rng of another generator": lambda m, a: m.update(rng={"bit_generator": "MT19937", "state": {}}),
    "wrong-shape moment": lambda m, a: a.update({"opt/m/decoder.bias": np.zeros(1, np.float32)}),
    "missing moment": lambda m, a: a.pop("opt/v/decoder.bias"),
    "wrong-shape state": lambda m, a: a.update({"state/h": np.zeros((7, 2, 5), np.float32)}),
    "negative window": lambda m, a: m.update(window=-3),
    "negative step": lambda m, a: m.update(step=-1),
    "fractional step": lambda m, a: m.update(step=2.5),
    "history of strings": lambda m, a: m.update(history=["x"]),
    "three-character char token": lambda m, a: m["vocab"].update(
        tokens=["abc" if t == "h" else t for t in m["vocab"]["tokens"]]),
    "token that is not a string": lambda m, a: m["vocab"]["tokens"].__setitem__(1, 5),
    "vocabulary that is not a list": lambda m, a: m["vocab"].update(tokens="abc"),
    "nested metadata": lambda m, a: m.update(extra=json.loads("[" * 40 + "]" * 40)),
    "string as a size": lambda m, a: m["model"].update(hidden="5"),
    "optimizer step count negative": lambda m, a: m["optimizer"].update(t=-4),
    "float64 grad norms": lambda m, a: a.update({"hist/grad_norm": np.zeros(3, np.float64)}),
}


@pytest.mark.parametrize("name", sorted(FORGERIES))
def test_forged_metadata_is_one_error_line(tmp_path, run_cli, name):
    forged = _forge(tmp_path, FORGERIES[name])
    failed(run_cli("train", TINY, *SMALL, "--steps", "1", "--init-from", forged, "--out", "new"), "forged.npz")
    assert not (tmp_path / "new").exists()


def _raw_meta(tmp_path, text: bytes) -> Path:
    """A checkpoint whose metadata bytes are given as is (no valid checksum can be computed for them)."""
    path = tmp_path / "ck.npz"
    checkpoint.save(make_checkpoint(), path)
    with np.load(path) as z:
        arrays = {n: z[n] for n in z.files}
    arrays["__meta__"] = np.frombuffer(text, np.uint8)
    with open(tmp_path / "raw.npz", "wb") as f:
        np.savez(f, **arrays)
    return tmp_path / "raw.npz"


@pytest.mark.parametrize("text", [b'{"format": "charlm-checkpoint", "version": 1, "best_val_loss": NaN}',
                                  b'{"format": "charlm-checkpoint", "version": 1, "x": 1e999}',
                                  b'{"format": "charlm-checkpoint", "version": 1, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                                  b'{"format": "charlm-checkpoint", "version": 1, "x": ' + b"1" * 5000 + b"}"],
                         ids=["nan", "overflow", "deep", "long-int"])
def test_metadata_json_charlm_never_writes_is_one_error_line(tmp_path, run_cli, text):
    _raw_meta(tmp_path, text)
    failed(run_cli("sample", "--model", "raw.npz", "--length", "3"), "raw.npz")


def test_a_fortran_order_checkpoint_loads_c_contiguous(tmp_path):
    ck = make_checkpoint()
    path = tmp_path / "f.npz"
    checkpoint.save(ck, path)

    def fortran(meta, arrays):
        for n in list(arrays):
            if n.startswith("param/") and arrays[n].ndim == 2:
                arrays[n] = np.asfortranarray(arrays[n])
    rewrite_with_meta(path, tmp_path / "fortran.npz", fortran)
    back = checkpoint.load(tmp_path / "fortran.npz")
    assert all(a.flags.c_contiguous for a in back.params.values())  # no new kernel specialisation
    assert all(back.params[n].tobytes() == ck.params[n].tobytes() for n in ck.params)


def test_ctrl_c_during_start_up_is_no_traceback(tmp_path):
    """Ctrl-C while charlm imports its modules (the first ~0.5 s) is one line and exit 130. (A signal
    that lands while Python itself starts, in its site module, is Python's own fatal error: not charlm's
    to catch, and not counted.)"""
    reached = 0
    for delay in (0.3, 0.45, 0.6, 0.8, 1.2, 2.0):  # later ones only while none reached (a loaded machine)
        if reached and delay > 0.8:
            break
        proc = _start("train", TINY, *SMALL, "--steps", "5", "--out", f"run{delay}", cwd=tmp_path)
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        if "init_import_site" in err or (proc.returncode == -signal.SIGINT and not err):
            continue  # Python itself was still starting (no handler yet, or its site module)
        reached += 1
        assert "Traceback" not in err, err[-3000:]
        assert proc.returncode in (130, 0), (proc.returncode, err)
        assert len(err.strip().splitlines()) <= 2, err
    assert reached >= 1


# ---------------------------------------------------------- 10. the rest
def test_a_resume_keeps_the_checkpoints_permissions(run, run_cli):
    (run / "latest.npz").chmod(0o600)
    ok(run_cli("train", "--resume", "run", "--steps", "1", "--json", "--threads", "1"))
    assert (run / "latest.npz").stat().st_mode & 0o777 == 0o600


def test_what_a_killed_tokenisation_leaves_is_named_and_cleaned_up(run_cli, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "tokens.bin").write_bytes(b"\x01" * 1000)
    (run / ".tokens.bin.abc123.tmp").write_bytes(b"\x01" * 5000)
    (run / ".tokens.bin.tmp").write_bytes(b"\x01" * 5000)  # the old fixed name
    failed(run_cli("sample", "--model", "run"), "no checkpoint in run", "stopped before the first save", "--out run")
    res = ok(run_cli("train", TINY, *SMALL, "--steps", "1", "--out", "run"))
    assert "removed 2 temporary files left in run by an interrupted run" in res.stderr
    assert sorted(os.listdir(run)) == ["best.npz", "latest.npz", "tokens.bin"]


def test_the_stop_advice_does_not_suggest_the_clip_already_in_use(tmp_path, monkeypatch):
    calls = []
    real = train_mod.grad_norm

    def norm(grads, rows=None):
        calls.append(1)
        return float("nan") if len(calls) > 2 else real(grads, rows)
    monkeypatch.setattr(train_mod, "grad_norm", norm)
    with pytest.raises(CharlmError) as e:
        list(train_mod.train(tiny_text(), ModelConfig(cell="rnn", embed=4, hidden=8, layers=1),
                             TrainConfig(seq_len=8, batch=2, steps=20, lr=1e30, clip=5.0), tmp_path / "run",
                             sample_chars=0))
    msg = str(e.value)
    assert "(--clip 5)" not in msg and "clipping at --clip 5 did not prevent it" in msg and "--lr" in msg


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root writes anywhere")
def test_qa_train_into_an_unwritable_folder_fails_before_training(run_cli, tmp_path):
    (tmp_path / "ro").mkdir()
    (tmp_path / "ro").chmod(0o500)
    try:
        res = run_cli("qa", "train", DATA / "qa_tiny_train.txt", "--epochs", "3", "--json", "--out", "ro/qa")
        failed(res, "ro/qa")
    finally:
        (tmp_path / "ro").chmod(0o700)


def test_a_negative_sample_seed_is_one_line(run_cli, tmp_path):
    """sample --seed -1 was an internal error (NumPy's ValueError); the library refuses it too."""
    train_tiny(tmp_path / "seedrun", steps=1)
    model = str(tmp_path / "seedrun")
    failed(run_cli("sample", "--model", model, "--seed", "-1", "--length", "5"), "--seed must be a whole number")
    import charlm
    with pytest.raises(charlm.CharlmError, match="seed must be a whole number"):
        charlm.load(model).generate(length=5, seed=-1)


def test_an_empty_text_without_the_end_factor_is_not_a_perplexity_of_1(run_cli, tmp_path):
    """score "" --no-eos printed perplexity 1.0 over zero tokens (eval refuses the same case)."""
    train_tiny(tmp_path / "r", steps=1)
    failed(run_cli("score", "", "--no-eos", "--model", tmp_path / "r"), "nothing to score")
    import charlm
    lm = charlm.load(tmp_path / "r")
    with pytest.raises(charlm.CharlmError, match="nothing to score"):
        lm.score("", eos=False)
    assert lm.score("", eos=True)["n_tokens"] == 1  # the end factor alone is a real probability


# ---------------------------------------------------------- 10. an all-OOV text is not a perplexity of the text
@pytest.fixture(scope="module")
def char_and_word(tmp_path_factory) -> dict[str, Path]:
    """A tiny character run and a tiny word run (words.txt), each trained for 2 steps."""
    import charlm
    root = tmp_path_factory.mktemp("levels")
    train_tiny(root / "char", steps=2)
    events = list(charlm.train(DATA / "words.txt", out=root / "word", level="word", steps=2, hidden=8, layers=1,
                               embed=4, seq_len=8, batch=2, eval_every=2, sample_length=0))
    assert events[-1]["event"] == "done"
    return {"char": root / "char", "word": root / "word"}


@pytest.mark.parametrize("level", ["char", "word"])
def test_eval_and_score_of_an_all_oov_file_say_what_was_scored(char_and_word, tmp_path, level):
    """Every token outside the vocabulary: eval printed a perplexity over the ends of line alone (a character
    model: 1 token) as if it measured the text. Now eval and score --file both say, in one warning line on
    stderr, that nothing of the text was in the vocabulary and what was scored instead; stdout is as before
    (--json parseable)."""
    model = char_and_word[level]
    (tmp_path / "oov.txt").write_text("\u20ac\u20ac\u20ac\u2603\n\u20ac\u20ac\n", encoding="utf-8")
    what = "characters" if level == "char" else "words"
    for args in (["eval", "oov.txt", "--json"], ["eval", "oov.txt"], ["score", "--file", "oov.txt", "--json"],
                 ["score", "--file", "oov.txt"]):
        res = _charlm(*args, "--model", model, "--threads", "1", cwd=tmp_path)
        assert res.returncode == 0, res.stderr[-2000:]
        err = res.stderr.strip()
        assert "\n" not in err and err.startswith("warning: nothing of"), err
        assert "is in the model's vocabulary" in err and what in err and "2 line ends" in err, err
        assert ("oov.txt" if args[0] == "eval" else "the 2 texts") in err, err
        if "--json" in args:
            r = json.loads(res.stdout)
            assert (r if args[0] == "eval" else r["total"])["oov"] == (6 if level == "char" else 2)


def test_the_library_warns_of_texts_with_nothing_in_the_vocabulary(char_and_word):
    import warnings

    import charlm
    from charlm.lm.score import OOVWarning
    lm = charlm.load(char_and_word["word"])
    with pytest.warns(OOVWarning, match="nothing of the text is in the model's vocabulary: 2 words"):
        r = lm.score("zzqx yyqw")
    assert r["oov"] == 2 and r["n_tokens"] == 3 and "in_vocab" not in r  # the figures are unchanged
    with pytest.warns(OOVWarning, match="nothing of oov.txt"):
        assert set(lm.evaluate_text("zzqx\n", source="oov.txt")) == {
            "n_tokens", "logprob", "perplexity", "perplexity_excl_oov", "bits_per_token", "oov"}
    seen = lm.vocab.tokens[2]
    with pytest.warns(OOVWarning, match=r"1 of 3 texts have no word in the model's vocabulary \(text 2\)"):
        list(lm.score_lines([seen, "zzqx", seen + " zzqx"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a text with something in the vocabulary: no warning
        lm.score(seen + " zzqx")
        lm.score_many([seen, "", seen])
        charlm.load(char_and_word["char"]).score("")  # the end factor of an empty text is a real probability


# ---------------------------------------------------------- 10. float64 checkpoints: a note before the compile
def test_a_float64_checkpoint_says_it_compiles_new_kernels_once(tmp_path):
    """A float64 checkpoint made the kernels compile a float64 version for ~1 min without a word. With an
    empty kernel cache: one note line on stderr, before the compile, and --json stays parseable; with the
    kernels cached (the second run), no note. Fortran-order arrays need no note: they load C-contiguous
    (test_a_fortran_order_checkpoint_loads_c_contiguous)."""
    ck = make_checkpoint(cell="rnn", layers=1, dtype=np.float64)
    for a in ck.params.values():
        np.clip(a, -1, 1, out=a)
    checkpoint.save(ck, tmp_path / "f64.npz")
    env = {"NUMBA_CACHE_DIR": str(tmp_path / "cache")}
    notes = []
    for _ in range(2):
        res = subprocess.run([sys.executable, "-m", "charlm", "score", "hello", "--model", "f64.npz", "--json",
                              "--threads", "1"], cwd=tmp_path, env={**_env(), **env}, capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        assert json.loads(res.stdout)["n_tokens"] == 6
        notes.append(res.stderr.strip())
    assert notes == ["note: this checkpoint is float64: compiling float64 kernels (first time only, ~1 min)", ""]


# ---------------------------------------------------------- 10. what a kill leaves, cleaned at the next use
def _strays(run: Path) -> list[str]:
    names = [".latest.npz.k1xq_7.tmp", ".best.npz.z9a2b3.tmp", ".tokens.bin.0a1b2c.tmp"]
    for n in names:
        (run / n).write_bytes(b"\0" * 100)
    return names


@pytest.mark.parametrize("command", [["sample", "--length", "3", "--model", "run"], ["score", "hi", "--model", "run"],
                                     ["eval", TINY, "--model", "run"], ["info", "run"],
                                     ["sample", "--length", "3", "--model", "run/latest.npz"]])
def test_stray_temporary_files_are_cleaned_at_the_next_use_of_the_run(run, tmp_path, command):
    """A kill mid-save leaves .latest.npz.XXXX.tmp (each as large as a checkpoint); they used to stay until
    the next training run. Any use of the run removes them (no process holds the folder) and says so."""
    names = _strays(run)
    res = _charlm(*command, "--threads", "1", cwd=tmp_path) if command[0] != "info" else _charlm(*command, cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    note = res.stderr.strip()
    assert note.startswith("note: removed 3 temporary files left in run by an interrupted run (") and "\n" not in note
    assert sorted(note.partition("(")[2].rstrip(")").split(", ")) == sorted(names), note
    assert sorted(os.listdir(run)) == ["best.npz", "latest.npz", "tokens.bin"]


def test_a_live_runs_temporary_files_are_never_touched(run, tmp_path):
    """While a process holds the run folder's lock (a training run saving), its temporary files are its own:
    sample works and leaves them, and says nothing."""
    from charlm.data.lock import lock_run_dir
    names = _strays(run)
    with lock_run_dir(run):
        res = _charlm("sample", "--length", "3", "--model", "run", "--seed", "1", "--threads", "1", cwd=tmp_path)
        assert res.returncode == 0 and res.stderr == "", res.stderr
        assert set(names) <= set(os.listdir(run))


@pytest.mark.parametrize("command", [["sample", "--length", "3"], ["score", "hi"], ["eval", TINY]])
def test_a_run_folder_with_no_checkpoint_is_named_at_every_use(tmp_path, command):
    """Killed during tokenisation: no checkpoint. sample, score and eval say why in one line; while the
    training is still alive (it holds the lock), they say it is preparing the run instead."""
    from charlm.data.lock import lock_run_dir
    run = tmp_path / "run"
    run.mkdir()
    (run / ".tokens.bin.abc123.tmp").write_bytes(b"\x01" * 5000)
    one_error_line(_charlm(*command, "--model", "run", cwd=tmp_path),
                   "no checkpoint in run", "stopped before the first save", "--out run")
    with lock_run_dir(run):
        one_error_line(_charlm(*command, "--model", "run", cwd=tmp_path),
                       "no checkpoint in run yet", f"(PID {os.getpid()})", "wait for its first save")
    assert (run / ".tokens.bin.abc123.tmp").exists()  # named, left for the next train --out run to clean


# ---------------------------------------------------------- found by this session's hostile matrix
def test_a_batch_of_samples_larger_than_the_machine_is_one_line(char_and_word, run_cli):
    """sample -n 1000000000 was an internal error (NumPy's MemoryError for 29.8 GiB of logits)."""
    failed(run_cli("sample", "--model", char_and_word["char"], "--num-samples", "1000000000", "--length", "5"),
           "1,000,000,000 samples", "GiB of memory")


def test_a_non_finite_length_penalty_is_refused(char_and_word, run_cli):
    """--length-penalty nan ranked the beam by NaN scores and printed "(score nan)", exit 0."""
    import charlm
    for value in ("nan", "inf"):
        failed(run_cli("sample", "--model", char_and_word["char"], "--beam", "2", "--length-penalty", value),
               "--length-penalty must be a finite number")
    with pytest.raises(CharlmError, match="length_penalty must be a finite number"):
        charlm.load(char_and_word["char"]).beam_search("", 5, 2, length_penalty=float("nan"))
