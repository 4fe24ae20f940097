"""Numba kernels of the polygonizer, part 2: grow seed blobs back over the boundary band.

Layout and pixel codes: see ``postproc.label``; the sweep that runs this: ``postproc.blobs``.

Growth is defined layer by layer (synchronously, so no blob gets ahead by scan order): in layer
``l`` each queued pixel joins the 4-neighbour (a seed, or grown in an earlier layer) whose seed
pixel is nearest in Euclidean distance, if within ``radius2`` (squared px, an integer: squared
distances between pixels are); ties go to the smaller provisional label, then to the first of
right, down, left, up (arbitrary but deterministic). Joining through a 4-neighbour keeps every
blob 4-connected, so one blob is one polygon, as in GDAL. A claimed pixel queues for layer
``l + 1`` its eligible neighbours that its seed reaches.

The kernel pushes rather than pulls: a pixel claimed in layer ``l`` offers its seed to the
neighbours it queues (or that are already queued for ``l + 1``), and each keeps its best offer
as one int64 whose integer order is the tie order above, so layer ``l + 1`` only commits it.
The offers are exactly the candidates that can win: a pixel queued for layer ``l + 1`` has no
seed neighbour (it would be in layer 0) and no neighbour from a layer before ``l`` whose seed
reaches it (that one would have queued it earlier). Pulling (reading four neighbours' codes and
seeds again at decision time) cost 3-6% more of the sweep.

A layer's row only reads rows next to it, so the layers need not sweep the tile one after the
other: ``grow_row`` does one layer of one row, and the sweep runs layer ``l`` two rows behind
layer ``l - 1`` (see ``postproc.blobs``), all while those rows are in cache.
"""

from __future__ import annotations

import numpy as np

from postproc.label import ELIGIBLE, GROWN, QUEUED, QUEUED_ODD, REJECTED, SEED, row_kernel
from postproc.numbacache import njit

RING = 4  # rows of a layer's queue that are live at once: its row and the three below
U = np.uint64  # NOTE: unsigned indices spare numba's negative-index wraparound on every access
# a candidate (see grow_row) as one int64, compared as a whole: squared distance, provisional
# label, the side it came from, and its seed pixel's offset (row, column: a byte each)
D2_SHIFT, LABEL_SHIFT, LABEL_MASK = 50, 18, 0xFFFFFFFF


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
    """Layer ``layer`` of row ``r``: claim its queued pixels (``queue``: ring, counts, best
    candidates; see ``RING``), offer each claimed pixel's seed to its neighbours for the next
    layer unless ``last``.

    ``rasters``: codes, lab; ``uf``: first pixel, pixel count and confidence sum per provisional
    label, updated with the claimed pixels (``frow``: the row's probabilities).
    """
    codes, lab = rasters
    first_prov, cnt_prov, sum_prov = uf
    ring, ringn, best = queue
    wp = frow.shape[0] // 3 + 2
    mine = GROWN + layer
    nxt = QUEUED + (QUEUED_ODD - QUEUED) * ((layer + 1) & 1)  # queued for the next layer
    s = r % RING
    # candidates live in a ring of rows, from their offer until their layer claims them
    # NOTE: the ring's row count is a power of two: a mask, not three integer divisions a call
    m = best.shape[0] // wp - 1
    base = (r & m) * wp - (r + 1) * wp  # flat index p -> its index in the ring
    b_up = ((r - 1) & m) * wp - r * wp
    b_dn = ((r + 1) & m) * wp - (r + 2) * wp
    for i in range(ringn[layer, s]):
        c = np.int64(ring[layer, s, i])
        p = (r + 1) * wp + c + 1
        if layer == 0:
            # every candidate is a seed next to p, at distance 1: the smaller label wins, then
            # the first in the tie order
            bq = -1
            bk = 0
            for k in range(4):
                q = _neighbour(k, p, r, c, wp)[0]
                if codes[U(q)] == SEED and (bq < 0 or lab[U(q)] < lab[U(bq)]):
                    bq, bk = q, k
            if bq < 0 or radius2 < 1:
                codes[U(p)] = REJECTED
                continue
            lb = np.int64(lab[U(bq)])
            _, sr, sc = _neighbour(bk, p, r, c, wp)
        else:
            key = best[U(p + base)]
            lb = (key >> LABEL_SHIFT) & LABEL_MASK
            sr = r + (((key >> 8) & 0xFF) ^ 0x80) - 0x80
            sc = c + ((key & 0xFF) ^ 0x80) - 0x80
        codes[U(p)] = mine
        lab[U(p)] = lb
        cnt_prov[U(lb)] += 1
        sum_prov[U(lb)] += min(np.int64(frow[U(3 * c + 1)]) + np.int64(frow[U(3 * c + 2)]), 255)
        if p < first_prov[U(lb)]:
            first_prov[U(lb)] = p
        if last:
            continue
        for k in range(4):
            q, rr, cc = _neighbour(k, p, r, c, wp)
            cq = codes[U(q)]
            if cq != ELIGIBLE and cq != nxt:
                continue
            d2 = (rr - sr) * (rr - sr) + (cc - sc) * (cc - sc)
            # NOTE: offer only what this seed can reach: a pixel nearer to another seed is
            # offered it by that seed's pixels
            if d2 > radius2:
                continue
            # the pull order as one integer: distance, label, then p's side as seen from q
            # (right, down, left, up), then the seed's offset from q (never a tie-break)
            key = (d2 << D2_SHIFT) | (lb << LABEL_SHIFT) | (((k + 2) & 3) << 16) \
                | (((sr - rr) & 0xFF) << 8) | ((sc - cc) & 0xFF)
            qs = U(q + (b_dn if k == 1 else (b_up if k == 3 else base)))  # k: unrolled
            if cq == ELIGIBLE:
                codes[U(q)] = nxt
                best[qs] = key
                s2 = rr % RING
                ring[layer + 1, s2, ringn[layer + 1, s2]] = cc
                ringn[layer + 1, s2] += 1
            elif key < best[qs]:
                best[qs] = key
    ringn[layer, s] = 0
