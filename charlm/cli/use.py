"""`charlm sample`, `charlm score` and `charlm eval`: use a trained model."""
from __future__ import annotations

import math
import sys
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from ..errors import CharlmError

from .common import PPL_HELP, THREADS_HELP, dumps, fail, load_model, limit_threads, out, err, show_token, warn


def sample_cmd(
    model: Annotated[Optional[str], typer.Option(help="Checkpoint file or run directory (its best checkpoint). "
        "Default: the most recently written run under models/.", show_default=False)] = None,
    temp: Annotated[float, typer.Option(help="Temperature: below 1 is more conservative, above 1 more varied.")] = 0.8,
    length: Annotated[int, typer.Option(help="Number of tokens to generate.")] = 500,
    prime: Annotated[str, typer.Option(help="Text to start from (words, for a word model); it is printed first. "
                                            "Characters not in the vocabulary are skipped, words not in it are fed "
                                            "as <unk>, with a warning.")] = "",
    seed: Annotated[Optional[int], typer.Option(help="Random seed; the same seed gives the same text. Default: random.",
                                                show_default=False)] = None,
    greedy: Annotated[bool, typer.Option(help="Always take the most likely token (ignores --temp).")] = False,
    top_k: Annotated[int, typer.Option("--top-k", help="Sample only among the K most likely tokens (0: all).")] = 0,
):
    """Generate text from a trained model, streamed to stdout as it is produced."""
    try:
        if length <= 0:
            fail(f"--length must be positive, got {length}")
        if not greedy and not temp > 0:
            fail(f"--temp must be positive, got {temp}")
        if top_k < 0:
            fail(f"--top-k must be 0 (off) or positive, got {top_k}")
        ck, m = load_model(model)
        from ..lm.sample import generate
        _, oov = ck.vocab.encode(prime)
        if oov:
            if ck.vocab.level == "word":
                words = " ".join(sorted({w for _, w in oov}))
                warn(f"{len(oov)} prime word(s) not in the model's vocabulary are fed as <unk>: {words}")
            else:
                chars = "".join(sorted({c for _, c in oov}))
                warn(f"{len(oov)} prime character(s) not in the model's vocabulary were skipped: {chars!r}")
        sys.stdout.write(prime)
        for chunk in generate(m, ck.vocab, length, temperature=temp, prime=prime, seed=seed,
                              top_k=top_k, greedy=greedy):
            sys.stdout.write(chunk)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except CharlmError as e:
        fail(str(e))



def score_cmd(
    text: Annotated[Optional[str], typer.Argument(help="The text to score; '-' reads standard input, one text per line.",
                                                  show_default=False)] = None,
    file: Annotated[Optional[str], typer.Option(help="Read texts from this file, one per line.", show_default=False)] = None,
    model: Annotated[Optional[str], typer.Option(help="Checkpoint file or run directory. Default: the most recent run "
                                                      "under models/.", show_default=False)] = None,
    no_eos: Annotated[bool, typer.Option("--no-eos", help="Leave out the end-of-sentence factor P(<eos> | text) "
                                                          "(the newline for character models).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of tables.")] = False,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP, show_default=False)] = None,
):
    """Score text by the chain rule: P(W) = prod_k P(w_k | w_1..w_(k-1)), token by token.

    Each text starts from the begin-of-sentence context (the zero state with <eos>, or a newline for character
    models, fed first, like KenLM's <s>) and ends with the factor P(<eos> | the whole text) unless --no-eos.
    A word outside the vocabulary contributes P(<unk> | history) and counts as OOV; a character outside it is
    left out of the product and counted as OOV.
    """
    from ..data import read_text
    from ..lm.score import corpus_total, score_text
    try:
        if text is not None and file is not None:
            fail("give either TEXT or --file, not both")
        if file is not None or text == "-":
            raw = read_text(file if file is not None else "-", what="input")
            texts = raw.split("\n")
            if texts and texts[-1] == "":
                texts.pop()
            if not texts:
                fail("no text to score: the input is empty")
        elif text is not None:
            texts = [text]
        else:
            fail("give a TEXT to score, '-' for standard input, or --file FILE")
        ck, m = load_model(model)
        with limit_threads(threads):
            results = [score_text(m, ck.vocab, t, eos=not no_eos) for t in texts]
        total = corpus_total(results)
        if as_json:
            strip = lambda r: {k: v for k, v in r.items() if k not in ("oov_tokens", "oov_logprob")}
            if len(results) == 1:
                print(dumps(strip(results[0]), ensure_ascii=False))
            else:
                print(dumps({"texts": [strip(r) for r in results], "total": total}, ensure_ascii=False))
            return
        word = ck.vocab.level == "word"
        for i, (t, r) in enumerate(zip(texts, results)):
            table = Table(title=f"text {i + 1}" if len(texts) > 1 else None)
            table.add_column("token")
            table.add_column("id", justify="right")
            table.add_column("P(token | before)", justify="right")
            table.add_column("ln P", justify="right")
            table.add_column("log10 P", justify="right")
            for tk in r["tokens"]:
                tid = f"<unk>={tk['id']}" if tk["oov"] else str(tk["id"])
                table.add_row(escape(show_token(tk["token"]) if not word else tk["token"]), tid,
                              f"{tk['prob']:.6g}", f"{tk['logprob']:.4f}", f"{tk['logprob'] / math.log(10):.4f}")
            out.print(table)
            unit = "bits/token" if word else "bits/char"
            out.print(f"Total (log10 P) = {r['log10prob']:.4f}   ln P = {r['logprob']:.4f}   OOV = {r['oov']}"
                      + (f" ({escape(' '.join(r['oov_tokens']))!s})" if r["oov"] else "")
                      + f"   {unit} = {r['bits_per_token']:.4f}   perplexity = {r['perplexity']:.4f}"
                      + f"   tokens = {r['n_tokens']}")
        if len(texts) > 1:
            out.print(f"[bold]total[/] over {len(texts)} texts: log10 P = {total['log10prob']:.4f}   "
                      f"ln P = {total['logprob']:.4f}   tokens = {total['n_tokens']}   OOV = {total['oov']}")
            out.print(f"Perplexity including OOVs: {total['perplexity']:.4f}")
            out.print(f"Perplexity excluding OOVs: {total['perplexity_excl_oov']:.4f}")
    except CharlmError as e:
        fail(str(e))


score_cmd.__doc__ = score_cmd.__doc__ + "\n\n" + PPL_HELP


def eval_cmd(
    file: Annotated[str, typer.Argument(help="Text file to evaluate ('-' reads standard input).", show_default=False)],
    model: Annotated[Optional[str], typer.Option(help="Checkpoint file or run directory. Default: the most recent run "
                                                      "under models/.", show_default=False)] = None,
    streams: Annotated[int, typer.Option(help="Score the file as K contiguous parts side by side, for speed. Each part "
                                              "restarts from the zero state, so K > 1 is slightly pessimistic; "
                                              "1 is exact (the state is carried through the whole file).")] = 1,
    encoding: Annotated[str, typer.Option(help="Text encoding of the file.")] = "utf-8",
    errors: Annotated[str, typer.Option(help="Undecodable bytes: strict, replace or ignore.")] = "strict",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object instead of the summary.")] = False,
    threads: Annotated[Optional[int], typer.Option(help=THREADS_HELP, show_default=False)] = None,
):
    """Perplexity (word models) or bits per character (character models) of a whole file.

    The file is one token sequence (one <eos> per line for word models, the newline characters for character
    models) scored from the begin context, the first input being <eos> (or a newline).
    """
    from ..data import read_text
    from ..lm.score import evaluate_text
    try:
        if streams <= 0:
            fail(f"--streams must be positive, got {streams}")
        text = read_text(file, encoding, errors, what="file")
        if text and not text.endswith("\n"):
            text += "\n"  # the last line ends with <eos> too, newline or not
        ck, m = load_model(model)
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
        with limit_threads(threads), Progress(
                TextColumn("[bold]eval[/]"), BarColumn(), TaskProgressColumn(),
                TextColumn("{task.fields[count]} tokens"), TimeRemainingColumn(),
                console=err, transient=True, disable=as_json) as progress:
            task = progress.add_task("eval", total=None, count="-")  # total unknown until the text is encoded
            r = evaluate_text(m, ck.vocab, text, streams=streams,
                              progress=lambda d, n: progress.update(task, completed=d, total=n,
                                                                    count=f"{d:,}/{n:,}"))
        if r["n_tokens"] == 0:  # not a perfect perplexity of 1
            fail(f"nothing to evaluate: {file} is empty" + (f" but for {r['oov']} characters outside the model's "
                                                           f"vocabulary" if r["oov"] else ""))
        if as_json:
            print(dumps({k: r[k] for k in ("n_tokens", "logprob", "perplexity", "perplexity_excl_oov",
                                                 "bits_per_token", "oov")}))
            return
        word = ck.vocab.level == "word"
        out.print(f"tokens = {r['n_tokens']:,}   ln P = {r['logprob']:.2f}   OOV = {r['oov']:,}   streams = {r['streams']}")
        if word:
            out.print(f"perplexity = {r['perplexity']:.3f}   perplexity excluding OOVs = {r['perplexity_excl_oov']:.3f}"
                      f"   bits/token = {r['bits_per_token']:.4f}")
        else:
            out.print(f"bits/char = {r['bits_per_token']:.4f}   perplexity = {r['perplexity']:.4f}")
    except CharlmError as e:
        fail(str(e))


eval_cmd.__doc__ = eval_cmd.__doc__ + "\n\n" + PPL_HELP

