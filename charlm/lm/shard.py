"""Training and scoring on K processes (charlm.dist): what each rank does with its share.

Synchronous data parallelism: the global batch's N streams are cut into K contiguous blocks, one
per rank (N divisible by K). Each step a rank computes the gradient of its block; GradSync sums
the gradients of all ranks in one Allreduce over one flat buffer, each weighted by its share of
the tokens, so every rank holds the gradient of the global batch and applies the same update.
The buffer's last slots carry the loss and the stop flags, so ranks agree on when to stop.

Whatever is random comes from what it is drawn for, never from the rank: StreamDropout draws
stream s's dropout mask at step t from a Philox generator keyed by (seed, s) and counted by
(t, layer), so one process and K processes use the same masks.

With one process none of this changes anything but the dropout masks' source (StreamDropout is
used alone too, so one process and K agree)."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import dist
from ..data import eval_windows, open_tokens
from ..errors import CharlmError


class StreamDropout:
    """Duck-types np.random.Generator.random for the model's dropout: random((T, N, H)) gives the
    uniforms of streams first .. first+N-1 at this step, call c (= the dropout layer, in order)."""

    def __init__(self, seed: int, step: int, first: int):
        self.seed, self.step, self.first, self.calls = seed % 2**64, step, first, 0
        self._bits = np.random.Philox(key=np.array([self.seed, 0], dtype=np.uint64))
        self._gen = np.random.Generator(self._bits)

    def random(self, shape, dtype=np.float32) -> np.ndarray:
        T, N, H = shape
        out = np.empty(shape, dtype=dtype)
        for n in range(N):
            self._bits.state = {"bit_generator": "Philox",
                                "state": {"counter": np.array([0, self.step, self.calls, 0], dtype=np.uint64),
                                          "key": np.array([self.seed, self.first + n], dtype=np.uint64)},
                                "buffer": np.zeros(4, dtype=np.uint64), "buffer_pos": 4,
                                "has_uint32": 0, "uinteger": 0}
            out[:, n, :] = self._gen.random((T, H), dtype=dtype)
        self.calls += 1
        return out


def new_run(corpus, model_cfg, train_cfg, run_dir, **options):
    """charlm.lm.start.new_run on rank 0 alone (it creates the run folder and tokenises the corpus);
    the other ranks wait for it, then memory-map the same token files (shared storage). A generator
    like new_run; a failure on rank 0 is raised, with its message, on every rank."""
    from .start import Start, new_run as start_new_run
    run_dir = Path(dist.bcast(str(run_dir), what="agreeing on the run folder"))
    if dist.rank() == 0:
        try:
            s = yield from start_new_run(corpus, model_cfg, train_cfg, run_dir, **options)
        except CharlmError as e:
            dist.bcast({"error": str(e)}, limit=0)
            raise
        except BaseException as e:
            dist.bcast({"error": f"rank 0 failed while preparing the run ({type(e).__name__})"}, limit=0)
            raise
        dist.bcast({"model_cfg": s.model_cfg, "vocab": s.vocab, "data": s.data}, limit=0)
        return s
    # no time limit: tokenising a large corpus takes as long as it takes (if rank 0 dies, the launcher ends the job)
    got = dist.bcast(None, what="waiting for rank 0 to tokenise the corpus", limit=0)
    if "error" in got:
        raise CharlmError(got["error"])
    data, vocab = got["data"], got["vocab"]
    ids = open_tokens(run_dir / data["tokens"], data["dtype"])
    if data.get("val_tokens"):
        vals = open_tokens(run_dir / data["val_tokens"], data["dtype"])
        train_ids, val_ids = ids, np.concatenate([[vocab.eos_id], vals]).astype(ids.dtype)
    else:
        train_ids, val_ids = ids[:data["n_train"]], ids[data["n_train"]:]
    return Start(run_dir, got["model_cfg"], train_cfg, vocab, train_ids, val_ids, data, options["corpus_name"],
                 init_from=options.get("init_from"))


def check_streams(n_streams: int, batch: int) -> tuple[int, int]:
    """This rank's block [lo, hi) of the global batch's streams; every rank has the same count."""
    k = dist.size()
    if n_streams % k:
        what = f"--batch {batch}" if n_streams == batch else f"the {n_streams} streams this short corpus allows"
        raise CharlmError(f"{what} cannot be split evenly over {k} processes: give a --batch that is a multiple "
                          f"of {k}")
    return dist.block(n_streams)


class GradSync:
    """The gradients as views into one flat buffer, with SLOTS extra entries, summed over ranks."""
    SLOTS = 4  # loss x tokens, tokens, stop asked (a signal), deadline passed

    def __init__(self, model, share: float):
        self.share = share  # this rank's tokens / the global batch's
        arrays = model.trainable
        self.P = sum(a.size for a in arrays.values())
        self.flat = np.zeros(self.P + self.SLOTS, dtype=model.dtype)
        self.grads, o = {}, 0
        for name, a in arrays.items():
            self.grads[name] = self.flat[o:o + a.size].reshape(a.shape)
            o += a.size
        self.stop = self.deadline = False

    def reduce(self, loss: float, tokens: int, stop: bool, deadline: bool) -> float:
        """Sum the weighted gradients (in place) and the flags; the global batch's mean loss."""
        if self.share != 1.0:
            self.flat[:self.P] *= self.share
        self.flat[self.P:] = (loss * tokens, tokens, float(stop), float(deadline))
        dist.allreduce(self.flat, "the gradient sum")
        total, n, stops, late = (float(v) for v in self.flat[self.P:])
        self.stop, self.deadline = stops > 0, late > 0
        return total / n


def full_state(state, n_streams: int):
    """The carried state of all streams (L, N, H) on rank 0 (None elsewhere): what a checkpoint saves."""
    if dist.size() == 1:
        return state
    parts = dist.gather((state.h, state.c), 0, "gathering the carried state")
    if parts is None:
        return None
    from .base import State
    return State(np.concatenate([p[0] for p in parts], axis=1), np.concatenate([p[1] for p in parts], axis=1))


def evaluate(model, ids: np.ndarray, seq_len: int, streams: int) -> float:
    """charlm.lm.train.evaluate with the streams split over the ranks and the sums reduced."""
    lo = hi = None
    total, count, state = 0.0, 0, None
    for x, y in eval_windows(ids, seq_len, streams):
        if lo is None:
            lo, hi = dist.block(x.shape[1])
        if hi <= lo:
            continue
        x, y = np.ascontiguousarray(x[:, lo:hi]), np.ascontiguousarray(y[:, lo:hi])
        if state is None:
            state = model.zero_state(hi - lo)
        loss, state = model.loss(x, y, state)
        total += loss * y.size
        count += int((y >= 0).sum())
    total, count = dist.allreduce_sum([total, count], "the validation sum")
    return total / count if count else float("nan")


def window_logprobs(model, x: np.ndarray, y: np.ndarray, state, block: tuple[int, int]):
    """token_logprobs of this rank's columns of the (T, K) window, gathered: the whole (T, K)
    array on rank 0 (None elsewhere), and this rank's new state. Each column is computed as
    one process computes it when the blocks are equal (the kernels treat columns alike)."""
    lo, hi = block
    lp = None
    if hi > lo:
        lp, state = model.token_logprobs(np.ascontiguousarray(x[:, lo:hi]), np.ascontiguousarray(y[:, lo:hi]), state)
    parts = dist.gather(lp, 0, "gathering log-probabilities")
    if parts is None:
        return None, state
    return np.concatenate([p for p in parts if p is not None], axis=1), state


def share_texts(texts: list[str]) -> tuple[int, int]:
    """This rank's contiguous block of texts, balanced by length."""
    k = dist.size()
    if k == 1:
        return 0, len(texts)
    cum = np.cumsum([len(t) + 1 for t in texts])
    cuts = [0] + [int(np.searchsorted(cum, cum[-1] * r / k)) for r in range(1, k)] + [len(texts)]
    r = dist.rank()
    return cuts[r], max(cuts[r], cuts[r + 1])
