"""One GeoJSON layer for an area: every tile's footprints in WGS 84, and a building that tile
edges cut into pieces merged back into one footprint.

CLI: ``python -m postproc.merge --pred PRED --geojson DIR --out AREA.geojson [--tolerance PX]
[--min-area PX]``.

Tiles are those of the prediction shards in PRED, in shard order. A tile's footprints are
``DIR/<ImageId>.geojson`` (``postproc.polygonize --pred PRED --geojson DIR``); its extent
(transform, width, height) and CRS are its ``meta.json`` in PRED, which the GeoJSON lacks.

Merging happens on pixel grids, one per CRS and alignment: a tile joins a grid when its corners
fall on the grid's pixel corners within ``--tolerance`` px (the tiles of one mosaic do, up to
float error), and a coordinate within the tolerance of a pixel corner is snapped onto it, so the
common edge of two tiles is one exact line. Two footprints of different tiles of one grid are one
building when their outlines share a segment longer than the tolerance on those tiles' borders
(so polygonize them without --simplify: it can move a piece's outline off the edge); a
touch at a point is not (4-connectivity, as the polygonizer's within a tile). Pieces merge
transitively (union-find: at a tile corner a building has up to four), and their union is taken
in grid pixels, where it is exact. Two footprints of one tile never merge with each other (the
polygonizer made them two instances; even overlapping ones, as another tool's may be), only
through a piece of another tile: a piece that meets two touching footprints of the next tile
along the edge joins all three (the tiles disagree; the piece is kept whole). Tiles of
different grids are not merged with each other: in another CRS (a mosaic across a UTM zone
boundary), or with another pixel size or alignment, their edges are not one line in any one
CRS. A note says when there was more than one grid.

Memory: a footprint with no segment on its tile's border cannot merge, so it is written as soon
as its tile is read; only border footprints (and the ImageIds and extents seen) are held:
memory follows the length of the tile edges (25-30% of the footprints with 256 px tiles,
benchmarks.merge), not every footprint of the area. Two buildings whose shared wall lies on a
tile edge merge into one: their pieces meet as a cut building's do, and the footprints cannot
tell the two apart.

Tiles of one grid are to meet edge to edge. Where two overlap (chips cut with an overlap by
another tool, or one tile given twice under two names), each one's footprints in the overlap
are written, twice over: a note names the first pair of ImageIds read and the number of pairs,
and the summary line counts them; the rest of the layer is unaffected, so merge goes on.

Output: one RFC 7946 FeatureCollection in WGS 84 lon/lat (no ``crs`` member, exterior rings
counter-clockwise), written atomically: interior footprints in tile order, then the border ones.
An unmerged footprint keeps its properties; a merged one has ``ImageIds`` and ``BuildingIds``
(its pieces', in the same order), ``MergedId`` (1, 2, ... in the file) and ``Confidence``, the
area-weighted mean of its pieces'.

``--min-area PX`` drops every output footprint under PX px of its tiles' grid (an interior one
as it is read, a merged one after the union), so that polygonize can keep every piece
(``--min-polygon-area 0``): polygonize's own minimum, per tile, drops a cut building's small
pieces before they are merged, and loses a building cut into small pieces altogether.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import tarfile
import time
from array import array
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import shapely
from pyproj import CRS, Transformer
from pyproj.exceptions import CRSError
from shapely.geometry import mapping, shape
from shapely.geometry.base import BaseGeometry

from dataio.atomic import atomic_open, check_writable
from postproc.predio import check_published, iter_raw_samples, list_pred_shards

TOLERANCE_PX = 0.01  # float error between a mosaic's tiles is ~1e-9 px; a snap this small is safe
WGS84 = "EPSG:4326"


class MergeError(ValueError):
    """A tile GeoJSON or meta that cannot be merged; the message names the file."""


@functools.lru_cache(maxsize=64)
def crs_key(text: str) -> str:
    """One name per CRS: ``EPSG:<code>``, or the WKT when it has no EPSG code."""
    try:
        crs = CRS.from_user_input(text)
    except CRSError as e:
        raise MergeError(f"unknown CRS {text[:60]!r} ({e})") from None
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg is not None else crs.to_wkt()


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


def _objects(items: list) -> np.ndarray:
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


@dataclass
class Piece:
    """A footprint with a segment on its tile's border, held until every tile is read."""

    tile: int
    grid: int
    geom: BaseGeometry  # in its tile's CRS, as read
    pixels: BaseGeometry  # in its grid's pixels, snapped
    props: dict[str, Any]


def _snap(xy: np.ndarray, tol: float) -> np.ndarray:
    r = np.round(xy)
    return np.where(np.abs(xy - r) <= tol, r, xy)


def _meta_extent(meta: dict[str, Any], where: str) -> tuple[np.ndarray, int, int]:
    t = meta.get("transform")
    if not isinstance(t, list | tuple) or len(t) < 6 or not all(
            isinstance(v, int | float) and math.isfinite(v) for v in t[:6]):
        raise MergeError(f"{where}: meta.json transform {t!r} is not six finite numbers")
    fwd = np.array([t[:3], t[3:6]], dtype=float)
    if abs(np.linalg.det(fwd[:, :2])) == 0:
        raise MergeError(f"{where}: meta.json transform {t!r} is degenerate")
    w, h = meta.get("width"), meta.get("height")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0
               and float(v).is_integer() for v in (w, h)):
        raise MergeError(f"{where}: meta.json needs a width and height in pixels "
                         f"(has {w!r} x {h!r})")
    return fwd, int(w), int(h)


def _feature(feat: Any, key: str) -> tuple[BaseGeometry, dict[str, Any]]:
    if not isinstance(feat, dict) or feat.get("type") != "Feature":
        raise ValueError("not a Feature")
    geom, props = feat.get("geometry"), feat.get("properties")
    if not isinstance(geom, dict) or geom.get("type") not in ("Polygon", "MultiPolygon"):
        raise ValueError("its geometry is not a Polygon or MultiPolygon")
    try:
        g = shape(geom)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError,
            shapely.errors.ShapelyError) as e:
        raise ValueError(f"unreadable coordinates ({e})") from None
    if g.is_empty or not np.isfinite(shapely.get_coordinates(g)).all() or not g.is_valid:
        raise ValueError(f"invalid polygon ({shapely.is_valid_reason(g)})")
    if not isinstance(props, dict) or props.get("ImageId") != key:
        found = props.get("ImageId") if isinstance(props, dict) else None
        raise ValueError(f"ImageId {found!r} is not the file's tile {key!r}: each tile's "
                         "footprints are in DIR/<its ImageId>.geojson, and only there")
    c = props.get("Confidence")
    if isinstance(c, bool) or not isinstance(c, int | float) or not math.isfinite(c):
        raise ValueError(f"Confidence {c!r} is not a number")
    return g, props


def read_tile(path: Path, key: str, crs: str) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """A tile's footprints (in its CRS) and their properties; errors name the file."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise MergeError(f"{path}: missing: tile {key} of --pred has no GeoJSON (--geojson must "
                         "be postproc.polygonize's output for this --pred)") from None
    except OSError as e:
        raise MergeError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MergeError(f"{path}: malformed GeoJSON ({e})") from None
    if (not isinstance(doc, dict) or doc.get("type") != "FeatureCollection"
            or not isinstance(doc.get("features"), list)):
        raise MergeError(f"{path}: not a GeoJSON FeatureCollection")
    geoms, props = [], []
    for i, feat in enumerate(doc["features"]):
        try:
            g, p = _feature(feat, key)
        except ValueError as e:
            raise MergeError(f"{path}: feature {i}: {e}") from None
        geoms.append(g)
        props.append(p)
    arr = _objects(geoms)
    member = doc.get("crs")
    if member is None:
        # NOTE: RFC 7946 has no crs member: lon/lat is implied. Coordinates outside its ranges
        # are a projected CRS that the writer did not name (meta.json alone might be wrong).
        x0, y0, x1, y1 = shapely.total_bounds(arr) if len(arr) else (0, 0, 0, 0)
        if not (max(abs(x0), abs(x1)) <= 180 and max(abs(y0), abs(y1)) <= 90):
            raise MergeError(f"{path}: no crs member, and its coordinates are not lon/lat "
                             "(RFC 7946's default): its CRS is unknown")
        found = WGS84
    else:
        try:
            found = crs_key(str(member["properties"]["name"]))
        except (TypeError, KeyError, MergeError) as e:
            raise MergeError(f"{path}: unreadable crs member ({e})") from None
    if found != crs:
        raise MergeError(f"{path}: its CRS {found[:60]} is not tile {key}'s, {crs[:60]} "
                         "(meta.json in --pred)")
    return arr, props


def _border_segments(pixels: BaseGeometry, box: tuple[int, int, int, int]
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


class Merger:
    """Reads tiles one by one, writes interior footprints at once, merges the rest at the end."""

    def __init__(self, out: IO[str], tolerance: float = TOLERANCE_PX, min_area: float = 0.0
                 ) -> None:
        self.out, self.tol, self.min_area = out, tolerance, min_area
        self.grids: list[Grid] = []
        self._by_phase: dict[tuple[str, int, int], list[int]] = defaultdict(list)
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

    def _place(self, crs: str, fwd: np.ndarray, w: int, h: int) -> tuple[int, np.ndarray]:
        """The grid of a tile and the tile's origin on it (whole pixels)."""
        # NOTE: tiles of one grid have origins a whole number of pixels apart, so the phase of
        # the origin (in pixels from the map's origin, mod 1) finds the candidates in O(1).
        # (a bucket >= tol, a whole number of them in 1, and wider than the phase's float error)
        q = 1.0 / math.floor(1.0 / max(self.tol, 1e-6))
        n = round(1.0 / q)
        phase = np.linalg.solve(fwd[:, :2], fwd[:, 2]) % 1.0
        bx, by = (int(v) % n for v in np.floor(phase / q))
        local = np.array([[0, 0], [w, 0], [0, h], [w, h]], dtype=float)
        corners = local @ fwd[:, :2].T + fwd[:, 2]
        for i in {g for dx in (-1, 0, 1) for dy in (-1, 0, 1)
                  for g in self._by_phase.get((crs, (bx + dx) % n, (by + dy) % n), ())}:
            px = self.grids[i].to_pixels(corners)
            origin = np.round(px[0])
            if np.abs(px - (origin + local)).max() <= self.tol:
                return i, origin
        self.grids.append(Grid.of(crs, fwd))
        self._by_phase[(crs, bx, by)].append(len(self.grids) - 1)
        return len(self.grids) - 1, np.zeros(2)

    def add_tile(self, key: str, meta: dict[str, Any], path: Path, shard: Path) -> None:
        if key in self.seen:
            raise MergeError(f"{shard}: ImageId {key!r} also appears in an earlier shard")
        self.seen.add(key)
        where = f"{shard}: {key}"
        fwd, w, h = _meta_extent(meta, where)
        try:
            crs = crs_key(str(meta.get("crs", WGS84)))
        except MergeError as e:
            raise MergeError(f"{where}: meta.json: {e}") from None
        geoms, props = read_tile(path, key, crs)
        if not len(geoms):
            return
        gi, (ox, oy) = self._place(crs, fwd, w, h)
        grid = self.grids[gi]
        pixels = shapely.transform(geoms, lambda xy: _snap(grid.to_pixels(xy), self.tol))
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
            segs = _border_segments(pixels[i], box) if edge[i] else []
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
        pairs = []
        for gi in np.unique(ext[:, 0]):
            idx = np.flatnonzero(ext[:, 0] == gi)
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
        both = np.concatenate(pairs) if pairs else np.empty((0, 2), np.int64)
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
                self._write(to_wgs84(_objects([p.geom]), self.grids[p.grid].crs)[0], p.props)
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
        self._write(to_wgs84(_objects([geom]), grid.crs)[0], props)

    def _write(self, geom: BaseGeometry, props: dict[str, Any], path: Path | None = None
               ) -> None:
        if not np.isfinite(shapely.get_coordinates(geom)).all():
            raise MergeError(f"{path or props.get('ImageIds')}: a footprint could not be "
                             "reprojected to lon/lat (outside its CRS's area of use?)")
        feat = {"type": "Feature", "geometry": mapping(geom), "properties": props}
        sep = ",\n" if self.written else ""
        self.out.write(sep + json.dumps(feat, separators=(",", ":")))
        self.written += 1


def _check_dir(d: Path) -> None:
    if not d.is_dir():
        what = "is a file" if d.exists() else "no such directory"
        raise MergeError(f"--geojson {d}: {what}; give the directory of tile GeoJSON that "
                         "postproc.polygonize --geojson wrote")
    check_published(d, f"rerun postproc.polygonize with --geojson {d}")
    if next(d.glob("*.geojson"), None) is None:
        raise MergeError(f"--geojson {d}: no tile GeoJSON (*.geojson) in it; write them with "
                         f"postproc.polygonize --pred PRED --geojson {d}")


def _inputs(args: argparse.Namespace) -> Iterator[tuple[str, Path | None]]:
    """What the command reads (lazily: ``check_writable`` lists them only for an existing --out):
    the shards, and the GeoJSON of their tiles, named by the shards' member names."""
    from postproc.predio import SHARD_GLOB

    shards = sorted(args.pred.glob(SHARD_GLOB)) if args.pred.is_dir() else []
    yield from (("--pred", p) for p in shards)
    # NOTE: not every DIR/*.geojson: an --out in DIR (which main leaves out of its note on files
    # that are no tiles) was refused as a --geojson input when the same command ran again
    for shard in shards if args.geojson.is_dir() else ():
        try:
            with tarfile.open(shard) as tar:  # (headers only; a bad shard: main names it)
                names = tar.getnames()
        except (tarfile.TarError, OSError):
            continue
        for key in dict.fromkeys(n.split(".", 1)[0] for n in names):
            yield "--geojson", args.geojson / f"{key}.geojson"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m postproc.merge",
        description="One GeoJSON for an area from postproc.polygonize's tiles: every footprint "
                    "in WGS 84 lon/lat, and a building that tile edges cut into pieces merged "
                    "back into one (pieces of tiles of one CRS and pixel grid that share a "
                    "segment of the tiles' common edge; a touch at a corner does not merge).")
    p.add_argument("--pred", type=Path, required=True, metavar="PRED",
                   help="directory of pred-*.tar shards that --geojson was made from (each "
                        "tile's extent and CRS: its meta.json)")
    p.add_argument("--geojson", type=Path, required=True, metavar="DIR",
                   help="postproc.polygonize --geojson DIR: DIR/<ImageId>.geojson per tile")
    p.add_argument("--out", type=Path, required=True, metavar="AREA.geojson",
                   help="the area's GeoJSON to write (RFC 7946: WGS 84 lon/lat)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE_PX, metavar="PX",
                   help="how far, in pixels, tile edges and outlines may be off the pixel grid "
                        f"and still meet (float error; default {TOLERANCE_PX})")
    p.add_argument("--min-area", type=float, default=0.0, metavar="PX",
                   help="drop every output footprint under this many px of its tiles' pixel "
                        "grid, after the merge (default 0: keep all); polygonize with "
                        "--min-polygon-area 0 and give its area here, so that the small pieces "
                        "of a cut building are merged, not dropped per tile")
    from postproc.cli import add_push_args

    add_push_args(p, job="footprints_merge")
    return p


def main(argv: list[str] | None = None) -> int:
    t0 = time.monotonic()
    args = build_parser().parse_args(argv)
    if not 0 <= args.tolerance < 0.5:
        raise ValueError(f"--tolerance {args.tolerance} px must lie in [0, 0.5)")
    if not (math.isfinite(args.min_area) and args.min_area >= 0):
        raise ValueError(f"--min-area {args.min_area} px must be a finite number >= 0 (0: keep "
                         "every footprint)")
    check_writable(args.out, "--out", _inputs(args))
    _check_dir(args.geojson)
    shards = list_pred_shards(args.pred)
    with atomic_open(args.out, "w", encoding="utf-8") as f:
        m = Merger(f, args.tolerance, args.min_area)
        for shard in shards:
            for key, _png, meta in iter_raw_samples(shard):
                m.add_tile(key, meta, args.geojson / f"{key}.geojson", shard)
        m.finish()
    from postproc.pools import say

    n_over, first = m.overlaps
    if first is not None:
        # NOTE: a note, not a refusal: only the overlaps are wrong (each tile's footprints there
        # are written, a building over an edge of one inside the other stays in pieces), the
        # rest of the layer is right, and chips that overlap on purpose (another tool's) have
        # no other way through; a refusal would come after reading every tile anyway
        say(f"merge: {n_over} pairs of tiles overlap on their pixel grid (first: {first[0]} and "
            f"{first[1]}; a tile given twice under two names?): their footprints in the overlap "
            "are written once per tile; tiles of a mosaic meet edge to edge")
    if len(m.grids) > 1:
        say(f"merge: the tiles lie on {len(m.grids)} pixel grids ({len({g.crs for g in m.grids})}"
            " CRS); footprints are merged only between tiles of one grid")
    out = args.out.resolve()
    extra = sum(1 for p in args.geojson.glob("*.geojson")
                if p.stem not in m.seen and p.resolve() != out)
    if extra:
        say(f"merge: {extra} *.geojson in {args.geojson} are not tiles of --pred {args.pred}: "
            "left out")
    small = f"; {m.dropped} under --min-area {args.min_area:g} px dropped" if args.min_area else ""
    if n_over:
        small += f"; {n_over} pairs of tiles overlap"
    print(f"{len(m.seen)} tiles, {m.written} footprints ({m.merged} merged from "
          f"{m.merged_pieces} pieces{small}) -> {args.out}")
    from postproc.cli import push_metrics
    from postproc.pushmetrics import PostprocRun

    push_metrics(args, PostprocRun(len(m.seen), m.written, time.monotonic() - t0))
    return 0


if __name__ == "__main__":
    from postproc.cli import exit_on_error

    sys.exit(exit_on_error(main))

