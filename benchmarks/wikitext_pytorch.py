"""The PyTorch side of the WikiText-2 comparison (issue: word-level models).

Trains torch.nn.Embedding + LSTM + Linear with the same configuration charlm uses
(2 layers, embedding and hidden 200, batch 20 streams, 35-token windows, Adam,
global-norm clipping, hidden state carried between windows, float32) for the
same number of minutes of training, then scores the validation and test files
exactly (one stream, state carried through the file, the first input <eos>) with
charlm's tokenisation: whitespace-separated words plus <eos> at each line end,
the vocabulary being every word of the training file.

    python benchmarks/wikitext_pytorch.py --minutes 30 --threads 1 > torch.json
    python benchmarks/wikitext_pytorch.py --recipe example --minutes 30 --threads 1

--recipe example follows the recipe of PyTorch's word_language_model example instead (its
defaults: tied decoder, dropout 0.2 on the embeddings, between the layers and on the output, plain
SGD at learning rate 20 with gradient clipping at 0.25, the rate divided by 4 after an epoch whose
validation loss did not improve, the best model by validation kept); the clock counts those
validations too (the budget is wall time, as charlm's --minutes). Validation then also runs when the
budget ends mid-epoch, so the last part of training counts.

Prints one JSON object: tokens/s, steps, val and test perplexity.
Needs the `bench` extra (PyTorch). Corpus: ../shared/corpora/wikitext-2/.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

DEFAULT_DIR = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "wikitext-2"


def tokens(path: Path) -> list[str]:
    out: list[str] = []
    for line in path.read_text(encoding="utf-8").split("\n")[:-1]:
        out.extend(line.split())
        out.append("<eos>")
    return out


class Net(torch.nn.Module):
    def __init__(self, V, E, H, L, dropout=0.0, tie=False):
        super().__init__()
        self.embedding = torch.nn.Embedding(V, E)
        self.rnn = torch.nn.LSTM(E, H, L, dropout=dropout if L > 1 else 0.0)
        self.decoder = torch.nn.Linear(H, V)
        self.drop = torch.nn.Dropout(dropout)
        torch.nn.init.uniform_(self.embedding.weight, -0.1, 0.1)   # as charlm initialises them
        torch.nn.init.uniform_(self.decoder.weight, -0.1, 0.1)
        torch.nn.init.zeros_(self.decoder.bias)
        if tie:
            self.decoder.weight = self.embedding.weight

    def forward(self, x, state):
        out, state = self.rnn(self.drop(self.embedding(x)), state)
        return self.decoder(self.drop(out)), state


def evaluate(net, ids: torch.Tensor, eos: int, window: int = 256) -> float:
    """Sum of ln P over the file, one stream from the zero state, first input <eos>."""
    net.eval()
    full = torch.cat([torch.tensor([eos]), ids])
    total = 0.0
    state = None
    with torch.no_grad():
        for s in range(0, len(ids), window):
            x = full[s:s + window][:, None]
            y = full[s + 1:s + 1 + window]
            x = x[:len(y)]
            logits, state = net(x, state)
            total += torch.log_softmax(logits[:, 0], -1).gather(1, y[:, None]).sum().item()
    net.train()
    return total


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DIR)
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--embed", type=int, default=200)
    ap.add_argument("--hidden", type=int, default=200)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--batch", type=int, default=20)
    ap.add_argument("--seq-len", type=int, default=35)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--clip", type=float, default=5.0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--recipe", choices=("same", "example"), default="same",
                    help="same: charlm's configuration (Adam, no dropout); example: PyTorch's word_language_model recipe")
    args = ap.parse_args()
    if args.recipe == "example":
        args.lr, args.clip = 20.0, 0.25
    if not (args.data / "train.txt").is_file():
        print(json.dumps({"skipped": f"no corpus at {args.data}"}))
        return 0
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_tok = tokens(args.data / "train.txt")
    vocab = {w: i for i, w in enumerate(sorted(set(train_tok)))}
    V = len(vocab)
    unk = vocab.get("<unk>")
    enc = lambda toks: torch.tensor([vocab.get(t, unk) for t in toks], dtype=torch.long)
    train_ids = enc(train_tok)
    val_ids = enc(tokens(args.data / "valid.txt"))
    test_ids = enc(tokens(args.data / "test.txt"))
    eos = vocab["<eos>"]

    N, T = args.batch, args.seq_len
    Ls = (len(train_ids) - 1) // N
    streams = train_ids[:N * Ls + 1]
    offs = torch.arange(N) * Ls
    example = args.recipe == "example"
    net = Net(V, args.embed, args.hidden, args.layers, dropout=0.2 if example else 0.0, tie=example)
    opt = (torch.optim.SGD if example else torch.optim.Adam)(net.parameters(), lr=args.lr)
    best_val, best_state, lr, evals = math.inf, None, args.lr, []
    started = time.perf_counter()

    def validate():  # the example's end of epoch: keep the best, else anneal
        nonlocal best_val, best_state, lr
        val = -evaluate(net, val_ids, eos) / len(val_ids)
        evals.append({"step": steps, "val_ppl": math.exp(val), "lr": lr})
        if val < best_val:
            best_val, best_state = val, {k: v.clone() for k, v in net.state_dict().items()}
        else:
            lr /= 4.0
            for g in opt.param_groups:
                g["lr"] = lr

    lossf = torch.nn.CrossEntropyLoss()
    state = None
    steps = 0
    train_s = 0.0
    k = 0
    while (time.perf_counter() - started if example else train_s) < args.minutes * 60:
        if (k + 1) * T > Ls:
            if example:
                validate()
            k, state = 0, None
        idx = offs[None, :] + k * T + torch.arange(T)[:, None]
        x, y = streams[idx], streams[idx + 1]
        t0 = time.perf_counter()
        if state is not None:
            state = tuple(s.detach() for s in state)
        logits, state = net(x, state)
        loss = lossf(logits.reshape(-1, V), y.reshape(-1))
        opt.zero_grad()
        loss.backward()
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(net.parameters(), args.clip)
        opt.step()
        train_s += time.perf_counter() - t0
        steps += 1
        k += 1
    tokens_per_s = steps * N * T / train_s
    if example:
        validate()
        net.load_state_dict(best_state)
    val_lp = evaluate(net, val_ids, eos)
    test_lp = evaluate(net, test_ids, eos)
    print(json.dumps({
        "side": "pytorch", "torch": torch.__version__, "threads": args.threads, "vocab": V,
        "steps": steps, "train_seconds": train_s, "tokens_per_s": tokens_per_s,
        "val_ppl": math.exp(-val_lp / len(val_ids)), "test_ppl": math.exp(-test_lp / len(test_ids)),
        "val_tokens": len(val_ids), "test_tokens": len(test_ids), "recipe": args.recipe, "evals": evals,
        "wall_seconds": time.perf_counter() - started,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
