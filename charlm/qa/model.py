"""End-to-end memory network (MemN2N, Sukhbaatar et al. 2015) with selectable sentence encoders.

Dimensions: N questions in a batch, M memory slots, J words per sentence (padded),
d embedding, K hops, V words, A answer classes, S = N*M sentences, H GRU hidden.

Parameters (adjacent weight tying: hop k reads with A_k = emb{k-1}, writes with
C_k = emb{k}, the question uses B = emb0):

    emb{k}   (V, d)   word embeddings, k = 0..K; row 0 (the padding word) is fixed at 0
    time{k}  (Mmax, d) temporal encoding by sentence age (0 = the newest), k = 0..K
    W, Wm    (A, d)   answer selection (free part) and the match term, one row per answer class
    rel{k}   (2R+1, d) relative-age vectors of hop k+1, k = 1..K-1 (cfg.relative = R > 0)
    mlp.W1 (U, (K+1) d), mlp.b1 (U,), mlp.W2 (A, U)   the answer MLP (cfg.mlp = U > 0)
    gru{k}f.* / gru{k}b.*   (gru, bigru) forward / backward GRU per embedding k:
             Wih (3H, d), Whh (3H, H), bih, bhh (3H,), gate order [r, z, n]

Sentence encoders (charlm.qa.encoders, which gives their formulas) map a sentence x_1..x_L to
enc_k(x) in R^d through embedding k: bow (sum of the embeddings), pe (position encoding), gru and
bigru (pe plus the last state of one GRU, or of a forward and a backward GRU, over the sentence).
Memories add the temporal vector of their age: m_i = enc_{k}(s_i) + time{k}[age_i]. Questions as
index arrays and batches: charlm.qa.batches.

Story selection (hop k = 1..K), u_1 = enc_0(question):

    score_i = u_k . m_i^A          p = softmax(score) over the story's memories
                                   (linear start: p = score, no softmax)
    o_k = sum_i p_i m_i^C          u_{k+1} = u_k + o_k

Relative age (cfg.relative = R > 0): hop k >= 2 scores u_k . (m_i + rel{k-1}[r_i]), r_i = age_i minus the
age of the memory hop k-1 attended to most, clipped to [-R, R] (rel{k} (2R+1, d)): "the move before that one".

Answer selection over the A answer classes (answer strings seen in training; "n,w" is one class):

    logits = (W + P emb{K}) u_{K+1}  +  Wm (u_1 * o_K)       P (A, V): the words of each answer
             [+ W2 tanh(W1 [u_1; o_1; ..; o_K] + b1)  with cfg.mlp > 0 hidden units]

P emb{K} ties each answer to the embedding of its words (the paper's W^T = C_K, summed
over the words of a multi-word answer); the match term Wm (u_1 * o_K), the elementwise
product of the question and the last read memory, lets a linear read-out compare them
(yes/no questions); QAConfig.match turns it off. Loss: mean cross-entropy of the answer;
with fact supervision, plus the mean cross-entropy of softmax(score) at hop k towards the
k-th supporting fact (hops past the last fact are left free).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..errors import CharlmError
from ..kernels.layers import embedding_backward
from .batches import encode, make_batch
from .encoders import ENCODERS, encoder_backward, encoder_forward, word_weights

NEG = -1e30  # score of an empty memory slot before the softmax


@dataclass(frozen=True)
class QAConfig:
    encoder: str = "pe"
    dim: int = 20
    hops: int = 3
    memory_size: int = 50
    vocab_size: int = 1
    n_answers: int = 1
    match: bool = True      # answer selection also reads question * last read memory (elementwise)
    mlp: int = 0            # hidden units of a tanh layer over [u_1; o_1; ..; o_K] added to the answer logits
    relative: int = 0       # hops 2..K also match a vector of each memory's age relative to the memory the
                            # previous hop selected, clipped to [-relative, relative] (0: off)

    def __post_init__(self):
        if self.encoder not in ENCODERS:
            raise CharlmError(f"--encoder must be one of {', '.join(ENCODERS)}, got {self.encoder!r}")
        if self.dim < 2:
            raise CharlmError(f"--dim must be at least 2, got {self.dim}")
        if self.encoder == "bigru" and self.dim % 2:
            raise CharlmError(f"--encoder bigru needs an even --dim (two GRUs of dim/2), got {self.dim}")
        if self.hops < 1:
            raise CharlmError(f"--hops must be at least 1, got {self.hops}")
        if self.memory_size < 1:
            raise CharlmError(f"--memory-size must be at least 1, got {self.memory_size}")
        if self.relative < 0:
            raise CharlmError(f"--relative must be 0 (off) or positive, got {self.relative}")
        if self.mlp < 0:
            raise CharlmError(f"--mlp must be 0 (off) or positive, got {self.mlp}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QAConfig":
        return cls(**{k: d[k] for k in ("encoder", "dim", "hops", "memory_size", "vocab_size", "n_answers",
                                        "match")}, mlp=d.get("mlp", 0),
                   relative=d.get("relative", 0))

    @property
    def gru_hidden(self) -> int:
        return self.dim if self.encoder == "gru" else self.dim // 2

    @property
    def directions(self) -> tuple[str, ...]:
        return {"gru": ("f",), "bigru": ("f", "b")}.get(self.encoder, ())


def param_shapes(cfg: QAConfig) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every parameter, in a fixed order (the one source of truth)."""
    V, d, M, A, H = cfg.vocab_size, cfg.dim, cfg.memory_size, cfg.n_answers, cfg.gru_hidden
    shapes: dict[str, tuple[int, ...]] = {}
    for k in range(cfg.hops + 1):
        shapes[f"emb{k}"] = (V, d)
        shapes[f"time{k}"] = (M, d)
        for r in cfg.directions:
            shapes[f"gru{k}{r}.Wih"] = (3 * H, d)
            shapes[f"gru{k}{r}.Whh"] = (3 * H, H)
            shapes[f"gru{k}{r}.bih"] = (3 * H,)
            shapes[f"gru{k}{r}.bhh"] = (3 * H,)
    if cfg.relative:
        for k in range(1, cfg.hops):
            shapes[f"rel{k}"] = (2 * cfg.relative + 1, d)
    shapes["W"] = (A, d)
    if cfg.match:
        shapes["Wm"] = (A, d)
    if cfg.mlp:
        shapes["mlp.W1"] = (cfg.mlp, (cfg.hops + 1) * d)
        shapes["mlp.b1"] = (cfg.mlp,)
        shapes["mlp.W2"] = (A, cfg.mlp)
    return shapes


def init_params(cfg: QAConfig, rng: np.random.Generator, dtype=np.float32) -> dict[str, np.ndarray]:
    """Embeddings, temporal vectors and W ~ N(0, 0.1^2); GRU weights ~ U(-1/sqrt(H), 1/sqrt(H))."""
    params = {}
    for name, shape in param_shapes(cfg).items():
        if name.startswith("gru"):
            a = 1.0 / np.sqrt(cfg.gru_hidden)
            p = rng.uniform(-a, a, shape)
        else:
            p = 0.1 * rng.standard_normal(shape)
        params[name] = np.ascontiguousarray(p, dtype=dtype)
    for k in range(cfg.hops + 1):
        params[f"emb{k}"][0] = 0.0
    return params


def check_params(cfg: QAConfig, params: dict[str, np.ndarray]) -> None:
    shapes = param_shapes(cfg)
    if set(shapes) != set(params):
        missing = sorted(set(shapes) - set(params))
        extra = sorted(set(params) - set(shapes))
        raise CharlmError(f"parameters do not match the configuration (missing {missing[:3]}, unexpected {extra[:3]})")
    dtypes = {p.dtype for p in params.values()}
    if len(dtypes) != 1 or next(iter(dtypes)) not in (np.float32, np.float64):
        raise CharlmError(f"parameters must all be float32 or all float64, got {sorted(map(str, dtypes))}")
    for n, s in shapes.items():
        if params[n].shape != s:
            raise CharlmError(f"parameter {n} has shape {params[n].shape}, expected {s}")


# ------------------------------------------------------------------ attention and answer layers
def masked_softmax(s: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Softmax of s (N, M) over the True entries of mask in each row; 0 elsewhere."""
    z = np.where(mask, s, NEG)
    z = z - z.max(1, keepdims=True)
    e = np.exp(z) * mask
    return e / e.sum(1, keepdims=True)


def hop_forward(u, m, c, mask, linear: bool):
    """One read of memory. u (N, d) controller; m, c (N, M, d) input / output memories.
    Returns p (N, M) attention, scores (N, M) and the new controller u + o (N, d)."""
    s = np.einsum("nmd,nd->nm", m, u)
    p = s * mask if linear else masked_softmax(s, mask)
    o = np.einsum("nm,nmd->nd", p, c)
    return p, s, u + o


def hop_backward(du_next, u, m, c, p, mask, linear: bool, dscore_extra=None, do_extra=None):
    """Gradients of hop_forward given du_next = dL/d(u + o) (N, d); dscore_extra (N, M) is
    added to dL/dscores (fact supervision), do_extra (N, d) to dL/do (the match term).
    Returns du, dm, dc."""
    do = du_next if do_extra is None else du_next + do_extra
    dp = np.einsum("nd,nmd->nm", do, c)
    dc = p[:, :, None] * do[:, None, :]
    if linear:
        ds = dp * mask
    else:
        ds = p * (dp - (p * dp).sum(1, keepdims=True))
    if dscore_extra is not None:
        ds = ds + dscore_extra
    dm = ds[:, :, None] * u[:, None, :]
    du = du_next + np.einsum("nm,nmd->nd", ds, m)
    return du, dm, dc


def log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def xent(logits: np.ndarray, target: np.ndarray, scale: float, mask=None):
    """scale * sum over rows with target >= 0 of -log softmax(logits)[target], and its gradient
    wrt logits (rows without a target: 0). mask (N, M) restricts the softmax (attention)."""
    if mask is None:
        lp = log_softmax(logits)
        prob = np.exp(lp)
    else:
        z = np.where(mask, logits, NEG)
        z = z - z.max(1, keepdims=True)
        lp = z - np.log((np.exp(z) * mask).sum(1, keepdims=True))
        prob = np.exp(lp) * mask
    has = target >= 0
    rows = np.nonzero(has)[0]
    loss = -scale * float(lp[rows, target[rows]].sum())
    g = prob * (scale * has)[:, None]
    g[rows, target[rows]] -= scale
    return loss, g.astype(logits.dtype)


# ------------------------------------------------------------------ the whole network
def answer_matrix(params, cfg: QAConfig, ans_words: np.ndarray) -> np.ndarray:
    """Answer selection weights (A, d): W + the sum of the last embedding's rows of each
    answer's words (the paper's tying W^T = C_K, extended to multi-word answer classes)."""
    E = params[f"emb{cfg.hops}"]
    return params["W"] + ans_words.astype(E.dtype) @ E


def relative_age(cfg: QAConfig, b: dict, p_prev: np.ndarray) -> np.ndarray:
    """(N, M) row index into rel{h}: each memory's age minus the age of the memory the previous
    hop attended to most, clipped to [-R, R] and shifted by R. Always the model's own choice, in
    training too: the supporting facts' positions would leak the answer (task 18: the order of
    the two facts tells yes from no), and the model would learn to rely on what a test lacks."""
    sel = np.where(b["mask"], p_prev, -1.0).argmax(1)
    age = b["age"]
    a_sel = np.take_along_axis(age, sel[:, None], axis=1)
    R = cfg.relative
    return (np.clip(age - a_sel, -R, R) + R).astype(np.int64)


def forward(params, cfg: QAConfig, b: dict, linear: bool = False):
    """Forward pass over batch b (make_batch). Returns logits (N, A) and the cache."""
    N, M, J = b["mem"].shape
    d, K = cfg.dim, cfg.hops
    dt = params["W"].dtype
    mlens = b["mem_len"].reshape(-1)
    wm = word_weights(mlens, J, d, cfg.encoder, dt)
    wq = word_weights(b["q_len"], b["q"].shape[1], d, cfg.encoder, dt)
    mem, mcache = [], []
    for k in range(K + 1):
        enc, cache = encoder_forward(params, cfg, k, b["mem"].reshape(N * M, J), mlens, wm)
        mem.append(enc.reshape(N, M, d) + params[f"time{k}"][b["age"]])
        mcache.append(cache)
    u0, qcache = encoder_forward(params, cfg, 0, b["q"], b["q_len"], wq)
    us, ps, ss, rels = [u0], [], [], [None]
    for h in range(K):
        m_in = mem[h]
        if h and cfg.relative:
            rels.append(relative_age(cfg, b, ps[-1]))
            m_in = mem[h] + params[f"rel{h}"][rels[-1]]
        elif h:
            rels.append(None)
        p, s, un = hop_forward(us[-1], m_in, mem[h + 1], b["mask"], linear)
        us.append(un)
        ps.append(p)
        ss.append(s)
    Wa = answer_matrix(params, cfg, b["ans_words"])        # (A, d)
    logits = us[-1] @ Wa.T                                 # (N, A)
    if cfg.match:
        logits += (us[0] * (us[-1] - us[-2])) @ params["Wm"].T   # question * last read o_K
    z = a = None
    if cfg.mlp:
        z = np.concatenate([us[0]] + [us[h + 1] - us[h] for h in range(K)], axis=1)   # (N, (K+1) d)
        a = np.tanh(z @ params["mlp.W1"].T + params["mlp.b1"])                          # (N, mlp)
        logits += a @ params["mlp.W2"].T
    return logits, dict(z=z, a=a, rels=rels, mem=mem, mcache=mcache, qcache=qcache, us=us, ps=ps, ss=ss, linear=linear)


def loss_and_grads(params, cfg: QAConfig, b: dict, linear: bool = False, supervise: float = 0.0,
                   need_grads: bool = True):
    """Mean answer cross-entropy (+ supervise * mean attention cross-entropy towards the
    supporting facts) over the batch, and the gradient of every parameter.
    Returns (loss, grads or None, logits, attention list of K (N, M))."""
    logits, c = forward(params, cfg, b, linear)
    N = logits.shape[0]
    loss, dlogits = xent(logits, b["ans"], 1.0 / N)
    dss = [None] * cfg.hops
    if supervise:
        for h in range(cfg.hops):
            l, g = xent(c["ss"][h], b["target"][:, h], supervise / N, b["mask"])
            loss += l
            dss[h] = g
    if not need_grads:
        return loss, None, logits, c["ps"]
    grads = {n: np.zeros_like(p) for n, p in params.items()}
    us, mem = c["us"], c["mem"]
    dWa = dlogits.T @ us[-1]                               # (A, d)
    grads["W"] += dWa
    grads[f"emb{cfg.hops}"] += b["ans_words"].astype(dWa.dtype).T @ dWa
    du = dlogits @ answer_matrix(params, cfg, b["ans_words"])
    K, d = cfg.hops, cfg.dim
    do_extra = [None] * K                                  # dL/do_k from the match term and the mlp
    dq_extra = None
    if cfg.match:
        oK = us[-1] - us[-2]
        grads["Wm"] += dlogits.T @ (us[0] * oK)
        dg = dlogits @ params["Wm"]                        # (N, d)
        do_extra[K - 1], dq_extra = dg * us[0], dg * oK
    if cfg.mlp:
        a = c["a"]
        grads["mlp.W2"] += dlogits.T @ a
        dpre = (dlogits @ params["mlp.W2"]) * (1.0 - a * a)
        grads["mlp.W1"] += dpre.T @ c["z"]
        grads["mlp.b1"] += dpre.sum(0)
        dz = dpre @ params["mlp.W1"]                       # (N, (K+1) d)
        dq_extra = dz[:, :d] if dq_extra is None else dq_extra + dz[:, :d]
        for h in range(K):
            g = dz[:, (h + 1) * d:(h + 2) * d]
            do_extra[h] = g if do_extra[h] is None else do_extra[h] + g
    dmem = [np.zeros_like(m) for m in mem]
    for h in range(cfg.hops - 1, -1, -1):
        m_in = mem[h] if c["rels"][h] is None else mem[h] + params[f"rel{h}"][c["rels"][h]]
        du, dm, dc = hop_backward(du, us[h], m_in, mem[h + 1], c["ps"][h], b["mask"], linear, dss[h],
                                  do_extra[h])
        if c["rels"][h] is not None:
            embedding_backward(grads[f"rel{h}"], np.ascontiguousarray(dm.reshape(-1, d)), c["rels"][h].reshape(-1))
        dmem[h] += dm
        dmem[h + 1] += dc
    N_, M, d = mem[0].shape
    age = b["age"].reshape(-1)
    for k in range(cfg.hops + 1):
        dk = np.ascontiguousarray(dmem[k].reshape(N_ * M, d))
        embedding_backward(grads[f"time{k}"], dk, age)
        encoder_backward(grads, params, cfg, k, dk, c["mcache"][k])
    if dq_extra is not None:
        du = du + dq_extra
    encoder_backward(grads, params, cfg, 0, np.ascontiguousarray(du), c["qcache"])
    for k in range(cfg.hops + 1):
        grads[f"emb{k}"][0] = 0.0                          # the padding word stays at zero
    return loss, grads, logits, c["ps"]


# ------------------------------------------------------------------ a trained network
class QAModel:
    """A trained network with its vocabulary: predict and explain. ck is a
    charlm.qa.checkpoint.QACheckpoint (config, params, vocab, answers)."""

    def __init__(self, ck):
        self.ck = ck
        self.cfg, self.params, self.vocab, self.answers = ck.config, ck.params, ck.vocab, ck.answers

    def encode(self, questions):
        return encode(questions, self.vocab, self.answers, self.cfg.memory_size)

    def predict(self, enc, batch: int = 256):
        """Answer probabilities (Q, A) and attention per hop, list of K (Q, M) over the slots
        of enc (oldest first)."""
        probs, attn = [], []
        for i0 in range(0, len(enc), batch):
            idx = np.arange(i0, min(len(enc), i0 + batch))
            b = make_batch(enc, idx, self.cfg.hops, self.cfg.memory_size)
            _, _, logits, ps = loss_and_grads(self.params, self.cfg, b, need_grads=False)
            z = logits - logits.max(1, keepdims=True)
            e = np.exp(z.astype(np.float64))
            probs.append(e / e.sum(1, keepdims=True))
            M = enc.mem.shape[1]
            attn.append([np.pad(p.astype(np.float64), ((0, 0), (0, M - p.shape[1]))) for p in ps])
        return np.concatenate(probs), [np.concatenate([a[h] for a in attn]) for h in range(self.cfg.hops)]
