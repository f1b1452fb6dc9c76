"""`charlm export MODEL --format safetensors|onnx`: the model as a standard file (charlm.lm.export)."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from ..errors import CharlmError
from .common import dumps, fail, out


def export_cmd(
    model: Annotated[Optional[str], typer.Argument(help="Checkpoint file or run directory (its best checkpoint). "
                                                        "Default: the most recently written run under models/.",
                                                   show_default=False)] = None,
    fmt: Annotated[str, typer.Option("--format", help="safetensors (tensors named as torch.nn's state_dict keys) "
                                                      "or onnx (a graph that takes token ids (T, N) and the hidden "
                                                      "state in and gives log-probabilities (T, N, V) and the new "
                                                      "state out; needs the onnx extra: pip install "
                                                      "\"charlm\\[onnx]\"; rnn, gru and lstm models with the full "
                                                      "softmax, not --softmax adaptive or esn yet). Either way a "
                                                      "JSON of the configuration and vocabulary is written beside "
                                                      "it.")] = "safetensors",
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="File to write. Default: model.safetensors "
                                                                         "or model.onnx beside the checkpoint.",
                                                  show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the files written as JSON.")] = False,
):
    """Export a model as a standard file: safetensors loads into PyTorch, onnx runs in onnxruntime, without
    charlm."""
    from ..config import models_dir
    from ..lm import checkpoint
    from ..lm.export import FORMATS, export
    try:
        if fmt not in FORMATS:
            raise CharlmError(f"unknown export format {fmt[:40]!r}: give safetensors or onnx")
        ck = checkpoint.load(checkpoint.resolve(model, models_dir()))
        path = output or str(Path(ck.path).with_name(f"model.{fmt}"))
        files = export(ck, path, fmt)
    except CharlmError as e:
        fail(str(e))
    if as_json:
        print(dumps({"files": files}))
    else:
        out.print(f"wrote {', '.join(map(escape, files[:-1]))} and {escape(files[-1])} (configuration and vocabulary)")
