"""``postproc.merge``'s work: tiles read one by one, interior footprints written at once,
border pieces held and merged at the end (see ``postproc.merge`` for the rules)."""

from __future__ import annotations

import json
from array import array
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import shapely
from shapely.geometry import mapping
from shapely.geometry.base import BaseGeometry

from postproc.mergegrid import (
    Grid,
    GridIndex,
    border_segments,
    objects,
    overlapping_pairs,
    snap,
    to_wgs84,
)
from postproc.mergeio import MergeError, meta_crs, meta_extent, read_tile

TOLERANCE_PX = 0.01  # float error between a mosaic's tiles is ~1e-9 px; a snap this small is safe


@dataclass
class Piece:
    """A footprint with a segment on its tile's border, held until every tile is read."""

    tile: int
    grid: int
    geom: BaseGeometry  # in its tile's CRS, as read
    pixels: BaseGeometry  # in its grid's pixels, snapped
    props: dict[str, Any]


class Merger:
    """Reads tiles one by one, writes interior footprints at once, merges the rest at the end."""

    def __init__(self, out: IO[str], tolerance: float = TOLERANCE_PX, min_area: float = 0.0
                 ) -> None:
        self.out, self.tol, self.min_area = out, tolerance, min_area
        self.index = GridIndex(tolerance)
        self.grids: list[Grid] = self.index.grids
        self.pieces: list[Piece] = []
        # (grid, axis, line) -> (lo, hi, piece) of every held border segment
        self.edges: dict[tuple[int, int, float], list[tuple[float, float, int]]] = \
            defaultdict(list)
        self.seen: set[str] = set()
        # (grid, x0, y0, x1, y1) in grid pixels of each tile with footprints, and its ImageId
        self._extents = array("q")
        self._extent_keys: list[str] = []
        self.written = self.merged = self.merged_pieces = self.dropped = 0
        self.overlaps: tuple[int, tuple[str, str] | None] = (0, None)  # (finish sets it)
        out.write('{"type":"FeatureCollection","features":[\n')

    def add_tile(self, key: str, meta: dict[str, Any], path: Path, shard: Path) -> None:
        if key in self.seen:
            raise MergeError(f"{shard}: ImageId {key!r} also appears in an earlier shard")
        self.seen.add(key)
        where = f"{shard}: {key}"
        fwd, w, h = meta_extent(meta, where)
        crs = meta_crs(meta, where)  # (no default, as polygonize --geojson)
        geoms, props = read_tile(path, key, crs)
        if not len(geoms):
            return
        gi, (ox, oy) = self.index.place(crs, fwd, w, h)
        grid = self.grids[gi]
        pixels = shapely.transform(geoms, lambda xy: snap(grid.to_pixels(xy), self.tol))
        box = (int(ox), int(oy), int(ox) + w, int(oy) + h)
        # NOTE: a tile without footprints is left out (it has no grid): it writes nothing twice
        self._extents.extend((gi, *box))
        self._extent_keys.append(key)
        b = shapely.bounds(pixels)
        if ((b[:, 0] < box[0]) | (b[:, 1] < box[1]) | (b[:, 2] > box[2])
                | (b[:, 3] > box[3])).any():
            raise MergeError(f"{path}: a footprint lies outside tile {key}'s extent (its "
                             "meta.json in --pred): the file is not of this tile")
        edge = ((b[:, 0] == box[0]) | (b[:, 1] == box[1]) | (b[:, 2] == box[2])
                | (b[:, 3] == box[3]))
        interior = []
        for i in range(len(geoms)):
            segs = border_segments(pixels[i], box) if edge[i] else []
            if not segs:  # (a touch at a point cannot merge either)
                interior.append(i)
                continue
            for axis, line, lo, hi in segs:
                self.edges[(gi, axis, line)].append((lo, hi, len(self.pieces)))
            self.pieces.append(Piece(len(self.seen), gi, geoms[i], pixels[i], props[i]))
        # NOTE: the area in grid pixels, where polygonize's min_polygon_area is counted (a blob's
        # pixel count is its outline's area); a tile in lon/lat has no other meaningful unit
        if self.min_area > 0:  # (the default, 0, keeps all: no areas to compute)
            small = shapely.area(pixels[interior]) < self.min_area
            self.dropped += int(small.sum())
            interior = [i for i, s in zip(interior, small, strict=True) if not s]
        for g, i in zip(to_wgs84(geoms[interior], crs), interior, strict=True):
            self._write(g, props[i], path)

    def _groups(self) -> list[int]:
        """Union-find over the held pieces: each one's root."""
        parent = list(range(len(self.pieces)))

        def find(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for segs in self.edges.values():
            segs.sort()
            for i, (_, hi, p) in enumerate(segs):
                for j in range(i + 1, len(segs)):
                    lo2, hi2, q = segs[j]
                    if lo2 >= hi - self.tol:  # (sorted by lo: no later one overlaps more)
                        break
                    if (min(hi, hi2) - lo2 > self.tol
                            and self.pieces[p].tile != self.pieces[q].tile):
                        parent[find(p)] = find(q)
        return [find(i) for i in range(len(self.pieces))]

    def _overlaps(self) -> tuple[int, tuple[str, str] | None]:
        """Pairs of tiles of one grid whose extents overlap (more than along an edge or at a
        corner), and the first pair read: their footprints in the overlap are written twice."""
        ext = np.frombuffer(self._extents, dtype=np.int64).reshape(-1, 5)
        both = overlapping_pairs(ext)
        if not len(both):
            return 0, None
        a, b = both[np.lexsort((both[:, 0], both[:, 1]))[0]]  # (the first read: by the later)
        return len(both), (self._extent_keys[a], self._extent_keys[b])

    def finish(self) -> None:
        """Write the border footprints, merged, and close the FeatureCollection."""
        self.overlaps = self._overlaps()
        roots = self._groups()
        members: dict[int, list[int]] = defaultdict(list)
        for i, r in enumerate(roots):
            members[r].append(i)
        for i, p in enumerate(self.pieces):
            group = members[roots[i]]
            if len(group) == 1 and p.pixels.area < self.min_area:
                self.dropped += 1
            elif len(group) == 1:
                self._write(to_wgs84(objects([p.geom]), self.grids[p.grid].crs)[0], p.props)
            elif group[0] == i:
                self._write_merged([self.pieces[k] for k in group])
        self.out.write("\n]}\n")

    def _write_merged(self, parts: list[Piece]) -> None:
        grid = self.grids[parts[0].grid]
        union = shapely.union_all([p.pixels for p in parts])
        if union.area < self.min_area:  # (after the union: its pieces may each be smaller)
            self.dropped += 1
            return
        areas = np.array([p.pixels.area for p in parts])
        confs = np.array([p.props["Confidence"] for p in parts], dtype=float)
        self.merged += 1
        self.merged_pieces += len(parts)
        props = {"ImageIds": [p.props["ImageId"] for p in parts],
                 "BuildingIds": [p.props.get("BuildingId") for p in parts],
                 "MergedId": self.merged,
                 "Confidence": round(float(areas @ confs / areas.sum()), 6)}
        geom = shapely.transform(union, grid.to_map)
        self._write(to_wgs84(objects([geom]), grid.crs)[0], props)

    def _write(self, geom: BaseGeometry, props: dict[str, Any], path: Path | None = None
               ) -> None:
        if not np.isfinite(shapely.get_coordinates(geom)).all():
            raise MergeError(f"{path or props.get('ImageIds')}: a footprint could not be "
                             "reprojected to lon/lat (outside its CRS's area of use?)")
        feat = {"type": "Feature", "geometry": mapping(geom), "properties": props}
        sep = ",\n" if self.written else ""
        self.out.write(sep + json.dumps(feat, separators=(",", ":")))
        self.written += 1
