"""Pixel grids and CRS for ``postproc.merge`` and ``postproc.mosaic``: which grid a tile lies
on (:class:`GridIndex`), which tiles of a grid overlap, a tile's footprints to its grid's pixels
and back, their segments on the tile's border, and lon/lat output (RFC 7946)."""

from __future__ import annotations

import functools
import math
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import shapely
from pyproj import Transformer
from shapely.geometry.base import BaseGeometry

WGS84 = "EPSG:4326"


@functools.lru_cache(maxsize=64)
def _transformer(key: str) -> Transformer:
    return Transformer.from_crs(key, WGS84, always_xy=True)


def to_wgs84(geoms: np.ndarray, key: str) -> np.ndarray:
    """Geometries in CRS ``key`` -> lon/lat, exterior rings counter-clockwise (RFC 7946)."""
    if key != WGS84:
        tr = _transformer(key)
        geoms = shapely.transform(geoms, lambda xy: np.column_stack(tr.transform(xy[:, 0],
                                                                                 xy[:, 1])))
    return shapely.orient_polygons(geoms, exterior_cw=False)


def objects(items: list) -> np.ndarray:
    """A 1-D object array of ``items`` (geometries) for shapely's vectorised functions."""
    arr = np.empty(len(items), dtype=object)
    arr[:] = items
    return arr


@dataclass
class Grid:
    """A pixel grid of one CRS: the affine of its first tile, pixel -> map and back."""

    crs: str
    fwd: np.ndarray  # 2x3
    inv: np.ndarray  # 2x2, of fwd's linear part

    @classmethod
    def of(cls, crs: str, t: np.ndarray) -> Grid:
        return cls(crs, t, np.linalg.inv(t[:, :2]))

    def to_pixels(self, xy: np.ndarray) -> np.ndarray:
        # NOTE: the origin first: map coordinates near it differ from it exactly, while
        # xy @ inv - origin @ inv lost ~1e-9 px to cancellation (UTM: 1.7e6 px from 0)
        return (xy - self.fwd[:, 2]) @ self.inv.T

    def to_map(self, xy: np.ndarray) -> np.ndarray:
        return xy @ self.fwd[:, :2].T + self.fwd[:, 2]

    def fit(self, fwd: np.ndarray, w: int, h: int) -> tuple[np.ndarray, float]:
        """Where a tile (affine ``fwd``, ``w`` x ``h`` px) lies on this grid: its origin in
        whole pixels, and how far (px) its corners are off the grid's pixel corners."""
        local = np.array([[0, 0], [w, 0], [0, h], [w, h]], dtype=float)
        px = self.to_pixels(local @ fwd[:, :2].T + fwd[:, 2])
        origin = np.round(px[0])
        return origin, float(np.abs(px - (origin + local)).max())


@dataclass
class GridIndex:
    """The pixel grids of the tiles seen so far: a tile joins a grid of its CRS when its corners
    fall on the grid's pixel corners within ``tol`` px, else it starts a grid of its own."""

    tol: float
    grids: list[Grid] = field(default_factory=list)
    _by_phase: dict[tuple[str, int, int], list[int]] = field(
        default_factory=lambda: defaultdict(list))

    def place(self, crs: str, fwd: np.ndarray, w: int, h: int) -> tuple[int, np.ndarray]:
        """The grid of a tile and the tile's origin on it (whole pixels)."""
        # NOTE: tiles of one grid have origins a whole number of pixels apart, so the phase of
        # the origin (in pixels from the map's origin, mod 1) finds the candidates in O(1).
        # (a bucket >= tol, a whole number of them in 1, and wider than the phase's float error)
        q = 1.0 / math.floor(1.0 / max(self.tol, 1e-6))
        n = round(1.0 / q)
        phase = np.linalg.solve(fwd[:, :2], fwd[:, 2]) % 1.0
        bx, by = (int(v) % n for v in np.floor(phase / q))
        for i in {g for dx in (-1, 0, 1) for dy in (-1, 0, 1)
                  for g in self._by_phase.get((crs, (bx + dx) % n, (by + dy) % n), ())}:
            origin, off = self.grids[i].fit(fwd, w, h)
            if off <= self.tol:
                return i, origin
        self.grids.append(Grid.of(crs, fwd))
        self._by_phase[(crs, bx, by)].append(len(self.grids) - 1)
        return len(self.grids) - 1, np.zeros(2)


def overlapping_pairs(ext: np.ndarray) -> np.ndarray:
    """(i, j), i < j, of the rows of ``ext`` (grid, x0, y0, x1, y1: tiles' extents in their
    grid's whole pixels) whose extents overlap: more than along an edge or at a corner."""
    pairs = []
    # (the tiles of each grid, by one sort: a mask per grid was O(grids x tiles), 3.9 s for
    # 40,000 tiles each on a grid of its own; a grid of one tile has no pair)
    order = np.argsort(ext[:, 0], kind="stable")
    for idx in np.split(order, np.flatnonzero(np.diff(ext[order, 0])) + 1):
        if len(idx) < 2:
            continue
        x0, y0, x1, y1 = ext[idx, 1:].T
        # NOTE: an R-tree (O(n log n); a mosaic's tile meets 8 others), then the overlap of
        # the whole-pixel rectangles, exact: "intersects" also holds for tiles that merely
        # meet, and shapely's "overlaps" is false for a tile given twice (equal extents)
        i, j = shapely.STRtree(shapely.box(x0, y0, x1, y1)).query(
            shapely.box(x0, y0, x1, y1), predicate="intersects")
        i, j = i[i < j], j[i < j]
        over = ((np.minimum(x1[i], x1[j]) > np.maximum(x0[i], x0[j]))
                & (np.minimum(y1[i], y1[j]) > np.maximum(y0[i], y0[j])))
        pairs.append(np.column_stack([idx[i[over]], idx[j[over]]]))
    return np.concatenate(pairs) if pairs else np.empty((0, 2), np.int64)


def snap(xy: np.ndarray, tol: float) -> np.ndarray:
    """Coordinates within ``tol`` of a whole number (a pixel corner) moved onto it."""
    r = np.round(xy)
    return np.where(np.abs(xy - r) <= tol, r, xy)


def border_segments(pixels: BaseGeometry, box: tuple[int, int, int, int]
                    ) -> list[tuple[int, float, float, float]]:
    """(axis, line, lo, hi): the outline's segments of positive length on the tile's border
    (axis 0: on x = line, from y = lo to hi; axis 1: on y = line)."""
    out: list[tuple[int, float, float, float]] = []
    for ring in shapely.get_exterior_ring(shapely.get_parts(pixels)):
        xy = shapely.get_coordinates(ring)
        a, b = xy[:-1], xy[1:]
        for axis, lines in ((0, (box[0], box[2])), (1, (box[1], box[3]))):
            on = (a[:, axis] == b[:, axis]) & np.isin(a[:, axis], lines)
            lo = np.minimum(a[on, 1 - axis], b[on, 1 - axis])
            hi = np.maximum(a[on, 1 - axis], b[on, 1 - axis])
            out += [(axis, float(v), float(s), float(e))
                    for v, s, e in zip(a[on, axis], lo, hi, strict=True) if e > s]
    return out
