"""Load a charlm checkpoint into torch.nn.Embedding + RNN/GRU/LSTM + Linear and
check that PyTorch gives the same per-token log-probabilities as charlm.

    python benchmarks/torch_equivalence.py [CHECKPOINT_OR_RUN] [--text TEXT]

Without a checkpoint, a fresh model of each cell (2 layers) is built and checked, then an LSTM
with a tied decoder and one with the adaptive softmax (word level).

Names: a checkpoint's arrays are the state_dict keys of a module with attributes embedding, rnn and
decoder. Tied (--tie): the checkpoint has no decoder.weight; torch's module shares the embedding's
(decoder.weight = embedding.weight, as PyTorch's word_language_model example ties them). Adaptive
(--softmax adaptive): decoder is nn.AdaptiveLogSoftmaxWithLoss(hidden, vocab, cutoffs, div_value,
head_bias=True) and decoder.head.*, decoder.tail.{i}.{0,1}.weight load into it as they are.
Needs the `bench` extra (PyTorch). Exits non-zero if any difference exceeds 1e-4.
"""
from __future__ import annotations

import argparse
import json
import sys

import numpy as np
import torch

from charlm.lm import checkpoint
from charlm.config import ModelConfig
from charlm.data import Vocab
from charlm.lm.model import Model
from charlm.lm.score import score_text


def torch_net(cfg: ModelConfig, params: dict[str, np.ndarray]) -> torch.nn.Module:
    cell = {"rnn": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[cfg.cell]

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = torch.nn.Embedding(cfg.vocab_size, cfg.embed)
            self.rnn = cell(cfg.embed, cfg.hidden, cfg.layers)
            if cfg.softmax == "adaptive":
                self.decoder = torch.nn.AdaptiveLogSoftmaxWithLoss(cfg.hidden, cfg.vocab_size, list(cfg.cutoffs),
                                                                   div_value=cfg.div_value, head_bias=True)
            else:
                self.decoder = torch.nn.Linear(cfg.hidden, cfg.vocab_size)
            if cfg.tie:
                self.decoder.weight = self.embedding.weight

    net = Net()
    state = {k: torch.from_numpy(np.asarray(v, dtype=np.float32)) for k, v in params.items()}
    if cfg.tie:
        state["decoder.weight"] = state["embedding.weight"]
    net.load_state_dict(state)
    return net.eval()


def torch_logprobs(net, vocab: Vocab, text: str) -> np.ndarray:
    ids, _ = vocab.encode(text)
    targets = np.concatenate([ids, [vocab.eos_id]])
    inputs = np.concatenate([[vocab.eos_id], ids])
    with torch.no_grad():
        x = torch.from_numpy(inputs.astype(np.int64))[:, None]         # (T, 1)
        out, _ = net.rnn(net.embedding(x))                              # (T, 1, H)
        if isinstance(net.decoder, torch.nn.AdaptiveLogSoftmaxWithLoss):
            lp = net.decoder.log_prob(out[:, 0])                        # (T, V)
        else:
            lp = torch.log_softmax(net.decoder(out[:, 0]), dim=-1)     # (T, V)
        return lp[torch.arange(len(targets)), torch.from_numpy(targets.astype(np.int64))].double().numpy()


def check(cfg, params, vocab, text) -> float:
    ours = np.array([t["logprob"] for t in score_text(Model(cfg, params), vocab, text)["tokens"]])
    theirs = torch_logprobs(torch_net(cfg, params), vocab, text)
    return float(np.abs(ours - theirs).max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?")
    ap.add_argument("--text", default="To be, or not to be, that is the question.")
    args = ap.parse_args()
    results = {}
    if args.model:
        ck = checkpoint.load(checkpoint.resolve(args.model))
        results[ck.model.cell] = check(ck.model, ck.params, ck.vocab, args.text)
    else:
        vocab = Vocab.from_text(args.text)
        for cell in ("rnn", "gru", "lstm"):
            cfg = ModelConfig(cell=cell, vocab_size=len(vocab), embed=16, hidden=32, layers=2)
            params = Model.create(cfg, seed=1).params
            results[cell] = check(cfg, params, vocab, args.text)
        words = Vocab.words_from_text("the cat sat on the mat and the dog sat on the log " * 3 + args.text)
        for name, opts in (("lstm tied", {"tie": True, "embed": 32}),
                           ("lstm adaptive", {"softmax": "adaptive", "cutoffs": (4, 9), "div_value": 2.0})):
            cfg = ModelConfig(**{"cell": "lstm", "vocab_size": len(words), "embed": 16, "hidden": 32, "layers": 2,
                                 **opts})
            results[name] = check(cfg, Model.create(cfg, seed=1).params, words, args.text.lower())
    print(json.dumps({"max_abs_logprob_diff": results}))
    return 0 if max(results.values()) < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
