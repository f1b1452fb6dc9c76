"""charlm against PyTorch on this machine, side by side in one process; writes BENCHMARKS.md.

    pip install ".[bench]"
    python benchmarks/run_all.py                 # the whole suite (about 5 minutes)
    python benchmarks/run_all.py --quick         # fewer repeats, for a first look
    python benchmarks/run_all.py --only train    # one section: gemm, train, sample, score, startup

Both sides use the same configuration: sizes, batch, window, optimizer, clipping, float32, and the
same number of threads (--threads, default all cores). Every number is the median over repeats.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from charlm.config import ModelConfig  # noqa: E402
from charlm.data import Vocab  # noqa: E402
from charlm.lm.model import Model  # noqa: E402
from charlm.optim import SGD, Adam, clip_scale, grad_norm  # noqa: E402

from torch_ref import lstmcell_sampler  # noqa: E402  (benchmarks/, this script's folder)

SHAKESPEARE = ROOT.parent / "shared" / "corpora" / "tinyshakespeare" / "input.txt"


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def paired_medians(ours, theirs, repeats: int) -> tuple[float, float]:
    """Median wall time of each side, the two timed alternately (ours, theirs, ours, ...) so
    that a slow spell of this shared machine hits both sides rather than one."""
    a, b = [], []
    for _ in range(repeats):
        a.append(median_time(ours, 1))
        b.append(median_time(theirs, 1))
    return statistics.median(a), statistics.median(b)


def train_flops_per_token(cell: str, V: int, E: int, H: int, L: int) -> float:
    """Multiply-adds x 2 of one training step per token: forward 2GH(D+H) per layer,
    backward twice that; decoder 6HV (the embedding is a lookup)."""
    G = {"rnn": 1, "gru": 3, "lstm": 4}[cell]
    per_layer = sum(6 * G * H * ((E if k == 0 else H) + H) for k in range(L))
    return per_layer + 6 * H * V


# ------------------------------------------------------------------ GEMM ceiling
def gemm_ceiling(repeats: int) -> float:
    a = np.random.default_rng(0).standard_normal((2048, 1024)).astype(np.float32)
    b = np.random.default_rng(1).standard_normal((1024, 1024)).astype(np.float32)
    out = np.empty((2048, 1024), np.float32)
    np.dot(a, b, out=out)
    exact = a[:64].astype(np.float64) @ b.astype(np.float64)
    err = np.abs(out[:64] - exact).max() / np.abs(exact).max()
    if not err < 1e-5:  # a BLAS kernel that computes wrongly on this CPU
        raise SystemExit(f"the BLAS float32 product is wrong here (relative error {err:.2e}); not benchmarking")
    t = median_time(lambda: np.dot(a, b, out=out), repeats * 5)
    return 2 * 2048 * 1024 * 1024 / t / 1e9


# ------------------------------------------------------------------ training
def ours_train(cell, V, E, H, L, N, T, opt_name, clip, steps):
    cfg = ModelConfig(cell=cell, vocab_size=V, embed=E, hidden=H, layers=L)
    m = Model.create(cfg, seed=0)
    rng = np.random.default_rng(0)
    data = rng.integers(0, V, (steps + 3, T + 1, N)).astype(np.int32)
    grads = m.zero_grads()
    opt = Adam(m.params) if opt_name == "adam" else SGD(m.params)
    lr = 2e-3 if opt_name == "adam" else 1.0
    state = m.zero_state(N)

    def step(i):
        nonlocal state
        x = np.ascontiguousarray(data[i, :-1])
        y = np.ascontiguousarray(data[i, 1:])
        _, state = m.loss_and_grads(x, y, state, grads)
        opt.step(m.params, grads, lr, clip_scale(grad_norm(grads), clip))

    for i in range(3):
        step(i)

    def run():
        for i in range(steps):
            step(i)
    return run


def torch_train(torch, cell, V, E, H, L, N, T, opt_name, clip, steps):
    Cell = {"rnn": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[cell]
    emb = torch.nn.Embedding(V, E)
    rnn = Cell(E, H, L)
    dec = torch.nn.Linear(H, V)
    params = [*emb.parameters(), *rnn.parameters(), *dec.parameters()]
    opt = torch.optim.Adam(params, lr=2e-3) if opt_name == "adam" else torch.optim.SGD(params, lr=1.0)
    lossf = torch.nn.CrossEntropyLoss()
    g = torch.Generator().manual_seed(0)
    data = torch.randint(0, V, (steps + 3, T + 1, N), generator=g)
    state = [None]

    def step(i):
        x, y = data[i, :-1], data[i, 1:]
        s = state[0]
        if s is not None:
            s = tuple(t.detach() for t in s) if isinstance(s, tuple) else s.detach()
        out, s = rnn(emb(x), s)
        state[0] = s
        loss = lossf(dec(out).reshape(-1, V), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if clip > 0:
            torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()

    for i in range(3):
        step(i)

    def run():
        for i in range(steps):
            step(i)
    return run


TRAIN_ROWS = [
    # name, cell, V, E, H, L, N, T, optimizer, clip, target ratio
    ("char LSTM 1x128", "lstm", 65, 64, 128, 1, 32, 64, "adam", 5.0, 1.0),
    ("char LSTM 1x256", "lstm", 65, 64, 256, 1, 32, 64, "adam", 5.0, 1.0),
    ("char LSTM 1x512", "lstm", 65, 64, 512, 1, 32, 64, "adam", 5.0, 1.0),
    ("char LSTM 2x128", "lstm", 65, 64, 128, 2, 32, 64, "adam", 5.0, 1.0),
    ("char LSTM 2x256", "lstm", 65, 64, 256, 2, 32, 64, "adam", 5.0, 1.0),
    ("char LSTM 2x512", "lstm", 65, 64, 512, 2, 32, 64, "adam", 5.0, 1.0),
    ("char GRU 2x256", "gru", 65, 64, 256, 2, 32, 64, "adam", 5.0, 1.5),
    ("char RNN 2x256", "rnn", 65, 64, 256, 2, 32, 64, "adam", 5.0, 1.5),
    ("word LSTM 2x200 V10k", "lstm", 10000, 200, 200, 2, 20, 35, "sgd", 0.25, 1.0),
]


def bench_train(torch, repeats, quick, ceiling):
    rows = []
    for name, cell, V, E, H, L, N, T, opt, clip, target in TRAIN_ROWS:
        steps = 3 if quick else (5 if H >= 512 or V > 1000 else 10)
        ours = ours_train(cell, V, E, H, L, N, T, opt, clip, steps)
        theirs = torch_train(torch, cell, V, E, H, L, N, T, opt, clip, steps)
        t_ours, t_theirs = paired_medians(ours, theirs, repeats)
        tok = steps * N * T
        a, b = tok / t_ours, tok / t_theirs
        gflops = a * train_flops_per_token(cell, V, E, H, L) / 1e9
        rows.append({"work": f"train {name}", "ours": a, "pytorch": b, "unit": "tok/s", "ratio": a / b,
                     "target": target, "gflops": gflops, "ceiling_frac": gflops / ceiling})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ------------------------------------------------------------------ sampling
def bench_sample(torch, repeats, quick):
    from charlm.lm.sample import generate
    rows = []
    V, E = 65, 64
    vocab = Vocab(tuple(chr(32 + i) for i in range(V - 1)) + ("\n",))
    for H in (256, 512):
        n = 400 if quick else 2000
        m = Model.create(ModelConfig(cell="lstm", vocab_size=V, embed=E, hidden=H, layers=2), seed=0)
        "".join(generate(m, vocab, 10, seed=0))
        torch_loop = lstmcell_sampler(torch, V, E, H, n)
        torch_loop()
        # as `charlm sample --length n` runs it: the default pieces of 64 tokens (the thread governor
        # times each; pieces of 256 gave it four pieces a call, its probe of one thread a quarter of them)
        t_ours, t_theirs = paired_medians(lambda: "".join(generate(m, vocab, n, seed=0)), torch_loop, repeats)
        rows.append({"work": f"sample batch 1, LSTM 2x{H}", "ours": n / t_ours, "pytorch": n / t_theirs,
                     "unit": "tok/s", "ratio": t_theirs / t_ours, "target": 5.0,
                     "note": "PyTorch: LSTMCell loop, its fastest batch-1 path"})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ------------------------------------------------------------------ scoring
def bench_score(torch, repeats, quick):
    from charlm.lm.score import evaluate_text
    n_chars = 20_000 if quick else 100_000
    if SHAKESPEARE.is_file():
        text = SHAKESPEARE.read_text(encoding="utf-8")[:n_chars]
    else:
        text = ("the quick brown fox jumps over the lazy dog.\n" * (n_chars // 45 + 1))[:n_chars]
    vocab = Vocab.from_text(text)
    V, E, H = len(vocab), 64, 512
    m = Model.create(ModelConfig(cell="lstm", vocab_size=V, embed=E, hidden=H, layers=2), seed=0)
    emb = torch.nn.Embedding(V, E)
    rnn = torch.nn.LSTM(E, H, 2)
    dec = torch.nn.Linear(H, V)
    ids = torch.from_numpy(vocab.encode(text)[0].astype(np.int64))
    rows = []
    for K in (1, 64):
        evaluate_text(m, vocab, text[:2000], streams=K)

        def torch_eval():
            with torch.no_grad():
                L = len(ids) // K
                x = ids[:K * L].reshape(K, L).T.contiguous()            # (L, K) time-major
                total = 0.0
                state = None
                for s in range(0, L, 256):
                    out, state = rnn(emb(x[s:s + 256]), state)
                    lp = torch.log_softmax(dec(out), -1)
                    total += lp.sum().item() * 0  # same work as gathering the targets
        torch_eval()
        t_ours, t_theirs = paired_medians(lambda: evaluate_text(m, vocab, text, streams=K), torch_eval, repeats)
        rows.append({"work": f"score {n_chars // 1000}k chars, LSTM 2x512, {K} stream{'s' if K > 1 else ''}",
                     "ours": n_chars / t_ours, "pytorch": n_chars / t_theirs, "unit": "tok/s",
                     "ratio": t_theirs / t_ours, "target": 1.5 if K == 1 else 1.0})
        print(json.dumps(rows[-1]), flush=True)
    return rows


# ------------------------------------------------------------------ start-up
def bench_startup(repeats, quick):
    """Wall time of whole commands with a warm kernel cache, and one cold start."""
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        corpus = d / "c.txt"
        corpus.write_text("To be, or not to be, that is the question.\n" * 200)
        env = {**os.environ, "PYTHONPATH": str(ROOT), "CHARLM_MODELS_DIR": str(d / "models")}
        run = lambda *a, env=env: subprocess.run([sys.executable, "-m", "charlm", *a], env=env, cwd=d,
                                                 capture_output=True, text=True, check=True)
        run("train", str(corpus), "--steps", "2", "--hidden", "256", "--layers", "2", "--out", str(d / "m"),
            "--json", "--sample-length", "0")
        rows = []
        for name, args in (("sample --length 200", ("sample", "--model", str(d / "m"), "--length", "200")),
                           ("score \"<a sentence>\"", ("score", "He went to buy some chocolate", "--model",
                                                      str(d / "m")))):
            run(*args)
            t = median_time(lambda: run(*args), repeats)
            rows.append({"work": f"start-up: charlm {name} (warm cache)", "ours": t, "unit": "s wall",
                         "target": 0.8, "pytorch": None, "ratio": None})
            print(json.dumps(rows[-1]), flush=True)
        cold = {**env, "NUMBA_CACHE_DIR": str(d / "cold-cache")}
        t = median_time(lambda: run("sample", "--model", str(d / "m"), "--length", "200", env=cold), 1)
        rows.append({"work": "start-up: charlm sample, cold (compiles)", "ours": t, "unit": "s wall",
                     "target": 30.0, "pytorch": None, "ratio": None})
        print(json.dumps(rows[-1]), flush=True)
        t = median_time(lambda: subprocess.run([sys.executable, "-c", "import torch"], check=True), repeats)
        rows.append({"work": "reference: python -c 'import torch'", "ours": None, "pytorch": t, "unit": "s wall",
                     "target": None, "ratio": None})
    return rows


# ------------------------------------------------------------------ report
def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    blas = "unknown"
    try:
        from threadpoolctl import threadpool_info
        blas = "; ".join(f"{i.get('internal_api')} {i.get('version')} {i.get('architecture')} "
                         f"({i.get('num_threads')} threads, {Path(i.get('filepath', '')).name})"
                         for i in threadpool_info() if i.get("user_api") == "blas")
    except Exception:
        pass
    import numba
    import torch
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "numpy": np.__version__,
            "numba": numba.__version__, "torch": torch.__version__, "blas (NumPy, SciPy)": blas,
            "torch BLAS": "MKL / oneDNN, " + torch.backends.cpu.get_cpu_capability(),
            "torch_threads": torch.get_num_threads(),
            "OPENBLAS_CORETYPE": os.environ.get("OPENBLAS_CORETYPE", "(unset: OpenBLAS picks its kernel for this CPU)")}


def write_report(path: Path, info: dict, ceiling: float, rows: list[dict]) -> None:
    def fmt(v, unit):
        if v is None:
            return "–"
        return f"{v:,.0f}" if unit == "tok/s" else f"{v:.2f}"
    lines = ["# Benchmarks", "",
             "Written by `python benchmarks/run_all.py` on this machine; both sides in one process, same "
             "configuration, medians over repeats. Regenerate after any kernel change.", "",
             "## Machine", ""]
    lines += [f"- {k}: {v}" for k, v in info.items()]
    lines += [f"- measured float32 GEMM ceiling (NumPy, 2048×1024×1024): {ceiling:.0f} GFLOP/s", "",
              "## Results", "",
              "| work | charlm | PyTorch | unit | ratio | target | met | GFLOP/s | of ceiling |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = r.get("ratio")
        target = r.get("target")
        if ratio is not None and target is not None:
            met = "yes" if ratio >= target else "**no**"
        elif r.get("unit") == "s wall" and r.get("ours") is not None and target is not None:
            met = "yes" if r["ours"] <= target else "**no**"
        else:
            met = ""
        gfl = "" if r.get("gflops") is None else f"{r['gflops']:.0f}"
        frac = "" if r.get("ceiling_frac") is None else f"{100 * r['ceiling_frac']:.0f} %"
        lines.append(f"| {r['work']} | {fmt(r.get('ours'), r['unit'])} | {fmt(r.get('pytorch'), r['unit'])} | "
                     f"{r['unit']} | {'' if ratio is None else f'{ratio:.2f}×'} | "
                     f"{'' if target is None else (f'≥ {target}×' if ratio is not None else f'≤ {target} s')} | "
                     f"{met} | {gfl} | {frac} |")
    lines.append("")
    marker = "<!-- analysis: kept when this file is regenerated -->"
    kept = ""
    if path.is_file() and marker in path.read_text():
        kept = path.read_text().split(marker, 1)[1]
    path.write_text("\n".join(lines) + "\n" + marker + (kept or "\n"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["gemm", "train", "sample", "score", "startup"])
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md")
    args = ap.parse_args()
    import torch
    from threadpoolctl import threadpool_limits
    from charlm.runtime import compute_threads
    torch.set_num_threads(args.threads)
    repeats = 3 if args.quick else 5
    rows: list[dict] = []
    with threadpool_limits(limits=args.threads, user_api="blas"):
        ceiling = gemm_ceiling(repeats)
    print(json.dumps({"gemm_ceiling_gflops": ceiling}), flush=True)
    # charlm computes as its CLI does: Numba threads share the work, each BLAS call single-threaded
    # (this limits only the BLAS that NumPy/SciPy load; PyTorch keeps its own --threads)
    with compute_threads(args.threads):
        if args.only in (None, "train"):
            # training rows are quick (about 35 s in all): more pairs for a steadier median
            rows += bench_train(torch, 2 * repeats - 1, args.quick, ceiling)
        if args.only in (None, "sample"):
            rows += bench_sample(torch, repeats, args.quick)
        if args.only in (None, "score"):
            rows += bench_score(torch, repeats, args.quick)
    if args.only in (None, "startup"):
        rows += bench_startup(repeats, args.quick)
    if args.only is None:
        write_report(args.out, machine(), ceiling, rows)
        print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
