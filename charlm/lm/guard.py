"""The divergence guard's snapshots (charlm.lm.train): the last good weights and optimizer state in
memory, put back after a non-finite step, and kept by checkpoints so that resume stays exact through a
rollback."""
from __future__ import annotations

from . import checkpoint as ckpt_mod
from .base import BaseModel


def snapshot(model: BaseModel, opt, state, step: int = 0) -> dict:
    """In-memory copy of the last good weights and optimizer state."""
    return {"step": step, "params": {k: v.copy() for k, v in model.trainable.items()},
            "opt": {k: v.copy() for k, v in opt.state_arrays().items()}, "t": opt.t}


def guard_of(ck: ckpt_mod.Checkpoint, own: dict) -> tuple[dict, int, int]:
    """The guard a checkpoint saved: (its snapshot, else `own`, the checkpoint's weights; halvings;
    non-finite steps in a row)."""
    g = ck.guard
    snapshot = own
    if ck.guard_arrays:
        snapshot = {"step": g["step"], "t": g["t"],
                    "params": {n[6:]: a.copy() for n, a in ck.guard_arrays.items() if n.startswith("param/")},
                    "opt": {n[4:]: a.copy() for n, a in ck.guard_arrays.items() if n.startswith("opt/")}}
    return snapshot, int(g.get("halvings", 0)), int(g.get("nonfinite_run", 0))


def restore(snapshot: dict, model: BaseModel, opt, streams: int):
    """Put the snapshot back; returns a zero hidden state for `streams` streams."""
    for k, v in snapshot["params"].items():
        model.params[k][...] = v
    for k, v in opt.state_arrays().items():
        v[...] = snapshot["opt"][k]
    opt.t = snapshot["t"]
    return model.zero_state(streams)


def guard_record(snap: dict, halvings: int, nonfinite_run: int, step: int, t: int) -> dict:
    """The guard's state as a checkpoint keeps it: its counters, and its snapshot unless that is the
    checkpoint's own weights (taken at this very step and optimizer count, as at the start of a session)."""
    if not snap:
        return {}
    guard = {"step": snap["step"], "t": snap["t"], "halvings": halvings, "nonfinite_run": nonfinite_run}
    if snap["step"] == step and snap["t"] == t:
        return {"guard": guard}
    arrays = {f"param/{n}": a for n, a in snap["params"].items()}
    arrays.update({f"opt/{n}": a for n, a in snap["opt"].items()})
    return {"guard": guard, "guard_arrays": arrays}
