"""The adaptive softmax (charlm.lm.adaptive, charlm.kernels.adaptive) against a plain NumPy
reference of its equations, central finite differences, and its edge cases."""
import numpy as np
import pytest

from charlm.config import ModelConfig
from charlm.errors import CharlmError
from charlm.kernels import adaptive as ak
from charlm.lm.adaptive import AdaptiveSoftmax, tail_width

V, H, M = 30, 6, 10
CUTOFFS = (8, 15, 22)


def make(cutoffs=CUTOFFS, vocab=V, hidden=H, div_value=2.0):
    """The head; every layer split between threads whenever parts > 1 (these sizes are far below
    the size at which it would be otherwise), so parts=2 tests the threaded kernels."""
    cfg = ModelConfig(vocab_size=vocab, hidden=hidden, softmax="adaptive", cutoffs=cutoffs, div_value=div_value)
    head = AdaptiveSoftmax(cfg)
    head.parallel_min = 0
    return head


def params_for(head, rng, dtype, spread=0.5):
    """Parameters large enough that every gradient matters (the head bias non-zero too)."""
    return {name: np.ascontiguousarray(rng.uniform(-spread, spread, size=shape), dtype=dtype)
            for name, shape in head.param_shapes().items()}


def targets_for(rng, n, vocab=V, pad=(2, 7)):
    t = rng.integers(0, vocab, n)
    for m in pad:
        if m < n:
            t[m] = -1
    return t


# ------------------------------------------------------------------ the NumPy reference
def _lsm(x):
    x = x - x.max(axis=1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=1, keepdims=True))


def ref_log_probs(p, top, cutoffs, vocab):
    """ln P (M, V) of every token, in float64, straight from the equations."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    top = np.asarray(top, np.float64)
    bounds = tuple(cutoffs) + (vocab,)
    c0 = cutoffs[0]
    head = _lsm(top @ p["decoder.head.weight"].T + p["decoder.head.bias"])
    out = np.empty((top.shape[0], vocab))
    out[:, :c0] = head[:, :c0]
    for i in range(len(cutoffs)):
        z = top @ p[f"decoder.tail.{i}.0.weight"].T
        out[:, bounds[i]:bounds[i + 1]] = head[:, c0 + i:c0 + i + 1] + _lsm(z @ p[f"decoder.tail.{i}.1.weight"].T)
    return out


def ref_grads(p, top, targets, cutoffs, vocab, scale):
    """(loss, dtop, grads) of sum_m -ln P(target_m) over rows with target >= 0, times scale."""
    p = {k: np.asarray(v, np.float64) for k, v in p.items()}
    top = np.asarray(top, np.float64)
    bounds = tuple(cutoffs) + (vocab,)
    c0, K = cutoffs[0], len(cutoffs)
    valid = targets >= 0
    lp = ref_log_probs(p, top, cutoffs, vocab)
    loss = -sum(lp[m, targets[m]] for m in range(len(targets)) if valid[m])
    Wh = p["decoder.head.weight"]
    head = top @ Wh.T + p["decoder.head.bias"]
    dhead = np.exp(_lsm(head))
    grads = {}
    cluster = np.full(len(targets), -1)
    for m, t in enumerate(targets):
        if t < 0:
            dhead[m] = 0.0
            continue
        col = t if t < c0 else c0 + np.searchsorted(bounds, t, side="right") - 1
        if t >= c0:
            cluster[m] = col - c0
        dhead[m, col] -= 1.0
    dhead *= scale
    grads["decoder.head.weight"] = dhead.T @ top
    grads["decoder.head.bias"] = dhead.sum(axis=0)
    dtop = dhead @ Wh
    for i in range(K):
        W0, W1 = p[f"decoder.tail.{i}.0.weight"], p[f"decoder.tail.{i}.1.weight"]
        rows = np.flatnonzero(cluster == i)
        x = top[rows]
        z = x @ W0.T
        dl = np.exp(_lsm(z @ W1.T)) if len(rows) else np.zeros((0, W1.shape[0]))
        dl[np.arange(len(rows)), targets[rows] - bounds[i]] -= 1.0
        dl *= scale
        grads[f"decoder.tail.{i}.1.weight"] = dl.T @ z
        dz = dl @ W1
        grads[f"decoder.tail.{i}.0.weight"] = dz.T @ x
        dtop[rows] += dz @ W0
    return loss, dtop, grads


def run_backward(head, p, top, t, scale, parts, start=None):
    """loss_and_backward with grads pre-filled (to check they are ADDED) and dtop garbage."""
    start = start or {k: np.full_like(v, 0.25) for k, v in p.items()}
    grads = {k: v.copy() for k, v in start.items()}
    dtop = np.full_like(top, np.nan)
    loss = head.loss_and_backward(p, top, t, scale, dtop, grads, parts)
    return loss, dtop, {k: grads[k] - start[k] for k in grads}


# ------------------------------------------------------------------ layout
def test_param_shapes_follow_pytorch_layout():
    head = make()
    shapes = head.param_shapes()
    assert list(shapes) == ["decoder.head.weight", "decoder.head.bias",
                            "decoder.tail.0.0.weight", "decoder.tail.0.1.weight",
                            "decoder.tail.1.0.weight", "decoder.tail.1.1.weight",
                            "decoder.tail.2.0.weight", "decoder.tail.2.1.weight"]
    assert shapes["decoder.head.weight"] == (8 + 3, H)
    assert shapes["decoder.head.bias"] == (11,)
    # hsz = int(H // div ** (i + 1)) floored at 1: 6 // 2 = 3, 6 // 4 = 1, 6 // 8 = 0 -> 1
    assert [shapes[f"decoder.tail.{i}.0.weight"] for i in range(3)] == [(3, H), (1, H), (1, H)]
    assert [shapes[f"decoder.tail.{i}.1.weight"] for i in range(3)] == [(7, 3), (7, 1), (8, 1)]
    # PyTorch divides by the float power (not its integer part): 512 // 2.25 = 227, not 512 // 2
    assert tail_width(512, 1.5, 1) == 227 and tail_width(512, 4.0, 0) == 128 and tail_width(512, 4.0, 4) == 1


def test_init_params():
    head = make()
    p = head.init_params(np.random.default_rng(0), np.float32)
    for name, shape in head.param_shapes().items():
        assert p[name].shape == shape and p[name].dtype == np.float32 and p[name].flags.c_contiguous
    assert not p["decoder.head.bias"].any()
    w = np.concatenate([v.ravel() for k, v in p.items() if k != "decoder.head.bias"])
    assert np.abs(w).max() <= 0.1 and w.std() > 0.04


def test_bad_configurations_raise():
    with pytest.raises(CharlmError):
        make(cutoffs=())
    head = make()
    p = head.init_params(np.random.default_rng(0), np.float64)
    with pytest.raises(CharlmError):
        head.loss(p, np.zeros((2, H)), np.array([0, V]))


# ------------------------------------------------------------------ against the reference
@pytest.mark.parametrize("parts", [1, 2])
@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_matches_reference(dtype, rtol, parts):
    rng = np.random.default_rng(0)
    head = make()
    p = params_for(head, rng, dtype)
    top = rng.standard_normal((M, H)).astype(dtype)
    t = targets_for(rng, M)
    t[0], t[1] = 29, 22  # the last word; the first word of the last tail
    ref = ref_log_probs(p, top, CUTOFFS, V)
    lp = np.empty((M, V), dtype)
    head.log_probs(p, top, lp, parts)
    np.testing.assert_allclose(lp, ref, rtol=rtol, atol=rtol)
    g = np.empty(M)
    head.gather(p, top, t, g, parts)
    want = np.array([ref[m, t[m]] if t[m] >= 0 else 0.0 for m in range(M)])
    np.testing.assert_allclose(g, want, rtol=rtol, atol=rtol)
    assert g[2] == 0.0 and g[7] == 0.0
    scale = 0.7
    loss_ref, dtop_ref, grads_ref = ref_grads(p, top, t, CUTOFFS, V, scale)
    assert head.loss(p, top, t, parts) == pytest.approx(loss_ref, rel=rtol)
    loss, dtop, grads = run_backward(head, p, top, t, scale, parts)
    assert loss == pytest.approx(loss_ref, rel=rtol)
    atol = rtol * 0.1
    np.testing.assert_allclose(dtop, dtop_ref, rtol=rtol, atol=atol)
    assert not dtop[2].any() and not dtop[7].any()
    assert set(grads) == set(head.param_shapes())
    for name, want in grads_ref.items():
        np.testing.assert_allclose(grads[name], want, rtol=rtol, atol=atol, err_msg=name)


@pytest.mark.parametrize("dtype,rtol", [(np.float64, 1e-10), (np.float32, 1e-4)])
def test_matches_reference_wider(dtype, rtol):
    """Wider softmaxes (hundreds of columns per part, rows of several clusters) on two parts."""
    rng = np.random.default_rng(1)
    vocab, hidden, cutoffs = 700, 24, (50, 200, 450)
    head = make(cutoffs, vocab, hidden, 2.0)
    p = params_for(head, rng, dtype, 0.3)
    top = rng.standard_normal((61, hidden)).astype(dtype)
    t = targets_for(rng, 61, vocab, pad=(5, 60))
    loss_ref, dtop_ref, grads_ref = ref_grads(p, top, t, cutoffs, vocab, 1.0)
    loss, dtop, grads = run_backward(head, p, top, t, 1.0, 2)
    assert loss == pytest.approx(loss_ref, rel=rtol)
    scale = np.abs(dtop_ref).max()
    np.testing.assert_allclose(dtop, dtop_ref, rtol=rtol, atol=rtol * scale)
    for name, want in grads_ref.items():
        np.testing.assert_allclose(grads[name], want, rtol=rtol, atol=rtol * np.abs(want).max(), err_msg=name)
    lp = np.empty((61, vocab), np.float64)
    head.log_probs(p, top, lp, 2)
    np.testing.assert_allclose(lp, ref_log_probs(p, top, cutoffs, vocab), rtol=rtol, atol=rtol)


# ------------------------------------------------------------------ finite differences
@pytest.mark.parametrize("parts", [1, 2])
def test_finite_differences(parts):
    """Central differences of the float64 loss for every element of every parameter and of top."""
    rng = np.random.default_rng(2)
    head = make()
    p = params_for(head, rng, np.float64, 1.0)
    top = rng.standard_normal((M, H))
    t = targets_for(rng, M)
    t[:4] = [3, 10, 18, 25]  # one row in the head and in each tail at least
    scale = 1.3
    _, dtop, grads = run_backward(head, p, top, t, scale, parts)
    eps = 1e-5

    def numeric(arr):
        g = np.zeros(arr.shape)
        for idx in np.ndindex(arr.shape):
            old = arr[idx]
            arr[idx] = old + eps
            up = head.loss(p, top, t, parts)
            arr[idx] = old - eps
            down = head.loss(p, top, t, parts)
            arr[idx] = old
            g[idx] = scale * (up - down) / (2 * eps)
        return g

    for name in head.param_shapes():
        num = numeric(p[name])
        err = np.abs(num - grads[name]).max() / max(np.abs(num).max(), 1e-8)
        assert np.abs(num).max() > 1e-3, name  # the check sees something
        assert err < 1e-6, (name, err)
    num = numeric(top)
    assert np.abs(num - dtop).max() / np.abs(num).max() < 1e-6
    assert t[7] == -1 and not num[7].any() and not dtop[7].any()


# ------------------------------------------------------------------ consistency
@pytest.mark.parametrize("parts", [1, 2])
def test_float32_distribution_sums_to_one(parts):
    rng = np.random.default_rng(3)
    head = make()
    p = params_for(head, rng, np.float32, 2.0)  # peaked distributions too
    top = rng.standard_normal((M, H)).astype(np.float32)
    t = targets_for(rng, M)
    lp = np.empty((M, V), np.float32)
    head.log_probs(p, top, lp, parts)
    sums = np.exp(lp.astype(np.float64)).sum(axis=1)
    assert np.abs(sums - 1.0).max() < 1e-6
    g = np.empty(M)
    head.gather(p, top, t, g, parts)
    for m in range(M):
        assert g[m] == (0.0 if t[m] < 0 else pytest.approx(lp[m, t[m]], abs=2e-6))
    loss = head.loss(p, top, t, parts)
    assert loss == -g.sum()
    assert head.loss_and_backward(p, top, t, 1.0, np.empty_like(top), {k: np.zeros_like(v) for k, v in p.items()},
                                  parts) == loss
    lp64 = np.empty((M, V))
    head.log_probs(p, top, lp64, parts)  # a float64 output of a float32 model
    np.testing.assert_allclose(lp64, lp, atol=2e-6)
    assert np.abs(np.exp(lp64).sum(axis=1) - 1.0).max() < 1e-6


def test_cluster_sort():
    cuts = np.array([8, 15, 22, 30], np.int64)
    targets = np.array([25, 3, -1, 9, 29, 14, 0, 8], np.int64)
    hcol, order, tloc = (np.full(8, -7, np.int64) for _ in range(3))
    starts = np.zeros(4, np.int64)
    assert ak.cluster_sort(hcol, order, tloc, starts, targets, cuts) == 5
    assert hcol.tolist() == [10, 3, -1, 8, 10, 8, 0, 8]
    assert starts.tolist() == [0, 3, 3, 5]
    assert order[:5].tolist() == [3, 5, 7, 0, 4]
    assert tloc[:5].tolist() == [1, 6, 0, 3, 7]


# ------------------------------------------------------------------ edge cases
EDGES = {
    "one cluster": dict(cutoffs=(8,)),
    "one-word last cluster": dict(cutoffs=(8, 15, 29)),
    "hsz 1 everywhere": dict(cutoffs=(8, 15, 22), div_value=100.0),
    "shortlist of one": dict(cutoffs=(1, 2)),
}


@pytest.mark.parametrize("case", list(EDGES))
def test_edge_layouts(case):
    kw = EDGES[case]
    rng = np.random.default_rng(4)
    head = make(kw["cutoffs"], div_value=kw.get("div_value", 2.0))
    if case == "hsz 1 everywhere":
        assert all(head.param_shapes()[f"decoder.tail.{i}.0.weight"] == (1, H) for i in range(3))
    p = params_for(head, rng, np.float64)
    top = rng.standard_normal((M, H))
    t = targets_for(rng, M)
    t[0], t[1] = V - 1, kw["cutoffs"][-1]
    loss_ref, dtop_ref, grads_ref = ref_grads(p, top, t, kw["cutoffs"], V, 1.0)
    for parts in (1, 2):
        loss, dtop, grads = run_backward(head, p, top, t, 1.0, parts)
        assert loss == pytest.approx(loss_ref, rel=1e-10)
        np.testing.assert_allclose(dtop, dtop_ref, rtol=1e-10, atol=1e-12)
        for name, want in grads_ref.items():
            np.testing.assert_allclose(grads[name], want, rtol=1e-10, atol=1e-12, err_msg=name)
        lp = np.empty((M, V))
        head.log_probs(p, top, lp, parts)
        np.testing.assert_allclose(lp, ref_log_probs(p, top, kw["cutoffs"], V), rtol=1e-10, atol=1e-12)


def test_cluster_absent_from_batch():
    rng = np.random.default_rng(5)
    head = make()
    p = params_for(head, rng, np.float64)
    top = rng.standard_normal((M, H))
    t = np.array([0, 3, -1, 9, 23, 29, 7, -1, 14, 1])  # nothing in tail 1 ([15, 22))
    loss_ref, dtop_ref, grads_ref = ref_grads(p, top, t, CUTOFFS, V, 1.0)
    loss, dtop, grads = run_backward(head, p, top, t, 1.0, 2)
    assert loss == pytest.approx(loss_ref, rel=1e-10)
    np.testing.assert_allclose(dtop, dtop_ref, rtol=1e-10, atol=1e-12)
    for name, want in grads_ref.items():
        np.testing.assert_allclose(grads[name], want, rtol=1e-10, atol=1e-12, err_msg=name)
    assert not grads["decoder.tail.1.0.weight"].any() and not grads["decoder.tail.1.1.weight"].any()


@pytest.mark.parametrize("parts", [1, 2])
def test_all_padding(parts):
    rng = np.random.default_rng(6)
    head = make()
    p = params_for(head, rng, np.float64)
    top = rng.standard_normal((M, H))
    t = np.full(M, -1)
    loss, dtop, grads = run_backward(head, p, top, t, 1.0, parts)
    assert loss == 0.0 and head.loss(p, top, t, parts) == 0.0
    assert not dtop.any()
    assert all(not g.any() for g in grads.values())
    g = np.full(M, 5.0)
    head.gather(p, top, t, g, parts)
    assert not g.any()


def test_no_rows_and_no_dtop():
    rng = np.random.default_rng(7)
    head = make()
    p = params_for(head, rng, np.float64)
    assert head.loss(p, np.zeros((0, H)), np.zeros(0, np.int32)) == 0.0
    top = rng.standard_normal((M, H))
    t = targets_for(rng, M).astype(np.int32)  # any int dtype
    _, dtop_ref, grads_ref = ref_grads(p, top, t, CUTOFFS, V, 1.0)
    grads = {k: np.zeros_like(v) for k, v in p.items()}
    head.loss_and_backward(p, top, t, 1.0, np.zeros((0, 0)), grads, 2)  # dtop not wanted
    for name, want in grads_ref.items():
        np.testing.assert_allclose(grads[name], want, rtol=1e-10, atol=1e-12, err_msg=name)
