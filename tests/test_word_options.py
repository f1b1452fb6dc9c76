"""The word-model options of the recurrent model (issue 15): tied weights, dropout on the embeddings
and on the output, variational masks, the adaptive softmax head inside the full model.
Every gradient is checked by central differences in float64, with the dropout masks fixed."""
import math

import numpy as np
import pytest

from charlm.config import ModelConfig
from charlm.errors import CharlmError
from charlm.lm.model import Model, State, param_shapes
from tests.gradcheck import numeric_grad, rel_err

N, T, H, V = 2, 3, 5, 11
CELLS = ("rnn", "gru", "lstm")


def make(rng, dtype=np.float64, scale=0.5, **kw):
    """A model of random (not initial) parameters of cfg ModelConfig(**kw) over V tokens."""
    opts = dict(cell="lstm", vocab_size=V, embed=H, hidden=H, layers=2)
    opts.update(kw)
    cfg = ModelConfig(**opts)
    params = {n: np.ascontiguousarray(scale * rng.standard_normal(s), dtype=dtype)
              for n, s in param_shapes(cfg).items()}
    return Model(cfg, params)


def random_state(model, rng, n=N):
    L, Hd = model.cfg.layers, model.cfg.hidden
    return State((0.5 * rng.standard_normal((L, n, Hd))).astype(model.dtype),
                 (0.5 * rng.standard_normal((L, n, Hd))).astype(model.dtype))


def window(rng, t=T, n=N, pad=False):
    x, y = rng.integers(0, V, (t, n)), rng.integers(0, V, (t, n))
    if pad:
        y[-1, 0] = -1  # a padding target: no loss, no gradient
    return x, y


def check_gradients(model, rng, seed=None, pad=False):
    """Analytic gradients of every trainable parameter vs central differences, under the masks
    drawn from default_rng(seed) (None: no dropout)."""
    state = random_state(model, rng)
    x, y = window(rng, pad=pad)
    noise = (lambda: None) if seed is None else (lambda: np.random.default_rng(seed))
    grads = model.zero_grads()
    model.loss_and_grads(x, y, state, grads, rng=noise())
    scratch = model.zero_grads()

    def objective():
        return model.loss_and_grads(x, y, state, scratch, rng=noise())[0]

    assert set(grads) == set(model.trainable)
    for name, p in model.trainable.items():
        err = rel_err(grads[name], numeric_grad(objective, p))
        assert err < 1e-6, (name, err)


# ------------------------------------------------------------------ tied weights
def test_tied_model_has_no_separate_decoder_and_needs_embed_equal_hidden():
    cfg = ModelConfig(cell="lstm", vocab_size=V, embed=H, hidden=H, layers=1, tie=True)
    assert "decoder.weight" not in param_shapes(cfg) and param_shapes(cfg)["decoder.bias"] == (V,)
    with pytest.raises(CharlmError, match="--embed equal to --hidden"):
        ModelConfig(cell="lstm", vocab_size=V, embed=4, hidden=H, tie=True)
    with pytest.raises(CharlmError, match="--softmax full only"):
        ModelConfig(cell="lstm", vocab_size=V, embed=H, hidden=H, tie=True, softmax="adaptive", cutoffs=(4,))


@pytest.mark.parametrize("cell", CELLS)
def test_tied_gradients(cell, rng):
    check_gradients(make(rng, cell=cell, tie=True), rng)


def test_tied_equals_untied_with_a_copied_table(rng):
    """A tied model is the untied one whose decoder is a copy of the embedding: same loss, and the
    tied table's gradient is the sum of the untied embedding's and decoder's."""
    tied = make(rng, tie=True)
    params = {n: a.copy() for n, a in tied.params.items()}
    params["decoder.weight"] = params["embedding.weight"].copy()
    untied = Model(ModelConfig(**{**tied.cfg.to_dict(), "tie": False}), params)
    state = random_state(tied, rng)
    x, y = window(rng)
    gt, gu = tied.zero_grads(), untied.zero_grads()
    lt, st = tied.loss_and_grads(x, y, state, gt)
    lu, su = untied.loss_and_grads(x, y, state, gu)
    assert lt == pytest.approx(lu, rel=1e-13)
    np.testing.assert_allclose(gt["embedding.weight"], gu["embedding.weight"] + gu["decoder.weight"], rtol=1e-12,
                               atol=1e-14)
    np.testing.assert_allclose(tied.token_logprobs(x, y, state)[0], untied.token_logprobs(x, y, state)[0],
                               rtol=1e-12)


# ------------------------------------------------------------------ dropout
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("variational", [False, True])
def test_dropout_everywhere_gradients(cell, variational, rng):
    model = make(rng, cell=cell, layers=3, dropout=0.3, dropout_in=0.25, dropout_out=0.4, variational=variational)
    check_gradients(model, rng, seed=5, pad=True)


def test_output_dropout_alone_gradients(rng):
    check_gradients(make(rng, layers=1, dropout_out=0.5), rng, seed=3)


def test_dropout_acts_only_when_training_and_where_configured(rng):
    base = make(rng, layers=2)
    state = random_state(base, rng)
    x, y = window(rng, t=6)
    plain, _ = base.loss(x, y, state)
    g = base.zero_grads()
    for opts in ({"dropout_in": 0.5}, {"dropout_out": 0.5}, {"dropout_in": 0.5, "variational": True}):
        model = Model(ModelConfig(**{**base.cfg.to_dict(), **opts}), base.params)
        assert model.loss(x, y, state)[0] == pytest.approx(plain, rel=1e-14)        # scoring: no dropout
        assert model.loss_and_grads(x, y, state, g)[0] == pytest.approx(plain, rel=1e-14)  # no rng: none
        dropped, _ = model.loss_and_grads(x, y, state, g, rng=np.random.default_rng(1))
        assert dropped != pytest.approx(plain, rel=1e-6), opts


def test_variational_masks_are_shared_by_the_steps_of_a_window(rng):
    model = make(rng, layers=2, dropout=0.5, dropout_in=0.5, dropout_out=0.5, variational=True)
    x, y = window(rng, t=7, n=3)
    model.loss_and_grads(x, y, model.zero_state(3), model.zero_grads(), rng=np.random.default_rng(2))
    ws = model._workspace(7, 3)
    for mask in (ws.masks[0], ws.masks[1], ws.mask_out):
        assert mask.shape[0] == 1 and (mask == 0).any() and (mask == 2.0).any()
    # every step of the dropped embeddings has zeros exactly where the one mask has them
    zero = ws.masks[0][0] == 0
    assert all(np.array_equal(ws.inputs[0][t] == 0, zero | (ws.emb[t] == 0)) for t in range(7))
    # per-step masks differ from step to step
    step = make(rng, layers=2, dropout_in=0.5)
    step.loss_and_grads(x, y, step.zero_state(3), step.zero_grads(), rng=np.random.default_rng(2))
    m = step._workspace(7, 3).masks[0]
    assert m.shape[0] == 7 and not all(np.array_equal(m[0], m[t]) for t in range(1, 7))


def test_dropout_rates_are_checked():
    for name in ("dropout_in", "dropout_out"):
        for bad in (-0.1, 1.0, math.nan, math.inf):
            with pytest.raises(CharlmError):
                ModelConfig(**{name: bad})


# ------------------------------------------------------------------ adaptive softmax inside the model
def adaptive(rng, **kw):
    return make(rng, softmax="adaptive", cutoffs=(3, 6, 9), div_value=2.0, **kw)


@pytest.mark.parametrize("cell", CELLS)
def test_adaptive_model_gradients(cell, rng):
    check_gradients(adaptive(rng, cell=cell, dropout_out=0.3), rng, seed=4, pad=True)


def test_adaptive_model_is_normalised_and_consistent(rng):
    model = adaptive(rng, dtype=np.float32)
    state = random_state(model, rng)
    x, y = window(rng, t=4)
    probs, _ = model.probs_last(x, state)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-6)
    lp, _ = model.token_logprobs(x, y, state)
    loss, _ = model.loss(x, y, state)
    assert loss == pytest.approx(-lp.mean(), rel=1e-5)
    # the distribution after the last input holds the last target's probability
    np.testing.assert_allclose(np.log(probs[np.arange(N), y[-1]]), lp[-1], rtol=1e-4)


def test_adaptive_sampling_draws_from_the_exact_distribution(rng):
    """The stepwise sampler of the adaptive head: the empirical distribution of the first token
    after a fixed context matches probs_last."""
    from charlm.lm.sample import Decoding
    model = adaptive(rng, scale=0.3)
    step = model.sampler()
    feed = np.array([1, 4], dtype=np.int32)
    st = model.zero_state(1)
    p, _ = model.probs_last(feed.reshape(-1, 1), st)
    draws = 4000
    u = np.random.default_rng(0).random(draws)
    counts = np.zeros(V)
    for i in range(draws):
        hs, cs = st.h.copy(), st.c.copy()
        out, lps = np.empty(1, np.int32), np.empty(1)
        step(out, lps, hs, cs, np.zeros(V, np.uint8), feed, u[i:i + 1], *Decoding(temperature=1.0).args)
        counts[out[0]] += 1
        assert lps[0] == pytest.approx(math.log(p[0, out[0]]), rel=1e-9)
    # a chi-square-like bound: every token within 5 standard deviations of its expected count
    sd = np.sqrt(draws * p[0] * (1 - p[0])) + 1
    assert (np.abs(counts - draws * p[0]) < 5 * sd).all()
