"""The `charlm` command's entry point: start-up without the cyclic garbage collector.

Importing Numba, Typer's pydantic layer and Numba's implementation registries (on the
first kernel call) creates a few hundred thousand objects, and the collector walking
them again and again cost about 0.1 s of a 0.8 s `charlm sample` here. Reference
counting still frees everything that is not in a cycle. The collector comes back on
(after gc.freeze, so what start-up created is left out of its passes) when a long
command starts (training calls charlm.runtime.gc_on()) and in any case START_UP_S seconds after the
start, so a long `eval` or `sample` never runs without it. Library users and tests
importing charlm.cli are untouched.
"""
import gc
import signal
import sys
import threading

from .runtime import exit_now, gc_on, mark_spawn_safe

START_UP_S = 1.5


def main() -> None:
    mark_spawn_safe()  # compile children (charlm.lm.precompile) may start: this module runs nothing on import
    gc.disable()
    timer = threading.Timer(START_UP_S, gc_on)
    timer.daemon = True
    timer.start()
    try:
        from .cli.app import main as cli_main  # Ctrl-C while this imports (~0.5 s) is no traceback either
        cli_main()
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        sys.exit(130)
    finally:
        timer.cancel()
        # the command is over; Python now shuts down (atexit, weakref finalizers, module teardown).
        # A Ctrl-C landing there would raise KeyboardInterrupt into that code and print its
        # traceback: end the process at once instead, with what it has written flushed
        signal.signal(signal.SIGINT, exit_now)
