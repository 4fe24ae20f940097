"""Numba kernels of the polygonizer, part 3: trace blobs into exact polygons with holes.

Layout and pixel codes: see ``postproc.label``. Rings run along pixel edges, corners only; the
result is the geometry of GDAL's polygonize (4-connectivity) on the same blobs.
"""

from __future__ import annotations

import numpy as np

from postproc.label import SEED
from postproc.numbacache import njit

U = np.uint64  # NOTE: unsigned indices spare numba's negative-index wraparound on every access


@njit(cache=True, inline="always")
def _inblob(codes: np.ndarray, lab: np.ndarray, final: np.ndarray, p: int, blob: int) -> bool:
    return codes[U(p)] >= SEED and final[U(lab[U(p)])] == blob


@njit(cache=True)
def _trace_ring(codes: np.ndarray, lab: np.ndarray, final: np.ndarray, blob: int, x0: int,
                y0: int, d0: int, wp: int, out: tuple, visited: np.ndarray, vy0: int,
                vx0: int) -> tuple:
    """``_walk`` with ``buf`` grown as needed: (buf, nb, twice the signed area, bbox x0, y0,
    x1, y1); ``out`` is (buf, nb)."""
    buf, nb = out
    while True:
        end, area2, bx0, by0, bx1, by1 = _walk(codes, lab, final, blob, x0, y0, d0, wp, buf, nb,
                                               visited, vy0, vx0)
        if end >= 0:
            return buf, end, area2, bx0, by0, bx1, by1
        # NOTE: full (rare: the buffer doubles); the walk is deterministic, so walk it again
        grown = np.empty((buf.shape[0] * 2, 2), np.float64)
        # NOTE: a loop, not ``grown[:nb] = buf[:nb]``: slice assignment compiles numba's
        # shape-mismatch error message (string formatting), ~5 s of a cold compile
        for i in range(nb):
            grown[i, 0] = buf[i, 0]
            grown[i, 1] = buf[i, 1]
        buf = grown


@njit(cache=True)
def _walk(codes: np.ndarray, lab: np.ndarray, final: np.ndarray, blob: int, x0: int, y0: int,
          d0: int, wp: int, buf: np.ndarray, nb: int, visited: np.ndarray, vy0: int,
          vx0: int) -> tuple:
    """Follow one ring from vertex (x0, y0) heading ``d0``, the blob on the right; add corners.

    Headings 0 east, 1 south, 2 west, 3 north (y down). At a vertex: turn left if the pixel
    ahead-left is in the blob, go straight if only the one ahead-right is, else turn right.
    Turning left at a diagonal (saddle) vertex joins the blob's own diagonal pixels, so a hole
    that touches the outside at a corner becomes a hole ring touching the shell at one point
    (valid), never a self-touching shell (invalid).
    Corners go to ``buf`` from ``nb`` on. Returns (the new nb, twice the signed area, bbox x0,
    y0, x1, y1), or nb -1 when ``buf`` is full.

    NOTE: ``buf`` is never reassigned here: growing it inside the loop made numba count
    references to it (two atomic operations) at every step of every ring.
    """
    # a vertex is tracked by its south-east pixel's padded flat index
    v = (y0 + 1) * wp + x0 + 1
    x, y, d = x0, y0, d0
    start = nb
    area2 = 0
    px, py = -1, -1
    bx0, by0, bx1, by1 = x0, y0, x0, y0
    track = visited.shape[0] > 0
    while True:
        if d == 0:
            x += 1
            v += 1
            al, ar = v - wp, v  # NE, SE
        elif d == 1:
            y += 1
            v += wp
            al, ar = v, v - 1  # SE, SW
        elif d == 2:
            x -= 1
            v -= 1
            al, ar = v - 1, v - 1 - wp  # SW, NW
            if track:  # the top edge of pixel (y, x), blob above: a hole's start candidate
                visited[y - vy0, x - vx0] = 1
        else:
            y -= 1
            v -= wp
            al, ar = v - 1 - wp, v - wp  # NW, NE
        if _inblob(codes, lab, final, al, blob):
            nd = (d + 3) & 3
        elif _inblob(codes, lab, final, ar, blob):
            nd = d
        else:
            nd = (d + 1) & 3
        if nd != d:
            if nb + 2 >= buf.shape[0]:
                return -1, 0, 0, 0, 0, 0
            buf[nb, 0] = x
            buf[nb, 1] = y
            if px >= 0:
                area2 += px * y - x * py
            px, py = x, y
            nb += 1
            bx0 = min(bx0, x)
            by0 = min(by0, y)
            bx1 = max(bx1, x)
            by1 = max(by1, y)
        d = nd
        if x == x0 and y == y0 and d == d0:
            break
    # close the ring, and its shoelace sum, with the first corner
    fx, fy = int(buf[start, 0]), int(buf[start, 1])
    area2 += px * fy - fx * py
    buf[nb, 0] = fx
    buf[nb, 1] = fy
    nb += 1
    return nb, area2, bx0, by0, bx1, by1


@njit(cache=True)
def _next_hole(codes: np.ndarray, lab: np.ndarray, final: np.ndarray, blob: int,
               visited: np.ndarray, by0: int, bx0: int, by1: int, bx1: int, wp: int, r: int,
               c: int) -> tuple:
    """The first hole start from pixel (r, c) on, in raster order over rows by0 + 1 .. by1 - 1
    and columns bx0 .. bx1 - 1: a pixel outside the blob, the blob above it, its top edge not
    yet ``visited``. (-1, -1) when there is none.

    NOTE: a loop of its own: scanning in ``trace_blobs``, whose ``buf`` and ``ring_off`` are
    reassigned when a hole is traced, made numba count references to them at every pixel.
    """
    while r < by1:
        while c < bx1:
            p = (r + 1) * wp + c + 1
            if visited[r - by0, c - bx0] == 0 and _inblob(codes, lab, final, p - wp, blob) \
                    and not _inblob(codes, lab, final, p, blob):
                return r, c
            c += 1
        r += 1
        c = bx0
    return -1, -1


@njit(cache=True)
def _push_offset(off: np.ndarray, k: int, value: int) -> tuple:
    """Set ``off[k + 1] = value`` (growing ``off`` when full); return (off, k + 1)."""
    if k + 2 > off.shape[0]:
        grown = np.empty(off.shape[0] * 2, np.int64)
        for i in range(k + 1):  # NOTE: not a slice assignment (see _trace_ring)
            grown[i] = off[i]
        off = grown
    off[k + 1] = value
    return off, k + 1


@njit(cache=True)
def trace_blobs(codes: np.ndarray, lab: np.ndarray, final: np.ndarray, n: int,
                first: np.ndarray, count: np.ndarray, width: int, min_count: float) -> tuple:
    """Trace every blob with at least ``min_count`` pixels into a shell and its holes.

    Returns GeoArrow-style ragged arrays ``(coords, ring_offsets, poly_offsets, blob_ids)`` for
    ``shapely.from_ragged_array``: corners only, rings closed, the shell first.
    """
    Wp = width + 2
    buf = np.empty((4096, 2), np.float64)
    # NOTE: np.int64, not literal ints, for every integer passed to a kernel (here and below):
    # numba compiles a callee once per argument type, and a literal 0 is a type of its own
    # (even while a variable's type is still being inferred): _trace_ring was compiled 5 times
    zero = np.int64(0)
    nb = zero
    ring_off = np.zeros(n + 2, np.int64)
    poly_off = np.zeros(n + 1, np.int64)
    ids = np.empty(n, np.int32)
    nr = zero
    npoly = 0
    no_visit = np.zeros((0, 0), np.uint8)
    for blob in range(1, n + 1):
        if count[blob] == 0 or count[blob] < min_count:
            continue
        r0 = first[blob] // Wp - 1  # the first pixel's top-left corner starts the shell
        c0 = first[blob] % Wp - 1
        start_nb = nb
        buf, nb, area2, bx0, by0, bx1, by1 = _trace_ring(codes, lab, final, blob, c0, r0, zero,
                                                         Wp, (buf, nb), no_visit, zero, zero)
        if area2 != 2 * count[blob]:
            # The shell encloses more than the blob, so there are holes (rare). Trace it again
            # marking west edges, then start a ring at every unmarked edge with the blob above
            # and something else below: the top edge of each hole's first pixel is one.
            nb = start_nb
            visited = np.zeros((by1 - by0 + 1, bx1 - bx0 + 1), np.uint8)
            buf, nb, _, _, _, _, _ = _trace_ring(codes, lab, final, blob, c0, r0, zero, Wp,
                                                 (buf, nb), visited, by0, bx0)
            ring_off, nr = _push_offset(ring_off, nr, nb)
            r, c = by0 + 1, bx0
            while True:
                r, c = _next_hole(codes, lab, final, blob, visited, by0, bx0, by1, bx1, Wp, r, c)
                if r < 0:
                    break
                buf, nb, _, _, _, _, _ = _trace_ring(codes, lab, final, blob, c + 1, r,
                                                     np.int64(2), Wp, (buf, nb), visited, by0,
                                                     bx0)
                ring_off, nr = _push_offset(ring_off, nr, nb)
                c += 1
        else:
            ring_off, nr = _push_offset(ring_off, nr, nb)
        npoly += 1
        poly_off[npoly] = nr
        ids[npoly - 1] = blob
    return (buf[:nb].copy(), ring_off[: nr + 1].copy(), poly_off[: npoly + 1].copy(),
            ids[:npoly].copy())
