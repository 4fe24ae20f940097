"""The prediction of an area as one georeferenced raster for GIS tools: a Cloud-Optimized GeoTIFF.

CLI: ``python -m postproc.mosaic --pred PRED --out AREA.tif [--band NAME] [--tolerance PX]``.

Output: the tiles' ``prob.png`` values as they are (uint8, round(255 * p)), bands background,
building, boundary (their descriptions say so; colour interpretation red, green, blue, so that a
viewer shows it as the PNGs look), or with ``--band NAME`` that band alone; each tile placed by
its ``meta.json`` transform, in its CRS. Pixels no tile covers are masked out by the file's
internal mask (0 there, 255 under a tile): GIS tools show them as nodata (transparent). A mask,
not a nodata value: every byte 0..255 is a probability. The COG (GDAL's COG driver: 512 px
tiles, DEFLATE, overviews averaged over the unmasked pixels, blocks without a tile not stored)
can be opened whole or read over HTTP a window at a time.

One pixel grid only: the tiles must share a CRS, pixel size and alignment (up to
``--tolerance`` px, as ``postproc.merge`` decides it: ``postproc.mergegrid``). Tiles on several
grids are refused (exit 2): placing them on one would resample probabilities, which are then no
longer what the model said; ``postproc.merge`` joins such tiles' footprints instead. Tiles of the
grid that overlap: the pixels of the overlap are those of the tile whose ImageId comes first in
sort order (the same file whatever the shard order), with a note naming the first pair read and
the number of pairs, as merge has.

Memory follows one tile, not the area: a first pass reads each tile's meta.json (grids, extent; the
PNGs' bytes are seeked over), a second decodes one tile at a time and writes it through a window
into a temporary tiled GTiff (sparse: no tile, no block), which GDAL then copies into the COG. Both
temporary files lie in ``--out``'s directory (``.<name>.<random>.{tiff,cog}.tmp``); the COG is
renamed onto ``--out`` at the end: the file is whole or absent, and an error or Ctrl-C leaves
neither temporary file. Disk: up to 3 bytes per pixel under the tiles (1 with ``--band``) for the
temporary GTiff, besides the compressed COG.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import math
import os
import secrets
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dataio.atomic import (
    TMP_SUFFIX,
    check_writable,
    fsync_dir,
    fsync_file,
    missing_dirs,
    remove_made_dirs,
    remove_stale_temps,
    writing,
)
from dataio.classes import CLASS_NAMES
from postproc.mergegrid import Grid, GridIndex, overlapping_pairs
from postproc.mergeio import MergeError, meta_crs, meta_extent
from postproc.merger import TOLERANCE_PX
from postproc.predio import (
    PredError,
    decode_sample,
    iter_metas,
    iter_raw_samples,
    list_pred_shards,
)

BANDS = CLASS_NAMES  # prob.png's channels (postproc.predio)
OUT_SUFFIXES = (".tif", ".tiff")  # --out's, in any case (GDAL's own for a GeoTIFF)
BLOCK_PX = 512  # the COG's tiles (GDAL's default): the unit a viewer reads over HTTP
# NOTE: the mask inside the TIFF, said here rather than left to the GDAL version's default (an
# external .msk sidecar in older ones: QGIS would miss it once the file is renamed, and a
# temporary one could outlive the run). PAM off: no .aux.xml beside --out or a temporary file
# (the band names are in the TIFF's own metadata).
WRITE_ENV = {"GDAL_TIFF_INTERNAL_MASK": True, "GDAL_PAM_ENABLED": "NO"}
# NOTE: SPARSE_OK: a block that no tile touches is not stored (GDAL reads it as 0, masked), so
# tiles far apart cost disk for their own blocks only; without it the COG of two 512 px tiles at
# the corners of a 20,000 px square was 31 times larger and twice as slow to write.
COG_OPTIONS = {"COMPRESS": "DEFLATE", "PREDICTOR": "YES", "BLOCKSIZE": BLOCK_PX,
               "OVERVIEW_RESAMPLING": "AVERAGE", "BIGTIFF": "IF_SAFER", "SPARSE_OK": "TRUE"}


@dataclass
class Tile:
    key: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in the grid's whole pixels
    # the boxes of overlapping tiles that come first in ImageId order: theirs are those pixels
    yields_to: list[tuple[int, int, int, int]] = field(default_factory=list)


@dataclass
class Layout:
    """What the first pass found: the grid, every tile's place on it, and the overlaps."""

    grid: Grid
    tiles: dict[str, Tile]
    overlaps: int = 0
    first_overlap: tuple[str, str] | None = None

    def bounds(self) -> tuple[int, int, int, int]:
        boxes = np.array([t.box for t in self.tiles.values()])
        return (int(boxes[:, 0].min()), int(boxes[:, 1].min()), int(boxes[:, 2].max()),
                int(boxes[:, 3].max()))

    def transform(self) -> list[float]:
        """The GDAL affine of the area's top-left pixel (the grid's, moved to it)."""
        x0, y0, _, _ = self.bounds()
        c, f = self.grid.to_map(np.array([[x0, y0]], dtype=float))[0]
        (a, b), (d, e) = self.grid.fwd[:, :2]
        return [float(a), float(b), float(c), float(d), float(e), float(f)]


def scan(shards: list[Path], tol: float) -> Layout:
    """First pass: each tile's grid and extent from its meta.json (no PNG is read: the tar's
    headers and meta.json members alone, ``predio.iter_metas``)."""
    index = GridIndex(tol)
    tiles: dict[str, Tile] = {}
    first_of: dict[int, str] = {}  # a tile of each grid, for the refusal
    ext: list[tuple[int, int, int, int, int]] = []
    for shard in shards:
        for key, meta in iter_metas(shard):
            if key in tiles:
                raise MergeError(f"{shard}: ImageId {key!r} also appears in an earlier shard")
            where = f"{shard}: {key}"
            fwd, w, h = meta_extent(meta, where)
            crs = meta_crs(meta, where)
            gi, (ox, oy) = index.place(crs, fwd, w, h)
            first_of.setdefault(gi, key)
            box = (int(ox), int(oy), int(ox) + w, int(oy) + h)
            tiles[key] = Tile(key, box)
            ext.append((gi, *box))
    # NOTE: a raster needs an extent: shards holding no sample ended in an IndexError traceback
    if not tiles:
        raise MergeError(f"--pred {shards[0].parent}: no tile in its {len(shards)} "
                         "pred-*.tar shard(s): nothing to mosaic")
    if len(index.grids) > 1:
        a, b = first_of[0], first_of[1]
        raise MergeError(
            f"--pred {shards[0].parent}: the tiles lie on {len(index.grids)} pixel grids "
            f"({len({g.crs for g in index.grids})} CRS; e.g. {a} on one, {b} on another"
            f"{_off_by(index.grids[0], index.grids[1], tiles[b], tol)}): a mosaic is one grid, "
            "and resampling would change the probabilities; mosaic each grid's tiles apart, or "
            "join their footprints with postproc.merge")
    return _resolve_overlaps(Layout(index.grids[0], tiles), np.array(ext, dtype=np.int64))


def _off_by(grid: Grid, other: Grid, tile: Tile, tol: float) -> str:
    """What the refusal adds when ``tile`` (the first of grid ``other``) is off ``grid`` by a
    rounding's worth (under 0.1 px), in the same CRS: by how much, and the flag that accepts it.

    NOTE: the refusal named only the ways out that keep the grids apart; tiles whose transforms
    were written with fewer digits (lon/lat origins to 1e-7 degrees: up to 0.02 px of SpaceNet's
    2.7e-6 degree pixels) lie a few hundredths of a pixel off one grid, and the user was not told
    that --tolerance joins them.
    """
    if other.crs != grid.crs:
        return ""
    _, off = grid.fit(other.fwd, tile.box[2] - tile.box[0], tile.box[3] - tile.box[1])
    if not tol < off < 0.1:
        return ""
    return (f", off the first by {off:.2g} px: if their transforms are rounded, pass "
            f"--tolerance {math.floor(off * 100 + 1) / 100:g} (now {tol:g})")


def _resolve_overlaps(layout: Layout, ext: np.ndarray) -> Layout:
    pairs = overlapping_pairs(ext)
    if not len(pairs):
        return layout
    keys = list(layout.tiles)  # (in the order read: ext's rows)
    for i, j in pairs:
        first, second = sorted((keys[i], keys[j]))
        layout.tiles[second].yields_to.append(layout.tiles[first].box)
    a, b = pairs[np.lexsort((pairs[:, 0], pairs[:, 1]))[0]]  # (the first read, as merge's)
    layout.overlaps, layout.first_overlap = len(pairs), (keys[a], keys[b])
    return layout


def own_boxes(tile: Tile) -> list[tuple[int, int, int, int]]:
    """The tile's box less those it yields to, as boxes (rows of cells between the edges of
    all of them, runs of free cells joined along a row)."""
    if not tile.yields_to:
        return [tile.box]
    x0, y0, x1, y1 = tile.box
    xs = sorted({x0, x1, *(min(max(v, x0), x1) for b in tile.yields_to for v in (b[0], b[2]))})
    ys = sorted({y0, y1, *(min(max(v, y0), y1) for b in tile.yields_to for v in (b[1], b[3]))})
    out = []
    for ya, yb in itertools.pairwise(ys):
        run = None
        for xa, xb in itertools.pairwise(xs):
            if any(b[0] <= xa and xb <= b[2] and b[1] <= ya and yb <= b[3]
                   for b in tile.yields_to):
                if run is not None:
                    out.append(run)
                run = None
            else:
                run = (xa if run is None else run[0], ya, xb, yb)
        if run is not None:
            out.append(run)
    return [b for b in out if b[2] > b[0] and b[3] > b[1]]


# NOTE: the longest of temporary_paths' names is this many bytes longer than --out's (the "tiff"
# tag's), where atomic_open's is dataio.atomic.TMP_NAME_EXTRA: check_writable refuses a longer
# --out name up front
TMP_NAME_EXTRA = len(".") + len(".") + 8 + len(".") + len("tiff") + len(TMP_SUFFIX)


@contextlib.contextmanager
def temporary_paths(out: Path, *tags: str) -> Iterator[list[Path]]:
    """Names beside ``out`` for files that GDAL writes; removed on the way out (a success
    renames the one it keeps first). A killed run's are removed first, as atomic_open does."""
    remove_stale_temps(out)
    token = secrets.token_hex(4)
    paths = [out.with_name(f".{out.name}.{token}.{tag}{TMP_SUFFIX}") for tag in tags]
    try:
        yield paths
    finally:
        for p in paths:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def write_tiles(path: Path, shards: list[Path], layout: Layout, bands: list[int]) -> int:
    """Second pass: every tile's pixels through windows into a new tiled GTiff at ``path``."""
    import rasterio
    from rasterio.enums import ColorInterp
    from rasterio.windows import Window
    from tqdm import tqdm

    ax0, ay0, ax1, ay1 = layout.bounds()
    profile = {"driver": "GTiff", "width": ax1 - ax0, "height": ay1 - ay0, "count": len(bands),
               "dtype": "uint8", "crs": layout.grid.crs, "transform": layout.transform(),
               "tiled": True, "blockxsize": BLOCK_PX, "blockysize": BLOCK_PX,
               "sparse_ok": True, "bigtiff": "IF_SAFER"}
    written: set[str] = set()
    with rasterio.open(path, "w", **profile) as dst:
        for i, b in enumerate(bands, start=1):
            dst.set_band_description(i, BANDS[b])
        dst.colorinterp = ([ColorInterp.red, ColorInterp.green, ColorInterp.blue]
                           if len(bands) == 3 else [ColorInterp.gray])
        dst.update_tags(VALUES="round(255 * probability), as the prediction's prob.png")
        bar = tqdm(total=len(layout.tiles), unit="tile", desc="mosaic")
        with bar:
            for shard in shards:
                for key, png, meta in iter_raw_samples(shard):
                    tile = layout.tiles.get(key)
                    if tile is None or key in written:
                        raise PredError(f"{shard}: {key}: the shards changed while they were "
                                        "read; rerun when trainer.predict is done")
                    prob = decode_sample(key, png, meta, shard)
                    tx0, ty0, tx1, ty1 = tile.box
                    if prob.shape[:2] != (ty1 - ty0, tx1 - tx0):
                        raise PredError(f"{shard}: {key}: the shards changed while they were "
                                        "read; rerun when trainer.predict is done")
                    for x0, y0, x1, y1 in own_boxes(tile):
                        win = Window(x0 - ax0, y0 - ay0, x1 - x0, y1 - y0)
                        part = prob[y0 - ty0:y1 - ty0, x0 - tx0:x1 - tx0]
                        dst.write(np.ascontiguousarray(part[:, :, bands].transpose(2, 0, 1)),
                                  window=win)
                        dst.write_mask(np.full((y1 - y0, x1 - x0), 255, np.uint8), window=win)
                    written.add(key)
                    bar.update(1)
    if len(written) != len(layout.tiles):
        raise PredError(f"--pred {shards[0].parent}: the shards changed while they were read; "
                        "rerun when trainer.predict is done")
    return len(written)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m postproc.mosaic",
        description="The prediction of an area as one Cloud-Optimized GeoTIFF for GIS tools: "
                    "the tiles' probabilities (uint8, round(255 * p), as in prob.png) placed by "
                    "their transforms in their CRS, areas without a tile masked out (nodata). "
                    "The tiles must lie on one pixel grid (one CRS, pixel size and alignment); "
                    "where tiles overlap, the one first in ImageId order is kept.")
    p.add_argument("--pred", type=Path, required=True, metavar="PRED",
                   help="directory of pred-*.tar shards (trainer.predict --out)")
    p.add_argument("--out", type=Path, required=True, metavar="AREA.tif",
                   help="the GeoTIFF (COG) to write, its name ending in .tif or .tiff; "
                        "replaced whole at the end")
    p.add_argument("--band", choices=BANDS, default=None,
                   help="write this probability alone, one band (default: all three, "
                        "background building boundary, as bands 1-3)")
    p.add_argument("--tolerance", type=float, default=TOLERANCE_PX, metavar="PX",
                   help="how far, in pixels, tile corners may be off one pixel grid and still "
                        f"be on it (float error; default {TOLERANCE_PX}, as postproc.merge)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0 <= args.tolerance < 0.5:
        raise ValueError(f"--tolerance {args.tolerance} px must lie in [0, 0.5)")
    from postproc.predio import SHARD_GLOB

    # (lazy: listed only for an --out that exists, which must not be a shard)
    check_writable(args.out, "--out", (("--pred", s) for s in args.pred.glob(SHARD_GLOB)),
                   tmp_extra=TMP_NAME_EXTRA)
    # NOTE: refused before any work (after check_writable's more particular refusals: a
    # directory, a shard): a COG written under another name (x.png) was a TIFF that image
    # viewers, and a GIS going by the suffix, fail to open or misread
    if args.out.suffix.lower() not in OUT_SUFFIXES:
        raise ValueError(f"--out {args.out}: the mosaic is a Cloud-Optimized GeoTIFF; give a "
                         f"name ending in {' or '.join(OUT_SUFFIXES)}")
    shards = list_pred_shards(args.pred)
    layout = scan(shards, args.tolerance)
    bands = [0, 1, 2] if args.band is None else [BANDS.index(args.band)]
    import rasterio
    import rasterio.shutil

    from dataio.geo import gdal_env
    from postproc.pools import say

    out = args.out
    made = missing_dirs(out.parent)
    try:
        # (the shards' reader raises PredError: an OSError in here, GDAL's RasterioIOError
        # included, is the output's, a full disk: exit 1)
        with writing():
            # NOTE: in here, as atomic_open makes its directories: --out was checked, so a mkdir
            # that fails (a full disk has no block for a directory either) is the disk's; outside
            # it said 2, "fix the input"
            out.parent.mkdir(parents=True, exist_ok=True)
            with (gdal_env(), rasterio.Env(**WRITE_ENV),
                  temporary_paths(out, "tiff", "cog") as (tiff, cog)):
                n = write_tiles(tiff, shards, layout, bands)
                # NOTE: one GDAL call that Ctrl-C cannot cut short: it is seen when the copy is
                # done, and the clean-up then removes both files
                rasterio.shutil.copy(tiff, cog, driver="COG", **COG_OPTIONS)
                fsync_file(cog)
                os.replace(cog, out)
            fsync_dir(out.parent, placed=out)
    except BaseException:
        remove_made_dirs(made)
        raise
    if layout.first_overlap is not None:
        a, b = layout.first_overlap
        say(f"mosaic: {layout.overlaps} pairs of tiles overlap on their pixel grid (first: {a} "
            f"and {b}; a tile given twice under two names?): in an overlap the pixels are the "
            "tile's first in ImageId order")
    x0, y0, x1, y1 = layout.bounds()
    over = f"; {layout.overlaps} pairs of tiles overlap" if layout.overlaps else ""
    from postproc.cli import report

    # (a full disk under stdout: exit 1, as for the GeoTIFF; see report)
    report(f"{n} tiles, {x1 - x0} x {y1 - y0} px in {layout.grid.crs[:60]}, "
           f"{'/'.join(BANDS[b] for b in bands)}{over} -> {out}")
    return 0


if __name__ == "__main__":
    from postproc.cli import exit_on_error

    sys.exit(exit_on_error(main))
