"""Numba kernels against the plain NumPy reference in tests/reference.py.

Sizes are small and pairwise distinct (N, T, D, H, V = 2, 3, 4, 5, 7) so that a
transposed axis cannot pass by accident; gradient checks run in float64.
"""
import numpy as np
import pytest

from charlm.config import ModelConfig
from charlm.kernels import fastmath, gru, layers, lstm, parallel, rnn, sample
from charlm.lm.model import param_shapes
from tests import reference as ref
from tests.gradcheck import numeric_grad, rel_err

N, T, D, H, V = 2, 3, 4, 5, 7
CELLS = ("rnn", "gru", "lstm")
GATES = {"rnn": 1, "gru": 3, "lstm": 4}
KERNELS = {
    "rnn": (rnn.rnn_step_forward, rnn.rnn_forward, rnn.rnn_backward),
    "gru": (gru.gru_step_forward, gru.gru_forward, gru.gru_backward),
    "lstm": (lstm.lstm_step_forward, lstm.lstm_forward, lstm.lstm_backward),
}
PARAM_NAMES = ("Wih", "Whh", "bih", "bhh")


# ------------------------------------------------------------------ helpers
def acts_width(cell):
    return 4 * H if cell == "gru" else GATES[cell] * H


def make_inputs(cell, rng, dtype=np.float64, T=T):
    """Random inputs, nonzero initial state and parameters of one layer."""
    GH = GATES[cell] * H
    d = {
        "x": rng.standard_normal((T, N, D)),
        "h0": 0.5 * rng.standard_normal((N, H)),
        "c0": 0.5 * rng.standard_normal((N, H)),
        "Wih": 0.5 * rng.standard_normal((GH, D)),
        "Whh": 0.5 * rng.standard_normal((GH, H)),
        "bih": 0.5 * rng.standard_normal(GH),
        "bhh": 0.5 * rng.standard_normal(GH),
    }
    return {k: np.ascontiguousarray(v, dtype=dtype) for k, v in d.items()}


def run_forward(cell, x, h0, c0, Wih, Whh, bih, bhh):
    """Kernel forward pass; returns hs, cs (T+1, N, H) and acts."""
    Tx, Nx, _ = x.shape
    dt = x.dtype
    hs = np.zeros((Tx + 1, Nx, H), dt)
    hs[0] = h0
    if cell == "lstm":
        cs = np.zeros((Tx + 1, Nx, H), dt)
        cs[0] = c0
    else:
        cs = np.zeros((1, 1, 1), dt)  # unused by rnn / gru (as the model passes it)
    acts = np.zeros((Tx, Nx, acts_width(cell)), dt)
    KERNELS[cell][1](hs, cs, acts, x, Wih, Whh, bih, bhh)
    return hs, cs, acts


def zero_grads(cell, dtype, T=T, with_dx=True):
    GH = GATES[cell] * H
    return {
        "x": np.zeros((T, N, D) if with_dx else (0, 0, 0), dtype),
        "Wih": np.zeros((GH, D), dtype),
        "Whh": np.zeros((GH, H), dtype),
        "bih": np.zeros(GH, dtype),
        "bhh": np.zeros(GH, dtype),
        "h0": np.zeros((N, H), dtype),
        "c0": np.zeros((N, H), dtype),
    }


def run_backward(cell, grads, dhs, hs, cs, acts, x, Wih, Whh):
    """Kernel backward pass, adding into grads (a dict as made by zero_grads)."""
    GH = GATES[cell] * H
    dt = x.dtype
    dacts = np.zeros((x.shape[0], x.shape[1], GH), dt)
    dacts_h = np.zeros((x.shape[0], x.shape[1], GH), dt)
    KERNELS[cell][2](grads["x"], grads["Wih"], grads["Whh"], grads["bih"], grads["bhh"],
                     grads["h0"], grads["c0"], dacts, dacts_h, dhs, hs, cs, acts, x, Wih, Whh)
    return grads


def forward_args(inp):
    return (inp["x"], inp["h0"], inp["c0"], inp["Wih"], inp["Whh"], inp["bih"], inp["bhh"])


def ref_sequence(cell, inp):
    return ref.sequence(cell, *forward_args(inp))


# ------------------------------------------------------------------ cell forward
@pytest.mark.parametrize("cell", CELLS)
def test_forward_matches_reference(cell, rng):
    inp = make_inputs(cell, rng)
    hs, cs, _ = run_forward(cell, *forward_args(inp))
    hs_ref, cs_ref = ref_sequence(cell, inp)
    assert np.all(hs_ref[0] != 0)
    np.testing.assert_allclose(hs, hs_ref, rtol=1e-12, atol=1e-12)
    if cell == "lstm":
        np.testing.assert_allclose(cs, cs_ref, rtol=1e-12, atol=1e-12)


def test_reference_sequence_helpers_agree(rng):
    """The per-cell sequence helpers of the reference are the generic one."""
    for cell, fn in (("rnn", ref.rnn_sequence), ("gru", ref.gru_sequence)):
        inp = make_inputs(cell, rng)
        hs = fn(inp["x"], inp["h0"], inp["Wih"], inp["Whh"], inp["bih"], inp["bhh"])
        np.testing.assert_array_equal(hs, ref_sequence(cell, inp)[0])
    inp = make_inputs("lstm", rng)
    hs, cs = ref.lstm_sequence(*forward_args(inp))
    hs2, cs2 = ref_sequence("lstm", inp)
    np.testing.assert_array_equal(hs, hs2)
    np.testing.assert_array_equal(cs, cs2)


def test_reference_gate_orders():
    """Pin the reference's gate layout with hand-made parameters (so the kernels
    cannot agree with a reference that has the same wrong order)."""
    h = np.full((1, 1), 0.5)
    c = np.full((1, 1), 0.25)
    x = np.zeros((1, 1))
    W0 = np.zeros((4, 1))
    big = 50.0  # sigmoid(big) = 1, sigmoid(-big) = 0
    # LSTM [i, f, g, o]: i = 0, f = 1, o = 1 -> c' = c, h' = tanh(c)
    b = np.array([-big, big, 0.3, big])
    h1, c1 = ref.lstm_step(x, h, c, W0, np.zeros((4, 1)), b, np.zeros(4))
    assert c1[0, 0] == pytest.approx(0.25) and h1[0, 0] == pytest.approx(np.tanh(0.25))
    # i = 1, f = 0, g = tanh(0.3), o = 1 -> c' = tanh(0.3)
    b = np.array([big, -big, 0.3, big])
    h1, c1 = ref.lstm_step(x, h, c, W0, np.zeros((4, 1)), b, np.zeros(4))
    assert c1[0, 0] == pytest.approx(np.tanh(0.3))
    # GRU [r, z, n]: z = 1 copies h; z = 0, r = 0 gives n = tanh(b_in)
    b = np.array([0.0, big, 0.7])
    assert ref.gru_step(x[:, :1], h, c, np.zeros((3, 1)), np.zeros((3, 1)), b, np.zeros(3))[0][0, 0] \
        == pytest.approx(0.5)
    Whh = np.array([[0.0], [0.0], [2.0]])  # W_hn h = 1.0 only reaches n through r
    b_ih = np.array([-big, -big, 0.7])
    assert ref.gru_step(x, h, c, np.zeros((3, 1)), Whh, b_ih, np.zeros(3))[0][0, 0] \
        == pytest.approx(np.tanh(0.7))
    b_ih = np.array([big, -big, 0.7])
    b_hh = np.array([0.0, 0.0, 0.1])  # n = tanh(0.7 + 1 * (1.0 + 0.1))
    assert ref.gru_step(x, h, c, np.zeros((3, 1)), Whh, b_ih, b_hh)[0][0, 0] \
        == pytest.approx(np.tanh(1.8))


@pytest.mark.parametrize("cell", CELLS)
def test_chained_steps_equal_forward(cell, rng):
    inp = make_inputs(cell, rng)
    hs, cs, acts = run_forward(cell, *forward_args(inp))
    step = KERNELS[cell][0]
    h, c = inp["h0"].copy(), inp["c0"].copy()
    for t in range(T):
        hout = np.zeros((N, H))
        cout = np.zeros((N, H))
        act = np.zeros((N, acts_width(cell)))
        step(hout, cout, act, inp["x"][t], h, c, inp["Wih"], inp["Whh"], inp["bih"], inp["bhh"])
        np.testing.assert_allclose(hout, hs[t + 1], rtol=1e-12, atol=1e-13)
        # the single-step reference too, step by step
        h_ref, c_ref = ref.step(cell, inp["x"][t], h, c, inp["Wih"], inp["Whh"], inp["bih"], inp["bhh"])
        np.testing.assert_allclose(hout, h_ref, rtol=1e-12, atol=1e-13)
        if cell == "lstm":
            np.testing.assert_allclose(cout, cs[t + 1], rtol=1e-12, atol=1e-13)
            np.testing.assert_allclose(act, acts[t], rtol=1e-12, atol=1e-13)
            c = cout
        if cell == "gru":
            np.testing.assert_allclose(act, acts[t], rtol=1e-12, atol=1e-13)
        h = hout


@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_split_and_carry_equals_whole(cell, k, rng):
    """Truncated-BPTT continuity: [0:k] then [k:T] with the carried state equals [0:T]."""
    inp = make_inputs(cell, rng)
    x, h0, c0, *w = forward_args(inp)
    hs, cs, _ = run_forward(cell, x, h0, c0, *w)
    hs1, cs1, _ = run_forward(cell, np.ascontiguousarray(x[:k]), h0, c0, *w)
    c_carry = cs1[-1] if cell == "lstm" else c0
    hs2, cs2, _ = run_forward(cell, np.ascontiguousarray(x[k:]), hs1[-1], c_carry, *w)
    np.testing.assert_allclose(np.concatenate([hs1, hs2[1:]]), hs, rtol=1e-13, atol=1e-14)
    if cell == "lstm":
        np.testing.assert_allclose(np.concatenate([cs1, cs2[1:]]), cs, rtol=1e-13, atol=1e-14)


# ------------------------------------------------------------------ cell backward
def _grad_cases():
    for cell in CELLS:
        for name in ("x", "h0") + (("c0",) if cell == "lstm" else ()) + PARAM_NAMES:
            yield cell, name


@pytest.mark.parametrize("cell,name", list(_grad_cases()))
def test_backward_matches_finite_differences(cell, name, rng):
    inp = make_inputs(cell, rng)
    dout = rng.standard_normal((T, N, H))

    def objective():
        hs, _, _ = run_forward(cell, *forward_args(inp))
        return float(np.sum(hs[1:] * dout))

    hs, cs, acts = run_forward(cell, *forward_args(inp))
    grads = run_backward(cell, zero_grads(cell, np.float64), dout.copy(), hs, cs, acts,
                         inp["x"], inp["Wih"], inp["Whh"])
    num = numeric_grad(objective, inp[name])
    assert np.max(np.abs(num)) > 1e-3  # the check is not vacuous
    assert rel_err(grads[name], num) < 1e-6, (cell, name, rel_err(grads[name], num))


@pytest.mark.parametrize("cell", CELLS)
def test_backward_adds_into_outputs(cell, rng):
    inp = make_inputs(cell, rng)
    dout = rng.standard_normal((T, N, H))
    hs, cs, acts = run_forward(cell, *forward_args(inp))
    saved = [a.copy() for a in (dout, hs, cs, acts, inp["x"], inp["Wih"], inp["Whh"])]
    once = run_backward(cell, zero_grads(cell, np.float64), dout, hs, cs, acts,
                        inp["x"], inp["Wih"], inp["Whh"])
    # the backward pass must not touch its inputs (the model reuses them)
    for before, after in zip(saved, (dout, hs, cs, acts, inp["x"], inp["Wih"], inp["Whh"])):
        np.testing.assert_array_equal(before, after)
    twice = zero_grads(cell, np.float64)
    for _ in range(2):
        run_backward(cell, twice, dout, hs, cs, acts, inp["x"], inp["Wih"], inp["Whh"])
    start = {k: rng.standard_normal(v.shape) for k, v in once.items()}
    offset = run_backward(cell, {k: v.copy() for k, v in start.items()}, dout, hs, cs, acts,
                          inp["x"], inp["Wih"], inp["Whh"])
    names = ["x", "h0", "Wih", "Whh", "bih", "bhh"] + (["c0"] if cell == "lstm" else [])
    for k in names:
        assert np.any(once[k] != 0), k
        np.testing.assert_allclose(twice[k], 2 * once[k], rtol=1e-12, atol=1e-14, err_msg=k)
        np.testing.assert_allclose(offset[k], start[k] + once[k], rtol=1e-12, atol=1e-14, err_msg=k)
    if cell != "lstm":  # dc0 is documented as untouched
        np.testing.assert_array_equal(once["c0"], 0)
        np.testing.assert_array_equal(offset["c0"], start["c0"])


@pytest.mark.parametrize("cell", CELLS)
def test_backward_without_dx(cell, rng):
    """dx of shape (0, 0, 0) skips the input gradient and changes nothing else."""
    inp = make_inputs(cell, rng)
    dout = rng.standard_normal((T, N, H))
    hs, cs, acts = run_forward(cell, *forward_args(inp))
    full = run_backward(cell, zero_grads(cell, np.float64), dout, hs, cs, acts,
                        inp["x"], inp["Wih"], inp["Whh"])
    skip = run_backward(cell, zero_grads(cell, np.float64, with_dx=False), dout, hs, cs, acts,
                        inp["x"], inp["Wih"], inp["Whh"])
    for k in ("Wih", "Whh", "bih", "bhh", "h0", "c0"):
        np.testing.assert_array_equal(skip[k], full[k], err_msg=k)


@pytest.mark.parametrize("cell", CELLS)
def test_float32_agrees_with_float64(cell, rng):
    inp64 = make_inputs(cell, rng)
    inp32 = {k: v.astype(np.float32) for k, v in inp64.items()}
    dout = rng.standard_normal((T, N, H))
    hs64, cs64, acts64 = run_forward(cell, *forward_args(inp64))
    hs32, cs32, acts32 = run_forward(cell, *forward_args(inp32))
    assert hs32.dtype == np.float32
    np.testing.assert_allclose(hs32, hs64, rtol=0, atol=1e-5)
    if cell == "lstm":
        np.testing.assert_allclose(cs32, cs64, rtol=0, atol=1e-5)
    g64 = run_backward(cell, zero_grads(cell, np.float64), dout, hs64, cs64, acts64,
                       inp64["x"], inp64["Wih"], inp64["Whh"])
    g32 = run_backward(cell, zero_grads(cell, np.float32), dout.astype(np.float32), hs32, cs32,
                       acts32, inp32["x"], inp32["Wih"], inp32["Whh"])
    for k in g64:
        assert g32[k].dtype == np.float32
        assert rel_err(g32[k], g64[k]) < 1e-5, k


# ------------------------------------------------------------------ common: fast activations
def test_fast_tanh_and_sigmoid_error_is_bounded():
    """float32 kernels use a rational tanh (and sigmoid = 0.5 + 0.5 tanh(x/2));
    bound its error against the exact functions, over and beyond the clamp at |x| = 9."""
    half = np.linspace(0.0, 20.0, 100001)
    x = np.concatenate([-half[::-1], half])  # exactly symmetric grid
    for dtype, tol_tanh, tol_sig in ((np.float32, 3.5e-7, 2.0e-7), (np.float64, 1e-15, 1e-15)):
        xs = x.astype(dtype)
        exact = np.tanh(xs.astype(np.float64))
        th = np.empty_like(xs)
        fastmath.tanh_kernel(th, xs)
        assert np.max(np.abs(th - exact)) < tol_tanh, dtype
        assert np.max(np.abs(th)) <= 1.0
        np.testing.assert_array_equal(th, -th[::-1])  # odd
        sg = np.empty_like(xs)
        fastmath.sigmoid_kernel(sg, xs)
        assert np.max(np.abs(sg - 1.0 / (1.0 + np.exp(-xs.astype(np.float64))))) < tol_sig, dtype
        assert sg.min() >= 0.0 and sg.max() <= 1.0
        special = np.array([np.inf, -np.inf, 0.0, np.nan], dtype)
        out = np.empty_like(special)
        fastmath.tanh_kernel(out, special)
        np.testing.assert_array_equal(out[:3], [1.0, -1.0, 0.0])
        assert np.isnan(out[3])  # a diverging run must stay visible, not be clamped
        fastmath.sigmoid_kernel(out, special)
        np.testing.assert_array_equal(out[:3], [1.0, 0.0, 0.5])
        assert np.isnan(out[3])
    # the pure-Python form of the approximation (used in float64 arithmetic)
    grid = np.linspace(-12.0, 12.0, 4001)
    approx = np.array([fastmath.tanh_rational(float(v)) for v in grid])
    assert np.max(np.abs(approx - np.tanh(grid))) < 2.5e-8


def test_fast_exp_error_is_bounded():
    """float32 softmax rows use a vectorisable exp (exact np.exp on float64)."""
    x = np.concatenate([np.linspace(-87.0, 0.0, 1_000_001), [-0.0, -1e-30, -86.99]])
    for dtype, tol in ((np.float32, 2.6e-7), (np.float64, 1e-15)):
        xs = x.astype(dtype)
        out = np.empty_like(xs)
        total = fastmath.exp_shifted_kernel(out, xs, dtype(0.0))
        exact = np.exp(xs.astype(np.float64))
        assert np.max(np.abs(out - exact) / exact) < tol, dtype
        assert total == pytest.approx(exact.sum(), rel=1e-6)
        # the shift: exp(x - mx), with mx >= max(x)
        row = np.array([3.0, 1.5, -2.0], dtype)
        shifted = np.empty_like(row)
        fastmath.exp_shifted_kernel(shifted, row, dtype(3.0))
        np.testing.assert_allclose(shifted, np.exp(row.astype(np.float64) - 3.0), rtol=tol)
    out = np.empty(5, np.float32)
    fastmath.exp_shifted_kernel(out, np.array([-1e4, -np.inf, -88.0, np.nan, 0.0], np.float32), np.float32(0.0))
    assert (out[:3] >= 0).all() and (out[:3] < 2e-38).all()  # far below: (almost) zero, never negative
    assert np.isnan(out[3])  # a diverging model must stay visible (the loss's NaN guard)
    assert out[4] == 1.0


# ------------------------------------------------------------------ common: linear, embedding
def test_linear_forward_and_backward(rng):
    M, Din, K = 6, 4, 7
    x = rng.standard_normal((M, Din))
    W = rng.standard_normal((K, Din))
    b = rng.standard_normal(K)
    dout = rng.standard_normal((M, K))
    out = np.full((M, K), np.nan)
    layers.linear_forward(out, x, W, b)
    np.testing.assert_allclose(out, x @ W.T + b, rtol=1e-13, atol=1e-13)

    def objective():
        o = np.empty((M, K))
        layers.linear_forward(o, x, W, b)
        return float(np.sum(o * dout))

    dx, dW, db = np.zeros_like(x), np.zeros_like(W), np.zeros_like(b)
    layers.linear_backward(dx, dW, db, dout, x, W)
    for name, a, g in (("x", x, dx), ("W", W, dW), ("b", b, db)):
        assert rel_err(g, numeric_grad(objective, a)) < 1e-6, name
    # ADDS into its outputs; dx of shape (0, 0) is skipped
    dx2, dW2, db2 = dx.copy(), dW.copy(), db.copy()
    layers.linear_backward(dx2, dW2, db2, dout, x, W)
    np.testing.assert_allclose(dx2, 2 * dx, rtol=1e-13)
    np.testing.assert_allclose(dW2, 2 * dW, rtol=1e-13)
    np.testing.assert_allclose(db2, 2 * db, rtol=1e-13)
    dW3, db3 = np.zeros_like(W), np.zeros_like(b)
    layers.linear_backward(np.zeros((0, 0)), dW3, db3, dout, x, W)
    np.testing.assert_array_equal(dW3, dW)
    np.testing.assert_array_equal(db3, db)


def test_embedding_forward_and_backward(rng):
    M, E = 9, 4
    table = rng.standard_normal((V, E))
    ids = rng.integers(0, V, M)
    ids[:3] = [2, 5, 2]  # a repeated id must accumulate
    out = np.full((M, E), np.nan)
    layers.embedding_forward(out, ids, table)
    np.testing.assert_array_equal(out, table[ids])
    dout = rng.standard_normal((M, E))
    start = rng.standard_normal((V, E))
    dtable = start.copy()
    layers.embedding_backward(dtable, dout, ids)
    expected = start.copy()
    np.add.at(expected, ids, dout)
    np.testing.assert_allclose(dtable, expected, rtol=1e-14, atol=1e-14)

    def objective():
        o = np.empty((M, E))
        layers.embedding_forward(o, ids, table)
        return float(np.sum(o * dout))

    assert rel_err(dtable - start, numeric_grad(objective, table)) < 1e-6


# ------------------------------------------------------------------ common: softmax cross-entropy
@pytest.mark.parametrize("scale", [1.0, 1e3])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_softmax_xent_forward(scale, dtype, rng):
    M = 6
    logits = (scale * rng.standard_normal((M, V))).astype(dtype)
    targets = rng.integers(0, V, M)
    lp = ref.log_softmax(logits.astype(np.float64))
    expected = -np.sum(lp[np.arange(M), targets])
    probs = np.full((M, V), np.nan, dtype)
    total = layers.softmax_xent_forward(probs, logits, targets)
    assert np.isfinite(total)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert total == pytest.approx(expected, rel=tol, abs=tol)
    np.testing.assert_allclose(probs, np.exp(lp), rtol=tol, atol=tol)
    # in place: probs is the logits array
    inplace = logits.copy()
    total2 = layers.softmax_xent_forward(inplace, inplace, targets)
    assert total2 == pytest.approx(expected, rel=tol, abs=tol)
    np.testing.assert_allclose(inplace, np.exp(lp), rtol=tol, atol=tol)


def test_softmax_xent_forward_skips_negative_targets(rng):
    M = 6
    logits = rng.standard_normal((M, V))
    targets = rng.integers(0, V, M)
    targets[[1, 4]] = -1
    lp = ref.log_softmax(logits)
    keep = targets >= 0
    expected = -np.sum(lp[np.arange(M)[keep], targets[keep]])
    probs = np.full((M, V), np.nan)
    total = layers.softmax_xent_forward(probs, logits, targets)
    assert total == pytest.approx(expected, rel=1e-12)
    np.testing.assert_allclose(probs, np.exp(lp), rtol=1e-12)  # every row still has probs


@pytest.mark.parametrize("inplace", [False, True])
def test_softmax_xent_backward_matches_finite_differences(inplace, rng):
    M, scale = 6, 1.0 / 6
    logits = 2.0 * rng.standard_normal((M, V))
    targets = rng.integers(0, V, M)
    targets[3] = -1

    def objective():
        return scale * layers.softmax_xent_forward(np.empty((M, V)), logits, targets)

    probs = np.empty((M, V))
    layers.softmax_xent_forward(probs, logits, targets)
    if inplace:
        dlogits = probs
    else:
        dlogits = np.full((M, V), 123.0)  # overwritten, not added to
    layers.softmax_xent_backward(dlogits, probs, targets, scale)
    num = numeric_grad(objective, logits)
    assert rel_err(dlogits, num) < 1e-6
    np.testing.assert_array_equal(dlogits[3], 0.0)
    # each row with a target sums to zero (probabilities minus one-hot)
    np.testing.assert_allclose(dlogits.sum(axis=1), 0.0, atol=1e-15)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_log_softmax_gather(dtype, rng):
    M = 6
    logits = (3.0 * rng.standard_normal((M, V))).astype(dtype)
    logits[0] *= 500.0  # large logits: no overflow
    targets = rng.integers(0, V, M)
    out = np.full(M, np.nan)
    layers.log_softmax_gather(out, logits, targets)
    expected = ref.log_softmax(logits.astype(np.float64))[np.arange(M), targets]
    np.testing.assert_allclose(out, expected, rtol=1e-12, atol=1e-12)
    # consistent with the cross-entropy sum
    total = layers.softmax_xent_forward(np.empty((M, V), dtype), logits, targets)
    assert -out.sum() == pytest.approx(total, rel=1e-6 if dtype == np.float32 else 1e-12)


# ------------------------------------------------------------------ common: draw_token
def draw(logits, temperature=1.0, top_k=0, greedy=False, u=0.5):
    return layers.draw_token(logits, temperature, top_k, 1.0, greedy, u, np.empty(logits.shape[0]))


def test_draw_token_greedy_and_top1_are_argmax(rng):
    for _ in range(10):
        logits = rng.standard_normal(V)
        best = int(np.argmax(logits))
        for u in (0.0, 0.3, 0.999999):
            assert draw(logits, greedy=True, u=u) == best
            assert draw(logits, top_k=1, u=u) == best
            assert draw(logits.astype(np.float32), top_k=1, u=u) == best
        # temperature -> 0 concentrates all the mass on the argmax (u = 0 exactly would
        # still pick the first token of nonzero mass, e.g. exp(-200), by design)
        for u in (1e-6, 0.3, 0.999999):
            assert draw(logits, temperature=1e-4, u=u) == best


def test_draw_token_extreme_uniforms_pick_first_and_last_allowed_tokens():
    logits = np.array([-np.inf, -np.inf, 0.3, 2.0, -1.0, 0.5, -np.inf])
    assert draw(logits, u=0.0) == 2
    assert draw(logits, u=1e-12) == 2
    assert draw(logits, u=1.0 - 1e-12) == 5
    # top_k = 2 keeps ids 3 and 5: u = 0 picks the first of them
    finite = np.array([0.1, -0.4, 0.3, 2.0, -1.0, 0.5, 0.2])
    assert draw(finite, u=0.0) == 0
    assert draw(finite, top_k=2, u=0.0) == 3
    assert draw(finite, top_k=2, u=1.0 - 1e-12) == 5
    assert draw(finite, top_k=3, u=0.0) == 2


@pytest.mark.parametrize("temperature,top_k", [(1.0, 0), (0.5, 0), (2.0, 0), (1.0, 3), (0.7, V)])
def test_draw_token_empirical_distribution(temperature, top_k, rng):
    logits = 1.5 * rng.standard_normal(V)
    n = 4000
    uniforms = (np.arange(n) + 0.5) / n  # stratified: each bin's count is off by at most 1
    counts = np.bincount([draw(logits, temperature, top_k, False, u) for u in uniforms], minlength=V)
    scaled = logits / temperature
    if 0 < top_k < V:
        kth = np.sort(logits)[V - top_k]
        scaled = np.where(logits >= kth, scaled, -np.inf)
    expected = ref.softmax(scaled)
    assert np.all(expected > 0) or top_k > 0
    np.testing.assert_allclose(counts / n, expected, rtol=0, atol=1.5 / n)


@pytest.mark.parametrize("n", [0, 1, 2, 3, 8, 65, 1000])
def test_sort_inplace_matches_numpy_sort(n, rng):
    for a in (rng.standard_normal(n), np.round(3 * rng.standard_normal(n)), np.zeros(n),
              np.arange(n, dtype=np.float64), np.arange(n, 0, -1, dtype=np.float64)):
        b = a.copy()
        layers.sort_inplace(b)
        np.testing.assert_array_equal(b, np.sort(a))


# ------------------------------------------------------------------ sample.stack_sample
E_S = 4  # embedding width in the sampling tests (= D)


def stack_params(cell, L, rng, scale=0.8):
    cfg = ModelConfig(cell=cell, vocab_size=V, embed=E_S, hidden=H, layers=L)
    return {name: scale * rng.standard_normal(shape) for name, shape in param_shapes(cfg).items()}


def stack_arrays(cell, params, L, dtype=np.float64):
    """The argument layout of stack_sample, built from model-named parameters."""
    return sample.pack(params, L, dtype)


def run_sample(cell, arrays, h, c, prime, uniforms, K, temperature=1.0, top_k=0, greedy=False):
    out = np.full(K, -1, dtype=np.int64)
    sample.stack_sample(out, np.empty(K), h, c, np.zeros(V, np.uint8), np.asarray(prime, dtype=np.int64),
                        np.asarray(uniforms, np.float64), sample.CELL_CODES[cell], *arrays, temperature, top_k, 1.0,
                        1.0, greedy)
    return out


def initial_state(cell, L, rng):
    h = 0.5 * rng.standard_normal((L, 1, H))
    c = 0.5 * rng.standard_normal((L, 1, H)) if cell == "lstm" else np.zeros((L, 1, H))
    return h, c


@pytest.mark.parametrize("L", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_stack_sample_greedy_matches_reference(cell, L, rng):
    params = stack_params(cell, L, rng)
    arrays = stack_arrays(cell, params, L)
    h0, c0 = initial_state(cell, L, rng)
    prime, K = [3, 0, 6], 12
    h, c = h0.copy(), c0.copy()
    out = run_sample(cell, arrays, h, c, prime, np.full(K, 0.5), K, greedy=True)
    ids, h_ref, c_ref = ref.generate(cell, params, prime, K, h0, c0, greedy=True)
    np.testing.assert_array_equal(out, ids)
    np.testing.assert_allclose(h, h_ref, rtol=1e-12, atol=1e-13)
    if cell == "lstm":
        np.testing.assert_allclose(c, c_ref, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("L", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_stack_sample_draws_match_reference(cell, L, rng):
    params = stack_params(cell, L, rng, scale=0.5)
    arrays = stack_arrays(cell, params, L)
    h0, c0 = initial_state(cell, L, rng)
    prime, K = [1, 4], 15
    uniforms = rng.random(K)
    out = run_sample(cell, arrays, h0.copy(), c0.copy(), prime, uniforms, K, temperature=0.9)
    ids, _, _ = ref.generate(cell, params, prime, K, h0, c0, greedy=False, temperature=0.9,
                             uniforms=uniforms)
    np.testing.assert_array_equal(out, ids)
    assert len(set(out.tolist())) > 1  # a real draw, not a constant


@pytest.mark.parametrize("dtype", [np.float64, np.float32, "bf16"])
def test_batch1_products_match_numpy_for_every_row_count(dtype, rng):
    """The sampler's products take weight rows four at a time with a remainder of 0-3 and, for the
    output layer, a window [v0, v1) of the columns: each against NumPy (bf16: on the widened weights)."""
    for D in (1, 2, 3, 4, 5, 7, 8, 13):
        K = 37
        W = rng.standard_normal((D, K))
        x = rng.standard_normal(D)
        b = rng.standard_normal(K)
        if dtype == "bf16":
            stored = sample.to_bf16(W.astype(np.float32))
            W, x, b = sample.from_bf16(stored).astype(np.float64), x.astype(np.float32), b.astype(np.float32)
            ft, tol = np.float32, 1e-5
        else:
            stored = W.astype(dtype)
            x, b, ft = x.astype(dtype), b.astype(dtype), dtype
            tol = 1e-12 if dtype == np.float64 else 1e-5
        out = np.full(K, np.nan, ft)
        sample._affine(out, x, stored, b, np.int64(0), np.int64(K))
        expect = b.astype(np.float64) + x.astype(np.float64) @ W
        np.testing.assert_allclose(out, expect, rtol=tol, atol=tol * D)
        logits = np.full(K, np.nan, ft)
        sample._affine(logits, x, stored, b, np.int64(5), np.int64(30))
        np.testing.assert_allclose(logits[5:30], expect[5:30], rtol=tol, atol=tol * D)
        assert np.isnan(logits[:5]).all() and np.isnan(logits[30:]).all()  # outside the window: untouched


@pytest.mark.parametrize("cell", CELLS)
def test_stack_sample_is_reproducible_and_chunkable(cell, rng):
    L = 2
    arrays = stack_arrays(cell, stack_params(cell, L, rng, scale=0.5), L)
    h0, c0 = initial_state(cell, L, rng)
    K1, K2 = 7, 9
    uniforms = rng.random(K1 + K2)
    prime = [2, 5, 1]
    h, c = h0.copy(), c0.copy()
    whole = run_sample(cell, arrays, h, c, prime, uniforms, K1 + K2)
    # same uniforms -> same output
    again = run_sample(cell, arrays, h0.copy(), c0.copy(), prime, uniforms, K1 + K2)
    np.testing.assert_array_equal(whole, again)
    # other uniforms -> (here) another output, so the uniforms are really used
    other = run_sample(cell, arrays, h0.copy(), c0.copy(), prime, 1.0 - uniforms, K1 + K2)
    assert not np.array_equal(whole, other)
    # two chunks, the second primed with the last token of the first
    h2, c2 = h0.copy(), c0.copy()
    first = run_sample(cell, arrays, h2, c2, prime, uniforms[:K1], K1)
    second = run_sample(cell, arrays, h2, c2, first[-1:], uniforms[K1:], K2)
    np.testing.assert_array_equal(np.concatenate([first, second]), whole)
    np.testing.assert_allclose(h2, h, rtol=1e-13, atol=1e-14)
    np.testing.assert_allclose(c2, c, rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("cell", CELLS)
def test_stack_sample_float32(cell, rng):
    L = 2
    params = stack_params(cell, L, rng)
    h0, c0 = initial_state(cell, L, rng)
    prime, K = [3, 0, 6], 10
    out64 = run_sample(cell, stack_arrays(cell, params, L), h0.copy(), c0.copy(), prime,
                       np.zeros(K), K, greedy=True)
    out32 = run_sample(cell, stack_arrays(cell, params, L, np.float32), h0.astype(np.float32),
                       c0.astype(np.float32), prime, np.zeros(K), K, greedy=True)
    np.testing.assert_array_equal(out32, out64)


# ------------------------------------------------------------------ thread splits
@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("N", [1, 2, 3])
@pytest.mark.parametrize("parts", [2, 4])
@pytest.mark.parametrize("H_", [6, 37, 70])
def test_forward_and_backward_do_not_depend_on_the_thread_split(cell, N, parts, H_, rng):
    """parts splits the work by batch rows, by time, or (lstm, at least 16 units a part)
    by hidden units, in unequal parts when H_ does not divide (37 and 70 units); every
    split must give the result of parts=1 (up to float rounding)."""
    _, fwd, bwd = KERNELS[cell]
    T_, D_ = 5, 4
    G = GATES[cell]
    x = rng.standard_normal((T_, N, D_))
    W = [rng.standard_normal((G * H_, D_)) * 0.5, rng.standard_normal((G * H_, H_)) * 0.5,
         rng.standard_normal(G * H_) * 0.1, rng.standard_normal(G * H_) * 0.1]
    dout = rng.standard_normal((T_, N, H_))
    results = []
    for p in (1, parts):
        hs = np.zeros((T_ + 1, N, H_)); cs = np.zeros((T_ + 1, N, H_))
        hs[0] = 0.3; cs[0] = -0.2
        acts = np.zeros((T_, N, 4 * H_ if cell == "gru" else G * H_))
        fwd(hs, cs, acts, x, *W, p)
        grads = [np.zeros((T_, N, D_)), np.zeros_like(W[0]), np.zeros_like(W[1]), np.zeros_like(W[2]),
                 np.zeros_like(W[3]), np.zeros((N, H_)), np.zeros((N, H_))]
        bwd(*grads, np.zeros((T_, N, G * H_)), np.zeros((T_, N, G * H_)), dout, hs, cs, acts, x, W[0], W[1], p)
        results.append([hs, cs, acts] + grads)
    for a, b in zip(*results):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_unit_parts_gives_each_part_at_least_16_units():
    assert [parallel.unit_parts(2, H) for H in (8, 31, 32, 256)] == [1, 1, 2, 2]
    assert [parallel.unit_parts(4, H) for H in (37, 70)] == [2, 4]
    assert parallel.unit_parts(1, 512) == 1


@pytest.mark.parametrize("shape", [(512, 32), (16, 16), (37, 5), (72, 19), (3, 40), (1, 1)])
def test_transpose_into_matches_numpy(shape, rng):
    a = rng.standard_normal(shape).astype(np.float32)
    out = np.full(shape[::-1], np.nan, np.float32)
    parallel.transpose_into(out, a)
    np.testing.assert_array_equal(out, a.T)


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("parts", [2, 3])
def test_stack_sample_does_not_depend_on_the_thread_split(cell, parts, rng):
    """parts splits every layer by hidden units (at least 16 a thread: 37 units give
    2 parts of 18 and 19) and the decoder by vocabulary (at least 64 words a thread);
    tokens and final state must be bit for bit those of one thread."""
    L, H_, V_, E_ = 2, 37, 150, 5
    cfg = ModelConfig(cell=cell, vocab_size=V_, embed=E_, hidden=H_, layers=L)
    params = {name: 0.8 * rng.standard_normal(shape) for name, shape in param_shapes(cfg).items()}
    h0 = (0.5 * rng.standard_normal((L, 1, H_))).astype(np.float32)
    c0 = (0.5 * rng.standard_normal((L, 1, H_))).astype(np.float32) if cell == "lstm" else np.zeros_like(h0)
    u = rng.random(40)
    results = []
    for p in (1, parts):
        arrays = sample.pack(params, L, np.float32, parts=p)
        assert arrays[3].shape[1] == min(p, 2)  # WhhT (L, P, H, G wmax): 37 units make 2 parts at most
        h, c = h0.copy(), c0.copy()
        out = np.full(40, -1, dtype=np.int64)
        sample.stack_sample(out, np.empty(40), h, c, np.zeros(V_, np.uint8), np.array([3, 1, 4], dtype=np.int64), u,
                            sample.CELL_CODES[cell], *arrays, 1.0, 0, 1.0, 1.0, False, p)
        results.append((out, h, c))
    np.testing.assert_array_equal(results[0][0], results[1][0])
    np.testing.assert_array_equal(results[0][1], results[1][1])
    np.testing.assert_array_equal(results[0][2], results[1][2])
    assert len(set(results[0][0].tolist())) > 5  # a real draw, not a constant


def test_small_rows_cuts_products_at_openblas_small_matrix_size():
    assert parallel.small_rows(512, 256, 32) == 64       # 64 x 256 x 32 = 524k <= 1e6 < 128 x 256 x 32
    assert parallel.small_rows(256, 512, 32) == 32
    assert parallel.small_rows(1024, 512, 64) == 16
    assert parallel.small_rows(40, 64, 8) == 40          # small enough whole
    assert parallel.small_rows(512, 4096, 64) == 512     # even 16 rows too big: one product
    for M, K, N in [(512, 256, 32), (1024, 512, 64), (300, 200, 20)]:
        r = parallel.small_rows(M, K, N)
        assert r == M or (r >= 16 and r * K * N <= 1_000_000 < 2 * r * K * N)


@pytest.mark.parametrize("rows", [1, 16, 37, 64, 200])
def test_dot_rows_matches_one_product(rows, rng):
    A = rng.standard_normal((100, 24)).astype(np.float32)
    B = rng.standard_normal((24, 7)).astype(np.float32)
    out = np.full((100, 7), np.nan, np.float32)
    parallel.dot_rows(A, B, out, rows)
    np.testing.assert_allclose(out, A @ B, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cell", CELLS)
def test_stack_sample_input_table_gives_the_same_tokens(cell, rng, monkeypatch):
    """pack() precomputes the first layer's input product per vocabulary entry for a small
    vocabulary; sampling with it must give exactly what computing it per token gives."""
    L = 2
    params = stack_params(cell, L, rng)
    h0, c0 = initial_state(cell, L, rng)
    u = rng.random(30)
    with_table = sample.pack(params, L, np.float32, parts=2)
    monkeypatch.setattr(sample, "TABLE_MAX_MACS", 0)
    without = sample.pack(params, L, np.float32, parts=2)
    assert with_table[-1].shape[1] == V and without[-1].shape[1] == 0
    outs = [run_sample(cell, arrays, h0.astype(np.float32), c0.astype(np.float32), [3, 0, 6], u, 30)
            for arrays in (with_table, without)]
    np.testing.assert_array_equal(outs[0], outs[1])
    assert len(set(outs[0].tolist())) > 2


@pytest.mark.parametrize("H_", [16, 37, 70])
@pytest.mark.parametrize("N_", [1, 3])
def test_lstm_loops_by_units_match_the_plain_loops(H_, N_, rng):
    """From 16 units lstm_forward / lstm_backward run their time loops split by hidden units
    (one part on one thread); the plain loops (used below 16 units, and gradient-checked
    above) are the reference: every part count gives their result in float64."""
    T_ = 5
    Whh = rng.standard_normal((4 * H_, H_)) * 0.3
    bias = rng.standard_normal(4 * H_) * 0.1
    pre = rng.standard_normal((T_, N_, 4 * H_))
    dhs = rng.standard_normal((T_, N_, H_))

    def run(fwd, bwd, *nc):
        hs = np.zeros((T_ + 1, N_, H_)); cs = np.zeros((T_ + 1, N_, H_))
        hs[0] = 0.2; cs[0] = -0.3
        acts = pre.copy()
        fwd(hs, cs, acts, Whh, bias, *nc)
        dacts = np.zeros((T_, N_, 4 * H_))
        dh0 = np.full((N_, H_), 0.5); dc0 = np.full((N_, H_), -0.5)  # added into
        bwd(dh0, dc0, dacts, dhs, cs, acts, Whh, *nc)
        return hs, cs, acts, dacts, dh0, dc0

    plain = run(lstm._lstm_recur_plain, lstm._lstm_backrecur_plain)
    for nc in (1, 2, 4):
        if H_ // nc < 16 and nc > 1:
            continue
        for a, b in zip(run(lstm._lstm_recur_by_units, lstm._lstm_backrecur_by_units, nc), plain):
            np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)


def test_linear_backward_without_bias_gradient(rng):
    """db of shape (0,) skips the bias sum (b_ih and b_hh share one); dW and dx unchanged."""
    M, Din, K = 9, 4, 6
    x, W, dout = rng.standard_normal((M, Din)), rng.standard_normal((K, Din)), rng.standard_normal((M, K))
    full = [np.zeros((M, Din)), np.zeros((K, Din)), np.zeros(K)]
    layers.linear_backward(*full, dout, x, W, 2)
    part = [np.zeros((M, Din)), np.zeros((K, Din)), np.zeros(0)]
    layers.linear_backward(*part, dout, x, W, 2)
    np.testing.assert_allclose(part[0], full[0], rtol=1e-14)
    np.testing.assert_allclose(part[1], full[1], rtol=1e-14)
    np.testing.assert_allclose(full[2], dout.sum(axis=0), rtol=1e-12)


@pytest.mark.parametrize("G", [1, 3, 4])
def test_gate_product_reads_the_blocks_in_either_order_to_the_same_result(G, rng):
    # odd steps read the gate blocks last to first (L2 reuse between steps); the rows land in the same places
    Hh, Nn, j0, j1 = 40, 3, 8, 27
    W = rng.standard_normal((G * Hh, Hh)).astype(np.float32)
    hT = rng.standard_normal((Hh, Nn)).astype(np.float32)
    want = np.concatenate([W[g * Hh + j0:g * Hh + j1] @ hT for g in range(G)])
    for t in (0, 1, 2, 3):
        got = parallel.gate_product(W, G, j0, j1, hT, np.zeros(G * (j1 - j0) * Nn, np.float32), t)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
