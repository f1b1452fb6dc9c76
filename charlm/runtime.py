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
from contextlib import contextmanager

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
def compute_threads(n: int | None = None):
    """Run the kernels on n threads (default: every core; under MPI the node's cores shared among
    the node's ranks). Numba splits the work
    (LSTM time loops by hidden units, GRU/RNN ones by batch rows, whole-window
    products by time or rows) and every BLAS call stays single-threaded: a BLAS
    thread waiting for a core that is busy elsewhere would otherwise stall every
    time step."""
    import numba
    from threadpoolctl import threadpool_limits
    from .dist import default_threads
    load_blas()  # load the BLAS Numba calls now, so that the limit reaches it
    n = n or default_threads(numba.config.NUMBA_NUM_THREADS)  # under MPI: the node's cores / its ranks
    old = numba.get_num_threads()
    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    try:
        with threadpool_limits(limits=1, user_api="blas"):
            yield
    finally:
        numba.set_num_threads(old)


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
