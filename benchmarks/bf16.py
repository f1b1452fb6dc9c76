"""Sampling with bfloat16 weights (`charlm sample --precision bf16`): its speed against float32 and
PyTorch's fastest batch-1 path, and what the rounding does to the model's log-probabilities.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/bf16.py --model RUN [--text held-out.txt]

Speed: char LSTM 2x256 and 2x512 (random weights, V 65), batch 1, 2,000 tokens per timing in
64-token pieces as `charlm sample`, charlm float32 / bf16 alternating with PyTorch's LSTMCell loop,
medians of 5, on --threads (2) threads (charlm's thread governor on, as the CLI runs it).

Log-probabilities: the trained model --model scores --text (default: the last tenth of Tiny Shakespeare,
which `charlm train --val-frac 0.1` holds out) exactly, and again with the weights the bf16 sampler
stores rounded to bfloat16 (every recurrent and output weight; the first layer's input product stays
float32 where the sampler tabulates it): the bf16 sampler computes exactly this model (tests/test_bf16.py).
Prints max and mean |delta ln P| per token and both bits per token. Markdown and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from torch_ref import lstmcell_sampler  # noqa: E402

SHAKESPEARE = ROOT / "corpora" / "tinyshakespeare" / "input.txt"


def rounded_params(model) -> dict:
    from charlm.kernels import sample
    L = model.cfg.layers
    stored = [f"rnn.weight_hh_l{k}" for k in range(L)] + [f"rnn.weight_ih_l{k}" for k in range(1, L)]
    stored.append("decoder.weight" if not model.cfg.tie else "embedding.weight")
    V, E, GH = model.cfg.vocab_size, model.cfg.embed, model.params["rnn.weight_hh_l0"].shape[0]
    if V * E * GH > sample.TABLE_MAX_MACS:  # no input table: the first layer's input weights are stored too
        stored.append("rnn.weight_ih_l0")
    return {k: (sample.from_bf16(sample.to_bf16(v)) if k in stored else v) for k, v in model.params.items()}


def logprob_effect(run: str, text: str) -> dict:
    import charlm
    from charlm.lm.score import _logprobs, eval_ids
    lm = charlm.load(run, threads=1)
    model = lm._model
    n, full, _, _ = eval_ids(lm.vocab, text)
    with lm._compute():
        exact = _logprobs(model, full[:-1].astype(np.int32), full[1:].astype(np.int32), 256)
    saved = model.params
    try:
        model.params = rounded_params(model)
        with lm._compute():
            bf = _logprobs(model, full[:-1].astype(np.int32), full[1:].astype(np.int32), 256)
    finally:
        model.params = saved
    d = np.abs(bf - exact)
    return {"tokens": int(n), "max_abs_delta_lnp": float(d.max()), "mean_abs_delta_lnp": float(d.mean()),
            "bits_per_token_float32": float(-exact.mean() / np.log(2)),
            "bits_per_token_bf16": float(-bf.mean() / np.log(2))}


def speed(threads: int, repeats: int) -> list[dict]:
    import torch
    from charlm.config import ModelConfig
    from charlm.data import Vocab
    from charlm.lm.model import Model
    from charlm.lm.sample import generate
    from charlm.runtime import compute_threads
    torch.set_num_threads(threads)
    V, E, n = 65, 64, 2000
    vocab = Vocab(tuple(chr(32 + i) for i in range(V - 1)) + ("\n",))
    rows = []
    with compute_threads(threads):
        for H in (256, 512):
            m = Model.create(ModelConfig(cell="lstm", vocab_size=V, embed=E, hidden=H, layers=2), seed=0)
            torch_loop = lstmcell_sampler(torch, V, E, H, n)
            sides = {"float32": lambda: "".join(generate(m, vocab, n, seed=0)),
                     "bf16": lambda: "".join(generate(m, vocab, n, seed=0, precision="bf16")),
                     "torch": torch_loop}
            times = {k: [] for k in sides}
            for f in sides.values():
                f()
            for _ in range(repeats):
                for k, f in sides.items():
                    t = time.perf_counter()
                    f()
                    times[k].append(time.perf_counter() - t)
            tps = {k: n / statistics.median(v) for k, v in times.items()}
            rows.append({"model": f"LSTM 2x{H}", "threads": threads, **{f"{k}_tok_s": v for k, v in tps.items()},
                         "float32_vs_torch": tps["float32"] / tps["torch"], "bf16_vs_torch": tps["bf16"] / tps["torch"],
                         "bf16_vs_float32": tps["bf16"] / tps["float32"]})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="a trained run for the log-probability effect (skipped without)")
    ap.add_argument("--text", type=Path, help="held-out text (default: the last tenth of Tiny Shakespeare)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    rows = speed(args.threads, args.repeats)
    effect = None
    if args.model:
        text = args.text.read_text(encoding="utf-8") if args.text else \
            SHAKESPEARE.read_text(encoding="utf-8")[-len(SHAKESPEARE.read_text(encoding="utf-8")) // 10:]
        effect = logprob_effect(args.model, text)
    print(f"\n| batch-1 sampling, {args.threads} threads | float32 tok/s | bf16 tok/s | PyTorch LSTMCell tok/s | "
          f"float32 / PyTorch | bf16 / PyTorch | bf16 / float32 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['float32_tok_s']:,.0f} | {r['bf16_tok_s']:,.0f} | {r['torch_tok_s']:,.0f} | "
              f"{r['float32_vs_torch']:.2f}× | {r['bf16_vs_torch']:.2f}× | {r['bf16_vs_float32']:.2f}× |")
    if effect:
        print(f"\nln P per token over {effect['tokens']:,} held-out tokens, bf16 weights against float32: max |Δ| "
              f"{effect['max_abs_delta_lnp']:.2e}, mean |Δ| {effect['mean_abs_delta_lnp']:.2e}; bits per token "
              f"{effect['bits_per_token_float32']:.5f} → {effect['bits_per_token_bf16']:.5f}")
    print(json.dumps({"speed": rows, "logprob_effect": effect}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
