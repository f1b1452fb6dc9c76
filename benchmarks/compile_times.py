"""Where a first run's compile time goes: per kernel and signature, and per command from an empty cache.

    python benchmarks/compile_times.py                 # every command below, each from an empty cache
    python benchmarks/compile_times.py train sample    # some of them
    python benchmarks/compile_times.py --one -- train --steps 1   # one command in this process (used by the above)

Each command runs in a fresh process with NUMBA_CACHE_DIR set to a new empty folder (removed afterwards), so
every kernel it calls is compiled. CPU seconds are what count on a shared machine (user + sys of the process
and its children, from getrusage); wall seconds are printed with the load average beside them. Per kernel,
Numba's event API ("numba:compile") gives each dispatcher's compilation for each signature; the table shows
its own CPU time (callees compiled along the way subtracted) and the time including them. A compile that
ran in a child process (charlm.lm.precompile) is counted in the command's total CPU, not in the table.
For train, "wall to 1st step" is the warm-up the command reports ("Kernels compiled in ... s").

The model for `sample` / `score` is trained first by a warm `charlm train --steps 1` (not timed).
"""
from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands(run_dir: str, word_corpus: str) -> dict[str, list[str]]:
    return {
        "train": ["train", "--steps", "1", "--out", run_dir + "-char"],
        "train-word": ["train", word_corpus, "--level", "word", "--steps", "1", "--out", run_dir + "-word"],
        "sample": ["sample", "--model", run_dir + "-model", "--length", "50", "--seed", "1"],
        "score": ["score", "x", "--model", run_dir + "-model"],
        "grads": ["grads", "--model", run_dir + "-model", "--max-lag", "4", "--windows", "2", "--warmup", "2"],
    }


# ------------------------------------------------------------------ one command, in this process
def _one(argv: list[str], out_json: str | None) -> None:
    from numba.core import event

    class CPUListener(event.Listener):
        """Inclusive and exclusive CPU seconds of each dispatcher compilation (nested ones subtracted)."""

        def __init__(self):
            self.stack = []  # [key, start, child seconds]
            self.rows = defaultdict(lambda: [0, 0.0, 0.0])  # key -> [count, own, inclusive]

        def on_start(self, ev):
            d = ev.data["dispatcher"]
            name = f"{d.py_func.__module__.replace('charlm.kernels.', '')}.{d.py_func.__name__}"
            sig = ",".join(_short(a) for a in ev.data["args"])
            self.stack.append([(name, sig), time.process_time(), 0.0])

        def on_end(self, ev):
            key, t0, child = self.stack.pop()
            dt = time.process_time() - t0
            row = self.rows[key]
            row[0] += 1
            row[1] += dt - child
            row[2] += dt
            if self.stack:
                self.stack[-1][2] += dt

    listener = CPUListener()
    event.register("numba:compile", listener)
    sys.argv = ["charlm", *argv]
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        from charlm._entry import main
        main()
    except SystemExit as e:
        if e.code:
            raise
    finally:
        if out_json:
            rows = [[k[0], k[1], v[0], v[1], v[2]] for k, v in listener.rows.items()]
            with open(out_json, "w") as f:
                json.dump({"rows": rows, "cpu": time.process_time() - c0, "wall": time.perf_counter() - t0}, f)


def _short(t) -> str:
    s = str(t)
    for a, b in (("array(", ""), (", 1d, C)", "[1]"), (", 2d, C)", "[2]"), (", 3d, C)", "[3]"),
                 (", 1d, A)", "[1A]"), (", 2d, A)", "[2A]"), (", 3d, A)", "[3A]"), ("float32", "f4"),
                 ("float64", "f8"), ("uint8", "u1"), ("uint16", "u2"), ("uint32", "u4"), ("int32", "i4"),
                 ("int64", "i8"), ("readonly ", "ro "), ("OmittedArg", "omit"), ("Literal[int]", "lit"),
                 ("boolean", "b")):
        s = s.replace(a, b)
    return s


# ------------------------------------------------------------------ every command, each cold
def _cold(name: str, argv: list[str], env: dict) -> dict:
    cache = tempfile.mkdtemp(prefix="charlm-nc-")
    out_json = cache + ".json"
    env = dict(env, NUMBA_CACHE_DIR=cache)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, __file__, "--one", "--json", out_json, "--", *argv], env=env,
                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    shutil.rmtree(cache, ignore_errors=True)
    if p.returncode:
        print(f"{name}: exit {p.returncode}\n{p.stderr[-2000:]}", file=sys.stderr)
    try:
        with open(out_json) as f:
            info = json.load(f)
        os.remove(out_json)
    except OSError:
        info = {"rows": []}
    import re
    m = re.search(r"Kernels compiled in ([0-9.]+) s", p.stderr)  # train: the wall seconds before its first step
    return dict(info, name=name, total_cpu=cpu, total_wall=wall, load=load, rc=p.returncode,
                compiled=float(m.group(1)) if m else None)


def main(names: list[str]) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    tmp = tempfile.mkdtemp(prefix="charlm-ct-")
    run_dir = os.path.join(tmp, "run")
    word = os.path.join(tmp, "words.txt")
    from charlm.data import default_corpus
    text, _ = default_corpus()
    with open(word, "w") as f:
        f.write(text[:200_000])
    cmds = _commands(run_dir, word)
    names = names or list(cmds)
    if {"sample", "score", "grads"} & set(names):  # a model to sample from (warm cache: not timed)
        subprocess.run([sys.executable, "-m", "charlm", "train", "--steps", "1", "--out", run_dir + "-model"],
                       env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    results = [_cold(n, cmds[n], env) for n in names]
    shutil.rmtree(tmp, ignore_errors=True)

    per = defaultdict(dict)  # (kernel, sig) -> command -> own cpu
    incl = {}
    for r in results:
        for name, sig, count, own, inc in r["rows"]:
            per[(name, sig)][r["name"]] = own
            incl[(name, sig)] = max(incl.get((name, sig), 0.0), inc)
    print(f"{'kernel':42s} {'signature':70s} " + " ".join(f"{r['name']:>10s}" for r in results) + f" {'incl':>6s}")
    for key in sorted(per, key=lambda k: -max(per[k].values())):
        cells = " ".join(f"{per[key][r['name']]:10.2f}" if r["name"] in per[key] else f"{'':10s}" for r in results)
        print(f"{key[0]:42.42s} {key[1]:70.70s} {cells} {incl[key]:6.2f}")
    print()
    print(f"{'command (empty cache)':24s} {'CPU s':>7s} {'wall s':>7s} {'load':>5s} {'sigs':>5s} {'compile CPU s':>13s} "
          f"{'wall to 1st step':>16s}")
    for r in results:
        n = sum(1 for row in r["rows"])
        comp = sum(row[3] for row in r["rows"])
        print(f"charlm {r['name']:17s} {r['total_cpu']:7.1f} {r['total_wall']:7.1f} {r['load']:5.1f} {n:5d} "
              f"{comp:13.1f} {'' if r['compiled'] is None else format(r['compiled'], '16.1f')}"
              f"{'' if not r['rc'] else '  (failed)'}")


if __name__ == "__main__":
    args = sys.argv[1:]
    if args[:1] == ["--one"]:
        out = None
        if args[1:2] == ["--json"]:
            out, args = args[2], args[3:]
        else:
            args = args[1:]
        _one(args[1:] if args[:1] == ["--"] else args, out)
    else:
        main(args)
