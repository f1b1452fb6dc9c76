"""Small shared pieces for the data / checkpoint / sample / CLI tests (no fixtures here: those
live in conftest.py). Test modules import from here, never from one another."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np

from charlm.config import ModelConfig, TrainConfig
from charlm.data import Vocab, npzfile
from charlm.lm import checkpoint

DATA = Path(__file__).parent / "data"
TINY = DATA / "tiny.txt"

# The tiny settings every training test uses: a few steps of a very small model.
TINY_MODEL = dict(embed=4, hidden=8, layers=1)
TINY_TRAIN = dict(seq_len=8, batch=2, steps=3, eval_every=2, val_frac=0.05)

# The keys of one text's `score --json` object.
SCORE_KEYS = {"tokens", "logprob", "log10prob", "bits_per_token", "perplexity", "perplexity_excl_oov", "n_tokens", "oov"}


def tiny_text() -> str:
    return TINY.read_text(encoding="utf-8")


def train_tiny(run_dir, cell: str = "lstm", seed: int = 0, steps: int = 3) -> list[dict]:
    """Train a tiny model on tests/data/tiny.txt into run_dir; return the events."""
    from charlm.lm.train import train
    mcfg = ModelConfig(cell=cell, **TINY_MODEL)
    tcfg = TrainConfig(**{**TINY_TRAIN, "steps": steps, "seed": seed})
    return list(train(tiny_text(), mcfg, tcfg, run_dir, corpus_name="tiny.txt", sample_chars=0))


def train_tiny_words(run_dir) -> list[dict]:
    """Train a tiny word model (1 x 8 LSTM) on tests/data/words.txt into run_dir; return the events."""
    import charlm
    events = list(charlm.train(TINY.parent / "words.txt", out=run_dir, level="word", steps=3, hidden=8, layers=1,
                               embed=4, seq_len=8, batch=2, eval_every=2, sample_length=0))
    assert events[-1]["event"] == "done"
    return events


def make_checkpoint(cell: str = "lstm", layers: int = 2, dtype=np.float32, seed: int = 0,
                    text: str = "hello, world\n") -> checkpoint.Checkpoint:
    """A complete checkpoint built by hand (no training): random parameters, Adam moments,
    a carried state, an rng state and a history, so every field has something to round-trip."""
    from charlm.lm.model import param_shapes
    rng = np.random.default_rng(seed)
    vocab = Vocab.from_text(text)
    cfg = ModelConfig(cell=cell, vocab_size=len(vocab), embed=3, hidden=5, layers=layers)
    params = {n: np.ascontiguousarray(rng.standard_normal(s), dtype=dtype) for n, s in param_shapes(cfg).items()}
    # values whose bits a lossy round trip would change
    w = params["decoder.bias"]
    w[0] = -0.0
    w[1] = np.finfo(dtype).tiny / 2  # subnormal
    w[2] = np.finfo(dtype).max
    opt = {f"m/{n}": rng.standard_normal(p.shape).astype(dtype) for n, p in params.items()}
    opt.update({f"v/{n}": rng.random(p.shape).astype(dtype) for n, p in params.items()})
    state = {"h": rng.standard_normal((layers, 2, 5)).astype(dtype),
             "c": rng.standard_normal((layers, 2, 5)).astype(dtype)}
    gen = np.random.default_rng(seed + 100)
    gen.random(3)
    return checkpoint.Checkpoint(
        model=cfg, vocab=vocab, params=params,
        train=TrainConfig(seq_len=8, batch=2, lr=1e-3, steps=7, seed=seed),
        optimizer={"name": "adam", "t": 7, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "lr": 1e-3},
        opt_arrays=opt, state=state, step=7, epoch=1, window=3, best_val_loss=2.5,
        rng=gen.bit_generator.state,
        history=[{"step": 5, "train_loss": 3.25, "val_loss": None, "clipped": 0, "lr": 1e-3}],
        corpus="hello.txt")


def env_plain() -> dict:
    """Environment for CliRunner: no colours, no terminal tricks, wide lines."""
    return {"NO_COLOR": "1", "TERM": "dumb", "COLUMNS": "250", "CHARLM_DEBUG": None}


# ------------------------------------------------------------ CLI results
def ok(result):
    assert result.exit_code == 0, result.output
    return result


def failed(result, *needles):
    """Exit code != 0, one line on stderr naming the problem, no traceback, nothing on stdout."""
    assert result.exit_code != 0
    err = result.stderr.strip()
    assert err, "no message on stderr"
    assert "\n" not in err, f"more than one line: {err!r}"
    assert err.startswith("error:"), err
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    assert result.stdout == ""
    for n in needles:
        assert n in err, (n, err)
    return err


def option_blocks(help_text: str) -> dict[str, str]:
    """Map each option name in a Rich help panel to the text of its row(s)."""
    blocks, current = {}, None
    for line in help_text.splitlines():
        inner = line.strip().strip("│").strip()
        m = re.match(r"(--[\w-]+)", inner)
        if m and line.strip().startswith("│"):
            current = m.group(1)
            blocks[current] = inner
        elif current and line.strip().startswith("│") and inner:
            blocks[current] += " " + inner
        elif not line.strip().startswith("│"):
            current = None
    return blocks


# ------------------------------------------------------------ checkpoint files by hand
def read_npz(path):
    with np.load(path, allow_pickle=False) as z:
        return {n: z[n] for n in z.files}


def write_npz(path, arrays):
    with open(path, "wb") as f:
        np.savez(f, **arrays)


def meta_array(meta: dict) -> np.ndarray:
    return np.frombuffer(json.dumps(meta, sort_keys=True).encode(), dtype=np.uint8)


def rewrite_with_meta(src, dst, edit):
    """Copy a checkpoint with its metadata changed by edit(meta), re-signed with a valid
    checksum (computed as npzfile.digest does), so only the edit can make it fail."""
    arrays = read_npz(src)
    meta = json.loads(arrays.pop("__meta__").tobytes().decode())
    meta.pop("checksum")
    edit(meta, arrays)
    meta["checksum"] = npzfile.digest(arrays, json.dumps(meta, sort_keys=True, allow_nan=False).encode())
    arrays["__meta__"] = meta_array(meta)
    write_npz(dst, arrays)
