"""charlm: recurrent language models (RNN, GRU, LSTM, ESN) trained, sampled and scored from the
command line or from Python.

    import charlm
    lm = charlm.load("models/run")                  # LanguageModel: generate, score, logprobs, evaluate
    for event in charlm.train("input.txt", out="models/run", steps=200): ...

`import charlm` is cheap: load, LanguageModel and train are imported on first use (PEP 562), so
Numba, the kernels and the command line's Typer and Rich are loaded only when needed.
"""
from typing import TYPE_CHECKING as _TYPE_CHECKING

from .errors import CharlmError

__version__ = "0.1.0"
__all__ = ["__version__", "CharlmError", "LanguageModel", "load", "train"]

# name -> the module that defines it, imported on first access
_LAZY = {"load": "charlm.lm.api", "LanguageModel": "charlm.lm.api", "train": "charlm.lm.run"}

if _TYPE_CHECKING:  # for type checkers and IDEs; never executed
    from .lm.api import LanguageModel, load
    from .lm.run import train


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'charlm' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
