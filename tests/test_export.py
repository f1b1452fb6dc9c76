"""`charlm export` (issue 16). safetensors: the file follows the safetensors layout, its tensors are
the checkpoint's bit for bit under torch.nn's state_dict names, and (when PyTorch is installed: the
benchmark extra) a torch module loaded from it gives charlm's log-probabilities. onnx (when onnx and
onnxruntime are installed: the test extra): onnxruntime gives charlm's log-probabilities and states
for rnn, gru and lstm with two layers, called on a whole window or one token at a time."""
from __future__ import annotations

import json
import struct

import numpy as np
import pytest

import charlm
from charlm.lm import checkpoint
from charlm.lm.export import read_safetensors
from helpers import failed, ok, train_tiny


@pytest.fixture(scope="module", params=["rnn", "gru", "lstm"])
def run(request, tmp_path_factory):
    path = tmp_path_factory.mktemp("export") / request.param
    train_tiny(path, cell=request.param, steps=3)
    return path


def test_safetensors_layout_and_round_trip(run_cli, run, tmp_path):
    ok(run_cli("export", str(run), "-o", "m.safetensors"))
    raw = (tmp_path / "m.safetensors").read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    assert n % 8 == 0 and header["__metadata__"]["format"] == "charlm-export"
    end = max(h["data_offsets"][1] for k, h in header.items() if k != "__metadata__")
    assert len(raw) == 8 + n + end
    tensors, meta = read_safetensors(str(tmp_path / "m.safetensors"))
    ck = checkpoint.load(run / "best.npz")
    assert set(tensors) == set(ck.params)
    for k, a in ck.params.items():
        np.testing.assert_array_equal(tensors[k], a)
        assert header[k]["dtype"] == "F32" and header[k]["shape"] == list(a.shape)
    side = json.loads((tmp_path / "m.safetensors.json").read_text())
    assert side["vocab"]["tokens"] == list(ck.vocab.tokens) and side["config"]["cell"] == ck.model.cell
    assert json.loads(meta["charlm"]) == side


def test_unknown_format_is_refused(run_cli, run):
    failed(run_cli("export", str(run), "--format", "tflite"), "tflite")


def test_pytorch_loads_the_safetensors_and_agrees(run, tmp_path):
    torch = pytest.importorskip("torch")
    nn = torch.nn
    lm = charlm.load(run)
    cfg = lm.config
    lm_path = tmp_path / "m.safetensors"
    from charlm.lm.export import export
    export(checkpoint.load(run / "best.npz"), str(lm_path))
    tensors, _ = read_safetensors(str(lm_path))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.embedding = nn.Embedding(cfg.vocab_size, cfg.embed)
            self.rnn = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[cfg.cell](cfg.embed, cfg.hidden, cfg.layers)
            self.decoder = nn.Linear(cfg.hidden, cfg.vocab_size)

        def forward(self, ids):
            return torch.log_softmax(self.decoder(self.rnn(self.embedding(ids))[0]), dim=-1)

    net = Net()
    net.load_state_dict({k: torch.from_numpy(v) for k, v in tensors.items()})
    text = "the old man and the sea"
    s = lm.score(text)
    ids = [lm.vocab.eos_id] + [t["id"] for t in s["tokens"]]
    with torch.no_grad():
        lp = net(torch.tensor(ids[:-1])[:, None])[:, 0]
    theirs = lp[torch.arange(len(ids) - 1), torch.tensor(ids[1:])].numpy()
    np.testing.assert_allclose(theirs, [t["logprob"] for t in s["tokens"]], atol=1e-4)


# ------------------------------------------------------------------------------------------ ONNX
def _onnx_runtime():
    """onnx and onnxruntime (the test extra), or a clean skip naming what is missing."""
    pytest.importorskip("onnx", reason="onnx is not installed (pip install 'charlm[onnx]' or the test extra)")
    return pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (the test extra)")


@pytest.fixture(scope="module", params=["rnn", "gru", "lstm"])
def run2(request, tmp_path_factory):
    """A two-layer model of each cell, trained a few steps through the library (charlm.train)."""
    path = tmp_path_factory.mktemp("onnx") / request.param
    from helpers import TINY
    for _ in charlm.train(str(TINY), cell=request.param, layers=2, hidden=6, embed=5, seq_len=8, batch=2,
                          steps=3, eval_every=2, sample_length=0, out=str(path)):
        pass
    return path


def _charlm_logprobs(model, x, state):
    """charlm's log P(v | inputs up to x[t, n]) for every token v: (T, N, V) float64, and the state after."""
    V = model.cfg.vocab_size
    out = np.empty(x.shape + (V,))
    for v in range(V):
        lp, after = model.token_logprobs(x, np.full_like(x, v), state.copy())
        out[..., v] = lp
    return out, after


def _feeds(cell, x, h, c):
    feeds = {"tokens": np.asarray(x, dtype=np.int64), "h0": np.asarray(h, dtype=np.float32)}
    if cell == "lstm":
        feeds["c0"] = np.asarray(c, dtype=np.float32)
    return feeds


def test_onnx_agrees_with_charlm_and_carries_state(run_cli, run2, tmp_path):
    ort = _onnx_runtime()
    from charlm.lm.models import build_model
    ok(run_cli("export", str(run2), "--format", "onnx", "-o", "m.onnx"))
    ck = checkpoint.load(run2 / "best.npz")
    cfg, model = ck.model, build_model(ck.model, ck.params)
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == ["tokens", "h0"] + (["c0"] if cfg.cell == "lstm" else [])
    meta = json.loads(sess.get_modelmeta().custom_metadata_map["charlm"])
    assert meta["vocab"]["tokens"] == list(ck.vocab.tokens) and meta["begin_token"] == ck.vocab.eos_id
    assert json.loads((tmp_path / "m.onnx.json").read_text())["config"]["cell"] == cfg.cell

    rng = np.random.default_rng(0)
    T, N, L, H = 7, 3, cfg.layers, cfg.hidden
    x = rng.integers(0, cfg.vocab_size, (T, N))
    state = model.zero_state(N)
    state.h[:] = rng.uniform(-0.5, 0.5, state.h.shape)
    if cfg.cell == "lstm":
        state.c[:] = rng.uniform(-0.5, 0.5, state.c.shape)
    want, after = _charlm_logprobs(model, x, state)
    got = sess.run(None, _feeds(cfg.cell, x, state.h, state.c))
    assert got[0].shape == (T, N, cfg.vocab_size) and got[1].shape == (L, N, H)
    np.testing.assert_allclose(got[0], want, atol=1e-4)
    np.testing.assert_allclose(got[1], after.h, atol=1e-5)
    if cfg.cell == "lstm":
        np.testing.assert_allclose(got[2], after.c, atol=1e-5)

    # step by step, the state carried from one call to the next: the same as the whole window
    h, c = state.h, state.c
    for t in range(T):
        step = sess.run(None, _feeds(cfg.cell, x[t:t + 1], h, c))
        np.testing.assert_allclose(step[0][0], got[0][t], atol=1e-5)
        h, c = step[1], step[2] if cfg.cell == "lstm" else None
    np.testing.assert_allclose(h, got[1], atol=1e-5)


def test_onnx_generates_what_charlm_generates(run2, tmp_path):
    """Greedy decoding one token per call from the begin token and the zero state, as the
    metadata says, gives charlm's greedy sample and its log-probability."""
    ort = _onnx_runtime()
    from charlm.lm.export import export
    ck = checkpoint.load(run2 / "best.npz")
    export(ck, str(tmp_path / "m.onnx"), "onnx")
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    begin = int(sess.get_modelmeta().custom_metadata_map["begin_token"])
    cfg = ck.model
    h = c = np.zeros((cfg.layers, 1, cfg.hidden), np.float32)
    tok, ids, total = begin, [], 0.0
    for _ in range(25):
        out = sess.run(None, _feeds(cfg.cell, [[tok]], h, c))
        lp = out[0][0, 0]
        tok = int(np.argmax(lp))
        ids.append(tok)
        total += float(lp[tok])
        h, c = out[1], out[2] if cfg.cell == "lstm" else None
    mine = charlm.load(run2).sample(length=25, greedy=True)[0]
    assert mine["ids"] == ids
    assert mine["logprob"] == pytest.approx(total, abs=1e-3)


def test_onnx_tied_model_uses_the_embedding(tmp_path):
    """A tied model (no decoder.weight of its own) exports as the untied model whose decoder is a copy
    of the embedding table."""
    ort = _onnx_runtime()
    from dataclasses import replace

    from charlm.config import ModelConfig
    from charlm.lm.export import export
    from helpers import make_checkpoint
    ck = make_checkpoint("gru", layers=2)
    ck.params["decoder.bias"][:] = 0.0  # make_checkpoint plants extreme values there
    E = ck.model.embed
    cfg = ModelConfig(**{**ck.model.to_dict(), "hidden": E})
    rng = np.random.default_rng(1)
    from charlm.lm.model import param_shapes
    untied = {n: rng.uniform(-0.5, 0.5, s).astype(np.float32) for n, s in param_shapes(cfg).items()}
    untied["decoder.weight"] = untied["embedding.weight"].copy()
    tied = {n: a for n, a in untied.items() if n != "decoder.weight"}
    a = replace(ck, model=cfg, params=untied, path="untied.npz")
    b = replace(ck, model=ModelConfig(**{**cfg.to_dict(), "tie": True}), params=tied, path="tied.npz")
    export(a, str(tmp_path / "a.onnx"), "onnx")
    export(b, str(tmp_path / "b.onnx"), "onnx")
    x = rng.integers(0, cfg.vocab_size, (4, 2))
    h = rng.uniform(-1, 1, (cfg.layers, 2, E)).astype(np.float32)
    outs = [ort.InferenceSession(str(tmp_path / f), providers=["CPUExecutionProvider"]).run(
        None, {"tokens": x, "h0": h}) for f in ("a.onnx", "b.onnx")]
    np.testing.assert_array_equal(outs[0][0], outs[1][0])


@pytest.mark.parametrize("changes, needle", [
    (dict(cell="esn", layers=1, embed=1), "esn"),
    (dict(softmax="adaptive", cutoffs=(4,)), "adaptive"),
])
def test_onnx_refuses_what_it_does_not_cover(changes, needle):
    from dataclasses import replace

    from charlm.config import ModelConfig
    from charlm.errors import CharlmError
    from charlm.lm.export import check_onnx_exportable, export
    from helpers import make_checkpoint
    ck = make_checkpoint("lstm", layers=1)
    cfg = ModelConfig(**{**ck.model.to_dict(), **changes})
    with pytest.raises(CharlmError, match=needle):
        check_onnx_exportable(cfg)
    with pytest.raises(CharlmError, match="safetensors"):
        export(replace(ck, model=cfg), "never-written.onnx", "onnx")


def test_onnx_without_the_extra_is_one_line(run_cli, run, monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "onnx", None)  # import onnx raises ImportError
    failed(run_cli("export", str(run), "--format", "onnx"), "charlm[onnx]")


def test_onnx_weights_past_the_limit_go_to_a_data_file(run, tmp_path, monkeypatch):
    """A model past protobuf's 2 GB goes out as ONNX external data (PATH.data beside the graph); the
    limit is lowered here so a tiny model takes that path."""
    ort = _onnx_runtime()
    from charlm.lm import export as export_mod
    monkeypatch.setattr(export_mod, "ONNX_EXTERNAL_BYTES", 0)
    ck = checkpoint.load(run / "best.npz")
    files = export_mod.export(ck, str(tmp_path / "m.onnx"), "onnx")
    assert files == [str(tmp_path / "m.onnx"), str(tmp_path / "m.onnx.data"), str(tmp_path / "m.onnx.json")]
    assert (tmp_path / "m.onnx.data").stat().st_size > 0
    assert (tmp_path / "m.onnx.data").stat().st_mode & 0o777 == (tmp_path / "m.onnx").stat().st_mode & 0o777
    size = (tmp_path / "m.onnx.data").stat().st_size
    export_mod.export(ck, str(tmp_path / "m.onnx"), "onnx")  # again: the data file is replaced, not appended to
    assert (tmp_path / "m.onnx.data").stat().st_size == size
    cfg = ck.model
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    z = np.zeros((cfg.layers, 1, cfg.hidden), np.float32)
    out = sess.run(None, _feeds(cfg.cell, [[ck.vocab.eos_id]], z, z))
    assert np.isclose(np.exp(out[0]).sum(), 1.0, atol=1e-5)


def test_safetensors_of_a_tied_model_spells_out_the_decoder(tmp_path):
    from dataclasses import replace

    from charlm.config import ModelConfig
    from charlm.lm.export import export
    from helpers import make_checkpoint
    ck = make_checkpoint("lstm", layers=1)
    cfg = ModelConfig(**{**ck.model.to_dict(), "hidden": ck.model.embed, "tie": True})
    rng = np.random.default_rng(0)
    from charlm.lm.model import param_shapes
    params = {n: rng.standard_normal(s).astype(np.float32) for n, s in param_shapes(cfg).items()
              if n != "decoder.weight"}
    export(replace(ck, model=cfg, params=params), str(tmp_path / "t.safetensors"))
    tensors, _ = read_safetensors(str(tmp_path / "t.safetensors"))
    np.testing.assert_array_equal(tensors["decoder.weight"], params["embedding.weight"])
    assert set(tensors) == set(params) | {"decoder.weight"}


def test_the_library_exports_as_the_command_does(run_cli, run, tmp_path):
    """LanguageModel.export writes the same tensors and side file as `charlm export`."""
    ok(run_cli("export", str(run), "-o", "cli.safetensors"))
    files = charlm.load(str(run)).export(tmp_path / "lib.safetensors")
    assert files == [str(tmp_path / "lib.safetensors"), str(tmp_path / "lib.safetensors.json")]
    a, _ = read_safetensors(str(tmp_path / "cli.safetensors"))
    b, _ = read_safetensors(files[0])
    assert set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)
    with pytest.raises(charlm.CharlmError, match="unknown export format"):
        charlm.load(str(run)).export(tmp_path / "x", "pickle")
