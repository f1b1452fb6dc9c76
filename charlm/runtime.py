"""The process around the kernels: the BLAS they call, how many threads they use, the garbage collector.

load_blas: load the BLAS that Numba's np.dot calls, without importing scipy.linalg.

Numba finds sgemm/dgemm through the C API capsules of `scipy.linalg.cython_blas`
(it imports that module by name from C the first time a kernel multiplies). Importing
it the ordinary way first runs `scipy.linalg/__init__`, which pulls in SciPy's
array-API layer, numpy.f2py and charset_normalizer: about 120 ms on this machine, a
seventh of a whole `charlm score` run, for nothing a kernel uses. The extension module
itself depends only on the `scipy` package and its bundled OpenBLAS, so we load it
from its file under its own name; Python's import system then finds it in
`sys.modules` and neither Numba nor a later `import scipy.linalg` loads it again.

If SciPy is laid out differently (no such file), fall back to the ordinary import.
"""

from __future__ import annotations

import gc
import glob
import importlib.machinery
import importlib.util
import os
import sys
import threading
import time
from collections import deque
import contextlib
from contextlib import contextmanager, nullcontext
from typing import Callable

_NAME = "scipy.linalg.cython_blas"


def load_blas() -> None:
    """Make sure `scipy.linalg.cython_blas` is imported, as cheaply as possible."""
    if _NAME in sys.modules:
        return
    if "scipy.linalg" not in sys.modules:
        try:
            _load_from_file()
            return
        except Exception:                      # any surprise: the ordinary import below
            sys.modules.pop(_NAME, None)
    import scipy.linalg.cython_blas  # noqa: F401


def _load_from_file() -> None:
    spec = importlib.util.find_spec("scipy")  # a top-level spec: imports nothing
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("scipy not found")
    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    paths = [p for d in spec.submodule_search_locations
             for p in glob.glob(os.path.join(d, "linalg", "cython_blas.*"))
             if any(p.endswith(s) for s in suffixes)]
    if not paths:
        raise ImportError("scipy/linalg/cython_blas extension not found")
    loader = importlib.machinery.ExtensionFileLoader(_NAME, paths[0])
    module_spec = importlib.util.spec_from_file_location(_NAME, paths[0], loader=loader)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[_NAME] = module
    loader.exec_module(module)
    if not getattr(module, "__pyx_capi__", None):
        raise ImportError("scipy.linalg.cython_blas has no C API table")


@contextmanager
def compute_threads(n: int | None = None, blas: bool = True):
    """Run the kernels split into n parts (default: every core; under MPI the node's cores shared among
    the node's ranks), on up to n threads. Numba splits the work
    (LSTM time loops by hidden units, GRU/RNN ones by batch rows, whole-window
    products by time or rows) and every BLAS call stays single-threaded: a BLAS
    thread waiting for a core that is busy elsewhere would otherwise stall every
    time step. How many threads run the parts is the Governor's choice, call by call
    (see there): the numbers never depend on it, only on n. blas=False: work that calls no BLAS
    (the compiled batch-1 sampler) skips loading and limiting it (threadpoolctl's import)."""
    import numba
    from .dist import default_threads
    n = n or default_threads(numba.config.NUMBA_NUM_THREADS)  # under MPI: the node's cores / its ranks
    n = min(n, numba.config.NUMBA_NUM_THREADS)
    old, outer = numba.get_num_threads(), governor()
    numba.set_num_threads(n)
    _LOCAL.governor = Governor(n, adaptive=os.environ.get("CHARLM_ADAPTIVE_THREADS", "1") != "0")
    try:
        if blas:
            from threadpoolctl import threadpool_limits
            load_blas()  # load the BLAS Numba calls now, so that the limit reaches it
            with threadpool_limits(limits=1, user_api="blas"):
                yield
        else:
            yield
    finally:
        _LOCAL.governor = outer
        numba.set_num_threads(old)


def parts() -> int:
    """How many parts the kernels split their work into: compute_threads' n (fixed for the whole
    context, whatever number of threads the Governor runs them on, so results do not depend on the
    load); outside compute_threads, Numba's thread count."""
    g = governor()
    if g is not None:
        return g.parts
    import numba
    return numba.get_num_threads()


def governed(units: float, kind) -> "contextlib.AbstractContextManager":
    """A context around one piece of kernel work of `units` units (tokens) of a kind (a hashable
    label: pieces of one kind cost about the same per unit, e.g. ("train", streams)): the active
    Governor picks its thread count and times it. Does nothing outside compute_threads."""
    g = governor()
    return g.run(units, kind) if g is not None else nullcontext()


def governor() -> "Governor | None":
    """The Governor of this thread's innermost compute_threads (per thread, as Numba's thread count is)."""
    return getattr(_LOCAL, "governor", None)


def thread_report() -> dict | None:
    """What the active Governor did, for a `done` event: {"parts", "adaptive", "kinds": {kind: {"threads": the
    count in use, "switches"}}}; None outside compute_threads."""
    g = governor()
    if g is None:
        return None
    kinds = {(k if isinstance(k, str) else "/".join(map(str, k))): {"threads": c.current, "switches": c.switches}
             for k, c in g.kinds.items()}
    return {"parts": g.parts, "adaptive": g.adaptive, "kinds": kinds}


class ThreadChoice:
    """The number of threads that run one kind of the kernels' work: all of them, or one.

    Every parallel region ends at a barrier, and a barrier waits for its slowest thread: when another
    process holds a core, a thread that has to share it arrives late at each of them (a batch-1 token
    or a short window has thousands a second), and two threads run slower than one would. Little
    tells a process that a core is busy (the load average lags by a minute and does not say whose
    load it is; the count of runnable threads, read once at the first piece, is a snapshot: see
    cores_taken), so the governor measures: it times each piece of work per unit (a training step, a
    token sampled, a token scored), keeps the recent times of the thread count in use, and now and
    then runs a few pieces on the other count (a probe). The faster count, by the medians of the
    times, is kept; a probe that loses doubles the time to the next (from 2 s, or 8 s after a switch, up to
    60 s; at least 20 times what the probe cost), so the loser costs little. A piece that stalls (over
    STALL times the recent median: a barrier waiting for a thread whose core another process took) brings
    the next probe forward at once; merely slow pieces (over SLOWER times) do so only SLOW_RUN in a row: on
    a shared host pieces are a little slow now and then for reasons a thread count does not change, and a
    probe for each cost a few per cent of a training run (2x256 LSTM steps: 66 against 63 ms a step). Parts stay fixed (compute_threads' n): with one thread, the one thread runs every
    part in turn, so the numbers are the same bit for bit and only the speed changes.

    adaptive=False (CHARLM_ADAPTIVE_THREADS=0): always every thread, as before; for benchmarks that
    measure the stall itself. Kinds of work differ in cost per unit and in the count that suits them
    (a batch-1 token against a training step): the Governor keeps one ThreadChoice per kind."""

    KEEP = 5            # recent times per thread count
    PROBE = 2           # pieces per probe
    FIRST_PROBE = 2.0   # seconds of work before the first probe
    AFTER_SWITCH = 8.0  # and after a switch (the count just left lost: not again at once)
    MAX_INTERVAL = 60.0
    STALL = 4.0         # a piece this much slower than the median brings the probe forward
    SLOWER = 1.5        # and SLOW_RUN pieces in a row this much slower; a probe's piece this much slower
                        # than the kept median ends the probe there (it lost: a stalled piece can cost ten
                        # of the others)
    SLOW_RUN = 3
    BETTER = 0.95       # a probe wins when its median is below this share of the kept one
    COST_SHARE = 0.05   # a lost probe's extra seconds: at most this share of the time to the next probe

    def __init__(self, n: int, adaptive: bool = True, clock: Callable[[], float] = time.perf_counter,
                 set_threads: Callable[[int], None] | None = None, busy: Callable[[int], bool] | None = None):
        self.parts = max(1, int(n))
        self.adaptive = adaptive and self.parts > 1
        self.clock = clock
        self._set = set_threads or _set_numba_threads
        self._busy = busy or cores_taken
        self.current = self.parts                 # the kept thread count
        self.times = {self.parts: deque(maxlen=self.KEEP), 1: deque(maxlen=self.KEEP)}
        self.probing = 0                          # pieces left in a running probe
        self.interval = self.FIRST_PROBE
        self.next_probe = None                    # clock time of the next probe (set by the first piece)
        self.depth = 0
        self.switches = 0
        self.pieces = 0
        self.probed = False                       # the first probe comes after the first timed piece
        self.lost = 0.0                           # seconds the running probe cost over the kept count
        self.slow = 0                             # kept-count pieces in a row over SLOWER x their median
        self.probes = 0                           # probes started

    def other(self) -> int:
        return 1 if self.current != 1 else self.parts

    def threads(self) -> int:
        """The thread count the next piece runs on."""
        return self.other() if self.probing else self.current

    @contextmanager
    def run(self, units: float = 1.0):
        if not self.adaptive or self.depth:  # nested pieces are part of the outer one
            with _nested(self):
                yield
            return
        if self.pieces == 0 and self._busy(self.parts):
            # other processes hold cores now: start on one thread, as if all of them had just lost a
            # probe (the first probe of all of them after AFTER_SWITCH seconds, then as any other)
            self.current = 1
            self.probed = True
            self.interval = self.AFTER_SWITCH
        n = self.threads()
        self._set(n)
        t0 = self.clock()
        try:
            with _nested(self):
                yield
        finally:
            self.record(n, (self.clock() - t0) / max(units, 1e-9), t0, units)

    def record(self, n: int, per_unit: float, now: float, units: float = 1.0) -> None:
        """A piece of `units` units ran on n threads at per_unit seconds a unit (started at clock time now)."""
        self.pieces += 1
        if self.pieces == 1:  # the first piece compiles or fills caches: not a speed
            self.next_probe = now + self.interval
            return
        kept = self.times[self.current]
        if self.probing:
            self.times[n].append(per_unit)
            self.lost += max(0.0, (per_unit - _median(kept)) * units)
            self.probing -= 1
            if self.probing and per_unit > self.SLOWER * _median(kept):
                self.probing = 0  # clearly slower: no need to pay for another such piece
            if not self.probing:
                self._decide(now)
            return
        median = _median(kept) if len(kept) >= 3 else float("inf")
        self.slow = self.slow + 1 if per_unit > self.SLOWER * median else 0
        if (per_unit > self.STALL * median or self.slow >= self.SLOW_RUN) and self.next_probe > now:
            self.next_probe = now  # a core may just have got busy (or free): look now
        kept.append(per_unit)
        if (len(kept) >= 3 and now >= self.next_probe) or not self.probed:
            self.times[self.other()].clear()  # the other count's old times say nothing of now
            self.probing = self.PROBE
            self.probed = True
            self.probes += 1

    def _decide(self, now: float) -> None:
        kept, probe = self.times[self.current], self.times[self.other()]
        if _median(probe) < self.BETTER * _median(kept):
            self.current = self.other()  # its times so far: the probe's
            self.switches += 1
            self.interval = self.AFTER_SWITCH
        else:  # lost: wait twice as long, and long enough that probes cost at most COST_SHARE of the time
            self.interval = min(max(2 * self.interval, self.lost / self.COST_SHARE), self.MAX_INTERVAL)
        self.lost = 0.0
        self.next_probe = now + self.interval


class Governor:
    """compute_threads' choices: the parts (fixed), and one ThreadChoice per kind of work."""

    def __init__(self, n: int, adaptive: bool = True, clock: Callable[[], float] = time.perf_counter,
                 set_threads: Callable[[int], None] | None = None, busy: Callable[[int], bool] | None = None):
        self.parts = max(1, int(n))
        self.adaptive = adaptive and self.parts > 1
        self.clock, self.set_threads, self.busy = clock, set_threads, busy
        self.kinds: dict = {}
        self.depth = 0

    def choice(self, kind) -> ThreadChoice:
        c = self.kinds.get(kind)
        if c is None:
            c = self.kinds[kind] = ThreadChoice(self.parts, self.adaptive, self.clock, self.set_threads, self.busy)
        return c

    @contextmanager
    def run(self, units: float, kind):
        if not self.adaptive or self.depth:  # nested pieces (of any kind) are part of the outer one
            with _nested(self):
                yield
            return
        with _nested(self), self.choice(kind).run(units):
            yield


@contextmanager
def _nested(owner):
    """owner.depth raised for the duration: pieces started inside are not pieces of their own."""
    owner.depth += 1
    try:
        yield
    finally:
        owner.depth -= 1


_SPAWN_SAFE = False  # set by the charlm command (charlm._entry): its main module is guarded


def mark_spawn_safe() -> None:
    """This program's main module does nothing when imported as another name (the `charlm` command)."""
    global _SPAWN_SAFE
    _SPAWN_SAFE = True


def spawn_safe() -> bool:
    """Whether a child process started with multiprocessing's `spawn` leaves this program's own code alone.
    Such a child first imports the parent's main script under another name: a library user's script
    without an `if __name__ == "__main__":` guard would run again in it, printing and writing as the
    parent does. Safe: the `charlm` command, `python -m <package>` (multiprocessing does not import a
    package's __main__), an interactive session (no main file)."""
    if _SPAWN_SAFE:
        return True
    main = sys.modules.get("__main__")
    if getattr(main, "__file__", None) is None:
        return True
    spec = getattr(main, "__spec__", None)
    return spec is not None and spec.name.endswith(".__main__")


def cores_taken(threads: int, reads: int = 5, gap: float = 0.001) -> bool:
    """Whether other processes' runnable threads leave fewer than `threads` of this process's cores
    free right now: the instantaneous count of runnable threads in /proc/loadavg (the fourth field;
    unlike the load averages it does not lag), less this process's own, the least of a few reads
    `gap` seconds apart (a short-lived command, or one of this process's threads waking up between
    two reads of a count, is not a busy core). False where /proc cannot say."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    others = None
    for i in range(reads):
        if i:
            time.sleep(gap)
        n = other_runnable()
        if n is None:
            return False
        others = n if others is None else min(others, n)
        if cpus - others >= threads:
            return False
    return True


def other_runnable(loadavg: str = "/proc/loadavg", tasks: str = "/proc/self/task") -> int | None:
    """Runnable threads (running or waiting for a core) outside this process, now; None where the
    files are missing or unlike Linux's. This process's own are those runnable in a look at its
    threads just before or just after the count (one of them may wake or sleep in between)."""
    try:
        before = _runnable_tasks(tasks)
        with open(loadavg) as f:
            runnable = int(f.read().split()[3].split("/")[0])
        own = len(before | _runnable_tasks(tasks))
    except (OSError, ValueError, IndexError):
        return None
    return max(0, runnable - own)


def _runnable_tasks(tasks: str) -> set[str]:
    """The ids of the threads under `tasks` (a /proc/<pid>/task folder) in state R."""
    found = set()
    for tid in os.listdir(tasks):
        try:
            with open(os.path.join(tasks, tid, "stat")) as f:
                stat = f.read()
        except OSError:  # the thread ended meanwhile
            continue
        end = stat.rindex(")")
        if stat[end + 2:end + 3] == "R":
            found.add(tid)
    return found


def _set_numba_threads(n: int) -> None:
    import numba
    if numba.get_num_threads() != n:
        numba.set_num_threads(n)


def _median(values) -> float:
    v = sorted(values)
    return v[len(v) // 2] if v else float("inf")


_LOCAL = threading.local()  # .governor: the Governor of this thread's compute_threads


def exit_now(signum: int, frame=None, message: str = "") -> None:
    """End the process at once with 128 + signum, what it has written flushed first (and message, if
    any, on stderr): a signal handler for when Python may be shutting down, where an exception raised
    into exit-time code (atexit, weakref finalizers) would print its traceback."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:  # a closed pipe: nothing more to say
            pass
    if message:
        os.write(2, message.encode())
    os._exit(128 + signum)


def gc_on() -> None:
    """The cyclic garbage collector back on (the console script starts without it: see
    charlm._entry); what start-up created is frozen out of its later passes."""
    if not gc.isenabled():
        gc.freeze()
        gc.enable()


def machine_memory() -> tuple[int, str]:
    """The memory this process can have at most, in bytes, and what sets it: the machine's RAM, or a
    smaller container (cgroup) limit or address-space limit (ulimit -v)."""
    import resource
    limits = []
    try:
        limits.append((os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "the machine has"))
    except (ValueError, OSError, AttributeError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                value = f.read().strip()
            if value.isdigit() and int(value) < 1 << 60:
                limits.append((int(value), "this container may use"))
        except OSError:
            pass
    soft = resource.getrlimit(resource.RLIMIT_AS)[0]
    if soft != resource.RLIM_INFINITY and soft > 0:
        limits.append((soft, "the address-space limit (ulimit -v) is"))
    return min(limits) if limits else (1 << 62, "no limit is known")
