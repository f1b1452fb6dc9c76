"""How `charlm score` and `charlm eval` show what LanguageModel.score_many / evaluate_text return:
strict JSON, or tables and summary lines on stdout, and the progress bar of eval on stderr."""
from __future__ import annotations

import math

from rich.markup import escape
from rich.table import Table

from .common import dumps, err, out, show_token


def print_score_json(result: dict) -> None:
    """One text: its dict; several: {"texts": [...], "total": {...}} (score_many's result as is)."""
    texts = result["texts"]
    print(dumps(texts[0] if len(texts) == 1 else result, ensure_ascii=False))


def print_score_tables(result: dict, word: bool) -> None:
    """A table of factors per text with its totals, then the corpus totals for several texts.
    result: score_many(..., details=True) (each text has its "oov_tokens")."""
    texts = result["texts"]
    for i, r in enumerate(texts):
        out.print(_factor_table(r, word, title=f"text {i + 1}" if len(texts) > 1 else None))
        unit = "bits/token" if word else "bits/char"
        out.print(f"Total (log10 P) = {r['log10prob']:.4f}   ln P = {r['logprob']:.4f}   OOV = {r['oov']}"
                  + (f" ({escape(' '.join(r['oov_tokens']))!s})" if r["oov"] else "")
                  + f"   {unit} = {r['bits_per_token']:.4f}   perplexity = {r['perplexity']:.4f}"
                  + f"   tokens = {r['n_tokens']}")
    if len(texts) > 1:
        print_score_total(result["total"])


def print_score_total(total: dict) -> None:
    """The corpus totals of several texts (score_many's "total", or a Tally's)."""
    out.print(f"[bold]total[/] over {total['n_texts']} texts: log10 P = {total['log10prob']:.4f}   "
              f"ln P = {total['logprob']:.4f}   tokens = {total['n_tokens']}   OOV = {total['oov']}")
    out.print(f"Perplexity including OOVs: {total['perplexity']:.4f}")
    out.print(f"Perplexity excluding OOVs: {total['perplexity_excl_oov']:.4f}")


# one line per text (score --file / -): fixed-width columns, the text last, as it was read
_LINE = "{:>12} {:>11} {:>7} {:>5} {:>10}  {}"


def score_header(word: bool) -> None:
    print(_LINE.format("ln P", "log10 P", "tokens", "OOV", "perplexity" if word else "bits/char", "text"))


def print_score_line(r: dict, text: str, word: bool) -> None:
    """One text's totals (score_lines' result) and the text itself, flushed at once."""
    unit = f"{r['perplexity']:.3f}" if word else f"{r['bits_per_token']:.4f}"
    print(_LINE.format(f"{r['logprob']:.4f}", f"{r['log10prob']:.4f}", r["n_tokens"], r["oov"], unit, text),
          flush=True)


def _factor_table(r: dict, word: bool, title: str | None) -> Table:
    table = Table(title=title)
    table.add_column("token")
    table.add_column("id", justify="right")
    table.add_column("P(token | before)", justify="right")
    table.add_column("ln P", justify="right")
    table.add_column("log10 P", justify="right")
    for tk in r["tokens"]:
        tid = f"<unk>={tk['id']}" if tk["oov"] else str(tk["id"])
        table.add_row(escape(show_token(tk["token"]) if not word else tk["token"]), tid,
                      f"{tk['prob']:.6g}", f"{tk['logprob']:.4f}", f"{tk['logprob'] / math.log(10):.4f}")
    return table


def eval_progress(disable: bool):
    """The transient progress bar of eval on stderr and the callback that advances it:
    `with bar: lm.evaluate_text(text, progress=advance)`."""
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeRemainingColumn
    bar = Progress(TextColumn("[bold]eval[/]"), BarColumn(), TaskProgressColumn(),
                   TextColumn("{task.fields[count]} tokens"), TimeRemainingColumn(),
                   console=err, transient=True, disable=disable)
    task = bar.add_task("eval", total=None, count="-")  # total unknown until the text is encoded

    def advance(done: int, total: int) -> None:
        bar.update(task, completed=done, total=total, count=f"{done:,}/{total:,}")
    return bar, advance


def print_eval(r: dict, word: bool, as_json: bool) -> None:
    """r: evaluate_text's result (with "streams" unless as_json)."""
    if as_json:
        print(dumps(r))
        return
    out.print(f"tokens = {r['n_tokens']:,}   ln P = {r['logprob']:.2f}   OOV = {r['oov']:,}   streams = {r['streams']}")
    if word:
        out.print(f"perplexity = {r['perplexity']:.3f}   perplexity excluding OOVs = {r['perplexity_excl_oov']:.3f}"
                  f"   bits/token = {r['bits_per_token']:.4f}")
    else:
        out.print(f"bits/char = {r['bits_per_token']:.4f}   perplexity = {r['perplexity']:.4f}")
