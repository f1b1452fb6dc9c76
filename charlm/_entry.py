"""The `charlm` command's entry point: start-up without the cyclic garbage collector.

Importing Numba, Typer's pydantic layer and Numba's implementation registries (on the
first kernel call) creates a few hundred thousand objects, and the collector walking
them again and again cost about 0.1 s of a 0.8 s `charlm sample` here. Reference
counting still frees everything that is not in a cycle. Commands that run for long
(training) call gc_on() once their start-up is over; short ones (sample, score, eval,
ask) finish without it. Library users and tests importing charlm.cli are untouched.
"""
import gc


def gc_on() -> None:
    """Collector back on; what start-up created is frozen out of its later passes."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def main() -> None:
    gc.disable()
    from .cli import main as cli_main
    cli_main()
