"""The one factory of the model family: a config's cell picks the model class.

    rnn, gru, lstm   charlm.lm.model.Model     (parameter names: that module's docstring)
    esn              charlm.lm.esn.EsnModel    (parameter names: that module's docstring)

Both are charlm.lm.base.BaseModel: the same methods for scoring, sampling and training.
"""
from __future__ import annotations

import numpy as np

from ..config import ModelConfig
from ..errors import CharlmError
from .base import BaseModel
from .esn import EsnModel
from .model import Model

MODELS: dict[str, type[BaseModel]] = {cell: cls for cls in (Model, EsnModel) for cell in cls.cells}


def model_class(cell: str) -> type[BaseModel]:
    """The class implementing a cell (CharlmError for an unknown one)."""
    try:
        return MODELS[cell]
    except KeyError:
        raise CharlmError(f"unknown cell {cell!r}: expected one of {', '.join(MODELS)}") from None


def check_params(cfg: ModelConfig, params: dict[str, np.ndarray]) -> None:
    """Every array cfg's model needs present, with the right shape and one float dtype
    (CharlmError naming the first that is not)."""
    model_class(cfg.cell).check_params(cfg, params)


def trainable_names(cfg: ModelConfig) -> list[str]:
    """The parameters the optimizer updates (and keeps moments of): the readout for an ESN, else all."""
    if cfg.cell == "esn":
        from .esn import TRAINABLE
        return list(TRAINABLE)
    from .model import param_shapes
    return list(param_shapes(cfg))


def build_model(cfg: ModelConfig, params: dict[str, np.ndarray]) -> BaseModel:
    """The model a configuration describes, over the given parameters (checked)."""
    return model_class(cfg.cell)(cfg, params)


def create_model(cfg: ModelConfig, seed: int = 0, dtype=np.float32) -> BaseModel:
    """A freshly initialised model of cfg, drawn from seed."""
    return model_class(cfg.cell).create(cfg, seed, dtype)
