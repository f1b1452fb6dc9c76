"""(T, N) windows of token ids for truncated BPTT, and the train / validation split."""
from __future__ import annotations

import numpy as np

from ..errors import CharlmError


def split_train_val(ids: np.ndarray, val_frac: float) -> tuple[np.ndarray, np.ndarray]:
    """The last val_frac of the tokens is held out (at least 2 tokens, if the corpus allows)."""
    n_val = max(2, int(round(len(ids) * val_frac)))
    if len(ids) - n_val < 2:
        return ids, ids[:0]
    return ids[:-n_val], ids[-n_val:]


class Batches:
    """N parallel contiguous streams over the training ids, cut into windows of T.

    Stream s reads ids[s*L : (s+1)*L + 1]. Window k gives inputs x (T, N) and
    targets y (T, N) at offsets k*T .. k*T+T-1 of every stream; the hidden state
    is carried from window k to k+1 and reset when an epoch wraps.
    """

    def __init__(self, ids: np.ndarray, seq_len: int, batch: int):
        if len(ids) < seq_len + 1:
            raise CharlmError(
                f"the training text has {len(ids)} tokens, fewer than one window of --seq-len {seq_len} + 1; "
                f"give a longer corpus or a smaller --seq-len")
        self.ids = ids
        self.T = seq_len
        self.N = min(batch, (len(ids) - 1) // seq_len)
        self.L = (len(ids) - 1) // self.N
        self.windows_per_epoch = self.L // self.T
        self._offsets = (np.arange(self.N) * self.L)[None, :] + np.arange(self.T)[:, None]  # (T, N)
        self.lo, self.hi = 0, self.N  # the streams window() gives (one process: all of them)

    @property
    def local(self) -> int:
        """How many streams window() gives: N, or this process's block of them (shard)."""
        return self.hi - self.lo

    def shard(self, lo: int, hi: int) -> None:
        """From now on window() gives streams lo..hi-1 only (one process's block of N under MPI)."""
        self.lo, self.hi = lo, hi
        self._offsets = np.ascontiguousarray(self._offsets[:, lo:hi])

    def window(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self._offsets + k * self.T
        return self.ids[idx].astype(np.int32), self.ids[idx + 1].astype(np.int32)


def eval_windows(ids: np.ndarray, seq_len: int, streams: int):
    """Cut ids into `streams` contiguous parts scored side by side (state reset at
    each part); yield (x, y) windows of at most seq_len steps, carrying state in
    between. Every target of ids[1:] is scored exactly once: the parts have
    ceil(n / streams) targets and the last one(s) are padded with target -1
    (not scored; input 0)."""
    n = len(ids) - 1
    if n < 1:
        return
    S = max(1, min(streams, n // max(1, seq_len)))
    L = -(-n // S)
    offs = np.arange(S) * L
    for start in range(0, L, seq_len):
        T = min(seq_len, L - start)
        pos = offs[None, :] + start + np.arange(T)[:, None]  # (T, S) input positions
        valid = pos < n
        # int32 before the -1: ids are often uint8/uint16 (a memory map), where -1 would wrap
        x = np.where(valid, ids[np.minimum(pos, n - 1)].astype(np.int32), 0)
        y = np.where(valid, ids[np.minimum(pos + 1, n)].astype(np.int32), -1)
        yield x.astype(np.int32), y.astype(np.int32)
