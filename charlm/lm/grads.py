"""Gradient flow through time: how much of the loss at the last step of a window
reaches the hidden state k steps earlier.

For W windows of real text (one stream each, side by side in one batch), every
window is `warmup` tokens of context from the zero state followed by the
max_lag + 1 measured steps. L_T is the cross-entropy of the prediction made at
the window's last step T (no other position contributes), and for each layer l
and lag k = 0..max_lag we measure

    g_k = dL_T / dh^(l)_(T-k)                                          (N, H)

as backpropagation through time computes it at that node of the graph: every
quantity computed from h^(l)_(T-k) onwards (the layers above at the same step,
the later steps) follows it; the inputs, the other states of earlier steps and,
for the LSTM, the cell state c^(l)_(T-k) are held fixed. For one layer this is
the gradient with respect to the carried state h_(T-k) (rerun the window from
there). The report is the mean over windows of ||g_k||_2.

`norms` is the first layer's curve: the gradient that reaches the bottom of the
stack k steps back, through every layer. For a single-layer model it is the only
one; the other layers are in `norms_by_layer`. For the LSTM, `c_norms` is the
same for the cell state, dL_T / dc^(0)_(T-k) (h^(0)_(T-k) recomputed from it).

Method (exact, float64, the model's own passes: Model.forward, then
Model.layer_backward, the cell's backward kernel): one forward pass over the
windows stores every state; then for each j = 1..max_lag + 1 the
stack's backward kernels run over the last j steps only, with only dL_T / dlogits
at the last step non-zero. A backward kernel gives dh0 = the gradient with respect
to its initial state (the state at T-j) with the states of the other layers at
T-j held fixed, and its dx, the part that enters each layer from the layer above,
row 0 being the step T-j+1. The node gradient of h^(l) at T-k is the sum of the
two: dh0 of the run over k steps plus row 0 of what enters layer l from above in
the run over k + 1 steps. That is O(max_lag^2) steps, but only W streams.

The lecture's bounds: for the vanilla RNN h_t = tanh(W_hh h_(t-1) + ...),
||dL/dh_(t-1)|| <= ||W_hh||_2 * max_j tanh'(a_t,j) * ||dL/dh_t||, with tanh' <= 1
and sigmoid' <= 1/4; the mean |tanh'| and |sigmoid'| of the units along the
measured steps are reported.

make_jobs() gathers what `charlm grads` measures (checkpoints with their corpus
or training token file, fresh models of given cells) and measure_job() measures
one; the pictures (sparkline, table lags, the PNG) are in charlm.lm.gradplot.

Dimensions: N windows (batch), S steps per window (warmup + max_lag + 1),
K = max_lag, L layers, H hidden, V vocab, D layer input.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from . import checkpoint
from ..config import ModelConfig, models_dir
from ..data import Vocab, read_text
from ..data.tokens import open_run_tokens, run_file
from ..errors import CharlmError
from .gradplot import PLOT_HINT, SPARK, plot, sparkline, table_lags  # noqa: F401  (part of this API)
from .model import Model
from .precompile import backward_split

CELLS = ("rnn", "gru", "lstm")


@dataclass
class GradFlow:
    """What measure() found for one model. Arrays are float64."""
    cell: str
    layers: int
    hidden: int
    max_lag: int
    windows: int
    warmup: int
    norms_by_layer: np.ndarray            # (L, K+1) mean over windows of ||dL_T/dh^(l)_(T-k)||
    per_window: np.ndarray                # (L, K+1, N) the same, each window
    c_norms: np.ndarray | None            # (K+1,) LSTM: mean ||dL_T/dc^(0)_(T-k)||
    mean_dtanh: float                     # mean tanh' over every tanh unit of the measured steps
    mean_dsigmoid: float | None           # mean sigmoid' over every gate unit (None for rnn: no gates)
    max_dtanh: float
    loss: float                           # mean L_T over the windows (nats)
    label: str = ""
    clipped_fraction: float | None = None  # trained model: share of training steps whose gradient was clipped
    steps: int | None = None               # trained model: training steps
    grad_norm_median: float | None = None  # pre-clip global gradient norm over training, if recorded
    grad_norm_max: float | None = None
    oov: int = 0                           # corpus tokens outside the model's vocabulary
    extra: dict = field(default_factory=dict)

    @property
    def norms(self) -> np.ndarray:
        """The first layer's curve (see the module docstring)."""
        return self.norms_by_layer[0]

    def decay_per_step(self, layer: int = 0) -> float:
        """Geometric mean of norm[k] / norm[k-1] over k = 2..K (lag 1 on, past the
        step where the gradient enters the stack): < 1 vanishes, > 1 explodes."""
        return decay_per_step(self.norms_by_layer[layer])

    def to_dict(self) -> dict:
        """Plain JSON-able values (lists of floats; NaN/inf left for the caller's strict dump)."""
        d = {"cell": self.cell, "label": self.label, "norms": self.norms.tolist(),
             "mean_dtanh": self.mean_dtanh, "mean_dsigmoid": self.mean_dsigmoid,
             "clipped_fraction": self.clipped_fraction,
             "norms_by_layer": self.norms_by_layer.tolist(),
             "c_norms": None if self.c_norms is None else self.c_norms.tolist(),
             "decay_per_step": self.decay_per_step(), "max_dtanh": self.max_dtanh, "loss": self.loss,
             "layers": self.layers, "hidden": self.hidden, "max_lag": self.max_lag, "windows": self.windows,
             "warmup": self.warmup, "steps": self.steps,
             "grad_norm_median": self.grad_norm_median, "grad_norm_max": self.grad_norm_max}
        return d


def decay_per_step(norms: np.ndarray) -> float:
    """(norms[K] / norms[1]) ** (1 / (K - 1)); NaN when undefined (K < 2 or a zero norm)."""
    K = len(norms) - 1
    if K < 2 or not (norms[1] > 0 and norms[K] > 0):
        return float("nan")
    with np.errstate(all="ignore"):
        return float(np.exp((np.log(norms[K]) - np.log(norms[1])) / (K - 1)))


# ------------------------------------------------------------------ inputs
def window_starts(n_tokens: int, windows: int, length: int) -> np.ndarray:
    """Start offsets of `windows` windows of `length` tokens spread evenly over the text
    (they may overlap when the text is short). CharlmError when the text is shorter than one."""
    if windows <= 0:
        raise CharlmError(f"--windows must be positive, got {windows}")
    if n_tokens < length:
        raise CharlmError(f"the text has {n_tokens} tokens; a window needs {length} "
                          f"(warm-up + --max-lag + 2): give a longer text or a smaller --max-lag")
    return np.linspace(0, n_tokens - length, windows).round().astype(np.int64)


def make_windows(ids: np.ndarray, windows: int, max_lag: int, warmup: int) -> tuple[np.ndarray, np.ndarray]:
    """Inputs x (S, N) with S = warmup + max_lag + 1 and the target of the last step y (N,)."""
    if max_lag < 0:
        raise CharlmError(f"--max-lag must be 0 or positive, got {max_lag}")
    if warmup < 0:
        raise CharlmError(f"--warmup must be 0 or positive, got {warmup}")
    S = warmup + max_lag + 1
    starts = window_starts(len(ids), windows, S + 1)
    ids = np.asarray(ids, dtype=np.int64)
    block = np.stack([ids[s:s + S + 1] for s in starts], axis=1)  # (S+1, N)
    return np.ascontiguousarray(block[:S]), np.ascontiguousarray(block[S])


def as_float64(model: Model) -> Model:
    """The same model with float64 parameters (the kernels compile for both)."""
    if model.dtype == np.float64:
        return model
    return Model(model.cfg, {k: v.astype(np.float64) for k, v in model.params.items()})


def fresh_model(cell: str, vocab_size: int, hidden: int = 256, layers: int = 2, embed: int = 64,
                seed: int = 0) -> Model:
    """An untrained model with charlm's initialisation (float32, as training starts)."""
    cfg = ModelConfig(cell=cell, vocab_size=vocab_size, hidden=hidden, layers=layers, embed=embed)
    return Model.create(cfg, seed=seed)


# ------------------------------------------------------------------ the measurement
def _slopes(cell: str, hs: np.ndarray, cs: np.ndarray, acts: np.ndarray, H: int):
    """(sum tanh', count tanh, max tanh', sum sigmoid', count sigmoid) over the given steps.
    hs, cs: outputs of the steps (T, N, H); acts (T, N, width) their activation caches."""
    if cell == "rnn":
        dt = 1.0 - hs * hs
        return dt.sum(), dt.size, dt.max(), 0.0, 0
    if cell == "gru":
        s = acts[..., :2 * H]                     # r, z
        n = acts[..., 2 * H:3 * H]
        ds = s * (1.0 - s)
        dt = 1.0 - n * n
        return dt.sum(), dt.size, dt.max(), ds.sum(), ds.size
    i, f, g, o = (acts[..., q * H:(q + 1) * H] for q in range(4))
    tc = np.tanh(cs)
    dts = (1.0 - g * g, 1.0 - tc * tc)
    dss = tuple(s * (1.0 - s) for s in (i, f, o))
    return (sum(d.sum() for d in dts), sum(d.size for d in dts), max(d.max() for d in dts),
            sum(d.sum() for d in dss), sum(d.size for d in dss))


def _last_step_gradient(model: Model, top: np.ndarray, y: np.ndarray):
    """From the last step's output-head input top (N, H) and targets y (N,): the loss of each
    window (N,) and dL_T/dh^(L-1)_T (N, H), through the model's output head (any head)."""
    N = len(y)
    targets = np.ascontiguousarray(y, dtype=np.int32)  # the ids type of every other path: no extra signature
    loss = np.empty(N)
    model.head.gather(model.params, top, targets, loss)
    dtop = np.empty_like(top)
    scratch = {n: np.zeros_like(a) for n, a in model.params.items()}
    model.head.loss_and_backward(model.params, top, targets, 1.0, dtop, scratch)
    return -loss, dtop


def _all_slopes(cell: str, hs, cs, acts, t0: int, H: int) -> tuple:
    """_slopes summed over every layer for the steps t0.. (the ones producing h_(t0+1) .. h_S)."""
    tot = [0.0, 0, 0.0, 0.0, 0]
    for l in range(len(hs)):
        st = _slopes(cell, hs[l][t0 + 1:], cs[l][t0 + 1:] if cell == "lstm" else None, acts[l][t0:], H)
        tot = [tot[0] + st[0], tot[1] + st[1], max(tot[2], st[2]), tot[3] + st[3], tot[4] + st[4]]
    return tuple(tot)


def gradient_flow(model: Model, x: np.ndarray, y: np.ndarray, max_lag: int,
                  progress: Callable[[int, int], None] | None = None) -> dict:
    """The node gradients dL_T/dh^(l)_(T-k) (and dL_T/dc^(l)_(T-k) for the LSTM) for
    k = 0..max_lag, where L_T = sum over windows of -log p(y[n] | x[:, n]) at the last step.

    x (S, N) ids with S >= max_lag + 1, y (N,). The model is used in float64.
    Returns {"dh": (L, K+1, N, H), "dc": (L, K+1, N, H) or None, "loss": (N,),
    "slopes": (sum tanh', n tanh', max tanh', sum sigmoid', n sigmoid')}.
    progress(done, total) is called after each of the max_lag + 1 backward runs."""
    model = as_float64(model)
    cfg, p = model.cfg, model.params
    S, N = x.shape
    K, L, H = max_lag, cfg.layers, cfg.hidden
    if S < K + 1:
        raise CharlmError(f"windows of {S} steps are too short for --max-lag {K}")
    ws = model.forward(np.ascontiguousarray(x), model.zero_state(N))
    hs = [h.copy() for h in ws.hs]                      # (S+1, N, H) each, hs[0] = 0
    cs = [c.copy() for c in ws.cs]                      # (S+1, N, H) lstm, else a (1, 1, 1) dummy
    acts = [a.copy() for a in ws.acts]                  # (S, N, width)
    emb = ws.emb.copy()                                 # (S, N, E)
    lstm = cfg.cell == "lstm"
    loss, dtop = _last_step_gradient(model, np.ascontiguousarray(ws.top.reshape(S, N, -1)[-1]), y)  # into h^(L-1)_T

    dh = np.zeros((L, K + 1, N, H))
    dc = np.zeros((L, K + 1, N, H)) if lstm else None
    prev_dh0 = np.zeros((L, N, H))                      # the run over 0 steps: nothing flows back
    prev_dc0 = np.zeros((L, N, H))
    GH = cfg.gates * H
    # the kernels also accumulate parameter gradients, not needed here: scratch
    scratch = {n: np.zeros_like(a) for n, a in p.items() if n.startswith("rnn.")}
    for j in range(1, K + 2):
        k = j - 1                                       # this run gives the node gradients at T-k
        dh0 = np.zeros((L, N, H))
        dc0 = np.zeros((L, N, H))
        dacts = np.zeros((j, N, GH))
        dacts_h = np.zeros((j, N, GH)) if cfg.cell == "gru" else dacts
        dhs = np.zeros((j, N, H))
        dhs[j - 1] = dtop
        for l in range(L - 1, -1, -1):
            dh[l, k] = dhs[0] + prev_dh0[l]
            if lstm:
                # c_(T-k) -> h_(T-k) = o * tanh(c): the node gradient of c adds that path
                o = acts[l][S - k - 1, :, 3 * H:4 * H]
                tc = np.tanh(cs[l][S - k])
                dc[l, k] = prev_dc0[l] + dh[l, k] * o * (1.0 - tc * tc)
            inp = emb[S - j:S] if l == 0 else hs[l - 1][S - j + 1:S + 1]
            dx = np.zeros((0, 0, 0)) if l == 0 else np.zeros((j, N, H))
            for g in scratch.values():
                g.fill(0)
            model.layer_backward(l, dx, scratch, dh0[l], dc0[l], dacts, dacts_h, dhs, hs[l][S - j:S + 1],
                                 cs[l][S - j:S + 1] if lstm else cs[l], acts[l][S - j:S], inp)
            dhs = dx
        prev_dh0, prev_dc0 = dh0, dc0
        if progress is not None:
            progress(j, K + 1)
    slopes = _all_slopes(cfg.cell, hs, cs, acts, S - K - 1, H)  # over the measured steps, every layer
    return {"dh": dh, "dc": dc, "loss": loss, "slopes": slopes}


def warm_up(model: Model) -> None:
    """Run the measurement once on a two-step window so Numba compiles (or loads from its
    cache) the float64 kernels of this model's cell before the real work starts."""
    x = np.zeros((2, 1), dtype=np.int64)
    model = as_float64(model)  # as gradient_flow computes
    backward = backward_split(model)  # from an empty cache: the backward kernel in a child meanwhile
    if backward is not None:
        model.forward(x, model.zero_state(1))
        backward.wait()
    gradient_flow(model, x, np.zeros(1, dtype=np.int64), 1)


def measure(model: Model, ids: np.ndarray, *, max_lag: int = 64, windows: int = 32, warmup: int = 32,
            label: str = "", progress: Callable[[int, int], None] | None = None) -> GradFlow:
    """Gradient flow of `model` over `windows` windows of the token ids (see the module docstring)."""
    if max_lag < 0:
        raise CharlmError(f"--max-lag must be 0 or positive, got {max_lag}")
    x, y = make_windows(ids, windows, max_lag, warmup)
    if int(x.max(initial=0)) >= model.cfg.vocab_size or int(y.max()) >= model.cfg.vocab_size:
        raise CharlmError("the token ids do not fit the model's vocabulary")
    r = gradient_flow(model, x, y, max_lag, progress)
    per_window = np.linalg.norm(r["dh"], axis=3)        # (L, K+1, N)
    st = r["slopes"]
    c_norms = None
    if r["dc"] is not None:
        c_norms = np.linalg.norm(r["dc"][0], axis=2).mean(axis=1)
    return GradFlow(cell=model.cfg.cell, layers=model.cfg.layers, hidden=model.cfg.hidden, max_lag=max_lag,
                    windows=windows, warmup=warmup, norms_by_layer=per_window.mean(axis=2), per_window=per_window,
                    c_norms=c_norms, mean_dtanh=float(st[0] / st[1]), max_dtanh=float(st[2]),
                    mean_dsigmoid=float(st[3] / st[4]) if st[4] else None,
                    loss=float(r["loss"].mean()), label=label or model.cfg.cell)


def training_record(ck) -> dict:
    """From a checkpoint: the share of its training steps whose gradient was clipped and,
    when the run recorded them, the median and largest pre-clip gradient norms."""
    steps = int(ck.step)
    clipped = (ck.counters or {}).get("clipped")
    rec = {"steps": steps, "clipped_fraction": clipped / steps if steps and clipped is not None else None,
           "grad_norm_median": None, "grad_norm_max": None}
    gn = getattr(ck, "grad_norms", None)
    if gn is not None and len(gn):
        g = np.asarray(gn, dtype=np.float64)
        g = g[np.isfinite(g)]
        if g.size:
            rec["grad_norm_median"] = float(np.median(g))
            rec["grad_norm_max"] = float(g.max())
    return rec


# ------------------------------------------------------------------ what to measure
@dataclass
class Job:
    """One model to measure over token ids. record: training_record() of a checkpoint (None for
    a fresh model); warning: something the caller should tell the user (corpus characters left out)."""
    label: str
    model: Model
    ids: np.ndarray
    record: dict | None = None
    warning: str | None = None


def check_options(max_lag: int, windows: int, warmup: int) -> None:
    """The measurement's options, checked before any slow work."""
    if max_lag < 0:
        raise CharlmError(f"--max-lag must be 0 or positive, got {max_lag}")
    if windows <= 0:
        raise CharlmError(f"--windows must be positive, got {windows}")
    if warmup < 0:
        raise CharlmError(f"--warmup must be 0 or positive, got {warmup}")


def label_of(path: str) -> str:
    """A checkpoint's label: its run directory's name."""
    p = Path(path)
    return p.parent.name or p.name


def checkpoint_job(path: str, text: str | None) -> Job:
    """The trained model in checkpoint `path` over `text`, or without a text over its run's token
    file. CharlmError for an ESN (nothing to measure) or a run without its token file."""
    ck = checkpoint.load(path)
    if ck.model.cell == "esn":
        raise CharlmError(f"{path} is an Echo State Network: its reservoir is fixed and no gradient flows through "
                          f"time in it (only the readout is trained); grads measures rnn, gru and lstm models")
    warning = None
    if text is not None:
        ids, oov = ck.vocab.encode(text)
        if oov and ck.vocab.level == "char":
            warning = f"{len(oov)} character(s) of CORPUS not in the vocabulary of {path} were left out"
    else:
        tok = ck.data.get("tokens")
        if not tok or not (Path(path).parent / str(tok)).is_file():
            raise CharlmError(f"{path} keeps no training text (its run's token file is missing): give a CORPUS")
        tpath = run_file(Path(path).parent, tok, "token file", why="cannot measure")  # never outside its run
        ids = open_run_tokens(tpath, ck.data.get("dtype"), ck.data.get("sha256"), len(ck.vocab),
                              why="cannot measure")
    return Job(label_of(path), Model(ck.model, ck.params), ids, training_record(ck), warning)


def make_jobs(corpus: str | None = None, models: Sequence[str | None] = (), cells: Sequence[str] = (), *,
              hidden: int = 256, layers: int = 2, embed: int = 64, seed: int = 0,
              root: str | None = None) -> list[Job]:
    """The models `charlm grads` measures, in order: each checkpoint of `models` (a file or run
    directory; with neither models nor cells, the most recent run under root, default
    models_dir()), then a fresh model of each of `cells` over the vocabulary of the corpus.
    corpus: a text file ('-' standard input); required with cells, else each run's token file."""
    for c in cells:
        if c not in CELLS:
            raise CharlmError(f"--cell must be rnn, gru or lstm, got {c!r}")
    if cells and corpus is None:
        raise CharlmError("--cell needs a CORPUS to take the windows from: charlm grads FILE --cell " + cells[0])
    text = read_text(corpus) if corpus is not None else None
    paths = list(models) or ([] if cells else [None])  # None: the most recent run
    jobs = [checkpoint_job(checkpoint.resolve(m, root or models_dir()), text) for m in paths]
    if cells:
        vocab = Vocab.from_text(text)
        ids = vocab.encode_corpus(text)
        for c in cells:
            model = fresh_model(c, len(vocab), hidden=hidden, layers=layers, embed=embed, seed=seed)
            jobs.append(Job(f"{c} (untrained)", model, ids))
    return jobs


def warm_up_jobs(jobs: Sequence[Job]) -> None:
    """warm_up() once for each cell among the jobs' models."""
    first: dict[str, Model] = {}
    for job in jobs:
        first.setdefault(job.model.cfg.cell, job.model)
    for model in first.values():
        warm_up(model)


def measure_job(job: Job, *, max_lag: int = 64, windows: int = 32, warmup: int = 32,
                progress: Callable[[int, int], None] | None = None) -> GradFlow:
    """measure() of the job's model over its ids, with its training record."""
    r = measure(job.model, job.ids, max_lag=max_lag, windows=windows, warmup=warmup, label=job.label,
                progress=progress)
    if job.record is not None:
        r.clipped_fraction, r.steps = job.record["clipped_fraction"], job.record["steps"]
        r.grad_norm_median, r.grad_norm_max = job.record["grad_norm_median"], job.record["grad_norm_max"]
    return r
