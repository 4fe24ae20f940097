"""Exact intersection areas for pixel polygons, in numba.

GEOS needs ~100 us to intersect a staircase-edged pixel polygon with the truth polygon it
matches (an overlay with noding), which made it the scorer's whole cost. A pixel polygon (every
edge horizontal or vertical, as ``postproc.polygonize`` writes them) splits into rectangles: the
horizontal slabs between its distinct vertex ys, each cut into x-intervals by the vertical edges
that cross it (even-odd, so holes come out right). The truth polygon is clipped to each rectangle
(Sutherland-Hodgman, exact for a convex window, and for concave subjects in area), so
area(T & P) = sum over rectangles of |shell & R| - sum |hole & R|. Any other proposal (simplified,
from another tool) falls back to GEOS. Tested against ``shapely.intersection(...).area``.
"""

from __future__ import annotations

import numpy as np
import shapely

from postproc.numbacache import njit

# NOTE: the clipping kernels allocate nothing, so they run without numba's reference counting:
# with it, every call (four clips per rectangle and truth ring) paid atomic increments and
# decrements for its arrays.
_noalloc = njit(cache=True, _nrt=False)


@_noalloc
def _clip_half(src: np.ndarray, n: int, dst: np.ndarray, axis: int, bound: float,
               keep_ge: bool) -> int:
    """Clip polygon ``src[:n]`` to the half plane coord[axis] >= bound (or <=); return length."""
    m = 0
    if n == 0:
        return 0
    sx, sy = src[n - 1, 0], src[n - 1, 1]
    s_in = (src[n - 1, axis] >= bound) if keep_ge else (src[n - 1, axis] <= bound)
    for i in range(n):
        ex, ey = src[i, 0], src[i, 1]
        e_in = (src[i, axis] >= bound) if keep_ge else (src[i, axis] <= bound)
        if e_in != s_in:
            if axis == 0:
                t = (bound - sx) / (ex - sx)
                dst[m, 0] = bound
                dst[m, 1] = sy + t * (ey - sy)
            else:
                t = (bound - sy) / (ey - sy)
                dst[m, 0] = sx + t * (ex - sx)
                dst[m, 1] = bound
            m += 1
        if e_in:
            dst[m, 0] = ex
            dst[m, 1] = ey
            m += 1
        sx, sy, s_in = ex, ey, e_in
    return m


@_noalloc
def _ring_rect_area(coords: np.ndarray, a: int, b: int, x0: float, x1: float, y0: float,
                    y1: float, buf1: np.ndarray, buf2: np.ndarray) -> float:
    """|area| of ring ``coords[a:b]`` (closed: last == first) clipped to [x0,x1] x [y0,y1]."""
    n = b - a - 1
    for i in range(n):
        buf1[i, 0] = coords[a + i, 0]
        buf1[i, 1] = coords[a + i, 1]
    n = _clip_half(buf1, n, buf2, 0, x0, True)
    n = _clip_half(buf2, n, buf1, 0, x1, False)
    n = _clip_half(buf1, n, buf2, 1, y0, True)
    n = _clip_half(buf2, n, buf1, 1, y1, False)
    s = 0.0
    for i in range(n):
        j = i + 1 if i + 1 < n else 0
        s += buf1[i, 0] * buf1[j, 1] - buf1[j, 0] * buf1[i, 1]
    return abs(s) * 0.5


@njit(cache=True)
def _sort_unique(a: np.ndarray, n: int, unique: bool = True) -> int:
    """Sort ``a[:n]`` in place, optionally dropping repeats; return the new length."""
    if n > 48:
        # NOTE: in place, not ``a[:n] = np.sort(a[:n])`` (the same quicksort): slice assignment
        # compiles numba's shape-mismatch error message, seconds of a cold compile
        a[:n].sort()
    for i in range(1, n if n <= 48 else 0):  # insertion sort: n is usually tiny
        v = a[i]
        j = i - 1
        while j >= 0 and a[j] > v:
            a[j + 1] = a[j]
            j -= 1
        a[j + 1] = v
    if not unique or n == 0:
        return n
    m = 1
    for i in range(1, n):
        if a[i] != a[m - 1]:
            a[m] = a[i]
            m += 1
    return m


@njit(cache=True)
def _rectangles(coords: np.ndarray, rings: np.ndarray, r0: int, r1: int) -> np.ndarray:
    """Split a pixel polygon (rings r0..r1) into rectangles [x0, x1, y0, y1]; empty if any edge
    is neither horizontal nor vertical (the caller then falls back to GEOS)."""
    ne = 0
    for r in range(r0, r1):
        ne += rings[r + 1] - rings[r]
    vx = np.empty(ne)
    vlo = np.empty(ne)
    vhi = np.empty(ne)
    ys = np.empty(ne)
    nv = 0
    # NOTE: np.int64, not 0, for the counts passed to _sort_unique: a literal int is an argument
    # type of its own, which compiled _sort_unique twice more
    ny = np.int64(0)
    for r in range(r0, r1):
        for i in range(rings[r], rings[r + 1] - 1):
            ax, ay = coords[i, 0], coords[i, 1]
            bx, by = coords[i + 1, 0], coords[i + 1, 1]
            ys[ny] = ay
            ny += 1
            if ax == bx:
                if ay != by:
                    vx[nv] = ax
                    vlo[nv] = min(ay, by)
                    vhi[nv] = max(ay, by)
                    nv += 1
            elif ay != by:
                return np.empty((0, 4))
    ny = _sort_unique(ys, ny)
    # NOTE: a slab holds at most nv // 2 rectangles and there are ny - 1 slabs, so ``out`` never
    # fills and is never reassigned (growing it in the loop made numba count references to it).
    out = np.empty((max(nv, 1) * max(ny, 1), 4))
    k = 0
    xs = np.empty(nv)
    for s in range(ny - 1):
        ya, yb = ys[s], ys[s + 1]
        mid = 0.5 * (ya + yb)
        m = np.int64(0)
        for e in range(nv):
            if vlo[e] < mid < vhi[e]:
                xs[m] = vx[e]
                m += 1
        m = _sort_unique(xs, m, False)
        for j in range(0, m - 1, 2):
            out[k, 0] = xs[j]
            out[k, 1] = xs[j + 1]
            out[k, 2] = ya
            out[k, 3] = yb
            k += 1
    return out[:k]


@njit(cache=True)
def pair_intersection_areas(t_coords: np.ndarray, t_rings: np.ndarray, t_geoms: np.ndarray,
                            p_coords: np.ndarray, p_rings: np.ndarray, p_geoms: np.ndarray,
                            pi: np.ndarray, ti: np.ndarray) -> np.ndarray:
    """area(T[ti[k]] & P[pi[k]]) for each pair, NaN where P is not a pixel polygon.

    Polygons come as GeoArrow ragged arrays (``shapely.to_ragged_array``): coords, ring offsets,
    polygon offsets. Pairs sorted by ``pi`` reuse one proposal's rectangles.
    """
    out = np.empty(pi.size)
    cap = 16
    for g in range(t_geoms.size - 1):
        cap = max(cap, 4 * (t_rings[t_geoms[g + 1]] - t_rings[t_geoms[g]]) + 16)
    buf1 = np.empty((cap, 2))
    buf2 = np.empty((cap, 2))
    last = -1
    rects = np.empty((0, 4))
    for k in range(pi.size):
        p = pi[k]
        if p != last:
            rects = _rectangles(p_coords, p_rings, p_geoms[p], p_geoms[p + 1])
            last = p
        if rects.shape[0] == 0:
            out[k] = np.nan
            continue
        t = ti[k]
        tr0, tr1 = t_geoms[t], t_geoms[t + 1]
        area = 0.0
        for q in range(rects.shape[0]):
            x0, x1, y0, y1 = rects[q, 0], rects[q, 1], rects[q, 2], rects[q, 3]
            for r in range(tr0, tr1):
                a = _ring_rect_area(t_coords, t_rings[r], t_rings[r + 1], x0, x1, y0, y1,
                                    buf1, buf2)
                area += a if r == tr0 else -a
        out[k] = area
    return out


def _ragged(polys: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """GeoArrow-style (coords, ring offsets, polygon offsets) of an all-Polygon array, or None
    (MultiPolygons go to GEOS). Leaner than ``shapely.to_ragged_array``, which cost as much as
    the areas themselves."""
    if polys.size == 0 or not np.all(shapely.get_type_id(polys) == 3):
        return None
    rings, owner = shapely.get_rings(polys, return_index=True)
    coords = shapely.get_coordinates(rings)
    ring_off = np.zeros(rings.size + 1, np.int64)
    np.cumsum(shapely.get_num_coordinates(rings), out=ring_off[1:])
    geom_off = np.zeros(polys.size + 1, np.int64)
    np.cumsum(np.bincount(owner, minlength=polys.size), out=geom_off[1:])
    return np.ascontiguousarray(coords, dtype=np.float64), ring_off, geom_off


def intersection_areas(truth: np.ndarray, proposals: np.ndarray, pi: np.ndarray,
                       ti: np.ndarray) -> np.ndarray:
    """area(truth[ti] & proposals[pi]) for each pair: numba for pixel polygons, else GEOS."""
    out = np.full(pi.size, np.nan)
    rt, rp = _ragged(truth), _ragged(proposals)
    if pi.size and rt is not None and rp is not None:
        order = np.argsort(pi, kind="stable")
        areas = pair_intersection_areas(*rt, *rp, pi[order].astype(np.int64),
                                        ti[order].astype(np.int64))
        out[order] = areas
    todo = np.flatnonzero(np.isnan(out))
    if todo.size:
        out[todo] = shapely.area(shapely.intersection(proposals[pi[todo]], truth[ti[todo]]))
    return out
