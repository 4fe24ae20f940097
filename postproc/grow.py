"""Numba kernels of the polygonizer, part 2: grow seed blobs back over the boundary band.

Layout and pixel codes: see ``postproc.label``; the sweep that runs this: ``postproc.blobs``.

Growth is defined layer by layer (synchronously, so no blob gets ahead by scan order): in layer
``l`` each queued pixel joins the 4-neighbour (a seed, or grown in an earlier layer) whose seed
pixel is nearest in Euclidean distance, if within ``radius2`` (squared px, an integer: squared
distances between pixels are); ties go to the smaller provisional label, then to the first of
right, down, left, up (arbitrary but deterministic). Joining through a 4-neighbour keeps every
blob 4-connected, so one blob is one polygon, as in GDAL. A claimed pixel queues for layer
``l + 1`` its eligible neighbours that its seed reaches.

A layer's row only reads rows next to it, so the layers need not sweep the tile one after the
other: ``grow_row`` does one layer of one row, and the sweep runs layer ``l`` two rows behind
layer ``l - 1`` (see ``postproc.blobs``), all while those rows are in cache.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from postproc.label import ELIGIBLE, GROWN, QUEUED, REJECTED, SEED, row_kernel

RING = 4  # rows of a layer's queue that are live at once: its row and the three below
U = np.uint64  # NOTE: unsigned indices spare numba's negative-index wraparound on every access


@njit(cache=True, inline="always")
def _neighbour(k: int, p: int, r: int, c: int, wp: int) -> tuple:
    """Neighbour ``k`` (0..3: right, down, left, up; the tie order) of pixel ``p`` at (r, c):
    its flat index, row and column."""
    if k == 0:
        return p + 1, r, c + 1
    if k == 1:
        return p + wp, r + 1, c
    if k == 2:
        return p - 1, r, c - 1
    return p - wp, r - 1, c


@row_kernel
def grow_row(frow: np.ndarray, r: int, layer: int, last: bool, rasters: tuple, uf: tuple,
             queue: tuple, radius2: int) -> None:
    """Layer ``layer`` of row ``r``: decide and claim its queued pixels (``queue``: ring, counts;
    see ``RING``), queue their neighbours for the next layer unless ``last``.

    ``rasters``: codes, lab; ``queue`` ends with each grown pixel's seed pixel as row and column
    offsets, one byte each in an int16 (row << 8 | column & 255); ``uf``: first pixel, pixel
    count and confidence sum per provisional label, updated with the claimed pixels (``frow``:
    the row's probabilities).
    """
    codes, lab = rasters
    first_prov, cnt_prov, sum_prov = uf
    ring, ringn, src = queue
    wp = frow.shape[0] // 3 + 2
    mine = GROWN + layer  # claimed in this layer: not grown as far as this layer knows
    s = r % RING
    # seed offsets live in a ring of rows: a row's are read until the last layer is past it
    # NOTE: the ring's row count is a power of two: a mask, not three integer divisions a call
    m = src.shape[0] // wp - 1
    base = (r & m) * wp - (r + 1) * wp  # flat index p -> its index in the source ring
    b_up = ((r - 1) & m) * wp - r * wp
    b_dn = ((r + 1) & m) * wp - (r + 2) * wp
    for i in range(ringn[layer, s]):
        c = np.int64(ring[layer, s, i])
        p = (r + 1) * wp + c + 1
        bd = radius2 + 1
        bq = -1
        bsr = 0
        bsc = 0
        for k in range(4):
            q, rr, cc = _neighbour(k, p, r, c, wp)
            cq = codes[U(q)]
            if cq == SEED:
                sr, sc = rr, cc
            elif cq >= GROWN and cq != mine:
                qs = q + (base if rr == r else (b_dn if rr > r else b_up))
                v = np.int64(src[U(qs)])
                sr, sc = rr + (v >> 8), cc + (((v & 0xFF) ^ 0x80) - 0x80)
            else:
                continue
            d2 = (r - sr) * (r - sr) + (c - sc) * (c - sc)
            # labels are loaded on ties only
            if d2 < bd or (d2 == bd and bq >= 0 and lab[U(q)] < lab[U(bq)]):
                bd, bq, bsr, bsc = d2, q, sr, sc
        if bd > radius2:  # rare: every pixel queued had a seed within reach
            codes[U(p)] = REJECTED
            continue
        codes[U(p)] = mine
        lb = np.int64(lab[U(bq)])
        lab[U(p)] = lb
        src[U(p + base)] = ((bsr - r) << 8) | ((bsc - c) & 0xFF)
        cnt_prov[U(lb)] += 1
        sum_prov[U(lb)] += min(np.int64(frow[U(3 * c + 1)]) + np.int64(frow[U(3 * c + 2)]), 255)
        if p < first_prov[U(lb)]:
            first_prov[U(lb)] = p
        if last:
            continue
        for k in range(4):
            q, rr, cc = _neighbour(k, p, r, c, wp)
            # NOTE: queue only what this seed can reach: evaluating (and rejecting) the band's
            # outer half in every layer cost more than growing the inner half. A pixel nearer
            # to another seed is queued by that seed's pixels.
            if codes[U(q)] == ELIGIBLE and \
                    (rr - bsr) * (rr - bsr) + (cc - bsc) * (cc - bsc) <= radius2:
                codes[U(q)] = QUEUED
                s2 = rr % RING
                ring[layer + 1, s2, ringn[layer + 1, s2]] = cc
                ringn[layer + 1, s2] += 1
    ringn[layer, s] = 0
