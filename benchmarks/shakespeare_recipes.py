"""Tiny Shakespeare, the default char model with and without the new regularisation, in equal time.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/shakespeare_recipes.py --minutes 10

Runs `charlm train corpora/tinyshakespeare/input.txt --val-frac 0.1 --minutes M` twice side by side, one
thread each (the same load for both): the defaults, and the defaults plus each recipe in RECIPES. Prints
the best validation bits per character of each, when it came, and the last one (overfitting shows as
a last value above the best), as a markdown table and one JSON line.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[1] / "corpora" / "tinyshakespeare" / "input.txt"
RECIPES = {
    "defaults": [],
    "dropout 0.2 between layers and on the output, plateau": ["--dropout", "0.2", "--dropout-out", "0.2",
                                                              "--lr-schedule", "plateau"],
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=10.0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="ts-"))
    procs = {name: subprocess.Popen([sys.executable, "-m", "charlm", "train", str(CORPUS), "--val-frac", "0.1",
                                     "--minutes", str(args.minutes), "--threads", "1", "--json", "--quiet",
                                     "--out", str(tmp / str(i)), *flags], stdout=subprocess.PIPE, text=True)
             for i, (name, flags) in enumerate(RECIPES.items())}
    rows = {}
    for name, p in procs.items():
        out, _ = p.communicate()
        if p.returncode:
            print(f"{name}: exit {p.returncode}", file=sys.stderr)
            return 1
        events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        evals = [e for e in events if e.get("event") == "eval"]
        best = min(evals, key=lambda e: e["val_bpc"])
        rows[name] = {"best_val_bpc": best["val_bpc"], "best_step": best["step"], "last_val_bpc": evals[-1]["val_bpc"],
                      "steps": events[-1]["steps"], "tokens_per_s": events[-1]["tokens_per_s"],
                      "curve": [(e["step"], round(e["val_bpc"], 4)) for e in evals]}
    print(f"Tiny Shakespeare, 2x256 LSTM (defaults), last 10 % held out, {args.minutes:g} minutes each side by side, "
          f"one thread each\n")
    print("| recipe | best validation bits/char | at step | last | steps | tokens/s |")
    print("|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['best_val_bpc']:.3f} | {r['best_step']:,} | {r['last_val_bpc']:.3f} | {r['steps']:,} | "
              f"{r['tokens_per_s']:,.0f} |")
    print(json.dumps({"minutes": args.minutes, "recipes": RECIPES, "rows": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
