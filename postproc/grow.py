"""Numba kernels of the polygonizer, part 2: grow seed blobs back over the boundary band.

Layout and pixel codes: see ``postproc.label``.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from postproc.label import ELIGIBLE, GROWN, QUEUED, REJECTED, SEED


@njit(cache=True)
def _decide(codes: np.ndarray, lab: np.ndarray, qr: np.ndarray, qc: np.ndarray, m: int,
            src: tuple, win: tuple, wp: int, radius2: int) -> None:
    """For each queued pixel, the 4-neighbour in a blob whose seed pixel is nearest (or -1)."""
    src_dr, src_dc = src
    win_q, win_r, win_c = win
    for i in range(m):
        r = np.int64(qr[i])
        c = np.int64(qc[i])
        p = (r + 1) * wp + c + 1
        bd = radius2 + 1
        bq = -1
        bsr = 0
        bsc = 0
        for k in range(4):
            if k == 0:
                q, rr, cc = p + 1, r, c + 1
            elif k == 1:
                q, rr, cc = p + wp, r + 1, c
            elif k == 2:
                q, rr, cc = p - 1, r, c - 1
            else:
                q, rr, cc = p - wp, r - 1, c
            cq = codes[q]
            if cq == SEED:
                sr, sc = rr, cc
            elif cq == GROWN:
                sr, sc = rr + np.int64(src_dr[q]), cc + np.int64(src_dc[q])
            else:
                continue
            d2 = (r - sr) * (r - sr) + (c - sc) * (c - sc)
            # labels are loaded on ties only (rare): the load is a cache miss more often than not
            if d2 < bd or (d2 == bd and lab[q] < lab[bq]):
                bd, bq, bsr, bsc = d2, q, sr, sc
        win_q[i] = bq if bd <= radius2 else -1
        win_r[i] = bsr
        win_c[i] = bsc


@njit(cache=True)
def _apply(prob: np.ndarray, codes: np.ndarray, lab: np.ndarray, stats: tuple, qr: np.ndarray,
           qc: np.ndarray, m: int, src: tuple, win: tuple, nxt: tuple, radius2: int) -> tuple:
    """Claim the decided pixels, update blob stats, queue the eligible neighbours that the
    claimed pixel's seed is near enough to reach. Returns (pixels claimed, next queue length).
    """
    final, first, count, fsum = stats
    src_dr, src_dc = src
    win_q, win_r, win_c = win
    nr_, nc_ = nxt
    W = prob.shape[1]
    wp = W + 2
    flat = prob.reshape(-1)
    nn = 0
    claimed = 0
    for i in range(m):
        r = np.int64(qr[i])
        c = np.int64(qc[i])
        p = (r + 1) * wp + c + 1
        q = win_q[i]
        if q < 0:  # rare: every pixel queued had a seed within reach
            codes[p] = REJECTED
            continue
        # NOTE: reading the winner now is safe: a pixel claimed in this layer was QUEUED while
        # the layer decided, so it cannot be anyone's winner.
        codes[p] = GROWN
        lab[p] = lab[q]
        src_dr[p] = win_r[i] - r
        src_dc[p] = win_c[i] - c
        f = final[lab[q]]
        count[f] += 1
        j = 3 * (r * W + c)
        fsum[f] += min(np.int32(flat[j + 1]) + np.int32(flat[j + 2]), 255)
        if p < first[f]:
            first[f] = p
        claimed += 1
        sr = np.int64(win_r[i])
        sc = np.int64(win_c[i])
        for k in range(4):
            if k == 0:
                q, rr, cc = p + 1, r, c + 1
            elif k == 1:
                q, rr, cc = p + wp, r + 1, c
            elif k == 2:
                q, rr, cc = p - 1, r, c - 1
            else:
                q, rr, cc = p - wp, r - 1, c
            # NOTE: queue only what this seed can reach: evaluating (and rejecting) the band's
            # outer half in every layer cost more than growing the inner half. A pixel nearer
            # to another seed is queued by that seed's pixels.
            if codes[q] == ELIGIBLE and (rr - sr) * (rr - sr) + (cc - sc) * (cc - sc) <= radius2:
                codes[q] = QUEUED
                nr_[nn] = rr
                nc_[nn] = cc
                nn += 1
    return claimed, nn


@njit(cache=True)
def grow(prob: np.ndarray, codes: np.ndarray, lab: np.ndarray, stats: tuple, nf: int,
         scratch: tuple, radius2: int, max_layers: int) -> int:
    """Grow seed blobs over eligible pixels, in place; return the number of pixels claimed.

    Layer by layer (synchronously, so no blob gets ahead by scan order) an eligible pixel joins
    the 4-neighbour whose seed pixel is nearest in Euclidean distance, if within ``radius2``
    (squared px, an integer: squared distances between pixels are); ties go to the smaller
    provisional label (arbitrary but deterministic). Joining through a 4-neighbour keeps every
    blob 4-connected, so one blob is one polygon, as in GDAL. ``stats`` is (final, first, count,
    fsum) from ``seed_label``, updated in place; the frontier is scratch[4:6][:nf] (the queue
    buffers are swapped between layers: reuse needs a new ``seed_label``).
    """
    # NOTE: two non-inlined helpers with plain scalars: a tuple-returning inline helper, or
    # one loop body with swapped queue arrays, compiled 3-9x slower.
    qa = (scratch[4], scratch[5])
    qb = (scratch[6], scratch[7])
    src = (scratch[8], scratch[9])
    win = (scratch[10], scratch[11], scratch[12])
    wp = prob.shape[1] + 2
    m = nf
    claimed = 0
    for layer in range(max_layers):
        if m == 0:
            break
        cur, nxt = (qa, qb) if layer % 2 == 0 else (qb, qa)
        _decide(codes, lab, cur[0], cur[1], m, src, win, wp, radius2)
        k, m = _apply(prob, codes, lab, stats, cur[0], cur[1], m, src, win, nxt, radius2)
        claimed += k
    if m > 0:  # the last layer's queue stays unclaimed
        last = qa if max_layers % 2 == 0 else qb
        for i in range(m):
            codes[(last[0][i] + 1) * wp + last[1][i] + 1] = ELIGIBLE
    return claimed
