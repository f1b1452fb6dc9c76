"""Export a model as a standard file: safetensors (written here; no extra package needed) or ONNX
(built with the onnx package: the optional extra, pip install "charlm[onnx]").

safetensors, as documented by Hugging Face: an 8-byte little-endian header length N, N bytes of
JSON header ({name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}},
padded with spaces to a multiple of 8), then the raw little-endian bytes of every tensor. The names
of a recurrent model are those of torch.nn's state_dict for a module with attributes embedding
(nn.Embedding), rnn (nn.RNN / nn.GRU / nn.LSTM, batch_first=False) and decoder (nn.Linear), so

    model.load_state_dict({k: torch.from_numpy(v) for k, v in read_safetensors(path).items()})

loads them one to one (see charlm.lm.model for the shapes and the gate order, which is torch's).
The header's metadata and a JSON file beside it (PATH.json) carry the configuration and the
vocabulary (the token of each id, in order), so the model can be rebuilt without charlm. A tied
model (cfg.tie) has no decoder.weight of its own: the file holds a copy of embedding.weight under
that name, as torch's state_dict of a tied module does.

ONNX (opset 17, IR version 8, float32): one step function of the model, so a runtime can score a
text in one call or generate token by token, carrying the state:

    inputs   tokens (T, N) int64, h0 (L, N, H) float32 [, c0 (L, N, H) for the LSTM]
    outputs  logprobs (T, N, V) float32 (natural log), hn (L, N, H) [, cn (L, N, H)]

T and N are free. The graph is Gather (embedding) -> one ONNX LSTM / GRU / RNN node per layer
(weights reordered to ONNX's gate order: LSTM [i, o, f, c] from our [i, f, g, o]; GRU [z, r, h]
from our [r, z, n], with linear_before_reset=1, which is torch's and our candidate) -> MatMul + Add
(decoder) -> LogSoftmax. The model's metadata_props hold "charlm" (the JSON written beside the
safetensors: configuration, vocabulary, begin_token) so the file stands alone; the same JSON is
also written to PATH.json. The context starts from h0 = c0 = 0 with begin_token fed first, as
charlm's own sampling and scoring start. Adaptive-softmax models and ESNs are not exported to ONNX.
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


ONNX_OPSET = 17
ONNX_IR_VERSION = 8          # what onnxruntime >= 1.13 reads
ONNX_EXTERNAL_BYTES = 1_500_000_000  # weights past this go to PATH.data (protobuf's 2 GB limit on one message)
ONNX_HINT = 'ONNX export needs the onnx package: pip install "charlm[onnx]" (or pip install onnx)'
FORMATS = ("safetensors", "onnx")


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
            "decoder": f"nn.Linear({cfg.hidden}, {cfg.vocab_size})"
                       + (" with decoder.weight = embedding.weight (tied)" if cfg.tie else "")},
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


def decoder_weight(ckpt: checkpoint.Checkpoint) -> np.ndarray:
    """The decoder's weight (V, H): its own, or the embedding table of a tied model."""
    p = ckpt.params
    if "decoder.weight" in p:
        return p["decoder.weight"]
    if ckpt.model.tie and "embedding.weight" in p:
        return p["embedding.weight"]
    raise CharlmError(f"{ckpt.path} has no decoder.weight to export")


def torch_tensors(ckpt: checkpoint.Checkpoint) -> dict[str, np.ndarray]:
    """The tensors of the safetensors file: the parameters, with decoder.weight spelled out for a
    tied model (torch's state_dict of a tied module has both names)."""
    tensors = dict(ckpt.params)
    if ckpt.model.tie and "decoder.weight" not in tensors:
        tensors["decoder.weight"] = decoder_weight(ckpt)
    return tensors


def export(ckpt: checkpoint.Checkpoint, path: str, fmt: str = "safetensors") -> list[str]:
    """Write the model to path in the format fmt ("safetensors" or "onnx"); returns the files
    written (the model file, and path + ".json": configuration and vocabulary)."""
    if fmt not in FORMATS:
        raise CharlmError(f"unknown export format {str(fmt)[:40]!r}: give safetensors or onnx")
    info = describe(ckpt)
    if fmt == "onnx":
        lstm = ckpt.model.cell == "lstm"
        info["onnx"] = {"inputs": ["tokens (T, N) int64", "h0 (L, N, H) float32"] + (["c0 (L, N, H) float32"] * lstm),
                        "outputs": ["logprobs (T, N, V) float32", "hn (L, N, H)"] + (["cn (L, N, H)"] * lstm)}
        files = write_onnx(ckpt, path, info)
    else:
        write_safetensors(torch_tensors(ckpt), path, {"format": FORMAT, "charlm": json.dumps(info, ensure_ascii=False)})
        files = [path]
    side = path + ".json"
    try:
        with open(side, "w", encoding="utf-8") as f:
            json.dump(info, f, ensure_ascii=False, indent=1)
    except OSError as e:
        raise CharlmError(f"cannot write {side}: {e.strerror or e}") from None
    return files + [side]


# ------------------------------------------------------------------------------------------ ONNX
# Our row blocks of W_ih / W_hh / b_* (each H rows) in the order ONNX stores them.
_ONNX_BLOCKS = {"lstm": (0, 3, 1, 2),   # ONNX [i, o, f, c] from our [i, f, g, o]
                "gru": (1, 0, 2),       # ONNX [z, r, h] from our [r, z, n]
                "rnn": (0,)}
_ONNX_OPS = {"lstm": "LSTM", "gru": "GRU", "rnn": "RNN"}


def check_onnx_exportable(cfg) -> None:
    """Refuse what the ONNX graph does not cover, in one line."""
    if cfg.cell not in _ONNX_OPS:
        raise CharlmError(f"ONNX export covers rnn, gru and lstm models, not --cell {cfg.cell}; "
                          f"use --format safetensors")
    if cfg.softmax != "full":
        raise CharlmError(f"ONNX export does not cover --softmax {cfg.softmax} yet; use --format safetensors")


def _onnx_blocks(a: np.ndarray, cell: str, H: int) -> np.ndarray:
    """a (G*H, ...) with its H-row gate blocks put in ONNX's order."""
    return np.concatenate([a[b * H:(b + 1) * H] for b in _ONNX_BLOCKS[cell]], axis=0)


def onnx_model(ckpt: checkpoint.Checkpoint, info: dict | None = None):
    """The onnx.ModelProto of a recurrent model (see the module docstring); CharlmError without
    the onnx package or for a model it does not cover."""
    cfg = ckpt.model
    check_onnx_exportable(cfg)
    try:
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        raise CharlmError(ONNX_HINT) from None
    info = describe(ckpt) if info is None else info
    p = ckpt.params
    L, H, V, cell = cfg.layers, cfg.hidden, cfg.vocab_size, cfg.cell
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)
    inits = [numpy_helper.from_array(f32(p["embedding.weight"]), "embedding.weight"),
             numpy_helper.from_array(f32(decoder_weight(ckpt).T), "decoder.weight_T"),  # (H, V)
             numpy_helper.from_array(f32(p["decoder.bias"]), "decoder.bias"),
             numpy_helper.from_array(np.array([0], dtype=np.int64), "axis_0"),
             numpy_helper.from_array(np.array([1], dtype=np.int64), "axis_1")]
    nodes = [helper.make_node("Gather", ["embedding.weight", "tokens"], ["x_0"], axis=0, name="embedding")]
    lstm = cell == "lstm"
    hn, cn = [], []
    for k in range(L):
        W = _onnx_blocks(p[f"rnn.weight_ih_l{k}"], cell, H)[None]           # (1, G*H, D)
        R = _onnx_blocks(p[f"rnn.weight_hh_l{k}"], cell, H)[None]           # (1, G*H, H)
        B = np.concatenate([_onnx_blocks(p[f"rnn.bias_ih_l{k}"], cell, H),
                            _onnx_blocks(p[f"rnn.bias_hh_l{k}"], cell, H)])[None]  # (1, 2*G*H)
        inits += [numpy_helper.from_array(f32(W), f"W_l{k}"), numpy_helper.from_array(f32(R), f"R_l{k}"),
                  numpy_helper.from_array(f32(B), f"B_l{k}"),
                  numpy_helper.from_array(np.array([k], dtype=np.int64), f"start_l{k}"),
                  numpy_helper.from_array(np.array([k + 1], dtype=np.int64), f"end_l{k}")]
        nodes.append(helper.make_node("Slice", ["h0", f"start_l{k}", f"end_l{k}", "axis_0"], [f"h0_l{k}"]))
        ins = [f"x_{k}", f"W_l{k}", f"R_l{k}", f"B_l{k}", "", f"h0_l{k}"]
        outs = [f"y_l{k}", f"hn_l{k}"]
        if lstm:
            nodes.append(helper.make_node("Slice", ["c0", f"start_l{k}", f"end_l{k}", "axis_0"], [f"c0_l{k}"]))
            ins.append(f"c0_l{k}")
            outs.append(f"cn_l{k}")
            cn.append(f"cn_l{k}")
        attrs = {"hidden_size": H}
        if cell == "gru":
            attrs["linear_before_reset"] = 1
        nodes.append(helper.make_node(_ONNX_OPS[cell], ins, outs, name=f"rnn_l{k}", **attrs))
        # y (T, 1, N, H): drop the direction axis for the next layer's input (T, N, H)
        nodes.append(helper.make_node("Squeeze", [f"y_l{k}", "axis_1"], [f"x_{k + 1}"]))
        hn.append(f"hn_l{k}")
    nodes.append(helper.make_node("Concat", hn, ["hn"], axis=0) if L > 1 else
                 helper.make_node("Identity", hn, ["hn"]))
    if lstm:
        nodes.append(helper.make_node("Concat", cn, ["cn"], axis=0) if L > 1 else
                     helper.make_node("Identity", cn, ["cn"]))
    nodes += [helper.make_node("MatMul", [f"x_{L}", "decoder.weight_T"], ["logits_nobias"], name="decoder"),
              helper.make_node("Add", ["logits_nobias", "decoder.bias"], ["logits"]),
              helper.make_node("LogSoftmax", ["logits"], ["logprobs"], axis=-1)]
    state = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [L, "N", H])
    inputs = [helper.make_tensor_value_info("tokens", TensorProto.INT64, ["T", "N"]), state("h0")]
    outputs = [helper.make_tensor_value_info("logprobs", TensorProto.FLOAT, ["T", "N", V]), state("hn")]
    if lstm:
        inputs.append(state("c0"))
        outputs.append(state("cn"))
    graph = helper.make_graph(nodes, f"charlm_{cell}", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", ONNX_OPSET)],
                              producer_name="charlm", doc_string=(
                                  f"charlm {cell} language model: tokens (T, N) int64 and h0"
                                  + (", c0" if lstm else "") + f" (L={L}, N, H={H}) in; logprobs (T, N, V={V}) "
                                  "(natural log) and hn" + (", cn" if lstm else "") + " out. Start from zero "
                                  f"state with token {info['begin_token']} (begin_token) fed first; the "
                                  "vocabulary is in metadata_props['charlm']."))
    model.ir_version = ONNX_IR_VERSION
    helper.set_model_props(model, {"charlm": json.dumps(info, ensure_ascii=False),
                                   "begin_token": str(info["begin_token"])})
    return model


def write_onnx(ckpt: checkpoint.Checkpoint, path: str, info: dict | None = None) -> list[str]:
    """Write the ONNX model of ckpt to path, atomically; the files written (past ONNX_EXTERNAL_BYTES
    of weights, the tensors go to PATH.data beside the graph, as ONNX's external data)."""
    model = onnx_model(ckpt, info)
    import onnx
    big = sum(t.ByteSize() for t in model.graph.initializer) > ONNX_EXTERNAL_BYTES
    if not big:
        try:
            onnx.checker.check_model(model)
        except onnx.checker.ValidationError as e:  # a bug here, not the user's: still one line
            raise CharlmError(f"the ONNX graph failed onnx's checker: {str(e).splitlines()[0]}") from None
    tmp = f"{path}.tmp"
    data = path + ".data"
    try:
        if big:
            if os.path.exists(data):  # save_model appends to an existing data file
                os.remove(data)
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=os.path.basename(data), size_threshold=1024)
            os.chmod(data, os.stat(tmp).st_mode & 0o777)  # onnx makes it private (0600); give it the model's mode
        else:
            onnx.save_model(model, tmp)
        os.replace(tmp, path)
    except (OSError, ValueError) as e:
        try:
            os.remove(tmp)
        except OSError:
            pass
        raise CharlmError(f"cannot write {path}: {getattr(e, 'strerror', None) or e}") from None
    return [path, data] if big else [path]
