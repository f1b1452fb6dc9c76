"""Data-parallel scaling: measured on this machine, then modelled for K nodes.

    python benchmarks/scaling.py            # measures (about 3 minutes on 2 cores), prints the section
    python benchmarks/scaling.py --write    # ... and puts it into BENCHMARKS.md (after the analysis marker,
                                            # which benchmarks/run_all.py keeps when it regenerates the file)

Measured: the training step of charlm.lm.train (the model's loss_and_grads on this rank's streams, the
gradient sum of charlm.lm.shard.GradSync, clipping, the optimizer) on random token ids, in one process on
2 threads and in `mpiexec -n 2` processes on 1 thread each, same global batch; the time each step spends in
the gradient Allreduce; and one process's step time at smaller batches (what one of K nodes computes).

Modelled (nothing below is measured on a cluster): step time(K) = compute(global batch / K) +
allreduce(gradient bytes, K, link), with compute() taken from the measured step times of one 2-core
process (interpolated in the batch; for models not measured, scaled by their FLOPs per token from the
measured word model), and a ring Allreduce 2 (K - 1) / K x bytes / bandwidth + 2 (K - 1) x latency, no
overlap of communication with computation (charlm sums once, after the backward pass).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

# name, cell, V, E, H, L, N (global batch), T, optimizer, clip
MEASURED = {
    "char": ("char LSTM 2x256 (default)", "lstm", 65, 64, 256, 2, 32, 64, "adam", 5.0),
    "word": ("word LSTM 2x200, V 10k", "lstm", 10000, 200, 200, 2, 20, 35, "sgd", 0.25),
}
# modelled only: name, cell, V, E, H, L, global batch, T, measured model whose per-FLOP speed it takes
MODELLED = [
    ("char LSTM 2x256", "lstm", 65, 64, 256, 2, 32, 64, "char"),
    ("word LSTM 2x650, V 10k", "lstm", 10000, 650, 650, 2, 20, 35, "word"),
    ("word LSTM 2x1024, V 100k", "lstm", 100000, 512, 1024, 2, 32, 35, "word"),
]
LINKS = [("10 Gb/s Ethernet", 10e9 / 8, 30e-6), ("25 Gb/s Ethernet", 25e9 / 8, 15e-6),
         ("100 Gb/s InfiniBand", 100e9 / 8, 3e-6)]
NODES = [1, 2, 4, 8, 16, 32, 64]
MARK = "<!-- scaling: written by benchmarks/scaling.py -->"
END = "<!-- /scaling -->"


# ------------------------------------------------------------------ one rank's work (the worker)
def worker(key: str, batch: int, steps: int) -> None:
    """Time `steps` training steps of MEASURED[key] with global batch `batch` on this rank's streams."""
    from charlm import dist
    from charlm.config import ModelConfig
    from charlm.lm.models import create_model
    from charlm.lm.shard import GradSync
    from charlm.optim import clip_scale, grad_norm, make_optimizer
    from charlm.runtime import compute_threads

    _, cell, V, E, H, L, _, T, opt_name, clip = MEASURED[key]
    k = dist.size()
    lo, hi = dist.block(batch)
    model = create_model(ModelConfig(cell=cell, vocab_size=V, embed=E, hidden=H, layers=L), seed=0)
    opt = make_optimizer(opt_name, model.trainable)
    sync = GradSync(model, (hi - lo) / batch)
    grads = sync.grads if k > 1 else model.zero_grads()
    rng = np.random.default_rng(0)
    data = rng.integers(0, V, (steps + 3, T + 1, batch)).astype(np.int32)[:, :, lo:hi]
    state = model.zero_state(hi - lo)
    comm = []
    with compute_threads(None):
        def step(i):
            nonlocal state
            x, y = np.ascontiguousarray(data[i, :-1]), np.ascontiguousarray(data[i, 1:])
            loss, state = model.loss_and_grads(x, y, state, grads, None)
            if k > 1:
                t = time.perf_counter()
                sync.reduce(loss, x.size, False, False)
                comm.append(time.perf_counter() - t)
            opt.step(model.trainable, grads, 0.1 if opt_name == "sgd" else 2e-3, clip_scale(grad_norm(grads), clip))
        for i in range(3):
            step(steps + i)
        comm.clear()
        dist.barrier()
        t0 = time.perf_counter()
        for i in range(steps):
            step(i)
        seconds = time.perf_counter() - t0
        pure = _pure_allreduce(sync.flat) if k > 1 else 0.0
    out = dist.gather({"seconds": seconds, "comm": float(np.median(comm)) if comm else 0.0, "pure": pure})
    if dist.rank() == 0:
        s = max(o["seconds"] for o in out)
        print(json.dumps({"tokens_per_s": steps * T * batch / s, "step_s": s / steps,
                          "allreduce_s": float(np.median([o["comm"] for o in out])),
                          "pure_allreduce_s": float(np.median([o["pure"] for o in out])),
                          "gradient_mb": sync.flat.nbytes / 1e6, "ranks": k}))


def _pure_allreduce(buf, reps: int = 15) -> float:
    """Median time of the gradient buffer's Allreduce alone, the ranks lined up by a barrier first."""
    from charlm import dist
    times = []
    for _ in range(reps):
        dist.barrier()
        t = time.perf_counter()
        dist.allreduce(buf)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


# ------------------------------------------------------------------ measuring
def launch(key: str, batch: int, steps: int, ranks: int, threads: int) -> dict:
    cmd = [sys.executable, __file__, "--worker", key, "--batch", str(batch), "--steps", str(steps)]
    if ranks > 1:
        cmd = [shutil.which("mpiexec"), "-n", str(ranks), *cmd]
    env = {**os.environ, "NUMBA_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    env = {k: v for k, v in env.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900, check=True)
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure(repeats: int) -> dict:
    """Per measured model: 1 rank x 2 threads and 2 ranks x 1 thread (medians over repeats, taken
    alternately), and 1 rank x 2 threads at smaller batches (a node's compute at global batch / K)."""
    results = {}
    for key, (name, _, V, E, H, L, N, T, _, _) in MEASURED.items():
        steps = 30 if key == "char" else 20
        one, two = [], []
        for _ in range(repeats):
            one.append(launch(key, N, steps, 1, 2))
            two.append(launch(key, N, steps, 2, 1))
        med = lambda rs, f: float(np.median([r[f] for r in rs]))  # noqa: E731
        curve = {N: med(one, "step_s")}
        for b in (N // 2, N // 4, max(1, N // 8)):
            curve[b] = launch(key, b, steps, 1, 2)["step_s"]
        results[key] = {"name": name, "one": {f: med(one, f) for f in ("tokens_per_s", "step_s")},
                        "two": {f: med(two, f) for f in ("tokens_per_s", "step_s", "allreduce_s",
                                                          "pure_allreduce_s", "gradient_mb")},
                        "compute_by_batch": {str(b): s for b, s in sorted(curve.items())}, "T": T, "N": N}
        print(json.dumps(results[key]), flush=True)
    return results


# ------------------------------------------------------------------ the model
def params(V, E, H, L, G=4) -> int:
    return V * E + sum(G * H * ((E if k == 0 else H) + H) + 2 * G * H for k in range(L)) + H * V + V


def compute_s(meas: dict, key: str, flops_ratio: float, local_batch: float, T_model: int) -> float:
    """Step time of one node at local_batch streams: the measured curve of `key` (per token,
    interpolated in log batch; below the smallest measured batch, the per-token cost stays),
    scaled by the model's FLOPs per token relative to the measured model's."""
    m = meas[key]
    bs = sorted(int(b) for b in m["compute_by_batch"])
    per_tok = [m["compute_by_batch"][str(b)] / (b * m["T"]) for b in bs]
    pt = float(np.interp(np.log(max(local_batch, bs[0])), np.log(bs), per_tok))
    return pt * local_batch * T_model * flops_ratio


def allreduce_s(nbytes: float, k: int, bw: float, lat: float) -> float:
    return 0.0 if k == 1 else 2 * (k - 1) / k * nbytes / bw + 2 * (k - 1) * lat


def model_table(meas: dict) -> list[str]:
    from run_all import train_flops_per_token
    lines = []
    for name, cell, V, E, H, L, N, T, ref in MODELLED:
        r = MEASURED[ref]
        ratio = train_flops_per_token(cell, V, E, H, L) / train_flops_per_token(r[1], r[2], r[3], r[4], r[5])
        nbytes = 4 * params(V, E, H, L)
        lines += ["", f"**{name}**: {params(V, E, H, L) / 1e6:.1f} M parameters, {nbytes / 1e6:.0f} MB of gradient "
                      f"per step; global batch {N} x {T} tokens (fixed) | tokens/s with K nodes (efficiency)", "",
                  "| link | " + " | ".join(f"K={k}" for k in NODES) + " | K=64, batch 32 per node |",
                  "|---|" + "---|" * (len(NODES) + 1)]
        for link, bw, lat in LINKS:
            base = N * T / compute_s(meas, ref, ratio, N, T)
            cells = []
            for k in NODES:
                if N % k and N < k:
                    cells.append("–")
                    continue
                t = compute_s(meas, ref, ratio, N / k, T) + allreduce_s(nbytes, k, bw, lat)
                cells.append(f"{rate(N * T / t)} ({N * T / t / (k * base):.0%})")
            weak = 64 * 32 * T / (compute_s(meas, ref, ratio, 32, T) + allreduce_s(nbytes, 64, bw, lat))
            cells.append(f"{rate(weak)} ({weak / (64 * 32 * T / compute_s(meas, ref, ratio, 32, T)):.0%})")
            lines.append(f"| {link} | " + " | ".join(cells) + " |")
    return lines


def rate(tokens_per_s: float) -> str:
    """Tokens/s for the tables: thousands above 10k, else whole numbers (a big model runs a few hundred
    tokens/s, which thousands without decimals showed as "0k")."""
    return f"{tokens_per_s / 1e3:,.0f}k" if tokens_per_s >= 1e4 else f"{tokens_per_s:,.0f}"


def section(meas: dict) -> str:
    rows = []
    for key, m in meas.items():
        one, two = m["one"], m["two"]
        rows.append(f"| {m['name']} | {one['tokens_per_s']:,.0f} | {two['tokens_per_s']:,.0f} | "
                    f"{two['tokens_per_s'] / one['tokens_per_s']:.2f}× | {two['gradient_mb']:.1f} MB | "
                    f"{1e3 * two['allreduce_s']:.2f} ms ({two['allreduce_s'] / two['step_s']:.0%}) | "
                    f"{1e3 * two['pure_allreduce_s']:.2f} ms | {1e3 * two['step_s']:.1f} ms |")
    curves = "; ".join(f"{m['name']}: " + ", ".join(f"batch {b} {1e3 * s:.1f} ms" for b, s in
                                                    m["compute_by_batch"].items()) for m in meas.values())
    return "\n".join([
        MARK, "## Scaling: more than one process (`mpiexec`)", "",
        "Written by `python benchmarks/scaling.py --write`. **Measured** on this 2-core machine (the training step "
        "of `charlm train` on random token ids, same global batch both ways, medians of alternating runs; MPICH "
        "wheel, shared memory):", "",
        "| model | 1 rank × 2 threads, tok/s | 2 ranks × 1 thread, tok/s | ratio (target ≥ 0.85×) | gradient "
        "| Allreduce per step in training (share of the step) | Allreduce alone | step |",
        "|---|---|---|---|---|---|---|---|", *rows, "",
        "The Allreduce in training includes waiting for the slower rank; alone (after a barrier) it is the "
        f"transfer. One process's step time by batch (2 threads), the compute of one node in the model below: "
        f"{curves}.", "",
        "**Modelled**, not measured: K nodes, each as fast as this 2-core machine, the global batch fixed (as "
        "`--batch` is): step time = compute(global batch / K), from the measured curve above (per token, "
        "interpolated; models not measured take the measured word model's speed per FLOP), + a ring "
        "Allreduce of the float32 gradient, 2 (K-1)/K × bytes / bandwidth + 2 (K-1) × latency (latency 30, 15 "
        "and 3 µs), with no overlap of the two. Efficiency = tokens/s ÷ (K × one node's). The last column keeps "
        "32 streams per node (global batch 32 K, so more tokens per update: what a larger batch buys).",
        *model_table(meas), "",
        "Reading: the embedding and decoder of a word model are dense V × H gradients summed every step, so a "
        "word model's bytes per token are far larger than a character model's; at a fixed global batch the "
        "compute per node shrinks as 1/K while the ring Allreduce does not, and scaling stops where the two meet. "
        "A larger global batch (or more streams per node) restores the compute side; the sum of a 100k-word "
        "vocabulary's dense gradients needs a fast link whatever the batch.", END])


def write(text: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    doc = path.read_text(encoding="utf-8")
    if MARK in doc:
        doc = re.sub(re.escape(MARK) + r".*?" + re.escape(END), lambda _: text, doc, flags=re.S)
    else:
        doc = doc.rstrip("\n") + "\n\n" + text + "\n"
    path.write_text(doc, encoding="utf-8")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--write", action="store_true")
    ap.add_argument("--from-json", help="skip measuring: use the measurements saved in this file")
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker, a.batch, a.steps)
    meas = json.loads(Path(a.from_json).read_text()) if a.from_json else measure(a.repeats)
    Path("/tmp/charlm_scaling.json").write_text(json.dumps(meas))
    text = section(meas)
    print(text)
    if a.write:
        write(text)


if __name__ == "__main__":
    main()
