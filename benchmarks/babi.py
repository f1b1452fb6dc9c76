"""The 20 bAbI tasks (1k training) with charlm's memory network, against the published numbers.

Runs `charlm.qa.train.suite` for each encoder and supervision mode asked for and prints one
Markdown table of test error % per task, beside the LSTM / MemNN (strongly supervised) /
MemN2N (weakly supervised, best of 10 runs) columns of Sukhbaatar et al. (2015), Table 1,
with the mean, the tasks failed (> 5 %) and the wall-clock time of each suite.

    NUMBA_NUM_THREADS=1 OMP_NUM_THREADS=1 OPENBLAS_NUM_THREADS=1 \\
        python benchmarks/babi.py ../shared/corpora/babi/en --encoders pe,bigru --modes weak,strong

One core: the time reported is what `charlm qa babi` takes for the same settings.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from charlm.qa.babi import parse_tasks  # noqa: E402
from charlm.qa.model import QAConfig  # noqa: E402
from charlm.qa.train import FAIL_PCT, REFERENCE, REFERENCE_MEAN, QATrainConfig, suite  # noqa: E402
from charlm.runtime import compute_threads  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", help="folder with qaN_<name>_train.txt / _test.txt")
    ap.add_argument("--tasks", default="1-20")
    ap.add_argument("--encoders", default="pe", help="comma list of bow, pe, gru, bigru")
    ap.add_argument("--modes", default="weak,strong", help="weak (answers only) and/or strong (--supervise-facts)")
    ap.add_argument("--epochs", type=int, default=100)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", dest="json_out", help="also write every result to this JSON file")
    args = ap.parse_args()
    tasks = parse_tasks(args.tasks)
    columns, results = [], {}
    with compute_threads(1):
        for enc in args.encoders.split(","):
            for mode in args.modes.split(","):
                tc = QATrainConfig(epochs=args.epochs, runs=args.runs, seed=args.seed,
                                   supervise_facts=(mode == "strong"))
                t0 = time.perf_counter()
                summary = None
                for ev in suite(args.folder, tasks, QAConfig(encoder=enc), tc):
                    if ev["event"] == "task":
                        print(f"  {enc} {mode} task {ev['task']:2d}: {ev['test_error_pct']:5.1f} % "
                              f"({ev['seconds']:.0f} s)", file=sys.stderr, flush=True)
                    elif ev["event"] == "suite":
                        summary = ev
                name = f"{enc} {mode}"
                columns.append(name)
                results[name] = {**summary, "wall_seconds": time.perf_counter() - t0}
    head = ["task"] + [f"charlm {c}" for c in columns] + ["LSTM", "MemNN strong", "MemN2N weak"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for i, t in enumerate(tasks):
        cells = [str(t)] + [f"{results[c]['tasks'][i]['test_error_pct']:.1f}" for c in columns]
        cells += [f"{v:g}" for v in REFERENCE[t]]
        print("| " + " | ".join(cells) + " |")
    print("| mean | " + " | ".join(f"{results[c]['mean_error_pct']:.1f}" for c in columns) + " | "
          + " | ".join(f"{REFERENCE_MEAN[k][0]:g}" for k in ("lstm", "memnn", "memn2n")) + " |")
    print(f"| failed (> {FAIL_PCT:g} %) | " + " | ".join(str(results[c]["failed"]) for c in columns) + " | "
          + " | ".join(str(REFERENCE_MEAN[k][1]) for k in ("lstm", "memnn", "memn2n")) + " |")
    print("| minutes | " + " | ".join(f"{results[c]['wall_seconds'] / 60:.1f}" for c in columns) + " | | | |")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
