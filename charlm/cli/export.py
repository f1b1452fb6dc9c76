"""`charlm export MODEL --format safetensors`: the weights as a standard file (charlm.lm.export)."""
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
    fmt: Annotated[str, typer.Option("--format", help="safetensors (tensors named as torch.nn's state_dict keys, "
                                                      "plus a JSON of the configuration and vocabulary).")]
    = "safetensors",
    output: Annotated[Optional[str], typer.Option("--output", "-o", help="File to write. Default: model.safetensors "
                                                                         "beside the checkpoint.", show_default=False)]
    = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the files written as JSON.")] = False,
):
    """Export a model's weights as a standard file that loads into PyTorch without charlm."""
    from ..config import models_dir
    from ..lm import checkpoint
    from ..lm.export import export
    try:
        ck = checkpoint.load(checkpoint.resolve(model, models_dir()))
        path = output or str(Path(ck.path).with_name("model.safetensors"))
        files = export(ck, path, fmt)
    except CharlmError as e:
        fail(str(e))
    if as_json:
        print(dumps({"files": files}))
    else:
        out.print(f"wrote {escape(files[0])} and {escape(files[1])} (configuration and vocabulary)")
