"""charlm.lm.grads and `charlm grads`: gradient flow through time.

The measured gradients are checked against central finite differences (float64) for every cell and
layer, then against the bound of the RNN's equations on controlled weights, the LSTM against the
RNN, and exploding gradients in training (clipping off versus --clip 5) through charlm.lm.train.train()."""
import json
import tempfile

import numpy as np
import pytest

import charlm.lm.train as train_mod
from charlm.lm import checkpoint, grads
from charlm.config import ModelConfig, TrainConfig
from charlm.data import Vocab
from charlm.errors import CharlmError
from charlm.kernels import gru, lstm, rnn
from charlm.lm.model import Model, init_params, param_shapes
from charlm.runtime import compute_threads
from tests.helpers import TINY, failed, ok, tiny_text, train_tiny

TEXT = tiny_text()
VOCAB = Vocab.from_text(TEXT)
IDS = VOCAB.encode_corpus(TEXT)
STEP = {"rnn": rnn.rnn_step_forward, "gru": gru.gru_step_forward, "lstm": lstm.lstm_step_forward}
WIDTH = {"rnn": 1, "gru": 4, "lstm": 4}


def random_model(cell, layers=2, H=5, E=4, seed=0, scale=0.6):
    """float64 model with N(0, scale^2) weights: every path carries a visible gradient."""
    rng = np.random.default_rng(seed)
    cfg = ModelConfig(cell=cell, vocab_size=len(VOCAB), embed=E, hidden=H, layers=layers)
    return Model(cfg, {n: scale * rng.standard_normal(s) for n, s in param_shapes(cfg).items()})


def last_losses(model, x, y, perturb=None):
    """-log p(y[n] | x[:, n]) at the last step, per window, running the stack one step at a
    time with the step kernels. perturb = (what, layer, t, delta): add delta (N, H) to h^(layer)_t
    ("h") right after it is computed, before anything reads it, or to c^(layer)_t ("c", LSTM:
    h_t is then recomputed from it as o * tanh(c))."""
    cfg, p = model.cfg, model.params
    S, N = x.shape
    L, H = cfg.layers, cfg.hidden
    h = np.zeros((L, N, H))
    c = np.zeros((L, N, H))
    for t in range(1, S + 1):
        inp = p["embedding.weight"][x[t - 1]]
        for l in range(L):
            hout, cout = np.zeros((N, H)), np.zeros((N, H))
            act = np.zeros((N, WIDTH[cfg.cell] * H))
            STEP[cfg.cell](hout, cout, act, np.ascontiguousarray(inp), h[l], c[l], p[f"rnn.weight_ih_l{l}"],
                           p[f"rnn.weight_hh_l{l}"], p[f"rnn.bias_ih_l{l}"], p[f"rnn.bias_hh_l{l}"])
            if perturb is not None and perturb[1:3] == (l, t):
                if perturb[0] == "h":
                    hout = hout + perturb[3]
                else:
                    cout = cout + perturb[3]
                    hout = act[:, 3 * H:] * np.tanh(cout)
            h[l], c[l] = hout, cout
            inp = hout
    logits = h[-1] @ p["decoder.weight"].T + p["decoder.bias"]
    m = logits.max(axis=1, keepdims=True)
    lse = (m + np.log(np.exp(logits - m).sum(axis=1, keepdims=True)))[:, 0]
    return lse - logits[np.arange(N), y]


def fd_gradient(model, x, y, what, layer, t, eps=1e-6):
    S, N = x.shape
    H = model.cfg.hidden
    g = np.zeros((N, H))
    for n in range(N):
        for j in range(H):
            d = np.zeros((N, H))
            d[n, j] = eps
            g[n, j] = (last_losses(model, x, y, (what, layer, t, d))[n]
                       - last_losses(model, x, y, (what, layer, t, -d))[n]) / (2 * eps)
    return g


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_gradients_at_every_lag_and_layer_match_finite_differences(cell):
    model = random_model(cell)
    K = 4
    x, y = grads.make_windows(IDS, 2, K, warmup=2)
    S = x.shape[0]
    r = grads.gradient_flow(model, x, y, K)
    np.testing.assert_allclose(r["loss"], last_losses(model, x, y), rtol=1e-12)
    assert r["dh"].shape == (2, K + 1, 2, 5)
    kinds = ["h"] + (["c"] if cell == "lstm" else [])
    for what in kinds:
        got = r["dh"] if what == "h" else r["dc"]
        for layer in range(2):
            for k in range(K + 1):
                want = fd_gradient(model, x, y, what, layer, S - k)
                assert np.abs(want).max() > 1e-4, (what, layer, k)  # a path that carries something
                err = np.abs(got[layer, k] - want).max() / np.abs(want).max()
                assert err < 1e-6, (what, layer, k, err)
    if cell != "lstm":
        assert r["dc"] is None


def test_float32_model_is_measured_in_float64():
    m32 = Model(random_model("gru").cfg, {k: v.astype(np.float32) for k, v in random_model("gru").params.items()})
    a = grads.measure(m32, IDS, max_lag=5, windows=3, warmup=4)
    b = grads.measure(Model(m32.cfg, {k: v.astype(np.float64) for k, v in m32.params.items()}), IDS,
                      max_lag=5, windows=3, warmup=4)
    np.testing.assert_array_equal(a.norms_by_layer, b.norms_by_layer)
    assert m32.params["embedding.weight"].dtype == np.float32  # the caller's model is left as it was


# ------------------------------------------------------------------ controlled weights
H16 = 16


def rnn_with(W, seed=0):
    cfg = ModelConfig(cell="rnn", vocab_size=len(VOCAB), embed=8, hidden=H16, layers=1)
    p = init_params(cfg, np.random.default_rng(seed), np.float64)
    p["rnn.weight_hh_l0"][...] = W
    return Model(cfg, p)


def orthogonal(H, seed=1):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((H, H)))
    return q


def hidden_history(model, x):
    ws = model._forward(x, model.zero_state(x.shape[1]), None)
    return ws.hs[0].copy()  # (S+1, N, H)


@pytest.mark.parametrize("rho", [0.5, 3.0])
def test_rnn_steps_back_obey_the_bound_of_the_equations(rho):
    """dL/dh_(t-1) = W_hh^T diag(tanh'_t) dL/dh_t, so with W_hh = rho * Q (Q orthogonal: every
    singular value is rho) each step back multiplies the norm by a factor between
    rho * min_j tanh'_t,j and rho * max_j tanh'_t,j: ||W_hh||_2 * max|tanh'| is the bound, and
    for this W also the rate up to the spread of tanh'."""
    W = rho * orthogonal(H16)
    assert np.linalg.norm(W, 2) == pytest.approx(rho)
    model = rnn_with(W)
    K = 40
    r = grads.measure(model, IDS, max_lag=K, windows=8, warmup=16)
    x, _ = grads.make_windows(IDS, 8, K, 16)
    hs = hidden_history(model, x)
    S = x.shape[0]
    g = r.per_window[0]                                       # (K+1, N)
    for k in range(K):
        dt = 1.0 - hs[S - k] ** 2                             # tanh' of the step that made h_(T-k)  (N, H)
        ratio = g[k + 1] / g[k]
        assert np.all(ratio <= rho * dt.max(axis=1) * (1 + 1e-9)), k
        assert np.all(ratio >= rho * dt.min(axis=1) * (1 - 1e-9)), k
    if rho < 1:   # vanishes geometrically, close to the bound rho per step (tanh' near 1 here)
        assert 0.8 * rho < r.decay_per_step() <= rho
        assert r.norms[K] < rho ** K * r.norms[0] * 1.01
        assert r.norms[K] < 1e-9 * r.norms[0]
    else:         # saturated units (tanh' ~ 0.3) but rho * tanh' > 1: it explodes
        assert r.decay_per_step() > 1.1
        assert r.norms[K] > 1e3 * r.norms[0]
        assert r.mean_dtanh < 0.5
    assert r.mean_dsigmoid is None
    # the reported mean tanh' is that of the measured steps
    assert r.mean_dtanh == pytest.approx(float((1.0 - hs[S - K:] ** 2).mean()), rel=1e-12)


def test_lstm_with_forget_bias_one_keeps_the_gradient_much_longer_than_the_rnn():
    """Same text, same embedding, the default initialisation, the LSTM's forget gates biased to +1."""
    rnn_m = rnn_with(init_params(ModelConfig(cell="rnn", vocab_size=len(VOCAB), embed=8, hidden=H16, layers=1),
                                 np.random.default_rng(0), np.float64)["rnn.weight_hh_l0"])
    cfg = ModelConfig(cell="lstm", vocab_size=len(VOCAB), embed=8, hidden=H16, layers=1)
    p = init_params(cfg, np.random.default_rng(0), np.float64)
    p["embedding.weight"][...] = rnn_m.params["embedding.weight"]
    p["rnn.bias_ih_l0"][H16:2 * H16] = 1.0
    p["rnn.bias_hh_l0"][H16:2 * H16] = 0.0
    lstm_m = Model(cfg, p)
    K = 40
    a = grads.measure(rnn_m, IDS, max_lag=K, windows=8, warmup=16)
    b = grads.measure(lstm_m, IDS, max_lag=K, windows=8, warmup=16)
    assert a.decay_per_step() < 0.6 < 0.8 < b.decay_per_step() < 1.0
    kept_rnn, kept_lstm = a.norms[K] / a.norms[1], b.norms[K] / b.norms[1]
    assert kept_lstm > 1e6 * kept_rnn
    assert b.c_norms[K] > 1e6 * a.norms[K]                   # the cell state carries it
    assert 0 < b.mean_dsigmoid <= 0.25 and 0 < b.mean_dtanh <= 1
    # the same model without the forget bias forgets faster
    p0 = {k: v.copy() for k, v in p.items()}
    p0["rnn.bias_ih_l0"][H16:2 * H16] = 0.0
    c = grads.measure(Model(cfg, p0), IDS, max_lag=K, windows=8, warmup=16)
    assert c.decay_per_step() < b.decay_per_step() - 0.1


# ------------------------------------------------------------------ exploding gradients in training
def exploding_rnn(H=32, gain=3.0):
    """A vanilla RNN initialised in the exploding regime: W_hh = 3 Q (Q orthogonal)."""
    cfg = ModelConfig(cell="rnn", vocab_size=len(VOCAB), embed=8, hidden=H, layers=1)
    p = init_params(cfg, np.random.default_rng(0))
    p["rnn.weight_hh_l0"][...] = gain * orthogonal(H)
    return checkpoint.Checkpoint(model=cfg, vocab=VOCAB, params=p)


def train_events(ck, clip, steps=30):
    """The events of a training run; a run the guard stops ends with {"event": "stopped", "error"}."""
    tcfg = TrainConfig(seq_len=256, batch=4, lr=0.5, optimizer="sgd", clip=clip, steps=steps, eval_every=1000)
    events = []
    with compute_threads(1), tempfile.TemporaryDirectory() as d:
        try:
            for e in train_mod.train(TEXT, None, tcfg, f"{d}/run", init_from=ck, sample_chars=0):
                events.append(e)
        except CharlmError as err:
            events.append({"event": "stopped", "error": str(err)})
    return events


def test_exploding_gradients_diverge_without_clipping_and_train_with_clip_5():
    """SGD, lr 0.5, windows of 256 characters, from an RNN whose gradient grows ~1.3x per step back:
    the first gradient norm is 1e25 to 1e30 (the exploding regime is chaotic: the BLAS kernel's
    summation order decides the exact value). Unclipped, the update throws the weights ~lr x norm
    away. Where float32 then overflows (it did on AVX2 machines, not on an AVX-512 one), every such
    step is caught (a "nonfinite" event, last good weights restored, learning rate halved) until the
    guard stops the run; either way the unclipped run learns less than the clipped one. Clipped to
    norm 5, the same run trains."""
    ck = exploding_rnn()
    flow = grads.measure(Model(ck.model, ck.params), IDS, max_lag=32, windows=8, warmup=16)
    assert flow.decay_per_step() > 1.2

    free = train_events(ck, clip=0)
    bad = [e for e in free if e["event"] == "nonfinite"]
    steps = [e for e in free if e["event"] == "step"]
    assert steps[0]["grad_norm"] > 1e15
    best_free = min(e["loss"] for e in steps)
    if bad:  # the update overflowed float32: the guard's path
        assert [e["lr"] for e in bad] == pytest.approx([0.5 / 2 ** (k + 1) for k in range(len(bad))])
        assert best_free > steps[0]["loss"] - 0.1                      # no progress
        # and the guard stops it after MAX_HALVINGS halvings, naming the way out
        assert len(bad) == train_mod.MAX_HALVINGS and free[-1]["event"] == "stopped"
        assert "--clip 5" in free[-1]["error"] and "exploding" in free[-1]["error"]
    else:    # no overflow on this machine: the run goes on from the thrown weights
        assert free[-1]["event"] == "done" and len(steps) == 30

    clipped = train_events(ck, clip=5)
    steps = [e for e in clipped if e["event"] == "step"]
    assert not [e for e in clipped if e["event"] == "nonfinite"]
    assert steps[0]["grad_norm"] > 1e15 and steps[0]["clipped"]
    first, last = np.mean([e["loss"] for e in steps[:3]]), np.mean([e["loss"] for e in steps[-5:]])
    assert last < first - 0.15 and last < best_free - 0.1             # (0.2 to 0.7 nats over seeds)
    done = clipped[-1]
    assert done["event"] == "done" and 0 < done["clipped_fraction"] <= 1


# ------------------------------------------------------------------ the command
SMALL = ["--hidden", "8", "--layers", "1", "--embed", "4", "--max-lag", "6", "--windows", "3", "--warmup", "4",
         "--threads", "1"]
KEYS = {"cell", "norms", "mean_dtanh", "mean_dsigmoid", "clipped_fraction"}


def test_cli_json_for_one_and_several_cells(run_cli):
    one = json.loads(ok(run_cli("grads", TINY, "--cell", "rnn", *SMALL, "--json")).stdout)
    assert KEYS <= set(one)
    assert one["cell"] == "rnn" and len(one["norms"]) == 7 and one["clipped_fraction"] is None
    assert one["mean_dsigmoid"] is None and 0 < one["mean_dtanh"] <= 1
    many = json.loads(ok(run_cli("grads", TINY, "--cell", "gru", "--cell", "lstm", *SMALL, "--json")).stdout)
    assert [m["cell"] for m in many] == ["gru", "lstm"]
    assert all(KEYS <= set(m) and 0 < m["mean_dsigmoid"] <= 0.25 for m in many)
    assert many[1]["c_norms"] is not None and many[0]["c_norms"] is None
    # the library gives the same numbers
    m = grads.fresh_model("gru", len(VOCAB), hidden=8, layers=1, embed=4, seed=0)
    r = grads.measure(m, IDS, max_lag=6, windows=3, warmup=4)
    assert many[0]["norms"] == pytest.approx(r.norms.tolist(), rel=1e-12)
    piped = json.loads(ok(run_cli("grads", "-", "--cell", "gru", *SMALL, "--json", input=TEXT)).stdout)
    assert piped["norms"] == many[0]["norms"]
    two = json.loads(ok(run_cli("grads", TINY, "--cell", "lstm", *SMALL, "--layers", "2", "--json")).stdout)
    assert len(two["norms_by_layer"]) == 2 and two["norms"] == two["norms_by_layer"][0]


def test_cli_trained_model_table_and_clipped_fraction(run_cli, tmp_path):
    train_tiny(tmp_path / "run", cell="gru", steps=4)
    ck = checkpoint.load(tmp_path / "run" / "latest.npz")
    r = json.loads(ok(run_cli("grads", "--model", tmp_path / "run", *SMALL, "--json")).stdout)
    assert r["cell"] == "gru" and r["steps"] == ck.step
    assert r["clipped_fraction"] == pytest.approx(ck.counters["clipped"] / ck.step)
    # without CORPUS the run's own token file is used; with it, the same text gives the same numbers
    r2 = json.loads(ok(run_cli("grads", "--model", tmp_path / "run", TINY, *SMALL, "--json")).stdout)
    assert len(r2["norms"]) == 7
    other = tmp_path / "other.txt"
    other.write_text(TEXT + "\u2603\n", encoding="utf-8")
    res = ok(run_cli("grads", "--model", tmp_path / "run", other, *SMALL, "--json"))
    assert "1 character(s) of CORPUS not in the vocabulary" in res.stderr
    table = ok(run_cli("grads", TINY, "--model", tmp_path / "run", "--cell", "rnn", *SMALL)).stdout
    assert "lag k" in table and "÷ lag 0" in table and "decay per step" in table
    assert "clipped" in table and "untrained" in table and "cell state c" not in table
    assert any(ch in table for ch in grads.SPARK)


def test_cli_plot(run_cli, tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    png = tmp_path / "flow.png"
    ok(run_cli("grads", TINY, "--cell", "rnn", "--cell", "lstm", *SMALL, "--plot", png))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import sys
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib now raises ImportError
    failed(run_cli("grads", TINY, "--cell", "rnn", *SMALL, "--plot", tmp_path / "x.png"), 'pip install "charlm[plot]"')


@pytest.mark.parametrize("args, needle", [
    (["--cell", "rnn"], "needs a CORPUS"),
    ([TINY, "--cell", "cnn"], "--cell must be"),
    ([TINY, "--cell", "rnn", "--max-lag", "-1"], "--max-lag"),
    ([TINY, "--cell", "rnn", "--windows", "0"], "--windows"),
    ([TINY, "--cell", "rnn", "--max-lag", "5000"], "a window needs"),
    (["no/such/file.txt", "--cell", "rnn"], "no/such/file.txt"),
    (["--model", "no/such/run"], "model not found"),
    ([], "no trained model found"),
])
def test_cli_failures(run_cli, args, needle):
    failed(run_cli("grads", *args), needle)


def test_sparkline_and_table_lags():
    assert grads.sparkline([1.0, 0.1, 0.01]) == "█▅▁"
    assert grads.sparkline([1.0, 0.0, float("nan")]) == "▅  "
    assert grads.sparkline([10.0, 1e-12], lo=-2, hi=1) == "█▁"
    assert grads.table_lags(64) == [0, 1, 2, 3, 4, 8, 16, 32, 64]
    assert grads.table_lags(10) == [0, 1, 2, 3, 4, 8, 10]
    assert grads.table_lags(0) == [0]
