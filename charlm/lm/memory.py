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
    total = V * E + layers + V * H + V
    return total, total


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
    return n + T * N * V + 2 * N * H


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
