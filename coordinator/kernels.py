"""Compiled loops for the one job vectorized numpy and PyTorch do in several passes: adding sparse
deltas into a running sum straight from their gap encoding.

Decoded the vectorized way, a top-k update of k values becomes k int64 positions (a cumulative sum
of its gaps) and k float32 values (int8 times block scales, times the update's weight), and only
then is scattered in: three passes and 12 bytes of temporaries per value. Here one loop reads the
gaps, the values and the scales once and adds each value where it belongs, with the same float32
operations in the same order, so the sum is bit for bit the one decoding and scattering gives.

Several deltas are added block by block of the sum: every delta's values inside one block, then
the next block. Each block stays in the cache while the deltas add into it, where one delta after
another would each miss it all over a sum larger than the cache. Every position still receives its
deltas in the given order. For a 25M-parameter model (a 100 MB sum, a 32 MiB L3) and distinct
updates of 271k values, per delta (medians of 11): 1.6 ms one by one, 1.5 for 12 at once, 1.2 for
24; one by one is the faster below about 12.

Indices are cast to unsigned before use: numba then leaves out the test for negative indices it
otherwise makes on every access (1.6 ms against 2.25 per delta one by one).

numba compiles the loops on first use (a few seconds, cold) and caches them beside this file
(``NUMBA_CACHE_DIR`` moves the cache where the package folder is read-only); a running sum calls
``warm_up`` when it is made, so no update waits for a compiler. They release the GIL, so the
running sum's thread adds while the coordinator's thread receives, and two threads can fold
disjoint ranges of one sum at once.
"""

from __future__ import annotations

import numba
import numpy as np
from numba.typed import List

# Values of the sum in one block: 256 KiB, which stays in a core's L2 cache while the deltas add into it.
BLOCK = 1 << 16
_U = np.uint64
# An int8 delta's block of values sharing a scale is 2**shift; float32 values get one scale of 1.0
# (a shift past any index), and x * 1.0 is exactly x.
_NO_SCALES = np.ones(1, np.float32)
_NO_SHIFT = 62


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _add_range(flat, gaps, values, scales, shift, alpha, i, stop, position):  # pragma: no cover - compiled
    """Add values i .. stop-1, value i at position + gaps[i]; the last position added."""
    for k in range(i, stop):
        u = _U(k)
        position += gaps[u]
        flat[_U(position)] += np.float32(values[u]) * scales[u >> _U(shift)] * alpha
    return position


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _seek(gaps, i, position, end):  # pragma: no cover - compiled
    """From value i (after ``position``) on, the first value at or past position ``end``, and the
    position just before it. A separate pass: a bound tested inside the adding loop slows it by a third."""
    for k in range(i, gaps.size):
        p = position + gaps[_U(k)]
        if p >= end:
            return k, position
        position = p
    return gaps.size, position


@numba.njit(nogil=True, cache=True, boundscheck=False)
def _fold(flat, gaps, values, scales, shifts, alphas, start, stop, block):  # pragma: no cover - compiled
    m = len(gaps)
    cursor = np.zeros(m, np.int64)
    position = np.full(m, -1, np.int64)
    for d in range(m):
        cursor[d], position[d] = _seek(gaps[d], 0, -1, start)
    for low in range(start, stop, block):
        high = min(low + block, stop)
        for d in range(m):
            # No delta names a position past the sum: the block that ends it takes all the rest.
            end = gaps[d].size if high == flat.size else _seek(gaps[d], cursor[d], position[d], high)[0]
            position[d] = _add_range(flat, gaps[d], values[d], scales[d], shifts[d], alphas[d], cursor[d], end, position[d])
            cursor[d] = end


def fold_at_gaps(flat: np.ndarray, deltas: list[tuple[np.ndarray, np.ndarray, np.ndarray | None, int, float]],
                 start: int = 0, stop: int | None = None, block: int = BLOCK) -> None:
    """flat[p] += alpha * v for the values of every (gaps, values, scales, scale_block, alpha) whose
    position p lies in [start, stop), the deltas in order, block by block of ``block`` values.

    A delta's positions are gaps[0] + ... + gaps[i] - 1; its values are float32, or int8 times
    scales[i // scale_block] (a power of two). ``flat`` must be contiguous float32. Positions are
    not checked here: the caller guarantees gaps of at least 1, positions inside ``flat``, and as
    many values (and scales) as the gaps need.
    """
    if flat.dtype != np.float32 or not flat.flags.c_contiguous:
        raise ValueError(f"sparse deltas are added into contiguous float32 sums, not {flat.dtype} "
                         f"with strides {flat.strides}")
    stop = flat.size if stop is None else stop
    # One compiled loop serves one kind of gaps and values: consecutive deltas of a kind fold together.
    run: list = []
    for delta in deltas:
        if run and (run[0][0].dtype, run[0][1].dtype) != (delta[0].dtype, delta[1].dtype):
            _fold_run(flat, run, start, stop, block)
            run = []
        run.append(delta)
    if run:
        _fold_run(flat, run, start, stop, block)


def _fold_run(flat, run, start, stop, block) -> None:
    kernel_args = [(g, v, *_scales(v, s, scale_block), np.float32(alpha)) for g, v, s, scale_block, alpha in run]
    if len(run) == 1 and start == 0 and stop == flat.size:
        # Straight from here: typed lists cost 0.2 ms to build, and inside _fold every store into
        # the sum might alias their array descriptors, which then are read again each time.
        g, v, s, shift, alpha = kernel_args[0]
        _add_range(flat, g, v, s, shift, alpha, 0, g.size, -1)
        return
    gaps, values, scales = List(), List(), List()
    for g, v, s, _, _ in kernel_args:
        gaps.append(g)
        values.append(v)
        scales.append(s)
    shifts = np.array([shift for *_, shift, _ in kernel_args], np.int64)
    alphas = np.array([alpha for *_, alpha in kernel_args], np.float32)
    _fold(flat, gaps, values, scales, shifts, alphas, start, stop, block)


def _scales(values: np.ndarray, scales: np.ndarray | None, scale_block: int) -> tuple[np.ndarray, int]:
    """The scales and the shift that picks a value's scale."""
    if (values.dtype, scales is None) not in ((np.float32, True), (np.int8, False)):
        raise ValueError(f"sparse values are float32, or int8 with scales; got {values.dtype} "
                         f"{'without' if scales is None else 'with'} scales")
    if scales is None:
        return _NO_SCALES, _NO_SHIFT
    if scale_block <= 0 or scale_block & (scale_block - 1):
        raise ValueError(f"int8 scale blocks must be a power of two, got {scale_block}")
    return scales, scale_block.bit_length() - 1


def warm_up() -> None:
    """Compile (or load from the cache) the loops for every kind of gaps and values, before anything is timed."""
    flat = np.zeros(4, np.float32)
    for dtype in (np.uint8, np.uint16, np.uint32, np.int64):
        gaps = np.ones(2, dtype)
        for values, scales in ((np.zeros(2, np.float32), None), (np.zeros(2, np.int8), np.zeros(1, np.float32))):
            for start in (0, 1):  # straight in, and through the block-wise loop
                fold_at_gaps(flat, [(gaps, values, scales, 256, 1.0)], start=start)
