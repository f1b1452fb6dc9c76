"""How kernels split work between threads, and the pieces the by-units loops share.

Two cores are used by splitting work between threads (numba prange) with each BLAS
call single-threaded. The caller keeps BLAS at one thread and passes parts = the
number of threads (kernels read no globals: Numba's get_num_threads() would also
make them uncacheable).

Dimensions: N batch, H hidden, G gates (rnn 1, gru 3, lstm 4), R rows of a part.
"""
import numpy as np
from numba import njit

JIT = dict(cache=True, error_model="numpy", nogil=True)
# Two cores are used by splitting work between threads (numba prange) with each
# BLAS call single-threaded, rather than letting BLAS split every small per-step
# product: GRU/RNN recurrences are split by batch rows (no synchronisation inside
# the time loop), the LSTM's by hidden units (a barrier per step, larger products:
# see lstm.py), whole-window products by time or rows. The caller keeps BLAS at one thread
# and passes parts = the number of threads (kernels read no globals: Numba's
# get_num_threads() would also make them uncacheable).
PJIT = dict(JIT, parallel=True)


@njit(**JIT)
def chunk(c, nc, n):
    """Bounds [lo, hi) of part c of nc near-equal parts of range(n)."""
    return c * n // nc, (c + 1) * n // nc


@njit(**JIT)
def n_parts(parts, n):
    """How many parts to split n rows into: `parts` (one per thread), at most n."""
    return max(1, min(parts, n))



# ------------------------------------------------------------ split by hidden units
# With several threads, each step's recurrent product is split by hidden units
# rather than by batch rows: thread c owns units [j0, j1) of every gate, so it
# multiplies all N rows by its 4(j1 - j0) rows of W_hh. For N 32, H 256 on two
# threads that is a 32x256 by 256x512 product per thread instead of 16x256 by
# 256x1024: splitting the batch makes the products thinner, and thin products run
# far below BLAS's large-matrix speed. The price is a barrier per step (the next
# step needs all of h): one prange per step, small against the product. The gate
# activations are split the same way, so they stay on the thread that computed
# their inputs. The same code with one part is also the fastest single-threaded
# loop (W h^T in row blocks beats the plain loop's h W^T); the plain loops remain
# for fewer than 16 units and as the tests' reference. Timings: BENCHMARKS.md.

@njit(**JIT)
def copy_row(dst, src):
    """dst[:] = src for two 1-D arrays of one length, element by element.

    Kernels copy with this rather than a slice assignment (a[i] = b[j]): Numba compiles
    each assignment of an array into a slice together with its shape-mismatch message,
    string formatting included, which costs ~1.5 s of compilation per array rank on a
    first run (benchmarks/compile_times.py), for a copy this loop does as fast."""
    for k in range(dst.shape[0]):
        dst[k] = src[k]


@njit(**JIT)
def unit_parts(parts, H):
    """How many unit parts: one per thread, each at least 16 units (a vector or two)."""
    return max(1, min(parts, H // 16))


@njit(**JIT)
def gate_product(W, G, j0, j1, hT, buf, t):
    """Part [j0, j1)'s rows of a step's recurrent product, W_hh h^T, unit-major: W (G H, H) the whole
    W_hh ([i | f | g | o] for the LSTM, [r | z | n] for the GRU), hT (H, N). Returns the (G w, N)
    view of the work space buf (G w N or more,) whose row g w + j is W[g H + j0 + j] . h^T: the
    part's rows of each gate block, gate after gate. Read in place, gate block by gate block (each
    a contiguous run of W's rows): packing the part's rows into one matrix first cost a copy of W_hh
    per window (0.5 ms of a 65 ms 2x256 training step), for the same row-block products. Step t
    (the caller's) reads the blocks in reverse order when t is odd, so a step starts with the block
    the step before ended with, still in the core's L2: with batch 1 each step streams all of the
    part's rows (2 MB a thread for a 512-unit LSTM on two threads, as much as its L2 holds), and one
    stream scored 2x512 went 13 % quicker (BENCHMARKS.md). The blocks are independent: the numbers
    do not change."""
    H, N = hT.shape
    w = j1 - j0
    rT = buf[:G * w * N].reshape(G * w, N)
    rows = small_rows(G * w, H, N)
    for i in range(G):
        g = G - 1 - i if t % 2 else i
        dot_rows(W[g * H + j0:g * H + j1], hT, rT[g * w:(g + 1) * w], rows)
    return rT


@njit(**JIT)
def transpose_into(out, a):
    """out (n, m) = a.T for a (m, n). Full 16 x 16 tiles go through views with
    constant bounds, which LLVM turns into vector shuffles (several times quicker
    than plain loops, tiled or not, whose variable bounds it does not vectorise;
    see BENCHMARKS.md); the edges element by element."""
    m, n = a.shape
    m16, n16 = m - m % 16, n - n % 16
    for i0 in range(0, m16, 16):
        for k0 in range(0, n16, 16):
            blk = a[i0:i0 + 16, k0:k0 + 16]
            ob = out[k0:k0 + 16, i0:i0 + 16]
            for k in range(16):
                for i in range(16):
                    ob[k, i] = blk[i, k]
    for i in range(m):
        for k in range(n16 if i < m16 else 0, n):
            out[k, i] = a[i, k]


@njit(**JIT)
def small_rows(M, K, N):
    """Rows per call when a per-step product (M x K) @ (K x N) is cut into row
    blocks: the largest power of two from 16 with rows K N <= 1e6, or M (no cut).
    OpenBLAS computes products up to that size with its small-matrix kernels,
    without packing the operands first; at the per-step sizes of a recurrent
    layer, several unpacked blocks are quicker than one packed product (forward
    and backward; see BENCHMARKS.md), while a block just over the limit pays
    for packing and is slower."""
    r = 16
    if r * K * N > 1_000_000:
        return M
    while 2 * r * K * N <= 1_000_000:
        r *= 2
    return min(r, M)


@njit(**JIT)
def dot_rows(A, B, out, rows):
    """out (M, N) = A (M, K) @ B (K, N), in blocks of `rows` rows (small_rows)."""
    M = A.shape[0]
    for r0 in range(0, M, rows):
        r1 = min(r0 + rows, M)
        np.dot(A[r0:r1], B, out[r0:r1])


@njit(**JIT)
def state_T(h0):
    """h0 (N, H) -> (2, H, N) with [0] = h0^T: the transposed state the by-units
    loops multiply, double-buffered by step parity (a part writes step t + 1's
    units while another may still read step t's)."""
    N, H = h0.shape
    hT = np.empty((2, H, N), dtype=h0.dtype)
    transpose_into(hT[0], h0)
    return hT
