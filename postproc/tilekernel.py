"""Numba driver of the polygonizer: a whole tile in one call from Python (issue 6).

``polygonize.polygonize_probs`` used to call the kernels one by one (``blobs.find_blobs``,
``label.finish``, ``label.seedless``, ``trace.trace_blobs``) and compute the confidences and
their order with numpy. Each call from Python costs numba's dispatch (typing and unboxing every
array argument: ~4 us for ``find_blobs``' 25 in a tight loop, 10-15 us a tile in the benchmark,
where the sweep has evicted the dispatcher's data from the caches), and the numpy calls on
~100-element arrays cost more than the arithmetic. Here they are one call; the kernels and the
results are the same (``tests/postproc/test_polygonize_equivalence.py``).
"""

from __future__ import annotations

import numpy as np

from postproc.blobs import find_blobs
from postproc.label import finish, seedless
from postproc.numbacache import njit
from postproc.trace import trace_blobs


@njit(cache=True)
def polygonize_tile(prob: np.ndarray, params: tuple, rasters: tuple, uf: tuple, runs: tuple,
                    rows: tuple, queue: tuple, stack: np.ndarray) -> tuple:
    """Blobs of an HxWx3 uint8 probability map, traced, with confidences, most confident first.

    ``params``: (seed threshold, eligible threshold, squared grow radius, growth layers, whether
    seedless components become blobs, minimum pixel count); the buffers are a
    ``polygonize.Workspace``'s. Returns ``trace.trace_blobs``' ragged arrays (in blob order),
    the confidences in descending order (stable: ties keep blob order) and that order.
    """
    st, ft, radius2, layers, with_seedless, min_count = params
    codes, lab = rasters
    nprov, nrun = find_blobs(prob, st, ft, radius2, layers, rasters, uf, runs, rows, queue)
    final, n, first, count, fsum = finish(uf[0], uf[1], uf[2], uf[3], nprov)
    if with_seedless and nrun > 0:
        final, first, count, fsum, n = seedless(prob, codes, lab, (final, first, count, fsum), n,
                                                runs, nrun, radius2, stack)
    coords, ring_off, poly_off, ids = trace_blobs(codes, lab, final, n, first, count,
                                                  prob.shape[1], min_count)
    neg = np.empty(ids.size, np.float64)
    for i in range(ids.size):
        b = ids[i]
        # NOTE: numpy's fsum / (255.0 * count) to the bit: the same float64 operations, in order
        neg[i] = -(fsum[b] / (255.0 * count[b]))
    order = np.argsort(neg, kind="mergesort")  # stable, as numpy's kind="stable"
    conf = np.empty(ids.size, np.float64)
    for i in range(ids.size):
        conf[i] = -neg[order[i]]
    return coords, ring_off, poly_off, conf, order
