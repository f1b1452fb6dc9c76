"""`charlm export --format safetensors` (issue 16): the file follows the safetensors layout, its
tensors are the checkpoint's bit for bit under torch.nn's state_dict names, and (when PyTorch is
installed: the benchmark extra) a torch module loaded from it gives charlm's log-probabilities."""
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
