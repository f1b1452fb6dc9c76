"""Speed next to a CPU hog: each path on an idle machine and beside `python -c "while True: pass"` pinned
to one core, against our own single-thread speed and against PyTorch beside the same hog (issue 17).

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/loaded.py            # about 10 minutes
    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/loaded.py --paths sample256 --seconds 4

Paths (the work of the CLI's commands, float32, the sizes of run_all.py's rows):
  sample256 / sample512  batch-1 sampling, char LSTM 2x256 / 2x512, 64-token pieces as `charlm sample`;
                         PyTorch: an LSTMCell loop, its fastest batch-1 path
  score                  one stream through a text, char LSTM 2x512, windows of 256 (`charlm score`);
                         PyTorch: nn.LSTM over the same windows
  eval                   64 streams, char LSTM 2x512 (`charlm eval --streams 64`)
  train                  char LSTM 2x256, batch 32, windows of 64, Adam, clipping (`charlm train`)

Sides, each in a fresh process (so each charlm side starts with a fresh thread governor, as a command does):
  charlm              --threads 2, the default: the governor picks 1 or 2 threads piece by piece
  charlm 1 thread     --threads 1
  charlm 2 fixed      --threads 2 with CHARLM_ADAPTIVE_THREADS=0: both threads always (the old behaviour)
  torch 2 / torch 1   torch.set_num_threads(2) (its default here) / (1)

Each side warms up, then repeats its work for --seconds and reports tokens/s (the governor's probes and
its first pieces on two threads included: what a user's command sees). Targets (issue 17, item 2): under
the hog, charlm >= 0.9x charlm 1 thread, and >= 1.2x PyTorch (its default threads) under the same hog.
Prints a markdown table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT / "corpora" / "tinyshakespeare" / "input.txt"
PATHS = ["sample256", "sample512", "score", "eval", "train"]
SIDES = {  # name: (library, threads, environment)
    "charlm": ("charlm", 2, {}),
    "charlm 1 thread": ("charlm", 1, {}),
    "charlm 2 fixed": ("charlm", 2, {"CHARLM_ADAPTIVE_THREADS": "0"}),
    "torch 2": ("torch", 2, {}),
    "torch 1": ("torch", 1, {}),
}


def _text(n: int) -> str:
    if SHAKESPEARE.is_file():
        return SHAKESPEARE.read_text(encoding="utf-8")[:n]
    return ("the quick brown fox jumps over the lazy dog.\n" * (n // 45 + 1))[:n]


# ------------------------------------------------------------------ one side of one path, in a worker
def charlm_work(path: str):
    """(a callable doing one piece of the path's work, tokens per piece)."""
    sys.path.insert(0, str(ROOT))
    from charlm.config import ModelConfig
    from charlm.data import Vocab
    from charlm.lm.model import Model
    if path.startswith("sample"):
        from charlm.lm.sample import generate
        H = int(path[len("sample"):])
        V = 65
        vocab = Vocab(tuple(chr(32 + i) for i in range(V - 1)) + ("\n",))
        m = Model.create(ModelConfig(cell="lstm", vocab_size=V, embed=64, hidden=H, layers=2), seed=0)
        n = 512
        return (lambda: "".join(generate(m, vocab, n, seed=0))), n
    if path in ("score", "eval"):
        from charlm.lm.score import evaluate_text
        text = _text(20_000 if path == "score" else 100_000)
        vocab = Vocab.from_text(text)
        m = Model.create(ModelConfig(cell="lstm", vocab_size=len(vocab), embed=64, hidden=512, layers=2), seed=0)
        K = 1 if path == "score" else 64
        return (lambda: evaluate_text(m, vocab, text, streams=K)), len(text)
    if path == "train":
        from charlm.optim import Adam, clip_scale, grad_norm
        V, N, T = 65, 32, 64
        m = Model.create(ModelConfig(cell="lstm", vocab_size=V, embed=64, hidden=256, layers=2), seed=0)
        opt, grads = Adam(m.params), m.zero_grads()
        data = np.random.default_rng(0).integers(0, V, (8, T + 1, N)).astype(np.int32)
        state = [m.zero_state(N), 0]

        def step():
            i = state[1] % len(data)
            x, y = np.ascontiguousarray(data[i, :-1]), np.ascontiguousarray(data[i, 1:])
            _, state[0] = m.loss_and_grads(x, y, state[0], grads)
            opt.step(m.params, grads, 2e-3, clip_scale(grad_norm(grads), 5.0))
            state[1] += 1
        return step, N * T
    raise ValueError(path)


def torch_work(path: str):
    import torch
    if path.startswith("sample"):
        from torch_ref import lstmcell_sampler  # benchmarks/, this script's folder
        n = 512
        return lstmcell_sampler(torch, 65, 64, int(path[len("sample"):]), n), n
    if path in ("score", "eval"):
        text = _text(20_000 if path == "score" else 100_000)
        chars = sorted(set(text))
        ids = torch.tensor([chars.index(c) for c in text])
        V, E, H, K = len(chars), 64, 512, 1 if path == "score" else 64
        emb, rnn, dec = torch.nn.Embedding(V, E), torch.nn.LSTM(E, H, 2), torch.nn.Linear(H, V)

        def score():
            with torch.no_grad():
                L = (len(ids) - 1) // K
                x = ids[:K * L].reshape(K, L).T.contiguous()
                y = ids[1:K * L + 1].reshape(K, L).T.contiguous()
                state, total = None, 0.0
                for s in range(0, L, 256):
                    out, state = rnn(emb(x[s:s + 256]), state)
                    lp = torch.log_softmax(dec(out), -1)
                    total += lp.gather(2, y[s:s + 256, :, None]).sum().item()
        return score, len(text)
    if path == "train":
        V, E, H, N, T = 65, 64, 256, 32, 64
        emb, rnn, dec = torch.nn.Embedding(V, E), torch.nn.LSTM(E, H, 2), torch.nn.Linear(H, V)
        params = [*emb.parameters(), *rnn.parameters(), *dec.parameters()]
        opt, lossf = torch.optim.Adam(params, lr=2e-3), torch.nn.CrossEntropyLoss()
        data = torch.randint(0, V, (8, T + 1, N), generator=torch.Generator().manual_seed(0))
        st = [None, 0]

        def step():
            i = st[1] % len(data)
            s = st[0] if st[0] is None else tuple(t.detach() for t in st[0])
            out, st[0] = rnn(emb(data[i, :-1]), s)
            loss = lossf(dec(out).reshape(-1, V), data[i, 1:].reshape(-1))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 5.0)
            opt.step()
            st[1] += 1
        return step, N * T
    raise ValueError(path)


def worker(path: str, lib: str, threads: int, seconds: float) -> dict:
    if lib == "charlm":
        sys.path.insert(0, str(ROOT))
        from charlm.runtime import compute_threads, governor
        with compute_threads(threads):
            fn, units = charlm_work(path)
            fn()  # compile / warm
            done, t0 = 0, time.perf_counter()
            while time.perf_counter() - t0 < seconds:
                fn()
                done += units
            took = time.perf_counter() - t0
            gov = governor()
            kept = {str(k): c.current for k, c in gov.kinds.items()} if gov else {}
        return {"tokens_per_s": done / took, "threads_kept": kept}
    import torch
    torch.set_num_threads(threads)
    fn, units = torch_work(path)
    fn()
    done, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        done += units
    return {"tokens_per_s": done / (time.perf_counter() - t0)}


# ------------------------------------------------------------------ the driver
def hog() -> subprocess.Popen:
    """`python -c "while True: pass"` pinned to the last core."""
    cpu = max(os.sched_getaffinity(0))
    return subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])


def measure(path: str, side: str, seconds: float) -> dict:
    lib, threads, env = SIDES[side]
    out = subprocess.run([sys.executable, __file__, "--worker", path, lib, str(threads), str(seconds)],
                         env={**os.environ, **env}, capture_output=True, text=True)
    if out.returncode:
        raise SystemExit(f"{path} / {side} failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _, _, path, lib, threads, seconds = sys.argv
        print(json.dumps(worker(path, lib, int(threads), float(seconds))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--paths", default=",".join(PATHS), help=f"comma-separated, of {', '.join(PATHS)}")
    ap.add_argument("--seconds", type=float, default=6.0, help="timed seconds per side (after its warm-up)")
    ap.add_argument("--no-idle", action="store_true", help="only the loaded rows")
    ap.add_argument("--sides", default=",".join(SIDES), help=f"comma-separated, of: {', '.join(SIDES)}")
    ap.add_argument("--merge", type=Path, help="a previous run's JSON line: sides not measured now are taken from it")
    args = ap.parse_args()
    paths = [p for p in args.paths.split(",") if p]
    sides = [s for s in args.sides.split(",") if s]
    if len(os.sched_getaffinity(0)) < 2:
        print(json.dumps({"skipped": "needs 2 cores"}))
        return 0
    results: dict = {}
    if args.merge:
        results = json.loads(args.merge.read_text().strip().splitlines()[-1])["results"]
    for condition in (["hog"] if args.no_idle else ["idle", "hog"]):
        for path in paths:
            h = hog() if condition == "hog" else None
            try:
                time.sleep(0.5 if h else 0)
                for side in sides:
                    r = measure(path, side, args.seconds)
                    results.setdefault(path, {}).setdefault(condition, {})[side] = r
                    print(json.dumps({"path": path, "condition": condition, "side": side, **r}), flush=True)
            finally:
                if h:
                    h.kill()
                    h.wait()
    print("\n| path | condition | charlm tok/s (threads kept) | charlm 1 thread | charlm 2 fixed | torch 2 | torch 1 "
          "| charlm / own 1 thread (≥ 0.9×) | charlm / torch 2 (≥ 1.2× under load) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for path, by in results.items():
        for condition, r in by.items():
            if any(s not in r for s in SIDES):
                continue
            ours = r["charlm"]["tokens_per_s"]
            kept = ",".join(sorted(set(map(str, r["charlm"]["threads_kept"].values())))) or "-"
            print(f"| {path} | {condition} | {ours:,.0f} ({kept}) | {r['charlm 1 thread']['tokens_per_s']:,.0f} | "
                  f"{r['charlm 2 fixed']['tokens_per_s']:,.0f} | {r['torch 2']['tokens_per_s']:,.0f} | "
                  f"{r['torch 1']['tokens_per_s']:,.0f} | {ours / r['charlm 1 thread']['tokens_per_s']:.2f}× | "
                  f"{ours / r['torch 2']['tokens_per_s']:.2f}× |")
    print(json.dumps({"seconds": args.seconds, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
