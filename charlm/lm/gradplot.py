"""Pictures of gradient flow without a terminal: a sparkline and the table's lags (text), and
the PNG of the curves (matplotlib, optional). charlm.lm.grads re-exports them; the CLI renders."""
from __future__ import annotations

import math

import numpy as np

from ..errors import CharlmError

PLOT_HINT = 'plotting needs matplotlib: pip install "charlm[plot]" (or pip install matplotlib)'
SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values, lo: float | None = None, hi: float | None = None) -> str:
    """One block character per value, scaled on log10 between lo and hi (log10 values;
    default: the values' own range). Zero or non-finite values are a space."""
    v = np.asarray(values, dtype=np.float64)
    with np.errstate(all="ignore"):
        lg = np.where((v > 0) & np.isfinite(v), np.log10(np.where(v > 0, v, 1.0)), np.nan)
    ok = np.isfinite(lg)
    if not ok.any():
        return " " * len(v)
    lo = float(np.nanmin(lg)) if lo is None else lo
    hi = float(np.nanmax(lg)) if hi is None else hi
    span = hi - lo
    out = []
    for x in lg:
        if not math.isfinite(x):
            out.append(" ")
        elif span <= 0:
            out.append(SPARK[len(SPARK) // 2])
        else:
            q = int(round((min(max(x, lo), hi) - lo) / span * (len(SPARK) - 1)))
            out.append(SPARK[q])
    return "".join(out)


def table_lags(max_lag: int) -> list[int]:
    """The lags a table shows: 0-4, then powers of two, and max_lag."""
    lags = [k for k in range(min(max_lag, 4) + 1)]
    k = 8
    while k < max_lag:
        lags.append(k)
        k *= 2
    if max_lag not in lags:
        lags.append(max_lag)
    return lags


def plot(results: list, path: str, title: str = "") -> None:
    """Write a PNG: mean ||dL_T/dh_(T-k)|| against k on a log scale, one curve per result
    (charlm.lm.grads.GradFlow, duck-typed: cell, label, norms, max_lag, steps).
    CharlmError when matplotlib is missing or the file cannot be written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CharlmError(PLOT_HINT) from None
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    colors = {"rnn": "tab:red", "gru": "tab:blue", "lstm": "tab:green"}
    seen = set()
    for r in results:
        k = np.arange(r.max_lag + 1)
        n = np.where(r.norms > 0, r.norms, np.nan)
        # one colour per cell, trained models solid and untrained ones dashed; a second curve of
        # the same kind takes the next colour of matplotlib's cycle
        style = "-" if r.steps else "--"
        color = colors.get(r.cell) if (r.cell, style) not in seen else None
        seen.add((r.cell, style))
        ax.semilogy(k, n, style, color=color, lw=1.8, label=r.label or r.cell)
    ax.set_xlabel("lag k (steps back from the last step T)")
    ax.set_ylabel(r"mean $\|\partial L_T / \partial h_{T-k}\|_2$")
    ax.set_title(title or "Gradient flow through time")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    try:
        fig.savefig(path)
    except OSError as e:
        raise CharlmError(f"could not write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
