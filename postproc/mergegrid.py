"""Pixel grids and CRS for ``postproc.merge``: a tile's footprints to its grid's pixels and
back, their segments on the tile's border, and lon/lat output (RFC 7946)."""

from __future__ import annotations

import functools
from dataclasses import dataclass

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
