"""How much memory a training run needs, estimated from its configuration before anything is
allocated, so that a size the machine cannot hold is one line instead of a MemoryError (or the
out-of-memory killer) minutes later.

The estimate counts what the training loop keeps (charlm.lm.train): the parameters, their
gradients, Adam's two moments, the divergence guard's snapshot of all three, the extra copies the
kernel warm-up makes, and two workspaces of one (seq_len, batch) window (charlm.lm.model.Workspace,
charlm.lm.esn.EsnWorkspace: training and evaluation). Token files are memory-mapped: not counted.
"""
from __future__ import annotations

from ..config import ModelConfig, TrainConfig
from ..errors import CharlmError

GiB = 1 << 30


def parameter_counts(cfg: ModelConfig) -> tuple[int, int]:
    """(every parameter, the trainable ones), counted without allocating."""
    V, E, H, L, G = max(cfg.vocab_size, 2), cfg.embed, cfg.hidden, cfg.layers, cfg.gates
    if cfg.cell == "esn":
        from .esn import connectivity_of
        k = max(1, min(H, int(round(connectivity_of(cfg) * H))))
        readout = V * H + V
        return V * H + H + 2 * H * k + H + 1 + readout, readout
    layers = G * H * (E + H + 2) + (L - 1) * G * H * (2 * H + 2)
    total = V * E + layers + _head_params(cfg, V, H)
    return total, total


def _head_params(cfg: ModelConfig, V: int, H: int) -> int:
    """The output head's parameters: the decoder (no weight of its own when tied), or the
    adaptive softmax's head and tails (their projections narrow by div_value per cluster)."""
    if cfg.softmax != "adaptive":
        return V + (0 if cfg.tie else V * H)
    c = _cutoffs(cfg, V)
    n = (c[0] + len(c) - 1) * (H + 1)
    for i in range(len(c) - 1):
        hsz = max(1, int(H // (cfg.div_value ** (i + 1))))
        n += hsz * H + (c[i + 1] - c[i]) * hsz
    return n


def _cutoffs(cfg: ModelConfig, V: int) -> list[int]:
    return list((cfg if cfg.cutoffs else cfg.with_vocab(V)).cutoffs) + [V]


def _logit_floats(cfg: ModelConfig, M: int, V: int) -> int:
    """Scores of M rows: all V for the full softmax; for the adaptive one the head's, plus (at
    most) every row through the widest tail, twice (its logits and their gradient)."""
    if cfg.softmax != "adaptive":
        return M * V
    c = _cutoffs(cfg, V)
    widest = max(c[i + 1] - c[i] for i in range(len(c) - 1))
    return M * (c[0] + len(c) - 1) + 2 * M * (widest + cfg.hidden)


def workspace_floats(cfg: ModelConfig, T: int, N: int) -> int:
    """Floats of one (T, N) workspace."""
    V, E, H, L, G = max(cfg.vocab_size, 2), cfg.embed, cfg.hidden, cfg.layers, cfg.gates
    if cfg.cell == "esn":
        return T * N * H + (T + 1) * N * H + T * N * V
    acts = 4 * H if cfg.cell == "gru" else G * H
    n = T * N * E + L * (T + 1) * N * H * (2 if cfg.cell == "lstm" else 1) + L * T * N * acts
    n += T * N * G * H * (2 if cfg.cell == "gru" else 1) + L * T * N * H + L * T * N * max(E, H)
    if cfg.dropout > 0:
        n += 2 * (L - 1) * T * N * H
    n += 2 * T * N * E * (cfg.dropout_in > 0) + 3 * T * N * H * (cfg.dropout_out > 0)
    return n + _logit_floats(cfg, T * N, V) + 2 * N * H


def training_bytes(cfg: ModelConfig, tcfg: TrainConfig, itemsize: int = 4) -> int:
    """The estimated peak memory of training cfg with tcfg's window (seq_len x batch)."""
    total, trainable = parameter_counts(cfg)
    # gradients 1, Adam moments 2, the guard's snapshot 3, the warm-up's spare optimizer 2 (Adam's, for SGD too)
    floats = total + 8 * trainable + 2 * workspace_floats(cfg, tcfg.seq_len, tcfg.batch)
    if cfg.cell == "esn":
        from .esn import connectivity_of
        floats += 3 * cfg.hidden * max(1, int(round(connectivity_of(cfg) * cfg.hidden)))  # drawing the reservoir
    return floats * itemsize


def check_memory(cfg: ModelConfig, tcfg: TrainConfig) -> None:
    """CharlmError (one line, before anything is allocated) if training cfg needs more memory than this
    process can ever have."""
    from ..runtime import machine_memory
    need = training_bytes(cfg, tcfg)
    have, who = machine_memory()
    if need > have:
        size = "--units" if cfg.cell == "esn" else "--hidden, --layers, --embed"
        raise CharlmError(f"this model needs ~{need / GiB:.1f} GiB of memory to train (parameters, optimizer "
                          f"state, workspaces); {who} {have / GiB:.1f} GiB: lower {size}, --batch or --seq-len")
