"""Sparse embedding updates: the trainer writes, zeroes, measures and updates only the embedding rows a
window uses (charlm.lm.base.BaseModel.touched, charlm.optim).

Exact where it promises to be: the gradient norm over the rows equals the full one bit for bit, SGD on the
rows equals dense SGD bit for bit, and a whole training run (SGD, and Adam without --sparse-embedding) is the
same bit for bit with the row-wise path as without it. --sparse-embedding (lazy Adam) against a NumPy
reference of lazy Adam: rows in the batch take Adam's update, the others keep weights and moments; it
resumes exactly. Refusals: --tie, ESN, SGD."""
from __future__ import annotations

import numpy as np
import pytest

from charlm.config import ModelConfig, TrainConfig
from charlm.errors import CharlmError
from charlm.lm import checkpoint, run
from charlm.lm import train as train_mod
from charlm.lm.model import Model
from charlm.lm.models import create_model
from charlm.optim import SGD, Adam, grad_norm
from charlm.runtime import compute_threads
from tests.helpers import DATA, TINY

WORDS = DATA / "words.txt"


def _sparse_grads(rng, V=50, E=6, rows=(3, 7, 8, 20)):
    g = {"embedding.weight": np.zeros((V, E), np.float32), "other": rng.standard_normal(11).astype(np.float32)}
    r = np.array(rows, np.int64)
    g["embedding.weight"][r] = rng.standard_normal((len(r), E)).astype(np.float32)
    return g, {"embedding.weight": r}


def test_grad_norm_over_the_rows_is_the_full_norm_bit_for_bit(rng):
    g, rows = _sparse_grads(rng)
    assert grad_norm(g, rows) == grad_norm(g)


def test_sgd_on_the_rows_is_dense_sgd_bit_for_bit(rng):
    g, rows = _sparse_grads(rng)
    p = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in g.items()}
    a, b = ({k: v.copy() for k, v in p.items()} for _ in range(2))
    SGD(a).step(a, g, 0.7, 0.3, rows)
    SGD(b).step(b, g, 0.7, 0.3)
    for k in p:
        assert a[k].tobytes() == b[k].tobytes()


@pytest.mark.parametrize("dtype, rtol", [(np.float32, 2e-6), (np.float64, 1e-13)])
def test_dense_adam_matches_a_float64_reference_over_several_steps(rng, dtype, rtol):
    """Adam computes in the parameters' own precision (float32 as PyTorch's): three steps with
    clipping scales against Kingma & Ba's update in float64, every element moving."""
    shapes = {"a": (7, 5), "b": (13,)}
    p0 = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
    p = {k: v.copy() for k, v in p0.items()}
    opt = Adam(p)
    ref = {k: v.astype(np.float64) for k, v in p0.items()}
    m = {k: np.zeros(s) for k, s in shapes.items()}
    v = {k: np.zeros(s) for k, s in shapes.items()}
    b1, b2, eps, lr = 0.9, 0.999, 1e-8, 0.01
    for t, scale in enumerate((1.0, 0.5, 0.8), start=1):
        g = {k: rng.standard_normal(s).astype(dtype) for k, s in shapes.items()}
        opt.step(p, g, lr, scale)
        for k in shapes:
            gk = g[k].astype(np.float64) * scale
            m[k] = b1 * m[k] + (1 - b1) * gk
            v[k] = b2 * v[k] + (1 - b2) * gk * gk
            ref[k] -= lr / (1 - b1 ** t) * m[k] / (np.sqrt(v[k] / (1 - b2 ** t)) + eps)
    for k in shapes:
        assert p[k].dtype == dtype
        assert np.all(p[k] != p0[k])
        np.testing.assert_allclose(p[k], ref[k], rtol=rtol, atol=rtol)


def test_lazy_adam_matches_a_reference_and_leaves_other_rows_alone(rng):
    g1, rows1 = _sparse_grads(rng, rows=(1, 4, 9))
    g2, rows2 = _sparse_grads(rng, rows=(4, 5))
    p0 = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in g1.items()}
    p = {k: v.copy() for k, v in p0.items()}
    opt = Adam(p, lazy=True)
    opt.step(p, g1, 0.01, 0.5, rows1)
    opt.step(p, g2, 0.01, 1.0, rows2)
    # reference, float64: per row, Adam steps only when the row is in the batch; bias correction by global t
    b1, b2, eps = 0.9, 0.999, 1e-8
    W, m, v = (p0["embedding.weight"].astype(np.float64), np.zeros((50, 6)), np.zeros((50, 6)))
    for t, (g, rows, scale) in enumerate([(g1, rows1, 0.5), (g2, rows2, 1.0)], start=1):
        for r in rows["embedding.weight"]:
            gr = g["embedding.weight"][r].astype(np.float64) * scale
            m[r] = b1 * m[r] + (1 - b1) * gr
            v[r] = b2 * v[r] + (1 - b2) * gr * gr
            W[r] -= 0.01 / (1 - b1 ** t) * m[r] / (np.sqrt(v[r] / (1 - b2 ** t)) + eps)
    np.testing.assert_allclose(p["embedding.weight"], W, rtol=1e-5, atol=1e-6)
    untouched = np.setdiff1d(np.arange(50), [1, 4, 5, 9])
    assert p["embedding.weight"][untouched].tobytes() == p0["embedding.weight"][untouched].tobytes()
    assert not opt.m["embedding.weight"][untouched].any() and not opt.v["embedding.weight"][untouched].any()
    dense = {k: v.copy() for k, v in p0.items()}
    d = Adam(dense)  # not lazy: rows ignored, every row moves (momentum)
    d.step(dense, g1, 0.01, 0.5, rows1)
    d.step(dense, g2, 0.01, 1.0, rows2)
    assert not np.array_equal(dense["embedding.weight"][1], p["embedding.weight"][1])  # row 1: momentum at t 2


def test_the_model_zeroes_only_the_rows_it_wrote_and_names_them(rng):
    cfg = ModelConfig(cell="lstm", vocab_size=40, embed=8, hidden=16, layers=1)
    m = create_model(cfg, seed=0)
    g_sparse, g_dense = m.zero_grads(), m.zero_grads()
    with compute_threads(1):
        for i in range(3):
            x = rng.integers(0, 40, (6, 2)).astype(np.int32)
            y = rng.integers(0, 40, (6, 2)).astype(np.int32)
            m.sparse_grads = True
            m.loss_and_grads(x, y, m.zero_state(2), g_sparse)
            rows = m.touched()
            m.sparse_grads = False
            m.loss_and_grads(x, y, m.zero_state(2), g_dense)
            assert m.touched() is None
            np.testing.assert_array_equal(rows["embedding.weight"], np.unique(x))
            for k in g_dense:
                assert g_sparse[k].tobytes() == g_dense[k].tobytes(), (i, k)
    tied = create_model(ModelConfig(cell="lstm", vocab_size=40, embed=16, hidden=16, layers=1, tie=True), seed=0)
    assert tied.sparse_param() is None


def _train(run_dir, tcfg: TrainConfig, dense: bool, monkeypatch, stop_after=None) -> checkpoint.Checkpoint:
    if dense:  # the whole gradient zeroed, measured and updated, as before the row-wise path
        monkeypatch.setattr(Model, "sparse_param", lambda self: None)
    calls = [0]

    def stop():
        calls[0] += 1
        return stop_after is not None and calls[0] > stop_after
    cfg = ModelConfig(cell="lstm", embed=8, hidden=16, layers=1, dropout=0.0, dropout_out=0.0)
    with compute_threads(1):
        list(train_mod.train(WORDS.read_text(), cfg, tcfg, run_dir, sample_chars=0, should_stop=stop))
    monkeypatch.undo()
    return checkpoint.load(run_dir / "latest.npz")


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_a_training_run_is_the_same_with_the_row_wise_path(tmp_path, monkeypatch, optimizer):
    tcfg = TrainConfig(seq_len=8, batch=2, steps=12, eval_every=6, level="word", optimizer=optimizer,
                       lr=0.5 if optimizer == "sgd" else 0.01)
    a = _train(tmp_path / "rows", tcfg, False, monkeypatch)
    b = _train(tmp_path / "dense", tcfg, True, monkeypatch)
    for k in a.params:
        assert a.params[k].tobytes() == b.params[k].tobytes(), k
    assert a.history == b.history


def test_sparse_embedding_trains_lazily_and_resumes_exactly(tmp_path, monkeypatch):
    tcfg = TrainConfig(seq_len=8, batch=2, steps=12, eval_every=4, level="word", lr=0.01, sparse_embedding=True)
    lazy = _train(tmp_path / "lazy", tcfg, False, monkeypatch)
    dense = _train(tmp_path / "dense", TrainConfig(**{**tcfg.to_dict(), "sparse_embedding": False}), False,
                   monkeypatch)
    assert lazy.params["embedding.weight"].tobytes() != dense.params["embedding.weight"].tobytes()
    assert lazy.train.sparse_embedding is True
    _train(tmp_path / "split", tcfg, False, monkeypatch, stop_after=5)
    with compute_threads(1):
        list(train_mod.train(None, None, TrainConfig(seq_len=8, batch=2, steps=12 - 5, level="word"), None,
                             resume=checkpoint.load(tmp_path / "split" / "latest.npz"), sample_chars=0))
    split = checkpoint.load(tmp_path / "split" / "latest.npz")
    assert split.step == lazy.step
    for k in lazy.params:
        assert split.params[k].tobytes() == lazy.params[k].tobytes(), k
    for k in lazy.opt_arrays:
        assert split.opt_arrays[k].tobytes() == lazy.opt_arrays[k].tobytes(), k


@pytest.mark.parametrize("options,needle", [
    (dict(optimizer="sgd", lr=0.5), "--sparse-embedding is for --optimizer adam"),
    (dict(cell="esn"), "an ESN's input weights are fixed"),
    (dict(tie=True, embed=16, hidden=16), "does not go with --tie"),
])
def test_sparse_embedding_refusals(options, needle):
    with pytest.raises(CharlmError, match=needle):
        run.plan(TINY, sparse_embedding=True, steps=2, out="x", **options)
