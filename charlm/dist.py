"""The one place that knows about MPI: rank, size, collectives and abort (CONVENTIONS.md 1c).

Launched without an MPI launcher the world is one process (rank 0 of 1) and mpi4py is never
imported, so `import charlm` and a plain `charlm sample` start as fast as ever. Launched by
`mpiexec` (MPICH, Open MPI, Intel MPI) or by Slurm's `srun`, the launcher's environment says so
(LAUNCH_VARS) and the first call here initialises MPI through mpi4py.

Every collective here is called by every rank at the same point of the same program. A rank
that waits longer than timeout() seconds in one of them (another rank died, e.g. kill -9) says
so in one line and aborts the job (MPI_Abort), instead of hanging: the collectives are the
non-blocking ones, polled, so a dead peer cannot block a rank forever and signal handlers run.
"""
from __future__ import annotations

import os
import sys
import time

# set by MPICH/Hydra and Intel MPI (PMI_*), Open MPI (OMPI_*), PMIx launchers (Open MPI 5, srun --mpi=pmix)
LAUNCH_VARS = ("PMI_RANK", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "PMIX_RANK")
TIMEOUT_VAR = "CHARLM_MPI_TIMEOUT"
DEFAULT_TIMEOUT_S = 600.0   # longest wait in one collective (a checkpoint save of a large model included)

_comm = None          # mpi4py's COMM_WORLD once initialised; None while the world is one process
_local_size = 1       # ranks on this node
_collectives = 0      # collectives entered so far (after the first, a rank-local error must abort)


def launched() -> bool:
    """True when an MPI launcher (mpiexec, mpirun, srun with an MPI plugin) started this process."""
    if any(os.environ.get(v) for v in LAUNCH_VARS):
        return True
    return int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1) > 1  # srun -n K (checked in _init)


def _world():
    global _comm, _local_size
    if _comm is None and launched():
        try:
            import mpi4py
            mpi4py.rc.thread_level = "funneled"  # only the main thread calls MPI (Numba's threads never do)
            from mpi4py import MPI
        except ImportError:
            raise SystemExit("error: launched by an MPI launcher but mpi4py is not installed: "
                             "pip install \"charlm[mpi]\"") from None
        comm = MPI.COMM_WORLD
        steps = int(os.environ.get("SLURM_STEP_NUM_TASKS", "1") or 1)
        if comm.Get_size() == 1 and steps > 1:
            raise SystemExit(f"error: srun started {steps} tasks but MPI sees each as alone; launch with the "
                             f"site's MPI plugin (srun --mpi=pmix or --mpi=pmi2) or with mpiexec")
        _local_size = comm.Split_type(MPI.COMM_TYPE_SHARED).Get_size()
        _comm = comm
    return _comm


def size() -> int:
    """Processes in the job (1 without a launcher)."""
    c = _world()
    return 1 if c is None else c.Get_size()


def rank() -> int:
    """This process's number, 0 .. size()-1; rank 0 prints and writes files."""
    c = _world()
    return 0 if c is None else c.Get_rank()


def is_root() -> bool:
    return rank() == 0


def local_size() -> int:
    """Ranks on this node (1 without a launcher)."""
    _world()
    return _local_size


def default_threads(cores: int) -> int:
    """Threads for one rank by default: the node's cores shared among the node's ranks."""
    if not launched():
        return cores
    return max(1, cores // local_size())


def block(n: int, r: int | None = None, k: int | None = None) -> tuple[int, int]:
    """The contiguous share [lo, hi) of n items that rank r of k takes (sizes differ by at most one)."""
    r = rank() if r is None else r
    k = size() if k is None else k
    q, extra = divmod(n, k)
    lo = r * q + min(r, extra)
    return lo, lo + q + (r < extra)


def timeout() -> float:
    try:
        return float(os.environ.get(TIMEOUT_VAR, DEFAULT_TIMEOUT_S))
    except ValueError:
        return DEFAULT_TIMEOUT_S


def started() -> bool:
    """Whether this process has entered a collective (from then on a rank-local error must abort)."""
    return _collectives > 0


def _wait(req, what: str, limit: float | None = None):
    """Poll a non-blocking request until it completes; abort the job after `limit` seconds."""
    global _collectives
    _collectives += 1
    limit = timeout() if limit is None else limit
    t0 = time.monotonic()
    spins = 0
    while True:
        done, value = req.test()
        if done:
            return value
        spins += 1
        if spins > 2000:  # a short spin for fast collectives, then sleep a little between tests
            time.sleep(0.0005)
            if limit > 0 and time.monotonic() - t0 > limit:
                abort(f"rank {rank()} of {size()} waited {limit:.0f} s for the other ranks in {what} "
                      f"(one of them died or hangs); stopping the job (set {TIMEOUT_VAR} for longer waits)")


def allreduce(buf, what: str = "the gradient sum"):
    """Sum buf (a contiguous float array) over every rank, in place; returns buf."""
    c = _world()
    if c is None or c.Get_size() == 1:
        return buf
    from mpi4py import MPI
    req = c.Iallreduce(MPI.IN_PLACE, buf, op=MPI.SUM)
    _wait(_Req(req), what)
    return buf


def allreduce_sum(values, what: str = "a sum"):
    """The sum over ranks of a few float64 numbers (a new array)."""
    import numpy as np
    return allreduce(np.array(values, dtype=np.float64), what)


def barrier(what: str = "a barrier", limit: float | None = None) -> None:
    c = _world()
    if c is None or c.Get_size() == 1:
        return
    _wait(_Req(c.Ibarrier()), what, limit)


def bcast(obj, root: int = 0, what: str = "a broadcast", limit: float | None = None):
    """Rank root's obj on every rank (any picklable object: these are our own processes)."""
    c = _world()
    if c is None or c.Get_size() == 1:
        return obj
    import numpy as np
    data = _pack(obj) if c.Get_rank() == root else None
    n = np.array([0 if data is None else len(data)], dtype=np.int64)
    _wait(_Req(c.Ibcast(n, root=root)), what, limit)
    buf = data if data is not None else np.empty(int(n[0]), dtype=np.uint8)
    _wait(_Req(c.Ibcast(buf, root=root)), what, limit)
    return obj if c.Get_rank() == root else _unpack(buf)


def gather(obj, root: int = 0, what: str = "a gather"):
    """[obj of rank 0, obj of rank 1, ...] on root, None elsewhere."""
    c = _world()
    if c is None or c.Get_size() == 1:
        return [obj]
    import numpy as np
    data = _pack(obj)
    sizes = np.zeros(c.Get_size(), dtype=np.int64)
    _wait(_Req(c.Iallgather(np.array([len(data)], dtype=np.int64), sizes)), what)
    out = np.empty(int(sizes.sum()), dtype=np.uint8) if c.Get_rank() == root else None
    offsets = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    _wait(_Req(c.Igatherv(data, [out, sizes, offsets, _byte()] if out is not None else None, root=root)), what)
    if c.Get_rank() != root:
        return None
    return [_unpack(out[o:o + n]) for o, n in zip(offsets, sizes)]


def allgather(obj, what: str = "a gather"):
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    c = _world()
    if c is None or c.Get_size() == 1:
        return [obj]
    return bcast(gather(obj, 0, what), 0, what)


# Messages between the ranks of one job are pickled, as mpi4py's own object API does: they never touch
# the disk and come only from processes of the job the user launched (the same trust as the process
# itself). Files are another matter: checkpoints and token files are never unpickled.
def _pack(obj):
    import pickle

    import numpy as np
    return np.frombuffer(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL), dtype=np.uint8)


def _unpack(buf):
    import pickle
    return pickle.loads(buf.tobytes())


def _byte():
    from mpi4py import MPI
    return MPI.BYTE


def abort(message: str, code: int = 1) -> None:
    """Print one line on stderr and end every rank of the job (MPI_Abort); exit if alone."""
    sys.__stderr__.write(message.rstrip() + "\n")  # the terminal, even where a rank's output is silenced
    sys.__stderr__.flush()
    c = _world()
    if c is not None and c.Get_size() > 1:
        time.sleep(0.3)  # let the launcher forward that line first: MPI_Abort tears the job down at once
        c.Abort(code)
    raise SystemExit(code)


class _Req:
    """A buffer request with the test() -> (done, value) shape of mpi4py's object requests."""

    def __init__(self, req):
        self.req = req

    def test(self):
        return self.req.Test(), None
