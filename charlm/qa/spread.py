"""The bAbI suite on K processes (charlm.dist): every (task, choice, run) is one unit of work.

Rank r trains units r, r+K, r+2K, ... (each run exactly as in the serial series: charlm.qa.train's
train(only_runs=[run])). The ranks then share what each unit reached (validation accuracy and loss,
epochs, seconds) and pick, for every task, the same model as the serial suite: the best run of each
choice (ties: the earlier run), then the best choice (ties: the earlier one). The rank that trained
the kept model tests it; rank 0 saves the models. Every rank yields the same events."""
from __future__ import annotations

import time
from pathlib import Path

from .. import dist
from . import babi
from .checkpoint import BEST, save
from .model import QAConfig


def spread_suite(files, tasks, cfg, tcfg, out_dir, should_stop, choices, *, train, evaluate, row_of):
    """charlm.qa.train._suite's events, the work spread over the ranks (see the module docstring).
    train, evaluate: charlm.qa.train's; row_of(task, name, result, kept, done, by_encoder, seconds) a row."""
    t0 = time.perf_counter()
    units = [(ti, ci, r) for ti in range(len(tasks)) for ci, (_, runs, _) in enumerate(choices) for r in range(runs)]
    mine = units[dist.rank()::dist.size()]
    questions: dict[int, list] = {}
    reached, models = {}, {}
    for ti, ci, r in mine:
        t = tasks[ti]
        if t not in questions:
            questions[t] = babi.read(files[t]["train"])
        enc, runs, hops = choices[ci]
        c = QAConfig(**{**cfg.to_dict(), "encoder": enc, "hops": hops})
        tc = type(tcfg)(**{**tcfg.to_dict(), "runs": runs})
        for ev in train(questions[t], c, tc, None, source=files[t]["train"], should_stop=should_stop, only_runs=[r]):
            if ev["event"] == "done":
                reached[(ti, ci, r)] = (ev["best_val_acc"], ev["best_val_loss"], ev["epochs"], ev["seconds"])
                models[(ti, ci, r)] = ev
    every = {}
    for part in dist.allgather(reached, "sharing the bAbI results"):
        every.update(part)
    kept = {ti: _choose(ti, choices, every) for ti in range(len(tasks))}
    rows = {}
    for ti, (unit, done, by_encoder, seconds) in kept.items():
        if unit in models:  # this rank trained the kept model: it tests it
            t = tasks[ti]
            model = models[unit]["model"]
            r = evaluate(model, babi.read(files[t]["test"]))
            rows[ti] = (row_of(t, files[t]["name"], r, model.ck, done, by_encoder, seconds),
                        model.ck if out_dir else None)
    gathered = dist.gather(rows, 0, "gathering the bAbI rows")
    table = {}
    if gathered is not None:
        for part in gathered:
            table.update(part)
        for ti, (_, ck) in table.items():
            if ck is not None:
                ck.path = str(Path(out_dir) / f"qa{tasks[ti]}" / BEST)
                save(ck, ck.path)
    table = dist.bcast({ti: row for ti, (row, _) in table.items()}, what="sharing the bAbI table")
    for ti, t in enumerate(tasks):
        yield {"event": "task_start", "task": t, "name": files[t]["name"], "index": ti, "n_tasks": len(tasks)}
        yield {"event": "task", **table[ti]}
    yield {"event": "rows", "rows": [table[ti] for ti in range(len(tasks))], "seconds": time.perf_counter() - t0}


def _choose(ti, choices, every):
    """The serial suite's pick for task ti: (unit, done-like dict, validation accuracy by choice, seconds)."""
    hop_counts = {h for _, _, h in choices}
    done, unit, by_encoder, seconds = None, None, {}, 0.0
    for ci, (enc, runs, hops) in enumerate(choices):
        best, epochs = None, 0
        for r in range(runs):
            acc, loss, n_epochs, secs = every[(ti, ci, r)]
            epochs += n_epochs
            seconds += secs
            if best is None or (acc, -loss) > (best[0], -best[1]):
                best = (acc, loss, r)
        name = enc if len(hop_counts) == 1 else f"{enc}/{hops}"
        by_encoder[name] = best[0]
        if done is None or (best[0], -best[1]) > (done["best_val_acc"], -done["best_val_loss"]):
            done = {"best_val_acc": best[0], "best_val_loss": best[1], "epochs": epochs}
            unit = (ti, ci, best[2])
    return unit, done, by_encoder, seconds
