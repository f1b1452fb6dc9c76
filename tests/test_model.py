"""The full model (charlm/model.py): gradients, loss, state carrying, learning, parameter checks."""
import math

import numpy as np
import pytest

from charlm.config import ModelConfig
from charlm.errors import CharlmError
from charlm.lm.model import Model, State, check_params, param_shapes
from tests import reference as ref
from tests.gradcheck import numeric_grad, rel_err

N, T, E, H, V = 2, 3, 4, 5, 7
CELLS = ("rnn", "gru", "lstm")
GATES = {"rnn": 1, "gru": 3, "lstm": 4}


def small_model(cell, rng, layers=2, dropout=0.0, dtype=np.float64, scale=0.5):
    """A float64 model with random (not initial) parameters, so no gradient is trivially small."""
    cfg = ModelConfig(cell=cell, vocab_size=V, embed=E, hidden=H, layers=layers, dropout=dropout)
    params = {n: np.ascontiguousarray(scale * rng.standard_normal(s), dtype=dtype)
              for n, s in param_shapes(cfg).items()}
    return Model(cfg, params)


def random_state(model, rng, n=N):
    L, Hd = model.cfg.layers, model.cfg.hidden
    h = (0.5 * rng.standard_normal((L, n, Hd))).astype(model.dtype)
    if model.cfg.cell == "lstm":
        c = (0.5 * rng.standard_normal((L, n, Hd))).astype(model.dtype)
    else:
        c = np.zeros((L, n, Hd), model.dtype)
    return State(h, c)


def random_window(rng, t=T, n=N, v=V):
    return rng.integers(0, v, (t, n)), rng.integers(0, v, (t, n))


# ------------------------------------------------------------------ parameter layout
@pytest.mark.parametrize("cell", CELLS)
def test_param_shapes_follow_the_torch_layout(cell):
    cfg = ModelConfig(cell=cell, vocab_size=V, embed=E, hidden=H, layers=2)
    G = GATES[cell]
    expected = {
        "embedding.weight": (V, E),
        "rnn.weight_ih_l0": (G * H, E), "rnn.weight_hh_l0": (G * H, H),
        "rnn.bias_ih_l0": (G * H,), "rnn.bias_hh_l0": (G * H,),
        "rnn.weight_ih_l1": (G * H, H), "rnn.weight_hh_l1": (G * H, H),
        "rnn.bias_ih_l1": (G * H,), "rnn.bias_hh_l1": (G * H,),
        "decoder.weight": (V, H), "decoder.bias": (V,),
    }
    assert param_shapes(cfg) == expected


# ------------------------------------------------------------------ loss vs reference
@pytest.mark.parametrize("cell", CELLS)
def test_loss_matches_reference(cell, rng):
    model = small_model(cell, rng)
    state = random_state(model, rng)
    x, y = random_window(rng)
    loss, after = model.loss(x, y, state)
    loss_ref, h_ref, c_ref = ref.model_loss(cell, model.params, x, y, state.h, state.c)
    assert loss == pytest.approx(loss_ref, rel=1e-12)
    np.testing.assert_allclose(after.h, h_ref, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(after.c, c_ref, rtol=1e-12, atol=1e-13)
    # loss_and_grads reports the same loss and state when there is no dropout
    loss2, after2 = model.loss_and_grads(x, y, state, model.zero_grads())
    assert loss2 == pytest.approx(loss_ref, rel=1e-12)
    np.testing.assert_array_equal(after2.h, after.h)
    np.testing.assert_array_equal(after2.c, after.c)


@pytest.mark.parametrize("cell", CELLS)
def test_float32_loss_matches_reference(cell, rng):
    model = small_model(cell, rng, dtype=np.float32)
    state = random_state(model, rng)
    x, y = random_window(rng, t=5)
    loss, after = model.loss(x, y, state)
    assert after.h.dtype == np.float32
    loss_ref, h_ref, _ = ref.model_loss(cell, model.params, x, y, state.h, state.c)
    assert loss == pytest.approx(loss_ref, rel=1e-5)
    np.testing.assert_allclose(after.h, h_ref, rtol=0, atol=1e-5)


# ------------------------------------------------------------------ gradients
@pytest.mark.parametrize("cell", CELLS)
def test_full_model_gradient_check(cell, rng):
    model = small_model(cell, rng, layers=2)
    state = random_state(model, rng)
    x, y = random_window(rng)
    saved = state.copy()
    grads = {n: np.full_like(p, np.nan) for n, p in model.params.items()}  # overwritten
    model.loss_and_grads(x, y, state, grads)
    np.testing.assert_array_equal(state.h, saved.h)  # the carried state is an input only
    np.testing.assert_array_equal(state.c, saved.c)

    def objective():
        return model.loss(x, y, state)[0]

    for name, p in model.params.items():
        num = numeric_grad(objective, p)
        assert np.max(np.abs(num)) > 1e-4, name
        err = rel_err(grads[name], num)
        assert err < 1e-6, (name, err)


@pytest.mark.parametrize("cell", CELLS)
def test_dropout_is_a_deterministic_function_of_the_rng(cell, rng):
    model = small_model(cell, rng, layers=3, dropout=0.4)
    state = random_state(model, rng)
    x, y = random_window(rng, t=4)
    g1, g2, g3 = model.zero_grads(), model.zero_grads(), model.zero_grads()
    l1, s1 = model.loss_and_grads(x, y, state, g1, rng=np.random.default_rng(7))
    l2, s2 = model.loss_and_grads(x, y, state, g2, rng=np.random.default_rng(7))
    l3, _ = model.loss_and_grads(x, y, state, g3, rng=np.random.default_rng(8))
    assert l1 == l2
    for n in g1:
        np.testing.assert_array_equal(g1[n], g2[n], err_msg=n)
    np.testing.assert_array_equal(s1.h, s2.h)
    # the masks matter: another seed, or no dropout at all, gives another loss
    no_dropout, _ = model.loss(x, y, state)
    assert l3 != l1
    assert l1 != no_dropout
    # dropout acts between layers only: the first layer's final state is mask-free
    _, s_plain = model.loss(x, y, state)
    np.testing.assert_allclose(s1.h[0], s_plain.h[0], rtol=1e-13, atol=1e-14)
    assert not np.allclose(s1.h[1], s_plain.h[1])


@pytest.mark.parametrize("cell", CELLS)
def test_dropout_gradient_check_with_fixed_masks(cell, rng):
    model = small_model(cell, rng, layers=3, dropout=0.3)
    state = random_state(model, rng)
    x, y = random_window(rng)
    seed = 11
    grads = model.zero_grads()
    model.loss_and_grads(x, y, state, grads, rng=np.random.default_rng(seed))
    scratch = model.zero_grads()

    def objective():  # the loss under the very same masks
        return model.loss_and_grads(x, y, state, scratch, rng=np.random.default_rng(seed))[0]

    for name, p in model.params.items():
        num = numeric_grad(objective, p)
        err = rel_err(grads[name], num)
        assert err < 1e-6, (name, err)


# ------------------------------------------------------------------ loss at initialisation
@pytest.mark.parametrize("cell", CELLS)
def test_initial_loss_is_close_to_log_vocab(cell):
    Vb = 65
    cfg = ModelConfig(cell=cell, vocab_size=Vb, embed=16, hidden=32, layers=2)
    model = Model.create(cfg, seed=0, dtype=np.float32)
    assert model.dtype == np.float32
    for p in model.params.values():
        assert p.dtype == np.float32 and p.flags.c_contiguous
    data = np.random.default_rng(1)
    x, y = random_window(data, t=16, n=4, v=Vb)
    loss, _ = model.loss(x, y, model.zero_state(4))
    assert abs(loss - math.log(Vb)) < 0.1


# ------------------------------------------------------------------ scoring and carried state
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("cell", CELLS)
def test_token_logprobs_sum_to_minus_loss_times_count(cell, dtype, rng):
    model = small_model(cell, rng, dtype=dtype)
    state = random_state(model, rng)
    x, y = random_window(rng, t=4)
    lp, after = model.token_logprobs(x, y, state)
    assert lp.shape == y.shape and lp.dtype == np.float64
    assert np.all(lp < 0)
    loss, after_loss = model.loss(x, y, state)
    tol = 1e-12 if dtype == np.float64 else 1e-5
    assert lp.sum() == pytest.approx(-loss * y.size, rel=tol)
    np.testing.assert_array_equal(after.h, after_loss.h)
    lp_ref, _, _ = ref.model_token_logprobs(cell, model.params, x, y, state.h, state.c)
    np.testing.assert_allclose(lp, lp_ref, rtol=tol, atol=tol)


@pytest.mark.parametrize("k", [1, 4])
@pytest.mark.parametrize("cell", CELLS)
def test_state_carried_across_windows_equals_one_window(cell, k, rng):
    model = small_model(cell, rng)
    state = random_state(model, rng)
    x, y = random_window(rng, t=6)
    lp_all, s_all = model.token_logprobs(x, y, state)
    lp1, s1 = model.token_logprobs(x[:k], y[:k], state)
    lp2, s2 = model.token_logprobs(x[k:], y[k:], s1)
    np.testing.assert_allclose(np.concatenate([lp1, lp2]), lp_all, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(s2.h, s_all.h, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(s2.c, s_all.c, rtol=1e-12, atol=1e-13)
    # the training pass carries the same state
    _, t1 = model.loss_and_grads(x[:k], y[:k], state, model.zero_grads())
    _, t2 = model.loss_and_grads(x[k:], y[k:], t1, model.zero_grads())
    np.testing.assert_allclose(t2.h, s_all.h, rtol=1e-12, atol=1e-13)
    np.testing.assert_allclose(t2.c, s_all.c, rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("cell", CELLS)
def test_probs_last_is_the_next_token_distribution(cell, rng):
    model = small_model(cell, rng)
    state = random_state(model, rng)
    x, _ = random_window(rng, t=4)
    probs, after = model.probs_last(x, state)
    logits, h_ref, _ = ref.model_forward(cell, model.params, x, state.h, state.c)
    np.testing.assert_allclose(probs, ref.softmax(logits[-1]), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-14)
    np.testing.assert_allclose(after.h, h_ref, rtol=1e-12, atol=1e-13)


# ------------------------------------------------------------------ learning
TEXT = "hello world. " * 20


@pytest.mark.parametrize("cell", CELLS)
def test_learns_a_tiny_repeated_text(cell):
    chars = sorted(set(TEXT))
    ids = np.array([chars.index(ch) for ch in TEXT])
    Vt, Tt, Nt, steps, lr = len(chars), 16, 4, 150, 1e-2
    cfg = ModelConfig(cell=cell, vocab_size=Vt, embed=16, hidden=32, layers=1)
    model = Model.create(cfg, seed=0, dtype=np.float32)
    x_all, y_all = ids[:-1].reshape(-1, 1), ids[1:].reshape(-1, 1)
    before, _ = model.loss(x_all, y_all, model.zero_state(1))
    assert before > 1.0

    # Nt parallel streams over the text, windows of Tt steps, state carried (truncated BPTT)
    span = (len(ids) - 1) // Nt
    xs = ids[:span * Nt].reshape(Nt, span).T
    ys = ids[1:span * Nt + 1].reshape(Nt, span).T
    grads = model.zero_grads()
    m1 = {n: np.zeros_like(p) for n, p in model.params.items()}
    m2 = {n: np.zeros_like(p) for n, p in model.params.items()}
    b1, b2, eps = 0.9, 0.999, 1e-8
    state, pos = model.zero_state(Nt), 0
    for step in range(1, steps + 1):
        if pos + Tt > span:
            state, pos = model.zero_state(Nt), 0
        x = np.ascontiguousarray(xs[pos:pos + Tt])
        y = np.ascontiguousarray(ys[pos:pos + Tt])
        pos += Tt
        _, state = model.loss_and_grads(x, y, state, grads)
        for n, p in model.params.items():
            g = grads[n]
            m1[n] = b1 * m1[n] + (1 - b1) * g
            m2[n] = b2 * m2[n] + (1 - b2) * g * g
            update = lr * (m1[n] / (1 - b1 ** step)) / (np.sqrt(m2[n] / (1 - b2 ** step)) + eps)
            p -= update.astype(p.dtype)
    after, _ = model.loss(x_all, y_all, model.zero_state(1))
    assert after < 0.05, after


# ------------------------------------------------------------------ parameter checks
def _params(cell="lstm", layers=2):
    cfg = ModelConfig(cell=cell, vocab_size=V, embed=E, hidden=H, layers=layers)
    return cfg, {n: np.zeros(s, np.float32) for n, s in param_shapes(cfg).items()}


def test_check_params_accepts_the_right_arrays():
    cfg, params = _params()
    check_params(cfg, params)  # no exception
    Model(cfg, params)


def test_check_params_rejects_a_wrong_shape():
    cfg, params = _params()
    params["rnn.weight_hh_l1"] = np.zeros((4 * H, H + 1), np.float32)
    with pytest.raises(CharlmError, match="rnn.weight_hh_l1"):
        check_params(cfg, params)
    with pytest.raises(CharlmError):
        Model(cfg, params)
    cfg, params = _params()
    params["decoder.weight"] = np.zeros((H, V), np.float32)  # transposed
    with pytest.raises(CharlmError, match="decoder.weight"):
        check_params(cfg, params)


def test_check_params_rejects_a_missing_parameter():
    cfg, params = _params()
    del params["rnn.bias_ih_l1"]
    with pytest.raises(CharlmError, match="rnn.bias_ih_l1"):
        check_params(cfg, params)
    with pytest.raises(CharlmError):
        Model(cfg, params)
    # parameters of a one-layer model do not fit a two-layer config
    _, one_layer = _params(layers=1)
    with pytest.raises(CharlmError):
        check_params(cfg, one_layer)
    # an lstm checkpoint does not fit a gru config
    with pytest.raises(CharlmError):
        check_params(ModelConfig(cell="gru", vocab_size=V, embed=E, hidden=H, layers=2), params)


def test_check_params_rejects_mixed_or_integer_dtypes():
    cfg, params = _params()
    params["decoder.bias"] = params["decoder.bias"].astype(np.float64)
    with pytest.raises(CharlmError):
        check_params(cfg, params)
    cfg, params = _params()
    params = {n: p.astype(np.int32) for n, p in params.items()}
    with pytest.raises(CharlmError):
        check_params(cfg, params)


@pytest.mark.parametrize("n, seq_len, streams", [(102, 7, 4), (66, 5, 3), (45, 4, 8), (64, 5, 3), (40, 3, 1)])
def test_validation_loss_counts_every_target_once(n, seq_len, streams):
    """train.evaluate: the mean over all n - 1 targets, each part from the zero
    state (including the last targets when the parts do not divide the text)."""
    from charlm.data import eval_windows
    from charlm.lm.train import evaluate
    cfg = ModelConfig(cell="lstm", vocab_size=11, embed=4, hidden=6, layers=1)
    m = Model.create(cfg, seed=3, dtype=np.float64)
    ids = np.random.default_rng(n).integers(0, 11, n).astype(np.uint8)  # as the token files store them
    got = evaluate(m, ids, seq_len, streams)
    S = next(eval_windows(ids, seq_len, streams))[0].shape[1]
    L = -(-(n - 1) // S)
    total = 0.0
    for s in range(S):  # each part alone, one window, from the zero state
        a, b = s * L, min((s + 1) * L, n - 1)
        if a >= b:
            continue
        lp, _ = m.token_logprobs(ids[a:b, None].astype(np.int32), ids[a + 1:b + 1, None].astype(np.int32),
                                 m.zero_state(1))
        total -= lp.sum()
    assert got == pytest.approx(total / (n - 1), rel=1e-12)
