"""The Echo State Network (--cell esn): the reservoir kernel against a dense NumPy
reference, the spectral radius, exact readout gradients, probabilities, reproducible
states from a checkpoint, training, sampling, and the command line."""
import json
import math

import numpy as np
import pytest

from charlm.lm import checkpoint
from charlm.config import ModelConfig, TrainConfig
from charlm.errors import CharlmError
from charlm.lm.esn import EsnModel, connectivity_of, spectral_radius
from charlm.kernels.esn import esn_forward
from charlm.lm.models import build_model
from charlm.runtime import compute_threads
from charlm.lm.sample import generate
from charlm.lm.score import score_text
from charlm.lm.train import train
from tests.helpers import TINY, failed, ok, tiny_text

N, T, V, H = 3, 6, 7, 20


def dense_W(params, H):
    W = np.zeros((H, H))
    ptr, ind, dat = params["reservoir.W_indptr"], params["reservoir.W_indices"], params["reservoir.W_data"]
    for i in range(H):
        for p in range(ptr[i], ptr[i + 1]):
            W[i, ind[p]] += dat[p]
    return W


def esn_reference(x, h0, Win_T, b, W, leak):
    """The equations written out with dense matrices: h_t = (1-a) h + a tanh(Win x_t + b + W h)."""
    hs = [h0]
    for t in range(x.shape[0]):
        h = hs[-1]
        pre = Win_T[x[t]] + b + h @ W.T
        hs.append((1 - leak) * h + leak * np.tanh(pre))
    return np.stack(hs)


def make(dtype=np.float64, seed=0, **kw):
    cfg = ModelConfig(**{**dict(cell="esn", vocab_size=V, hidden=H, layers=1, connectivity=0.2, bias_scaling=0.3,
                                leak=0.7), **kw})
    return EsnModel.create(cfg, seed=seed, dtype=dtype)


@pytest.mark.parametrize("parts", [1, 2])
def test_reservoir_kernel_matches_dense_reference(rng, parts):
    m = make()
    p = m.params
    x = rng.integers(0, V, size=(T, N)).astype(np.int32)
    h0 = rng.uniform(-0.5, 0.5, size=(N, H))
    hs = np.zeros((T + 1, N, H))
    hs[0] = h0
    u = p["reservoir.input_weight"][x] + p["reservoir.bias"]
    esn_forward(hs, u, p["reservoir.W_data"], p["reservoir.W_indices"], p["reservoir.W_indptr"], 0.7, parts)
    ref = esn_reference(x, h0, p["reservoir.input_weight"], p["reservoir.bias"], dense_W(p, H), 0.7)
    np.testing.assert_allclose(hs, ref, rtol=1e-12, atol=1e-12)
    # and through the model, from a carried state
    from charlm.lm.base import State
    states = m.states(x, State(h0[None], np.zeros_like(h0[None])))
    np.testing.assert_allclose(states, ref, rtol=1e-12, atol=1e-12)


def test_float32_reservoir_stays_close_to_float64(rng):
    m64 = make()
    m32 = EsnModel(m64.cfg, {k: (v.astype(np.float32) if v.dtype.kind == "f" else v) for k, v in m64.params.items()})
    x = rng.integers(0, V, size=(40, N)).astype(np.int32)
    a = m64.states(x, m64.zero_state(N)).copy()
    b = m32.states(x, m32.zero_state(N))
    assert np.abs(a - b).max() < 1e-4  # the rational tanh and float32 rounding, not diverging over 40 steps


@pytest.mark.parametrize("units, conn, sr", [(200, 0.1, 0.9), (400, 0.05, 1.25), (300, 0.02, 0.5)])
def test_spectral_radius_is_within_one_percent_of_sr(units, conn, sr):
    m = make(hidden=units, connectivity=conn, sr=sr, seed=units)
    rho = np.abs(np.linalg.eigvals(dense_W(m.params, units))).max()
    assert abs(rho - sr) / sr < 0.01, rho
    # each unit reads round(connectivity * units) others, none twice
    ptr, ind = m.params["reservoir.W_indptr"], m.params["reservoir.W_indices"]
    k = round(conn * units)
    assert (np.diff(ptr) == k).all()
    assert all(len(set(ind[ptr[i]:ptr[i + 1]])) == k for i in range(units))


def test_power_iteration_on_a_matrix_with_a_known_complex_leading_pair():
    """A rotation by 40 degrees scaled by 0.8 (eigenvalues 0.8 e^{+-i 40deg}) beside smaller real
    eigenvalues: the ratio of successive norms oscillates, the growth rate does not."""
    import scipy.sparse as sp
    c, s = 0.8 * math.cos(0.7), 0.8 * math.sin(0.7)
    blocks = [np.array([[c, -s], [s, c]]), np.array([[0.5]]), np.array([[-0.3]]), np.array([[0.79]])]
    W = sp.csr_matrix(sp.block_diag(blocks))
    W = sp.csr_matrix(np.triu(np.ones((5, 5)), 2) * 0.05 + W.toarray())  # non-normal, same eigenvalues
    rho = spectral_radius(W.data, W.indices.astype(np.int32), W.indptr.astype(np.int32))
    assert rho == pytest.approx(0.8, rel=2e-3)


def test_default_connectivity_keeps_100_inputs_per_unit_for_large_reservoirs():
    cfg = lambda u: ModelConfig(cell="esn", hidden=u, layers=1)
    assert connectivity_of(cfg(500)) == 0.1 and connectivity_of(cfg(1000)) == 0.1
    assert connectivity_of(cfg(4000)) * 4000 == pytest.approx(100)
    assert connectivity_of(ModelConfig(cell="esn", hidden=4000, layers=1, connectivity=0.3)) == 0.3


def test_readout_gradient_matches_finite_differences(rng):
    m = make()
    for n in ("decoder.weight", "decoder.bias"):
        m.params[n][...] = rng.standard_normal(m.params[n].shape) * 0.5
    x = rng.integers(0, V, size=(T, N)).astype(np.int32)
    y = rng.integers(0, V, size=(T, N)).astype(np.int32)
    state = m.zero_state(N)
    state.h[...] = rng.uniform(-0.5, 0.5, size=state.h.shape)
    grads = m.zero_grads()
    assert set(grads) == {"decoder.weight", "decoder.bias"}  # the reservoir is not trained
    m.loss_and_grads(x, y, state, grads)
    eps = 1e-6
    for n, g in grads.items():
        p = m.params[n]
        num = np.zeros_like(p)
        for i in np.ndindex(p.shape):
            old = p[i]
            p[i] = old + eps
            lp, _ = m.loss(x, y, state)
            p[i] = old - eps
            lm, _ = m.loss(x, y, state)
            p[i] = old
            num[i] = (lp - lm) / (2 * eps)
        rel = np.abs(num - g).max() / max(np.abs(num).max(), 1e-12)
        assert rel < 1e-6, (n, rel)


def test_probabilities_sum_to_one_and_agree_with_the_loss(rng):
    m = make()
    m.params["decoder.weight"][...] = rng.standard_normal((V, H))
    x = rng.integers(0, V, size=(T, N)).astype(np.int32)
    y = rng.integers(0, V, size=(T, N)).astype(np.int32)
    probs, _ = m.probs_last(x, m.zero_state(N))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, rtol=1e-12)
    lp, _ = m.token_logprobs(x, y, m.zero_state(N))
    loss, _ = m.loss(x, y, m.zero_state(N))
    assert -lp.mean() == pytest.approx(loss, rel=1e-12)
    # carrying the state across a split equals one pass
    lp1, st = m.token_logprobs(x[:2], y[:2], m.zero_state(N))
    lp2, _ = m.token_logprobs(x[2:], y[2:], st)
    np.testing.assert_allclose(np.concatenate([lp1, lp2]), lp, rtol=1e-12)


def test_the_same_seed_draws_the_same_reservoir_and_another_seed_another():
    a, b, c = make(seed=5), make(seed=5), make(seed=6)
    for k in a.params:
        assert a.params[k].tobytes() == b.params[k].tobytes()
    assert a.params["reservoir.W_data"].tobytes() != c.params["reservoir.W_data"].tobytes()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A small ESN trained for 60 steps on tests/data/tiny.txt (events, run directory)."""
    run = tmp_path_factory.mktemp("esn") / "run"
    mcfg = ModelConfig(cell="esn", hidden=60, layers=1, leak=0.8)
    tcfg = TrainConfig(seq_len=16, batch=4, steps=60, eval_every=20, lr=1e-2, seed=3)
    with compute_threads(1):
        events = list(train(tiny_text(), mcfg, tcfg, run, corpus_name="tiny.txt", sample_chars=0))
    return events, run


def test_training_the_readout_improves_held_out_loss(trained):
    events, run = trained
    evals = [e for e in events if e["event"] == "eval"]
    vocab_size = next(e for e in events if e["event"] == "start")["vocab_size"]
    assert len(evals) == 3
    # the zero readout starts at the uniform distribution, ln V nats per character
    assert evals[-1]["val_loss"] < math.log(vocab_size) - 0.5
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    ck = checkpoint.load(run / "latest.npz")
    assert ck.model.cell == "esn" and ck.model.hidden == 60 and ck.model.leak == 0.8 and ck.train.seed == 3
    # only the readout was trained: the optimizer holds moments for it alone
    assert sorted(ck.opt_arrays) == ["m/decoder.bias", "m/decoder.weight", "v/decoder.bias", "v/decoder.weight"]


def test_a_loaded_checkpoint_reproduces_the_reservoir_states_exactly(trained):
    _, run = trained
    ck = checkpoint.load(run / "latest.npz")
    model = build_model(ck.model, ck.params)
    # a fresh model from the same seed and hyperparameters has the same reservoir ...
    fresh = EsnModel.create(ck.model, seed=ck.train.seed)
    for k in ("reservoir.input_weight", "reservoir.bias", "reservoir.W_data", "reservoir.W_indices",
              "reservoir.W_indptr"):
        assert fresh.params[k].tobytes() == ck.params[k].tobytes(), k
    # ... and the states the loaded model computes are the ones the trained model computed
    x = np.array([ck.vocab.encode("the cat sat")[0]], dtype=np.int32).T
    a = model.states(x, model.zero_state(1)).copy()
    b = fresh.states(x, fresh.zero_state(1))
    assert a.tobytes() == b.tobytes()


def test_sampling_and_scoring_work_unchanged(trained):
    _, run = trained
    ck = checkpoint.load(run / "best.npz")
    model = build_model(ck.model, ck.params)
    a = "".join(generate(model, ck.vocab, 80, seed=4, temperature=0.7))
    b = "".join(generate(model, ck.vocab, 80, seed=4, temperature=0.7))
    assert a == b and len(a) == 80
    # greedy sampling follows the argmax of the model's own next-token distribution
    g = "".join(generate(model, ck.vocab, 12, greedy=True))
    ids = [ck.vocab.eos_id]
    for ch in g:
        probs, _ = model.probs_last(np.array(ids, dtype=np.int32)[:, None], model.zero_state(1))
        assert ck.vocab.tokens[int(probs[0].argmax())] == ch
        ids.append(ck.vocab.encode(ch)[0][0])
    s = score_text(model, ck.vocab, "the cat")
    assert s["logprob"] == pytest.approx(sum(t["logprob"] for t in s["tokens"]))
    assert len(s["tokens"]) == len("the cat") + 1  # and the end of the line


def test_a_damaged_reservoir_matrix_is_refused(trained, tmp_path):
    _, run = trained
    ck = checkpoint.load(run / "latest.npz")
    ck.params["reservoir.W_indices"] = ck.params["reservoir.W_indices"].copy()
    ck.params["reservoir.W_indices"][0] = 10_000
    checkpoint.save(ck, tmp_path / "bad.npz")
    with pytest.raises(CharlmError, match="CSR"):
        checkpoint.load(tmp_path / "bad.npz")


@pytest.mark.parametrize("kw, needle", [
    (dict(layers=2), "single reservoir"), (dict(leak=0.0), "--leak"), (dict(leak=1.5), "--leak"),
    (dict(sr=0.0), "--sr"), (dict(connectivity=1.5), "--connectivity"), (dict(input_scaling=0.0), "--input-scaling"),
    (dict(dropout=0.2), "--dropout")])
def test_bad_esn_settings_are_refused(kw, needle):
    with pytest.raises(CharlmError, match=needle):
        ModelConfig(**{**dict(cell="esn", hidden=10, layers=1), **kw})


ESN_TINY = ["--cell", "esn", "--units", "40", "--seq-len", "8", "--batch", "2", "--steps", "4", "--eval-every", "2",
            "--threads", "1"]


def test_cli_train_sample_score_eval_and_resume(run_cli, tmp_path):
    ok(run_cli("train", TINY, *ESN_TINY, "--sr", "0.8", "--leak", "0.5", "--out", "run", "--json"))
    ck = checkpoint.load("run/latest.npz")
    assert (ck.model.hidden, ck.model.sr, ck.model.leak, ck.step) == (40, 0.8, 0.5, 4)
    out = ok(run_cli("sample", "--model", "run", "--length", "30", "--seed", "1")).stdout
    assert len(out.rstrip("\n")) >= 20
    s = json.loads(ok(run_cli("score", "--model", "run", "--json", "the cat")).stdout)
    assert s["n_tokens"] == len("the cat") + 1
    e = json.loads(ok(run_cli("eval", TINY, "--model", "run", "--json")).stdout)
    assert e["bits_per_token"] > 0
    ok(run_cli("train", "--resume", "run", "--steps", "2", "--json"))
    assert checkpoint.load("run/latest.npz").step == 6


@pytest.mark.parametrize("args, needle", [
    (["--layers", "2"], "--layers"), (["--hidden", "64"], "--units"), (["--leak", "0"], "--leak")])
def test_cli_refuses_options_that_do_not_apply_to_an_esn(run_cli, args, needle):
    failed(run_cli("train", TINY, *ESN_TINY, *args, "--out", "run"), needle)


def test_cli_refuses_esn_options_on_other_cells(run_cli):
    failed(run_cli("train", TINY, "--cell", "lstm", "--sr", "0.5", "--steps", "1", "--out", "run"),
           "--sr", "only to --cell esn")


def test_help_lists_the_esn_options(run_cli):
    text = ok(run_cli("train", "--help")).stdout
    for opt in ("--units", "--leak", "--sr", "--connectivity", "--input-scaling", "--bias-scaling"):
        assert opt in text


def test_grads_refuses_an_esn_with_the_reason(run_cli):
    ok(run_cli("train", TINY, *ESN_TINY, "--out", "run", "--json"))
    failed(run_cli("grads", TINY, "--model", "run"), "Echo State Network", "no gradient flows through time")
    failed(run_cli("grads", TINY, "--cell", "esn"), "--cell")
