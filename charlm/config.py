"""Frozen, validated configuration records, convertible to and from plain dicts."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

from .errors import CharlmError

CELLS = ("rnn", "gru", "lstm", "esn")
GATES = {"rnn": 1, "gru": 3, "lstm": 4, "esn": 1}
OPTIMIZERS = ("adam", "sgd")
SOFTMAXES = ("full", "adaptive")
DEFAULT_CUTOFFS = (2000, 10000, 50000)  # adaptive softmax without --cutoffs (those below the vocabulary size)


# Upper bounds on sizes, so that a flag or a forged checkpoint is refused before anything is
# allocated (the memory a real configuration needs is estimated separately: charlm.lm.memory).
MAX_SIZE = 1 << 24        # embed, hidden, seq-len, batch, ...
MAX_LAYERS = 1024
MAX_SEED = 2 ** 64 - 1    # NumPy seeds are non-negative


def _positive(name: str, value, integer: bool = True, limit: float | None = None) -> None:
    """A positive whole number (integer) or a positive finite number, at most limit."""
    if integer and (not isinstance(value, int) or isinstance(value, bool)):
        raise CharlmError(f"{name} must be a whole number, got {str(value)[:40]}")
    if not integer and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise CharlmError(f"{name} must be a number, got {str(value)[:40]}")
    if not value > 0 or not math.isfinite(value):
        raise CharlmError(f"{name} must be positive{'' if integer else ' and finite'}, got {str(value)[:40]}")
    if limit is not None and value > limit:
        raise CharlmError(f"{name} must be at most {limit:,}, got {str(value)[:40]}")


def _finite(name: str, value, low: float = 0.0) -> None:
    """A finite number >= low (0 means off for --clip)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < low:
        least = "" if low == -math.inf else f", {low:g} or more"
        raise CharlmError(f"{name} must be a finite number{least}, got {str(value)[:40]}")


def _cutoffs(value) -> tuple:
    """--cutoffs as a tuple of ascending positive ints (from a tuple, a JSON list or "2000,10000")."""
    if isinstance(value, str):
        try:
            value = [int(v) for v in value.replace(" ", "").split(",") if v]
        except ValueError:
            raise CharlmError(f"--cutoffs must be whole numbers separated by commas, got {value[:40]!r}") from None
    if not isinstance(value, (tuple, list)) or len(value) > 64 \
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise CharlmError(f"--cutoffs must be up to 64 whole numbers, got {str(value)[:40]}")
    if any(v <= 0 for v in value) or any(b <= a for a, b in zip(value, value[1:])):
        raise CharlmError(f"--cutoffs must be positive and ascending, got {','.join(map(str, value))[:40]}")
    return tuple(value)


def check_seed(name: str, value) -> None:
    """A seed NumPy takes: a whole number from 0 to 2**64 - 1."""
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_SEED:
        raise CharlmError(f"{name} must be a whole number from 0 to 2**64 - 1, got {str(value)[:40]}")


def _from_dict(cls, d: dict):
    names = {f.name for f in fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise CharlmError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
    return cls(**d)


@dataclass(frozen=True)
class ModelConfig:
    cell: str = "lstm"
    vocab_size: int = 0
    embed: int = 64
    hidden: int = 256
    layers: int = 2
    dropout: float = 0.0        # between recurrent layers (as torch.nn.LSTM(dropout=p))
    dropout_in: float = 0.0     # on the embeddings, before the first layer (training only)
    dropout_out: float = 0.0    # on the last layer's output, before the decoder (training only)
    variational: bool = False   # one dropout mask per window and stream, shared by its time steps
    tie: bool = False           # decoder.weight is embedding.weight (needs embed == hidden)
    softmax: str = "full"       # "full" | "adaptive" (charlm.lm.heads)
    cutoffs: tuple = ()         # adaptive: ascending ids where the head's shortlist and each tail cluster end
    div_value: float = 4.0      # adaptive: tail cluster i projects to hidden // div_value**(i+1) units
    # Echo State Network only (cell "esn"; hidden = the reservoir's units; see charlm.esn)
    leak: float = 1.0           # leak rate a: h_t = (1 - a) h_{t-1} + a tanh(...)
    sr: float = 0.9             # spectral radius W is rescaled to
    connectivity: float = 0.0   # share of non-zeros in W; 0: 0.1, or 100/units past 1,000 units
    input_scaling: float = 1.0  # input weights drawn from U(-s, s)
    bias_scaling: float = 0.0   # reservoir bias drawn from U(-s, s)

    def __post_init__(self):
        if self.cell not in CELLS:
            raise CharlmError(f"--cell must be one of {', '.join(CELLS)}, got {self.cell!r}")
        for name in ("embed", "hidden"):
            _positive(f"--{name}", getattr(self, name), limit=MAX_SIZE)
        _positive("--layers", self.layers, limit=MAX_LAYERS)
        if not isinstance(self.vocab_size, int) or isinstance(self.vocab_size, bool) \
                or not 0 <= self.vocab_size < 1 << 32:  # 0: not known yet
            raise CharlmError(f"vocab_size must be a whole number below 2**32, got {str(self.vocab_size)[:40]}")
        for name in ("dropout", "leak", "sr", "connectivity", "input_scaling", "bias_scaling"):
            _finite(f"--{name.replace('_', '-')}", getattr(self, name), -math.inf)
        for name in ("dropout", "dropout_in", "dropout_out", "div_value"):
            _finite(f"--{name.replace('_', '-')}", getattr(self, name), -math.inf)
        for name in ("dropout", "dropout_in", "dropout_out"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise CharlmError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        for name in ("variational", "tie"):
            if not isinstance(getattr(self, name), bool):
                raise CharlmError(f"{name} must be true or false, got {str(getattr(self, name))[:40]}")
        if self.softmax not in SOFTMAXES:
            raise CharlmError(f"--softmax must be one of {', '.join(SOFTMAXES)}, got {str(self.softmax)[:40]!r}")
        object.__setattr__(self, "cutoffs", _cutoffs(self.cutoffs))
        if not 1.0 < self.div_value <= 1e3:
            raise CharlmError(f"--div-value must be over 1, got {self.div_value}")
        if self.tie and self.embed != self.hidden:
            raise CharlmError(f"--tie makes the decoder the embedding table: it needs --embed equal to --hidden "
                              f"(got {self.embed} and {self.hidden})")
        if self.tie and self.softmax == "adaptive":
            raise CharlmError("--tie works with --softmax full only: the adaptive softmax's tail clusters have "
                              "narrower projections than the embedding, so there is no one table to share")
        if self.softmax == "adaptive" and self.vocab_size and self.cutoffs and self.cutoffs[-1] >= self.vocab_size:
            raise CharlmError(f"--cutoffs must be below the vocabulary size {self.vocab_size:,}, "
                              f"got {','.join(map(str, self.cutoffs))}")
        if self.cell == "esn":
            if self.layers != 1:
                raise CharlmError(f"--cell esn has a single reservoir; drop --layers (got {self.layers})")
            if self.dropout or self.dropout_in or self.dropout_out:
                raise CharlmError("--dropout does not apply to --cell esn (its reservoir is not trained)")
            if self.tie or self.softmax != "full":
                raise CharlmError("--tie and --softmax adaptive do not apply to --cell esn (it has no embedding table)")
            if not 0.0 < self.leak <= 1.0:
                raise CharlmError(f"--leak must be in (0, 1], got {self.leak}")
            if not 0.0 < self.sr < 1e3:
                raise CharlmError(f"--sr must be positive, got {self.sr}")
            if not 0.0 <= self.connectivity <= 1.0:
                raise CharlmError(f"--connectivity must be in (0, 1] (or 0 for the default), got {self.connectivity}")
            if not 0.0 < self.input_scaling < 1e6:
                raise CharlmError(f"--input-scaling must be positive, got {self.input_scaling}")
            if not 0.0 <= self.bias_scaling < 1e6:
                raise CharlmError(f"--bias-scaling must be 0 or positive, got {self.bias_scaling}")

    @property
    def gates(self) -> int:
        return GATES[self.cell]

    def with_vocab(self, vocab_size: int) -> "ModelConfig":
        """This configuration for a vocabulary of vocab_size tokens; an adaptive softmax without
        --cutoffs gets the default ones that fit (DEFAULT_CUTOFFS below the vocabulary size, or
        one tail over the rarer half of a vocabulary under 2,000 tokens), so that the checkpoint
        states its layout."""
        cutoffs = self.cutoffs
        if self.softmax == "adaptive" and not cutoffs:
            cutoffs = tuple(c for c in DEFAULT_CUTOFFS if c < vocab_size - 1) or (max(1, vocab_size // 2),)
        return ModelConfig(**{**self.to_dict(), "vocab_size": vocab_size, "cutoffs": cutoffs})

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "ModelConfig":
        return _from_dict(cls, d)


@dataclass(frozen=True)
class TrainConfig:
    seq_len: int = 64
    batch: int = 32
    lr: float = 2e-3
    optimizer: str = "adam"
    clip: float = 5.0
    steps: int = 0          # 0: not set
    epochs: float = 0.0     # 0: not set
    minutes: float = 0.0    # 0: not set
    val_frac: float = 0.05
    eval_every: int = 500
    seed: int = 0
    level: str = "char"     # char | word
    lower: bool = False     # word level: lower-case the text
    min_count: int = 1      # word level: keep words seen at least this often
    max_vocab: int = 50_000  # word level: at most this many tokens, <eos> and <unk> included
    # the learning-rate schedule (charlm.lm.train.scheduled_lr) and early stopping
    lr_schedule: str = "constant"  # constant | plateau (divide by lr_decay when validation did not improve) | cosine
    lr_decay: float = 4.0   # plateau: the divisor
    warmup: int = 0         # linear warm-up over the first warmup steps (0: none)
    patience: int = 0       # stop after this many evaluations in a row without improvement (0: never)
    min_lr: float = 0.0     # plateau never divides below it; cosine anneals down to it
    sparse_embedding: bool = False  # Adam: update only the embedding rows a batch uses ("lazy", as SparseAdam)

    LR_SCHEDULES = ("constant", "plateau", "cosine")  # (not a field: no annotation)

    def __post_init__(self):
        _positive("--seq-len", self.seq_len, limit=MAX_SIZE)
        _positive("--batch", self.batch, limit=MAX_SIZE)
        _positive("--lr", self.lr, integer=False)
        _positive("--eval-every", self.eval_every)
        if self.optimizer not in OPTIMIZERS:
            raise CharlmError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {str(self.optimizer)[:40]!r}")
        if isinstance(self.clip, bool) or not isinstance(self.clip, (int, float)) or not math.isfinite(self.clip) \
                or self.clip < 0:
            raise CharlmError(f"--clip must be 0 (off) or a finite positive number, got {str(self.clip)[:40]}")
        if not isinstance(self.steps, int) or isinstance(self.steps, bool) or self.steps < 0:
            raise CharlmError(f"--steps must be positive, got {str(self.steps)[:40]}")
        for name in ("epochs", "minutes"):  # 0: not set
            _finite(f"--{name}", getattr(self, name))
        _finite("--val-frac", self.val_frac)
        check_seed("--seed", self.seed)
        if self.level not in ("char", "word"):
            raise CharlmError(f"--level must be char or word, got {self.level!r}")
        _positive("--min-count", self.min_count)
        if not isinstance(self.max_vocab, int) or isinstance(self.max_vocab, bool) or self.max_vocab >= 1 << 32:
            raise CharlmError(f"--max-vocab must be at least 3 and below 2**32, got {str(self.max_vocab)[:40]}")
        if not isinstance(self.max_vocab, int) or self.max_vocab < 3:
            raise CharlmError(f"--max-vocab must be at least 3, got {self.max_vocab!r}")
        if not 0.0 < self.val_frac < 0.5:
            raise CharlmError(f"--val-frac must be between 0 and 0.5, got {self.val_frac}")
        if self.lr_schedule not in self.LR_SCHEDULES:
            raise CharlmError(f"--lr-schedule must be one of {', '.join(self.LR_SCHEDULES)}, "
                              f"got {str(self.lr_schedule)[:40]!r}")
        _finite("--lr-decay", self.lr_decay, -math.inf)
        if not 1.0 < self.lr_decay <= 1e6:
            raise CharlmError(f"--lr-decay must be over 1 (the learning rate is divided by it), got {self.lr_decay}")
        for name in ("warmup", "patience"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < 1 << 48:
                raise CharlmError(f"--{name} must be a whole number, 0 (off) or more, got {str(v)[:40]}")
        if not isinstance(self.sparse_embedding, bool):
            raise CharlmError(f"--sparse-embedding is a switch (true or false), got {str(self.sparse_embedding)[:40]}")
        _finite("--min-lr", self.min_lr)
        if self.min_lr >= self.lr:
            raise CharlmError(f"--min-lr must be below --lr ({self.lr:g}), got {self.min_lr:g}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return _from_dict(cls, d)


def models_dir() -> str:
    """The folder where runs are created and the latest model is looked for: $CHARLM_MODELS_DIR, or
    models/ in the working folder. Read at each call, so a library user can change it."""
    import os
    return os.environ.get("CHARLM_MODELS_DIR", "models")
