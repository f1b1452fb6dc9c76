"""Sampling with bfloat16 weights (`charlm sample --precision bf16`, kernels.sample.pack(precision="bf16")).

The rounding: nearest, ties to even, within half a unit of the 8-bit significand. The kernels: the
bf16 sampler gives bit for bit what the float32 sampler gives on a model whose stored weights were
rounded the same way (widening is exact; the arithmetic and its order are the float32 path's), which
the NumPy reference already checks (tests/test_kernels.py); greedy tokens equal the float64
reference's on the rounded weights. Refusals where bf16 does not apply; float32 stays the default."""
from __future__ import annotations

import numpy as np
import pytest

from charlm.config import ModelConfig
from charlm.data import Vocab
from charlm.errors import CharlmError
from charlm.kernels import sample
from charlm.lm.model import param_shapes
from charlm.lm.models import create_model
from charlm.lm.sample import Decoding, sample_batch, sample_one
from charlm.runtime import compute_threads
from tests import reference as ref
from tests.helpers import failed, ok

CELLS = ("rnn", "gru", "lstm")
STORED = ("rnn.weight_ih_l1", "rnn.weight_hh_l0", "rnn.weight_hh_l1", "decoder.weight")  # with the input table


def test_rounding_is_to_nearest_even_and_within_half_a_unit(rng):
    one = np.float32(1.0)
    ulp = np.float32(2.0 ** -7)  # the bf16 spacing at 1
    ties = np.array([one + ulp / 2, one + 3 * ulp / 2, -(one + ulp / 2)], np.float32)
    np.testing.assert_array_equal(sample.from_bf16(sample.to_bf16(ties)), [one, one + 2 * ulp, -one])
    above = np.array([one + ulp / 2 + 2.0 ** -20], np.float32)  # just past the tie: up
    assert sample.from_bf16(sample.to_bf16(above))[0] == one + ulp
    x = (rng.standard_normal(100_000) * 10.0 ** rng.uniform(-6, 6, 100_000)).astype(np.float32)
    r = sample.from_bf16(sample.to_bf16(x))
    _, e = np.frexp(x)  # |x| in [2^(e-1), 2^e): bf16 values there are 2^(e-8) apart
    assert np.all(np.abs(r.astype(np.float64) - x) <= np.ldexp(1.0, e - 9))  # half of that
    assert np.abs(r.astype(np.float64) - x).max() > 0
    bits = r.view(np.uint32)
    assert np.all(bits & 0xFFFF == 0)  # exactly representable in 16 bits


def _params(cell: str, V: int, H: int, rng) -> dict:
    cfg = ModelConfig(cell=cell, vocab_size=V, embed=8, hidden=H, layers=2)
    return {k: (0.5 * rng.standard_normal(s)).astype(np.float32) for k, s in param_shapes(cfg).items()}


def _rounded(params: dict) -> dict:
    return {k: (sample.from_bf16(sample.to_bf16(v)) if k in STORED else v) for k, v in params.items()}


def _run(cell, arrays, h, c, prime, uniforms, greedy=False, parts=1):
    K = len(uniforms)
    out, lps = np.empty(K, np.int32), np.empty(K)
    sample.stack_sample(out, lps, h, c, np.zeros(arrays[0].shape[0], np.uint8), np.asarray(prime, np.int32),
                        np.asarray(uniforms, np.float64), sample.CELL_CODES[cell], *arrays, 0.9, 0, 1.0, 1.0, greedy,
                        parts)
    return out, lps


@pytest.mark.parametrize("parts", [1, 2])
@pytest.mark.parametrize("cell", CELLS)
def test_bf16_sampler_is_the_float32_sampler_on_rounded_weights(cell, parts, rng):
    V, H = 40, 64
    params = _params(cell, V, H, rng)
    bf = sample.pack(params, 2, np.float32, parts=parts, precision="bf16")
    assert bf[3].dtype == np.uint16 and bf[2].dtype == np.uint16 and bf[6].dtype == np.uint16
    assert bf[8].shape[1] == V  # the input table (float32, from the exact weights)
    f32 = sample.pack(_rounded(params), 2, np.float32, parts=parts)
    h0 = (0.3 * rng.standard_normal((2, 1, H))).astype(np.float32)
    c0 = (0.3 * rng.standard_normal((2, 1, H))).astype(np.float32)
    u = rng.random(60)
    h1, c1, h2, c2 = h0.copy(), c0.copy(), h0.copy(), c0.copy()
    a = _run(cell, bf, h1, c1, [0, 3, 5], u, parts=parts)
    b = _run(cell, f32, h2, c2, [0, 3, 5], u, parts=parts)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()
    assert h1.tobytes() == h2.tobytes() and c1.tobytes() == c2.tobytes()
    exact = _run(cell, sample.pack(params, 2, np.float32, parts=parts), h0.copy(), c0.copy(), [0, 3, 5], u)
    assert not np.array_equal(exact[1], a[1])  # the rounding is real: the numbers move


@pytest.mark.parametrize("cell", CELLS)
def test_bf16_greedy_tokens_match_the_float64_reference_on_rounded_weights(cell, rng):
    V, H = 40, 32
    params = _params(cell, V, H, rng)
    rounded64 = {k: v.astype(np.float64) for k, v in _rounded(params).items()}
    h0 = 0.3 * rng.standard_normal((2, 1, H))
    c0 = 0.3 * rng.standard_normal((2, 1, H)) if cell == "lstm" else np.zeros((2, 1, H))
    prime, K = [3, 0, 6], 12
    out, _ = _run(cell, sample.pack(params, 2, np.float32, precision="bf16"), h0.astype(np.float32),
                  c0.astype(np.float32), prime, np.zeros(K), greedy=True)
    ids, _, _ = ref.generate(cell, rounded64, prime, K, h0, c0, greedy=True)
    np.testing.assert_array_equal(out, ids)


def test_bf16_without_the_input_table_rounds_the_first_layer_too(rng, monkeypatch):
    monkeypatch.setattr(sample, "TABLE_MAX_MACS", 0)  # as a word model's vocabulary: no table
    params = _params("lstm", 40, 32, rng)
    bf = sample.pack(params, 2, np.float32, precision="bf16")
    assert bf[1].dtype == np.uint16 and bf[8].shape[1] == 0
    f32 = sample.pack({**_rounded(params), "rnn.weight_ih_l0": sample.from_bf16(sample.to_bf16(
        params["rnn.weight_ih_l0"]))}, 2, np.float32)
    h = np.zeros((2, 1, 32), np.float32)
    u = rng.random(30)
    a = _run("lstm", bf, h.copy(), h.copy(), [1, 2], u)
    b = _run("lstm", f32, h.copy(), h.copy(), [1, 2], u)
    assert a[0].tobytes() == b[0].tobytes() and a[1].tobytes() == b[1].tobytes()


def _vocab(V: int) -> Vocab:
    return Vocab(tuple(["\n"] + [chr(0x100 + i) for i in range(V - 1)]))


def test_library_sample_with_bf16_and_refusals():
    cfg = ModelConfig(cell="lstm", vocab_size=30, embed=8, hidden=32, layers=2)
    m, vocab = create_model(cfg, seed=2), _vocab(30)
    with compute_threads(1):
        exact = sample_one(m, vocab, 50, Decoding(0.9), seed=1)
        again = sample_one(m, vocab, 50, Decoding(0.9, precision="float32"), seed=1)
        bf = sample_one(m, vocab, 50, Decoding(0.9, precision="bf16"), seed=1)
        assert exact == again and bf["n_tokens"] == 50
        with pytest.raises(CharlmError, match="one sample at a time"):
            sample_batch(m, vocab, 2, 10, Decoding(precision="bf16"))
        with pytest.raises(CharlmError, match="--precision must be one of float32, bf16"):
            Decoding(precision="fp8")
        esn = create_model(ModelConfig(cell="esn", vocab_size=30, hidden=64, layers=1), seed=0)
        with pytest.raises(CharlmError, match="for LSTM, GRU and RNN models"):
            sample_one(esn, vocab, 5, Decoding(precision="bf16"), seed=1)
        ada = create_model(ModelConfig(cell="lstm", vocab_size=300, embed=8, hidden=32, layers=1, softmax="adaptive",
                                       cutoffs=(50, 150)), seed=0)
        with pytest.raises(CharlmError, match="full softmax"):
            sample_one(ada, _vocab(300), 5, Decoding(precision="bf16"), seed=1)


def test_cli_precision(run_cli, tmp_path):
    from tests.helpers import train_tiny
    train_tiny(tmp_path / "run")
    model = str(tmp_path / "run")
    a = ok(run_cli("sample", "--model", model, "--length", "40", "--seed", "3", "--precision", "bf16", "--json"))
    assert '"n_tokens": 40' in a.stdout
    b = ok(run_cli("sample", "--model", model, "--length", "40", "--seed", "3", "--json"))
    c = ok(run_cli("sample", "--model", model, "--length", "40", "--seed", "3", "--precision", "float32", "--json"))
    assert b.stdout == c.stdout  # float32 is the default
    failed(run_cli("sample", "--model", model, "--precision", "fp16"), "--precision must be float32 or bf16")
    failed(run_cli("sample", "--model", model, "--precision", "bf16", "-n", "2"), "one sample at a time")
    failed(run_cli("sample", "--model", model, "--precision", "bf16", "--beam", "2"), "one sample at a time")
