"""Numba kernel of the polygonizer: one sweep down the tile finds its blobs (issue 6).

Each step classifies and labels one row (``postproc.label``), queues growth's first layer in
the row above it, and grows every layer a row: layer ``l`` works two rows behind layer
``l - 1``. A pixel's decision in layer ``l`` reads its 4-neighbours as layer ``l - 1`` left
them (done down to two rows below), and whether a pixel may be queued for layer ``l + 1`` needs
the queue of layer ``l`` one row further down to be complete (done by layer ``l - 1`` two rows
below). So the sweep gives exactly what the layer-by-layer definition gives, while every row
it touches is in cache: a sweep over the whole tile per stage and per layer went to memory for
each.
"""

from __future__ import annotations

import numpy as np

from postproc.grow import RING, grow_row
from postproc.label import (
    classify_row,
    frontier_row,
    join_runs,
    label_row,
    row_kernel,
    row_runs,
)


@row_kernel
def find_blobs(prob: np.ndarray, st: int, ft: int, radius2: int, layers: int, rasters: tuple,
               uf: tuple, runs: tuple, rows: tuple, queue: tuple) -> tuple:
    """Seed blobs of an HxWx3 uint8 probability map, grown ``layers`` layers within
    ``radius2`` (0 layers: no growth). Seeds: building > ``st``; eligible: building + boundary
    > ``ft`` (uint8 units, ft <= st).

    ``rasters``: padded codes and lab; ``uf``: union-find parent, first pixel, pixel count and
    confidence sum per provisional label; ``runs``: the eligible runs (see ``label.row_runs``,
    for ``label.seedless``); ``rows``: row buffers and ``queue`` growth's queues, >= ``layers``
    of them, and its best candidates (see ``postproc.grow`` and ``polygonize.Workspace``).
    Returns the number of provisional labels (``label.finish`` makes the blobs of them) and of
    eligible runs.
    """
    codes, lab = rasters
    first_prov, cnt_prov, sum_prov = uf[1], uf[2], uf[3]
    rb, mb, seeds, sega, segb = rows
    H, W = prob.shape[0], prob.shape[1]
    Wp = W + 2
    flat = prob.reshape(-1)
    ring, ringn = queue[0], queue[1]
    for layer in range(layers):
        for s in range(RING):
            ringn[layer, s] = 0
    st8 = np.uint8(st)
    ft8 = np.uint8(ft)
    # NOTE: np.int64, not 0: a literal int is an argument type of its own, so each row kernel
    # was compiled again for it (join_runs three times)
    n = np.int64(0)
    nrun = np.int64(0)
    prev0 = prev1 = np.int64(0)  # the previous row's eligible runs
    nseg = np.int64(0)  # the previous row's seed segments
    for t in range(H + 2 * layers + 2):
        if t < H:
            o = (t + 1) * Wp + 1
            frow = flat[t * W * 3:(t + 1) * W * 3]
            classify_row(frow, st8, ft8, codes[o:o + W], rb)
            row0 = nrun
            nrun, ns = row_runs(rb, W, t, runs, nrun, seeds)
            join_runs(runs, prev0, prev1, row0, nrun)
            prev0, prev1 = row0, nrun
            above, segs = (sega, segb) if t % 2 == 0 else (segb, sega)
            nseg, n = label_row(seeds, ns, above, nseg, segs, frow, o, lab, uf, n)
        x = t - 1  # the row above has all its neighbours classified now
        if layers > 0 and 0 <= x < H:
            ringn[0, x % RING] = frontier_row(codes, (x + 1) * Wp + 1, W, Wp, mb,
                                              ring[0, x % RING])
        for layer in range(layers):
            r = t - 2 - 2 * layer
            if r < 0:
                break
            # NOTE: most rows of the outer layers queue nothing; a call still costs its set-up
            if r < H and ringn[layer, r % RING] > 0:
                grow_row(flat[r * W * 3:(r + 1) * W * 3], r, layer, layer + 1 == layers,
                         rasters, (first_prov, cnt_prov, sum_prov), queue, radius2)
    return n, nrun
