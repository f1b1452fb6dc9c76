"""More than one process (charlm.dist, CONVENTIONS.md 1c): `mpiexec -n 2` against one process.

Every test launches real processes (`mpiexec -n 2 python ...`, one thread each) with a timeout, and
is skipped, with the reason, where mpiexec or mpi4py cannot start two ranks. Equivalence bounds:

- the gradient of the global batch, float64: 2 ranks equal 1 process to 1e-12 relative (the
  reduction order of the sums is all that differs);
- 20 training steps in float32 (Adam, dropout, clipping): every parameter agrees to 2e-5 absolute
  (the weights move about 0.04 in those steps; float32 rounding of the differently ordered sums is
  ~1e-7 per step and Adam's normalisation lets it grow), and the weights are bit-identical on both ranks;
- eval and score --file: the output of 1 process, byte for byte.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from charlm.lm import checkpoint
from charlm.runtime import compute_threads
from tests.helpers import DATA, TINY, env_plain, ok

ROOT = Path(__file__).resolve().parents[1]
WORDS = DATA / "words.txt"
MODEL = ["--hidden", "16", "--embed", "8", "--layers", "2", "--seq-len", "8", "--threads", "1"]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "CHARLM_DEBUG"}
    env.update({k: v for k, v in env_plain().items() if v is not None})
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    env.update(extra)
    return env


def _mpiexec() -> list[str]:
    exe = shutil.which("mpiexec")
    return [exe, "-n", "2"] if exe else []


def _why_no_mpi() -> str | None:
    """None when `mpiexec -n 2` starts two ranks that see each other; else why not."""
    if not _mpiexec():
        return "mpiexec is not on PATH (pip install \"charlm[mpi]\")"
    try:
        import mpi4py  # noqa: F401
    except ImportError:
        return "mpi4py is not installed (pip install \"charlm[mpi]\")"
    code = "from mpi4py import MPI; c = MPI.COMM_WORLD; r = c.gather(c.Get_rank()); r and print(r)"
    try:
        res = subprocess.run([*_mpiexec(), sys.executable, "-c", code], capture_output=True, text=True,
                             timeout=60, env=_env())
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"mpiexec -n 2 does not start: {e}"
    if res.returncode != 0 or res.stdout.strip() != "[0, 1]":
        return f"mpiexec -n 2 does not give two ranks: {res.stdout[-200:]} {res.stderr[-300:]}"
    return None


_WHY = _why_no_mpi()
pytestmark = pytest.mark.skipif(_WHY is not None, reason=_WHY or "")


def mpi(args, cwd, timeout=120, python=False) -> subprocess.CompletedProcess:
    """`mpiexec -n 2 python -m charlm ARGS` (or `python -c CODE`) in cwd; a hang fails the test."""
    cmd = [*_mpiexec(), sys.executable, *(["-c", args] if python else ["-m", "charlm", *map(str, args)])]
    try:
        return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"mpiexec -n 2 did not finish in {timeout} s: {cmd}")


def one(args, cwd, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "charlm", *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=timeout)


def done_ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Traceback" not in res.stderr
    return res


# ------------------------------------------------------------------ the arithmetic, in float64
GRADIENT = textwrap.dedent("""
    import numpy as np
    from charlm import dist
    from charlm.config import ModelConfig
    from charlm.lm.models import create_model
    from charlm.lm.shard import GradSync, StreamDropout
    from charlm.runtime import compute_threads
    worst = 0.0
    with compute_threads(1):
        for cell in ("lstm", "gru"):
            cfg = ModelConfig(cell=cell, vocab_size=11, embed=5, hidden=7, layers=3, dropout=0.3)
            m = create_model(cfg, seed=1, dtype=np.float64)
            rng = np.random.default_rng(2)
            x, y = rng.integers(0, 11, (6, 4)).astype(np.int32), rng.integers(0, 11, (6, 4)).astype(np.int32)
            whole = m.zero_grads()
            loss, _ = m.loss_and_grads(x, y, m.zero_state(4), whole, StreamDropout(5, 3, 0))
            lo, hi = dist.block(4)
            sync = GradSync(m, (hi - lo) / 4)
            part, _ = m.loss_and_grads(np.ascontiguousarray(x[:, lo:hi]), np.ascontiguousarray(y[:, lo:hi]),
                                       m.zero_state(hi - lo), sync.grads, StreamDropout(5, 3, lo))
            got = sync.reduce(part, (hi - lo) * 6, False, False)
            worst = max(worst, abs(got - loss) / abs(loss))
            for n, g in whole.items():
                worst = max(worst, float(np.abs(sync.grads[n] - g).max() / np.abs(g).max()))
    ranks = dist.gather((dist.rank(), dist.size(), worst))
    if ranks:
        print(ranks)
""")


def test_the_gradient_of_the_global_batch_is_one_processs_in_float64(tmp_path):
    res = done_ok(mpi(GRADIENT, tmp_path, python=True))
    ranks = eval(res.stdout.strip().splitlines()[-1])  # rank 0's line: [(rank, size, worst), ...]
    assert [r[:2] for r in ranks] == [(0, 2), (1, 2)], res.stdout
    assert all(r[2] < 1e-12 for r in ranks), ranks


# ------------------------------------------------------------------ training
CASES = [("lstm", "char"), ("gru", "char"), ("lstm", "word"), ("gru", "word")]
OPTIONS = dict(hidden=16, embed=8, layers=2, dropout=0.3, seq_len=8, batch=4, steps=20, eval_every=10, clip=1.0,
               sample_length=0, seed=3)
TRAIN = textwrap.dedent("""
    import json, sys, zlib
    import charlm
    from charlm import dist
    from charlm.lm import train as T
    from charlm.runtime import compute_threads
    crc = {}
    done = T._Trainer._done
    def spy(self):  # every rank's weights, as bytes
        crc["w"] = zlib.crc32(b"".join(self.model.params[k].tobytes() for k in sorted(self.model.params)))
        return done(self)
    T._Trainer._done = spy
    out = []
    for corpus, run_dir, options in json.loads(sys.argv[1]):
        with compute_threads(1):
            events = list(charlm.train(corpus, out=run_dir, **options))
        out.append({"size": dist.size(), "crcs": dist.allgather(crc["w"]), "steps": events[-1]["steps"]})
    if dist.rank() == 0:
        print(json.dumps(out))
""")


def _corpus(level):
    return str(TINY if level == "char" else WORDS)


@pytest.fixture(scope="module")
def two_rank_runs(tmp_path_factory):
    """The four training cases, trained under mpiexec -n 2 (the library's train) in one launch."""
    d = tmp_path_factory.mktemp("mpi_runs")
    jobs = [(_corpus(level), str(d / f"{cell}-{level}"), {**OPTIONS, "cell": cell, "level": level})
            for cell, level in CASES]
    res = done_ok(mpi(f"import sys; sys.argv = ['x', {json.dumps(jobs)!r}]; exec({TRAIN!r})", d, python=True))
    return d, json.loads(res.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", range(len(CASES)), ids=[f"{c}-{lv}" for c, lv in CASES])
def test_two_ranks_train_as_one_process(tmp_path, two_rank_runs, case):
    """20 steps with dropout and clipping: the parameters of 2 ranks are those of 1 process to 2e-5
    (float32 sums in another order), and bit-identical on the two ranks."""
    cell, level = CASES[case]
    d, info = two_rank_runs
    assert info[case]["size"] == 2 and info[case]["steps"] == 20
    assert info[case]["crcs"][0] == info[case]["crcs"][1], "the ranks' weights differ"
    import charlm
    with compute_threads(1):
        list(charlm.train(_corpus(level), out=tmp_path / "one", **{**OPTIONS, "cell": cell, "level": level}))
    a, b = checkpoint.load(tmp_path / "one" / "latest.npz"), checkpoint.load(d / f"{cell}-{level}" / "latest.npz")
    assert (a.step, a.epoch, a.window) == (b.step, b.epoch, b.window) and a.step == 20
    worst = max(float(np.abs(a.params[n].astype(np.float64) - b.params[n]).max()) for n in a.params)
    assert worst < 2e-5, worst
    assert a.state["h"].shape == b.state["h"].shape == (2, 4, 16)  # every stream's state, not rank 0's
    np.testing.assert_allclose(a.state["h"], b.state["h"], atol=1e-4)
    assert [h["step"] for h in a.history] == [h["step"] for h in b.history] == [10, 20]
    for ha, hb in zip(a.history, b.history):
        assert hb["val_loss"] == pytest.approx(ha["val_loss"], rel=1e-5)
        assert hb["train_loss"] == pytest.approx(ha["train_loss"], rel=1e-5)
    assert a.counters["tokens"] == b.counters["tokens"]
    assert a.train == b.train and a.model == b.model and a.vocab == b.vocab


def test_a_batch_the_ranks_cannot_share_is_one_error_line(tmp_path):
    res = mpi(["train", TINY, *MODEL, "--batch", "3", "--steps", "2", "--out", "run"], tmp_path)
    assert res.returncode != 0
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "--batch 3" in lines[0] and "2 processes" in lines[0], \
        res.stderr
    assert not (tmp_path / "run" / "latest.npz").exists()


def test_resume_under_another_number_of_processes(tmp_path, run_cli):
    """2 ranks for 6 steps, then 1 process for 6, then 2 ranks for 6 again: the checkpoint ties
    nothing to K, and the result is the 18-step run of one process (to float32 reduction order)."""
    args = [TINY, *MODEL, "--batch", "4", "--dropout", "0.2", "--eval-every", "5", "--json", "--sample-length", "0"]
    done_ok(mpi(["train", *args, "--steps", "6", "--out", tmp_path / "split"], tmp_path))
    ck = checkpoint.load(tmp_path / "split" / "latest.npz")
    assert ck.step == 6 and ck.state["h"].shape == (2, 4, 16)
    ok(run_cli("train", "--resume", tmp_path / "split", "--steps", "6", "--json", "--threads", "1"))
    done_ok(mpi(["train", "--resume", tmp_path / "split", "--steps", "6", "--json", "--threads", "1"], tmp_path))
    ok(run_cli("train", *args, "--steps", "18", "--out", tmp_path / "whole"))
    a, b = checkpoint.load(tmp_path / "whole" / "latest.npz"), checkpoint.load(tmp_path / "split" / "latest.npz")
    assert a.step == b.step == 18
    assert max(float(np.abs(a.params[n] - b.params[n]).max()) for n in a.params) < 2e-5
    # and an MPI-trained run samples and scores in one process
    ok(run_cli("sample", "--model", tmp_path / "split", "--length", "20", "--seed", "1"))
    ok(run_cli("score", "hello there", "--model", tmp_path / "split", "--json"))


# ------------------------------------------------------------------ eval and score
USE = textwrap.dedent("""
    import json, sys
    import charlm
    from charlm import dist
    from charlm.runtime import compute_threads
    out = []
    with compute_threads(1):
        for kind, model, arg, option in json.loads(sys.argv[1]):
            lm = charlm.load(model)
            if kind == "eval":
                out.append(lm.evaluate_text(open(arg, encoding="utf-8").read(), option, details=True))
            elif kind == "many":
                out.append(lm.score_many(arg, details=True))
            else:
                out.append(list(lm.score_lines(arg, batch=option, details=True)))
    if dist.rank() == 0:
        print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny char model and a tiny word model, trained once in one process."""
    import charlm
    d = tmp_path_factory.mktemp("models")
    with compute_threads(1):
        for level in ("char", "word"):
            list(charlm.train(_corpus(level), out=d / level, **{**OPTIONS, "level": level, "steps": 30}))
    return d


def test_eval_and_score_under_two_ranks_give_one_processs_numbers_exactly(trained):
    """The library under mpiexec -n 2: evaluate (--streams 1 and 8) and score_many / score_lines
    (batches of 64 and 3) give one process's dicts, every float equal (one launch for them all);
    --streams 3 (blocks of 2 and 1) agrees to 1e-9 relative."""
    texts = WORDS.read_text(encoding="utf-8").splitlines()[:23]
    jobs = [("eval", str(trained / level), _corpus(level), streams) for level in ("char", "word") for streams in (1, 8, 3)]
    jobs += [("many", str(trained / "word"), texts, 0), ("lines", str(trained / "word"), texts, 64),
             ("lines", str(trained / "char"), texts, 3)]
    res = done_ok(mpi(f"import sys; sys.argv = ['x', {json.dumps(jobs)!r}]; exec({USE!r})", trained, python=True))
    two = json.loads(res.stdout.strip().splitlines()[-1])
    import charlm
    with compute_threads(1):
        for (kind, model, arg, option), got in zip(jobs, two):
            lm = charlm.load(model)
            if kind == "eval":
                want = lm.evaluate_text(open(arg, encoding="utf-8").read(), option, details=True)
            elif kind == "many":
                want = lm.score_many(arg, details=True)
            else:
                want = list(lm.score_lines(arg, batch=option, details=True))
            want = json.loads(json.dumps(want))
            if kind == "eval" and option == 3:  # blocks of 2 and 1 streams: float32 kernels round a lone column
                assert got["logprob"] == pytest.approx(want["logprob"], rel=1e-9)  # otherwise than a block of 3
                assert got["n_tokens"] == want["n_tokens"]
            else:
                assert got == want, (kind, model, option)


def test_the_eval_command_under_two_ranks_prints_what_one_process_prints(trained):
    args = ["eval", WORDS, "--model", trained / "word", "--streams", "8", "--json", "--threads", "1"]
    a, b = done_ok(one(args, trained)), done_ok(mpi(args, trained))
    assert b.stdout == a.stdout and json.loads(a.stdout)["n_tokens"] > 100
    args = ["score", "--file", WORDS, "--model", trained / "word", "--json", "--threads", "1"]
    a, b = done_ok(one(args, trained)), done_ok(mpi(args, trained))
    assert b.stdout == a.stdout and json.loads(a.stdout)["total"]["n_texts"] > 20


# ------------------------------------------------------------------ start-up
def test_importing_charlm_does_not_import_mpi4py_without_a_launcher():
    code = ("import sys, charlm, charlm.cli.app, charlm.lm.train, charlm.dist as d; "
            "assert d.size() == 1 and d.rank() == 0; print('mpi4py' in sys.modules)")
    env = {k: v for k, v in _env().items() if not k.startswith(("PMI_", "OMPI_", "PMIX_", "SLURM_"))}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr


# ------------------------------------------------------------------ stopping
def _rank_pids(marker: str, timeout: float = 60.0) -> dict[int, int]:
    """{rank: pid} of the python processes whose command line holds marker (found through /proc)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        found = {}
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
                env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            if marker.encode() in cmd and b"-m" in cmd:
                rank = next((e.split(b"=")[1] for e in env if e.startswith(b"PMI_RANK=")), None)
                if rank is not None:
                    found[int(rank)] = int(pid)
        if len(found) == 2:
            return found
        time.sleep(0.1)
    pytest.fail("the two ranks did not show up")


def _start_mpi(args, cwd) -> subprocess.Popen:
    return subprocess.Popen([*_mpiexec(), sys.executable, "-m", "charlm", *map(str, args)], cwd=cwd, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_file(path: Path, proc: subprocess.Popen, timeout: float = 90.0):
    t0 = time.monotonic()
    while not path.exists():
        if proc.poll() is not None or time.monotonic() - t0 > timeout:
            proc.kill()
            out, err = proc.communicate()
            pytest.fail(f"no {path.name}: {err[-2000:]}")
        time.sleep(0.05)


KEEP_TRAINING = [TINY, *MODEL, "--batch", "4", "--minutes", "5", "--eval-every", "20", "--json"]


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_a_signal_to_one_rank_stops_every_rank_and_rank_0_saves(tmp_path):
    run = tmp_path / "sigrun"
    proc = _start_mpi(["train", *KEEP_TRAINING, "--out", run], tmp_path)
    _wait_file(run / "latest.npz", proc)
    os.kill(_rank_pids(str(run))[1], signal.SIGTERM)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0 and "Traceback" not in err
    assert "stopped by a signal to another process at step" in " ".join(err.split()), err
    done = json.loads(out.strip().splitlines()[-1])
    ck = checkpoint.load(run / "latest.npz")
    assert done["event"] == "done" and ck.step == done["steps"] and ck.history[-1]["step"] == ck.step


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the ranks through /proc")
def test_a_rank_killed_with_sigkill_ends_the_job_soon_and_leaves_the_last_checkpoint(tmp_path):
    run = tmp_path / "killrun"
    proc = _start_mpi(["train", *KEEP_TRAINING, "--checkpoint-every", "5", "--out", run], tmp_path)
    _wait_file(run / "latest.npz", proc)
    os.kill(_rank_pids(str(run))[1], signal.SIGKILL)
    t0 = time.monotonic()
    try:
        proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail("rank 0 went on waiting for the killed rank")
    assert proc.returncode != 0 and time.monotonic() - t0 < 60
    assert checkpoint.load(run / "latest.npz").step > 0


HANG = textwrap.dedent("""
    import time
    import numpy as np
    from charlm import dist
    if dist.rank() == 1:
        time.sleep(30)  # never joins the sum: a rank that hangs (or died under a launcher that waits)
    dist.allreduce(np.zeros(4, dtype=np.float32))
""")


def test_a_rank_that_never_answers_is_one_line_and_an_abort_after_the_timeout(tmp_path):
    cmd = [*_mpiexec(), sys.executable, "-c", HANG]
    t0 = time.monotonic()
    res = subprocess.run(cmd, cwd=tmp_path, env=_env(CHARLM_MPI_TIMEOUT="2"), capture_output=True, text=True,
                         timeout=60)
    assert res.returncode != 0 and time.monotonic() - t0 < 25
    assert "rank 0 of 2 waited 2 s for the other ranks in the gradient sum" in res.stderr, res.stderr


# ------------------------------------------------------------------ bAbI
def test_qa_babi_under_two_ranks_gives_the_serial_table(tmp_path):
    """Two tasks x two runs (and two encoders) spread over 2 ranks: the same per-task rows as one
    process (kept encoder, validation accuracy, epochs, test error), seconds aside; models saved."""
    folder = tmp_path / "babi"
    folder.mkdir()
    for task in (1, 2):
        for part in ("train", "test"):
            shutil.copy(DATA / f"qa_tiny_{part}.txt", folder / f"qa{task}_tiny_{part}.txt")
    args = ["qa", "babi", folder, "--tasks", "1-2", "--epochs", "6", "--encoder", "pe,bow", "--runs", "2",
            "--dim", "8", "--json", "--threads", "1"]
    a = done_ok(one([*args, "--out", tmp_path / "one"], tmp_path))
    b = done_ok(mpi([*args, "--out", tmp_path / "two"], tmp_path))

    def rows(res):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in json.loads(res.stdout)["tasks"]]
    assert rows(b) == rows(a) and len(rows(a)) == 2
    assert json.loads(b.stdout)["mean_error_pct"] == json.loads(a.stdout)["mean_error_pct"]
    from charlm.qa.checkpoint import load
    for task in (1, 2):  # the same weights (the files differ in their timings)
        x, y = load(tmp_path / "one" / f"qa{task}" / "best.npz"), load(tmp_path / "two" / f"qa{task}" / "best.npz")
        assert x.params.keys() == y.params.keys()
        assert all(x.params[n].tobytes() == y.params[n].tobytes() for n in x.params)
