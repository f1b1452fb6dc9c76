"""Echo State Network language model: a fixed random reservoir and a trained softmax readout.

    h_t = (1 - a) h_{t-1} + a tanh(Win[:, x_t] + b + W h_{t-1})     # reservoir, never trained
    P(x_{t+1} | x_1..x_t) = softmax(Wout h_t + bout)                 # readout, trained

Win (H, V) dense from U(-input_scaling, input_scaling); b from U(-bias_scaling,
bias_scaling); W (H, H) sparse, each unit reading round(connectivity * H) others
with N(0, 1) weights, then rescaled so that its spectral radius (largest
|eigenvalue|, estimated by power iteration) is ``sr``. Everything is drawn from
the run's seed. The readout is trained like the other models' decoder (Adam on
the cross-entropy over minibatches of reservoir states, no backpropagation
through time). EsnModel is a BaseModel (charlm.lm.base), a peer of the recurrent
Model, so sampling, scoring, evaluation and training treat both alike.

Parameters (checkpoint names; the reservoir is stored, so a loaded model
reproduces the states exactly whatever NumPy's random streams do):

    reservoir.input_weight  (V, H)   Win transposed: row v is token v's input
    reservoir.bias          (H,)
    reservoir.W_data        (Z,)     W as CSR: values,
    reservoir.W_indices     (Z,)     int32 column of each value,
    reservoir.W_indptr      (H+1,)   int32 row starts
    decoder.weight          (V, H)   the readout Wout (trained)
    decoder.bias            (V,)     bout (trained)

Names of the hyperparameters in reservoirpy (Reservoir / ESN): --units = units,
--leak = lr, --sr = sr, --connectivity = rc_connectivity, --input-scaling =
input_scaling, --bias-scaling = bias_scaling (input_connectivity is 1 here:
every token reaches every unit).
"""
from __future__ import annotations

import math

import numpy as np

from ..config import ModelConfig
from ..runtime import governed, parts
from ..errors import CharlmError
from ..kernels import layers
from ..kernels.esn import csr_matvec, esn_forward, esn_sample
from .base import BaseModel, SampleStep, State

TRAINABLE = ("decoder.weight", "decoder.bias")
RESERVOIR = ("reservoir.input_weight", "reservoir.bias", "reservoir.W_data", "reservoir.W_indices",
             "reservoir.W_indptr")


def connectivity_of(cfg: ModelConfig) -> float:
    """--connectivity, or its default: 0.1, and 100 / units for reservoirs past 1,000 units
    (every unit then reads 100 others, so the cost per step grows linearly with the units)."""
    return cfg.connectivity or min(0.1, 100.0 / cfg.hidden)


def spectral_radius(data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, iters: int = 3000,
                    seed: int = 0) -> float:
    """Largest |eigenvalue| of the CSR matrix by power iteration: the mean growth rate
    of ||W^k v|| over the last two thirds of `iters` steps. The growth rate, not the
    last ratio: the leading eigenvalues of a random matrix come as complex pairs, for
    which ||W^k v|| oscillates while its long-run rate is still |lambda_max|."""
    H = len(indptr) - 1
    v = np.random.default_rng(seed).standard_normal(H)
    w = np.empty(H)
    d = np.asarray(data, dtype=np.float64)
    burn = iters // 3
    logs = 0.0
    for k in range(iters):
        csr_matvec(w, d, indices, indptr, v)
        nrm = float(np.sqrt(w @ w))
        if nrm == 0.0 or not math.isfinite(nrm):
            return 0.0 if nrm == 0.0 else math.inf
        if k >= burn:
            logs += math.log(nrm)
        v, w = w / nrm, v
    return math.exp(logs / (iters - burn))


def init_params(cfg: ModelConfig, rng: np.random.Generator, dtype=np.float32) -> dict[str, np.ndarray]:
    """A new reservoir (scaled to spectral radius cfg.sr) and a zero readout."""
    V, H = cfg.vocab_size, cfg.hidden
    k = max(1, min(H, int(round(connectivity_of(cfg) * H))))
    indices = np.empty((H, k), dtype=np.int32)
    for i in range(H):
        indices[i] = np.sort(rng.choice(H, size=k, replace=False))
    data = rng.standard_normal((H, k)).reshape(-1)
    indices = indices.reshape(-1)
    indptr = (np.arange(H + 1) * k).astype(np.int32)
    rho = spectral_radius(data, indices, indptr, seed=int(rng.integers(2**31)))
    if rho > 0:
        data *= cfg.sr / rho
    c = lambda a: np.ascontiguousarray(a, dtype=dtype)
    return {
        "reservoir.input_weight": c(rng.uniform(-cfg.input_scaling, cfg.input_scaling, size=(V, H))),
        "reservoir.bias": c(rng.uniform(-cfg.bias_scaling, cfg.bias_scaling, size=H)),
        "reservoir.W_data": c(data),
        "reservoir.W_indices": indices,
        "reservoir.W_indptr": indptr,
        "decoder.weight": np.zeros((V, H), dtype=dtype),
        "decoder.bias": np.zeros(V, dtype=dtype),
    }


def check_params(cfg: ModelConfig, params: dict[str, np.ndarray]) -> None:
    """Every array present with the right shape and type, W a valid CSR matrix, all finite."""
    missing = [n for n in RESERVOIR + TRAINABLE if n not in params]
    if missing:
        raise CharlmError(f"checkpoint is missing parameters: {', '.join(missing)}")
    V, H = cfg.vocab_size, cfg.hidden
    floats = [n for n in RESERVOIR + TRAINABLE if n not in ("reservoir.W_indices", "reservoir.W_indptr")]
    dtypes = {params[n].dtype for n in floats}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (np.float32, np.float64):
        raise CharlmError(f"parameters must all be float32 or all float64, got {sorted(map(str, dtypes))}")
    expect = {"reservoir.input_weight": (V, H), "reservoir.bias": (H,), "reservoir.W_indptr": (H + 1,),
              "decoder.weight": (V, H), "decoder.bias": (V,)}
    for n, s in expect.items():
        if params[n].shape != s:
            raise CharlmError(f"parameter {n} has shape {params[n].shape}, expected {s}")
    ind, ptr, dat = params["reservoir.W_indices"], params["reservoir.W_indptr"], params["reservoir.W_data"]
    if ind.dtype != np.int32 or ptr.dtype != np.int32 or dat.ndim != 1 or ind.shape != dat.shape:
        raise CharlmError("the reservoir matrix is not a valid CSR matrix (types or sizes)")
    if ptr[0] != 0 or ptr[-1] != len(dat) or (np.diff(ptr) < 0).any() or (len(ind) and (ind.min() < 0 or ind.max() >= H)):
        raise CharlmError("the reservoir matrix is not a valid CSR matrix (row pointers or column indices)")
    for n in floats:
        if not np.isfinite(params[n]).all():
            raise CharlmError(f"parameter {n} is not finite (NaN or infinity): the weights are unusable")


class EsnWorkspace:
    """u (T, N, H) the input drive Win x_t + b; hs (T+1, N, H) the states, [0] the carried one;
    top (M, H) the states the readout reads (a view of hs[1:])."""

    def __init__(self, cfg: ModelConfig, T: int, N: int, dtype):
        H = cfg.hidden
        self.u = np.zeros((T, N, H), dtype)
        self.hs = np.zeros((T + 1, N, H), dtype)
        self.top = self.hs[1:].reshape(T * N, H)
        self.no_dx = np.zeros((0, 0), dtype)  # the readout's input gradient is not needed


class EsnModel(BaseModel):
    """An ESN as a BaseModel (scoring, training step and sampling as for the recurrent model).
    ``params`` holds every array (saved in checkpoints); ``trainable`` only the readout, which
    is all the optimizer sees. Its State has one layer (h the reservoir, c unused zeros)."""

    cells = ("esn",)
    workspace_type = EsnWorkspace
    check_params = staticmethod(check_params)
    init_params = staticmethod(init_params)
    state_layers = 1

    def __init__(self, cfg: ModelConfig, params: dict[str, np.ndarray]):
        super().__init__(cfg, params)
        self._trainable = {n: params[n] for n in TRAINABLE}

    @property
    def trainable(self) -> dict[str, np.ndarray]:
        """The readout only: the reservoir is fixed."""
        return self._trainable

    def states(self, x: np.ndarray, state: State) -> np.ndarray:
        """Reservoir states after each input of x (T, N): (T+1, N, H) with [0] = state.h[0].
        The array is the workspace's: copy it to keep it."""
        return self._forward(x, state, None).hs

    def _forward(self, x: np.ndarray, state: State, rng: np.random.Generator | None = None) -> EsnWorkspace:
        """The reservoir over ids x (T, N); the readout (the output head) reads ws.top. No dropout:
        rng is unused."""
        T, N = x.shape
        p, H = self.params, self.cfg.hidden
        ws = self._workspace(T, N)
        ids = np.ascontiguousarray(x, dtype=np.int32).reshape(T * N)
        u = ws.u.reshape(T * N, H)
        layers.embedding_forward(u, ids, p["reservoir.input_weight"])
        u += p["reservoir.bias"]
        ws.hs[0] = state.h[0]
        esn_forward(ws.hs, ws.u, p["reservoir.W_data"], p["reservoir.W_indices"], p["reservoir.W_indptr"],
                    float(self.cfg.leak), parts())
        return ws

    def _final_state(self, ws: EsnWorkspace) -> State:
        h = ws.hs[-1][None].copy()
        return State(h, np.zeros_like(h))

    def _dtop(self, ws: EsnWorkspace) -> np.ndarray:
        return ws.no_dx  # the readout's input gradient is not needed: nothing behind it is trained

    def _backward(self, ws: EsnWorkspace, x: np.ndarray, grads: dict[str, np.ndarray],
                  rng: np.random.Generator | None) -> None:
        """Nothing: the head already added the readout's gradient, and the reservoir is fixed."""

    def sampler(self, precision: str = "float32") -> SampleStep:
        """The compiled reservoir sampler (see BaseModel.sampler); uses hs[0, 0], ignores cs. float32 only:
        its sparse reservoir is not what a token's time goes to."""
        if precision != "float32":
            raise CharlmError(f"--precision {precision} is for LSTM, GRU and RNN models: drop it for an ESN")
        p = self.params
        WoutT = np.ascontiguousarray(p["decoder.weight"].T)
        arrays = (p["reservoir.input_weight"], p["reservoir.bias"], p["reservoir.W_data"], p["reservoir.W_indices"],
                  p["reservoir.W_indptr"], float(self.cfg.leak), WoutT, p["decoder.bias"])

        def step(out, lps, hs, cs, seen, feed, u, temperature, top_k, top_p, penalty, greedy):
            esn_sample(out, lps, hs[0, 0], seen, feed, u, *arrays, temperature, top_k, top_p, penalty, greedy)
        return step
