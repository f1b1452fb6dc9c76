"""WikiText-2 in equal time: charlm's word-model recipe next to PyTorch's word_language_model recipe.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python benchmarks/wikitext_compare.py --minutes 30

Both run at the same time, one thread each (the machine's two cores, one each: the same load for
both), for the same wall-clock budget including their validations; then each scores the test file
exactly (one stream, state carried, first input <eos>), charlm also with dynamic evaluation. Both
use the same sizes (2 layers, 200 units, windows of 35 words) and the full WikiText-2 vocabulary
(every training word, 33,278 tokens).

charlm's recipe (RECIPE below): adaptive softmax (cutoffs 2000,10000), dropout 0.2 on the
embeddings, between the layers and on the output, Adam 2e-3 divided by 4 when validation stops
improving (--lr-schedule plateau), batch 32. PyTorch's (benchmarks/wikitext_pytorch.py --recipe
example): tied full softmax, dropout 0.2, SGD 20, clip 0.25, the rate divided by 4 after an epoch
without improvement, batch 20.

`--optimizer sgd` takes PyTorch's optimizer settings instead (SGD at 20, clipping 0.25, batch 20).
`--alone` runs charlm only, on `--threads` (2) threads: the whole machine for one run, as a user would
(PyTorch's row is then not measured). `--schedule cosine` anneals over the time budget instead of plateau
(charlm estimates the steps the budget holds after a tenth of it). `--no-dynamic` skips dynamic evaluation.

Prints a markdown table and one JSON line. Corpus: ../shared/corpora/wikitext-2/ (skipped if absent).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[1] / "shared" / "corpora" / "wikitext-2"
RECIPE = ["--level", "word", "--max-vocab", "100000", "--embed", "200", "--hidden", "200", "--layers", "2",
          "--seq-len", "35", "--softmax", "adaptive", "--cutoffs", "2000,10000",
          "--dropout", "0.2", "--dropout-in", "0.2", "--dropout-out", "0.2",
          "--eval-every", "1500", "--sample-length", "0"]
OPTIMIZERS = {  # --optimizer: charlm's recipe's optimizer and batch
    "adam": ["--optimizer", "adam", "--lr", "2e-3", "--batch", "32"],
    # PyTorch's word_language_model settings: SGD at 20, clipping at 0.25, batch 20
    "sgd": ["--optimizer", "sgd", "--lr", "20", "--clip", "0.25", "--batch", "20"],
}


def charlm(*args: str) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "charlm", *args], capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.startswith("{")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=30.0)
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--dynamic-lr", type=float, default=None, help="charlm eval --dynamic-lr (default: its own)")
    ap.add_argument("--alone", action="store_true", help="charlm only, on --threads threads")
    ap.add_argument("--threads", type=int, default=None, help="threads per side (default: 1, or 2 with --alone)")
    ap.add_argument("--schedule", choices=["plateau", "cosine"], default="plateau")
    ap.add_argument("--no-dynamic", action="store_true")
    ap.add_argument("--optimizer", choices=list(OPTIMIZERS), default="adam")
    args = ap.parse_args()
    threads = str(args.threads or (2 if args.alone else 1))
    recipe = [*RECIPE, *OPTIMIZERS[args.optimizer], "--lr-schedule", args.schedule]
    if not (args.data / "train.txt").is_file():
        print(json.dumps({"skipped": f"no corpus at {args.data}"}))
        return 0
    run = Path(tempfile.mkdtemp(prefix="wt2-")) / "run"
    ours = subprocess.Popen([sys.executable, "-m", "charlm", "train", str(args.data / "train.txt"),
                             "--val", str(args.data / "valid.txt"), *recipe, "--minutes", str(args.minutes),
                             "--threads", threads, "--out", str(run), "--json"], stdout=subprocess.PIPE, text=True)
    theirs = None if args.alone else subprocess.Popen(
        [sys.executable, str(HERE / "wikitext_pytorch.py"), "--recipe", "example", "--minutes", str(args.minutes),
         "--threads", threads, "--data", str(args.data)], stdout=subprocess.PIPE, text=True)
    t_out = theirs.communicate()[0] if theirs else None
    o_out, _ = ours.communicate()
    if ours.returncode or (theirs and theirs.returncode):
        print(f"a side failed: charlm {ours.returncode}, pytorch {theirs and theirs.returncode}", file=sys.stderr)
        return 1
    events = [json.loads(line) for line in o_out.splitlines() if line.startswith("{")]
    done = events[-1]
    torch_res = json.loads(t_out.splitlines()[-1]) if t_out else None
    test = str(args.data / "test.txt")
    static = charlm("eval", test, "--model", str(run), "--json", "--threads", "2")[-1]
    dyn_args = ["--dynamic"] + (["--dynamic-lr", str(args.dynamic_lr)] if args.dynamic_lr is not None else [])
    dynamic = None if args.no_dynamic else charlm("eval", test, "--model", str(run), "--json", "--threads", "2",
                                                  *dyn_args)[-1]
    rows = [(f"charlm (adaptive, dropout, {args.optimizer} + {args.schedule})", done["tokens_per_s"], done["steps"],
             done["best_val_ppl"], static["perplexity"])]
    if dynamic:
        rows.append(("charlm, dynamic evaluation", None, None, None, dynamic["perplexity"]))
    if torch_res:
        rows.append((f"PyTorch {torch_res['torch']} (word_language_model recipe)", torch_res["tokens_per_s"],
                     torch_res["steps"], torch_res["val_ppl"], torch_res["test_ppl"]))
    how = (f"charlm alone on {threads} threads" if args.alone else
           f"each side by side, {threads} thread{'s' if threads != '1' else ''} each")
    print(f"WikiText-2, 2x200 LSTM, {args.minutes:g} minutes, {how}\n")
    print("| | training tokens/s | steps | best validation perplexity | test perplexity |")
    print("|---|---|---|---|---|")
    fmt = lambda v, f: "–" if v is None else format(v, f)
    for name, tps, steps, val, test_ppl in rows:
        print(f"| {name} | {fmt(tps, ',.0f')} | {fmt(steps, ',')} | {fmt(val, '.1f')} | {fmt(test_ppl, '.1f')} |")
    print(json.dumps({"charlm": {"done": done, "test": static, "dynamic": dynamic,
                                 "evals": [e for e in events if e.get("event") == "eval"]},
                      "pytorch": torch_res, "recipe": recipe, "threads": int(threads)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
