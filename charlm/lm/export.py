"""Export a model as a standard file: safetensors (written here; no extra package needed).

safetensors, as documented by Hugging Face: an 8-byte little-endian header length N, N bytes of
JSON header ({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
padded with spaces to a multiple of 8), then the raw little-endian bytes of every tensor. The names
of a recurrent model are those of torch.nn's state_dict for a module with attributes embedding
(nn.Embedding), rnn (nn.RNN / nn.GRU / nn.LSTM, batch_first=False) and decoder (nn.Linear), so

    model.load_state_dict({k: torch.from_numpy(v) for k, v in read_safetensors(path).items()})

loads them one to one (see charlm.lm.model for the shapes and the gate order, which is torch's).
The header's metadata and a JSON file beside it (PATH.json) carry the configuration and the
vocabulary (the token of each id, in order), so the model can be rebuilt without charlm.
"""
from __future__ import annotations

import json
import os
import struct

import numpy as np

from ..errors import CharlmError
from . import checkpoint

FORMAT = "charlm-export"
_DTYPES = {np.dtype(np.float32): "F32", np.dtype(np.float64): "F64", np.dtype(np.int32): "I32",
           np.dtype(np.int64): "I64", np.dtype(np.uint8): "U8"}
_NUMPY = {v: k for k, v in _DTYPES.items()}


def describe(ckpt: checkpoint.Checkpoint) -> dict:
    """The JSON written beside the tensors: format, config, vocabulary, torch modules, how to score."""
    cfg = ckpt.model
    torch_cls = {"rnn": "RNN(nonlinearity='tanh')", "gru": "GRU", "lstm": "LSTM"}.get(cfg.cell)
    return {
        "format": FORMAT, "version": 1,
        "config": {k: v for k, v in vars(cfg).items()},
        "vocab": ckpt.vocab.to_dict(),
        "torch": None if torch_cls is None else {
            "embedding": f"nn.Embedding({cfg.vocab_size}, {cfg.embed})",
            "rnn": f"nn.{torch_cls.split('(')[0]}({cfg.embed}, {cfg.hidden}, num_layers={cfg.layers}"
                   + (", nonlinearity='tanh'" if cfg.cell == "rnn" else "") + ")",
            "decoder": f"nn.Linear({cfg.hidden}, {cfg.vocab_size})"},
        "begin_token": ckpt.vocab.eos_id,
        "note": "log P(next) = log_softmax(decoder(rnn(embedding(ids))[0])); the context starts from the "
                "zero state with begin_token fed first",
        "step": ckpt.step, "corpus": ckpt.corpus,
    }


def write_safetensors(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> None:
    """Write tensors (C order, little-endian) as a safetensors file, atomically."""
    header: dict = {}
    offset = 0
    blobs = []
    for name, a in tensors.items():
        a = np.ascontiguousarray(a)
        if a.dtype not in _DTYPES:
            raise CharlmError(f"cannot export {name}: dtype {a.dtype} has no safetensors name here")
        b = a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
        header[name] = {"dtype": _DTYPES[a.dtype], "shape": list(a.shape), "data_offsets": [offset, offset + len(b)]}
        offset += len(b)
        blobs.append(b)
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(raw)))
            f.write(raw)
            for b in blobs:
                f.write(b)
        os.replace(tmp, path)
    except OSError as e:
        raise CharlmError(f"cannot write {path}: {e.strerror or e}") from None


def read_safetensors(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and the metadata of a safetensors file (the inverse of write_safetensors)."""
    with open(path, "rb") as f:
        data = f.read()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    meta = header.pop("__metadata__", {})
    body = memoryview(data)[8 + n:]
    out = {}
    for name, h in header.items():
        b0, b1 = h["data_offsets"]
        out[name] = np.frombuffer(body[b0:b1], dtype=_NUMPY[h["dtype"]].newbyteorder("<")).reshape(h["shape"]).copy()
    return out, meta


def export(ckpt: checkpoint.Checkpoint, path: str, fmt: str = "safetensors") -> list[str]:
    """Write the model to path in the format fmt; returns the files written (the tensors, and
    path + ".json": config and vocabulary)."""
    if fmt != "safetensors":
        raise CharlmError(f"unknown export format {fmt!r}: only safetensors is written so far (onnx is planned)")
    info = describe(ckpt)
    write_safetensors(ckpt.params, path, {"format": FORMAT, "charlm": json.dumps(info, ensure_ascii=False)})
    side = path + ".json"
    try:
        with open(side, "w", encoding="utf-8") as f:
            json.dump(info, f, ensure_ascii=False, indent=1)
    except OSError as e:
        raise CharlmError(f"cannot write {side}: {e.strerror or e}") from None
    return [path, side]
