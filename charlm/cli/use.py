"""`charlm sample`, `charlm score` and `charlm eval`: use a trained model.

Each command checks its flags, reads its input, loads the model (charlm.lm.api.load) and calls one
LanguageModel method (stream, score_many, evaluate_text), then renders what it returns
(charlm.cli.render_score): the library and the command line give the same numbers."""
from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from ..errors import CharlmError

from .common import PPL_HELP, THREADS_HELP, fail, warn


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
        from ..lm.api import load
        lm = load(model)
        _warn_prime_oov(lm, prime)
        sys.stdout.write(prime)
        for chunk in lm.stream(prime, length, temperature=temp, seed=seed, top_k=top_k, greedy=greedy):
            sys.stdout.write(chunk)
            sys.stdout.flush()
        sys.stdout.write("\n")
    except CharlmError as e:
        fail(str(e))


def _warn_prime_oov(lm, prime: str) -> None:
    oov = lm.oov(prime)
    if not oov:
        return
    if lm.level == "word":
        words = " ".join(sorted(set(oov)))
        warn(f"{len(oov)} prime word(s) not in the model's vocabulary are fed as <unk>: {words}")
    else:
        chars = "".join(sorted(set(oov)))
        warn(f"{len(oov)} prime character(s) not in the model's vocabulary were skipped: {chars!r}")


def _check_threads(threads: Optional[int]) -> None:
    if threads is not None and threads <= 0:
        fail(f"--threads must be positive, got {threads}")


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
    from ..lm.api import load
    from .render_score import print_score_json, print_score_tables
    try:
        texts = _texts_to_score(text, file)
        _check_threads(threads)
        lm = load(model, threads=threads)
        result = lm.score_many(texts, eos=not no_eos, details=not as_json)
        if as_json:
            print_score_json(result)
        else:
            print_score_tables(result, word=lm.level == "word")
    except CharlmError as e:
        fail(str(e))


def _texts_to_score(text: Optional[str], file: Optional[str]) -> list[str]:
    """TEXT, or the lines of --file / standard input ('-')."""
    from ..data import read_text
    if text is not None and file is not None:
        fail("give either TEXT or --file, not both")
    if file is not None or text == "-":
        raw = read_text(file if file is not None else "-", what="input")
        texts = raw.split("\n")
        if texts and texts[-1] == "":
            texts.pop()
        if not texts:
            fail("no text to score: the input is empty")
        return texts
    if text is not None:
        return [text]
    fail("give a TEXT to score, '-' for standard input, or --file FILE")


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
    from ..lm.api import load
    from .render_score import eval_progress, print_eval
    try:
        if streams <= 0:
            fail(f"--streams must be positive, got {streams}")
        text = read_text(file, encoding, errors, what="file")
        _check_threads(threads)
        lm = load(model, threads=threads)
        bar, advance = eval_progress(disable=as_json)
        with bar:
            r = lm.evaluate_text(text, streams, progress=advance, details=not as_json, source=file)
        print_eval(r, word=lm.level == "word", as_json=as_json)
    except CharlmError as e:
        fail(str(e))


eval_cmd.__doc__ = eval_cmd.__doc__ + "\n\n" + PPL_HELP

