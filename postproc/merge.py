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
are written, twice over (but pieces on an edge line that the two share, which are joined): a
note names the first pair of ImageIds read and the number of pairs, and the summary line counts
them; the rest of the layer is unaffected, so merge goes on.

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
import math
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

from dataio.atomic import atomic_open, check_writable, writing
from postproc.mergegrid import WGS84, Grid, to_wgs84
from postproc.mergeio import MergeError, crs_key, read_tile
from postproc.merger import TOLERANCE_PX, Merger, Piece
from postproc.predio import check_published, iter_metas, list_pred_shards

# NOTE: the work lives in postproc.merger (Merger), .mergeio (reading the inputs) and .mergegrid
# (pixel grids, CRS); its names stay importable here, and main looks Merger up in this module
# when it runs (benchmarks.merge_run counts its pieces through it)
__all__ = ["TOLERANCE_PX", "WGS84", "Grid", "MergeError", "Merger", "Piece", "build_parser",
           "crs_key", "main", "read_tile", "to_wgs84"]


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


def _is(path: Path, target: Path) -> bool:
    """Whether ``path`` leads to ``target`` (resolved). A link that cannot be followed (a loop)
    does not: it is a file of DIR that is not a tile, counted, not a reason to stop."""
    try:
        return path.resolve() == target
    except (RuntimeError, OSError):
        return False


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
    # (the tiles' reader raises MergeError: an OSError here is the output's, a full disk: exit 1)
    with writing(), atomic_open(args.out, "w", encoding="utf-8") as f:
        m = Merger(f, args.tolerance, args.min_area)
        for shard in shards:
            for key, meta in iter_metas(shard):  # (the PNGs are seeked over, not read)
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
    out = args.out.resolve()  # (the rename replaced any link there: it resolves)
    extra = sum(1 for p in args.geojson.glob("*.geojson")
                if p.stem not in m.seen and not _is(p, out))
    if extra:
        say(f"merge: {extra} *.geojson in {args.geojson} are not tiles of --pred {args.pred}: "
            "left out")
    small = f"; {m.dropped} under --min-area {args.min_area:g} px dropped" if args.min_area else ""
    if n_over:
        small += f"; {n_over} pairs of tiles overlap"
    from postproc.cli import push_metrics, report
    from postproc.pushmetrics import PostprocRun

    # NOTE: pushed before the report: the area's file is complete here, and a closed stdout
    # (| head -0) at the report, which ends quietly with 1, skipped the push of a finished run
    push_metrics(args, PostprocRun(len(m.seen), m.written, time.monotonic() - t0,
                                   overlaps=n_over))
    # (a full disk under stdout: exit 1, as for the area's file; see report)
    report(f"{len(m.seen)} tiles, {m.written} footprints ({m.merged} merged from "
           f"{m.merged_pieces} pieces{small}) -> {args.out}")
    return 0


if __name__ == "__main__":
    from postproc.cli import exit_on_error

    sys.exit(exit_on_error(main))

