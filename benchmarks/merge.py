"""Merging a mosaic's tile GeoJSON into one WGS 84 layer: postproc.merge against a union_all.

    python -m benchmarks.merge [--grids 4,8,16] [--tile-px 256] [--repeat 3] [--json OUT]

Input, per size N: ONE synthetic raster of N x N tiles' worth of buildings (postproc.synthmask's
recipe and density, ~100 buildings per 650x650 px, placed over the whole canvas, so that they
continue across tile edges), cut into N x N georeferenced tiles of --tile-px (UTM zone 11N,
0.3 m pixels, one mosaic grid; origins computed in floats, as a tiler does), written as
prediction shards (``postproc.predio``, one-hot probabilities, a shard per row of tiles) and
polygonized with ``postproc.polygonize --geojson DIR --min-polygon-area 0 --no-seedless`` (set-up,
not timed), so that every 4-connected blob of building-class pixels in a tile is one footprint:
the canvas's buildings are then the count to meet. (With the defaults, a cut building's piece
under 20 px is dropped before merge sees it, and the band-only sliver that a tile edge cuts off a
building becomes a footprint of its own, which can bridge two buildings of a row; at 16x16 tiles
of 256 px: 86 buildings lost to the area filter, 13 more joined, 3 slivers left alone.)

- merge, project: ``python -m postproc.merge --pred PRED --geojson DIR --out AREA.geojson``
  (interior footprints streamed out, border pieces held and merged at the end).
- merge, baseline: every tile's GeoJSON read, all footprints reprojected to WGS 84,
  ``shapely.union_all`` of them all, exploded into parts (``benchmarks.merge_run``).

Each run is a fresh process (``benchmarks.merge_run``); the variants alternate, --repeat times.
Figures: seconds of the work after the imports (best run), tiles/s, footprints/s (footprints
read from the tiles' GeoJSON), held (footprints in memory at once: the project's border pieces,
the baseline's every footprint), peak RSS (VmHWM, exact) and work MiB (the peak over the RSS
after the imports: what the work itself needed).

Counts (not timed): the canvas's buildings are its 4-connected components of building-class
pixels (``rasterio.features.shapes``, not the project's labeller), each matched to the output
footprints it overlaps. The run fails when a building is in two footprints or none, when a
footprint holds none, and unless the project's footprints are the buildings less ``joined``
(buildings in one footprint with another) and its merged footprints exactly those that hold a
building over a tile edge (``crossing``: pixels in two tiles or more) or a joined pair. Joins
are of two kinds: a thin drawn footprint (synthmask's polygon) rasterises into several blobs,
whose grown outlines can meet on a tile edge and be merged back into one; and two drawn
buildings whose outlines meet on a tile edge (a shared wall, or a gap of a pixel or so there)
share a segment of it as a cut building's pieces do, and merge cannot tell them apart:
``joined_drawn`` counts these (a footprint holding n drawn buildings counts n - 1). The baseline
also joins footprints that merely touch (a shared wall within a tile, or a corner):
``touch_wall`` and ``touch_corner`` count the pairs of the project's footprints that one
baseline part holds, ``baseline_split`` the project's footprints that it left in pieces (the
tiles' common edges are a float error apart in lon/lat, and union_all does not close the gap).
"""

from __future__ import annotations

import contextlib
import io
import json
import shutil
import subprocess
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from pyproj import Transformer
from rasterio.features import shapes
from shapely.geometry import Polygon, shape

from benchmarks.common import (
    base_parser,
    count,
    machine_info,
    parse_args,
    print_table,
    run,
    sizes,
    write_json,
)
from dataio.classes import BUILDING
from postproc.synthmask import SynthConfig, make_mask, one_hot, synth_footprints

REPO = Path(__file__).resolve().parents[1]
UTM, PX, X0, Y0 = "EPSG:32611", 0.3, 500_000.0, 4_000_000.0  # the mosaic's CRS, m, NW corner
DENSITY = 100 / 650**2  # buildings per px^2: synthmask's 100 on a 650x650 tile
PROJECT, BASELINE = "merge, project", "merge, baseline (union_all)"


# ---- the canvas ---------------------------------------------------------------------------------

def buildings(mask: np.ndarray) -> list[Polygon]:
    """The canvas's buildings: 4-connected components of building-class pixels, as polygons in
    pixel coordinates (GDAL's polygonize, independent of the project's labeller)."""
    b = (mask == BUILDING).astype(np.uint8)
    return [shape(g) for g, _ in shapes(b, mask=b.astype(bool), connectivity=4)]


def tile_meta(r: int, c: int, tile: int) -> dict[str, Any]:
    return {"crs": UTM, "transform": [PX, 0.0, X0 + c * tile * PX, 0.0, -PX, Y0 - r * tile * PX],
            "width": tile, "height": tile}


def make_mosaic(n: int, tile: int, work: Path) -> dict[str, Any]:
    """The canvas of n x n tiles, its shards in ``work/pred`` and tile GeoJSON in ``work/gj``;
    returns the canvas's buildings and facts."""
    from postproc import polygonize
    from postproc.predio import write_pred_shard

    size = n * tile
    cfg = SynthConfig(size=size, buildings=round(DENSITY * size * size))
    polys = synth_footprints(np.random.default_rng(1000 + n), cfg)
    mask = make_mask(polys, size, cfg.boundary_width)
    for r in range(n):
        write_pred_shard(work / "pred" / f"pred-{r:06d}.tar", [
            (f"AOI_9_Mosaic_r{r}c{c}", one_hot(mask[r * tile:(r + 1) * tile,
                                                    c * tile:(c + 1) * tile]),
             tile_meta(r, c, tile)) for c in range(n)])
    said = io.StringIO()
    argv = ["--pred", str(work / "pred"), "--out", str(work / "proposals.csv"), "--geojson",
            str(work / "gj"), "--min-polygon-area", "0", "--no-seedless", "--no-tuned",
            "--workers", "1"]
    try:
        with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
            polygonize.main(argv)
    except BaseException:
        sys.stderr.write(said.getvalue())
        raise
    found = buildings(mask)
    cut = [g for g in found if _crosses(g.bounds, tile)]
    return {"pred": work / "pred", "gj": work / "gj", "buildings": found, "crossing": len(cut),
            "drawn": drawn_of(found, polys),
            "canvas_px": size, "tile_px": tile}


def drawn_of(found: list[Polygon], polys: list[Polygon]) -> list[int]:
    """For each building blob, the drawn footprint it overlaps most (blob pixels' centres lie in
    it: synthmask's rasterisation): a thin drawn building can be several blobs."""
    best = np.full(len(found), -1.0)
    out = [-1] * len(found)
    for b, d, ar in zip(*overlaps(np.asarray(polys, object), found), strict=True):
        if ar > best[b]:
            best[b], out[b] = ar, int(d)
    return out


def _crosses(bounds: tuple[float, ...], tile: int) -> bool:
    """Whether pixel-coordinate bounds reach over a tile edge (a 4-connected blob does iff)."""
    x0, y0, x1, y1 = bounds
    return x0 // tile != (x1 - 1) // tile or y0 // tile != (y1 - 1) // tile


# ---- runs and counts ----------------------------------------------------------------------------

def measured(variant: str, mosaic: dict[str, Any], out: Path) -> dict[str, Any]:
    """One ``benchmarks.merge_run`` process; its JSON line."""
    cmd = [sys.executable, "-m", "benchmarks.merge_run", variant, "--geojson", str(mosaic["gj"]),
           "--out", str(out)]
    if variant == "project":
        cmd += ["--pred", str(mosaic["pred"])]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited with {proc.returncode}:\n"
                           f"{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


_TO_UTM = Transformer.from_crs("EPSG:4326", UTM, always_xy=True)


def read_pixels(path: Path) -> tuple[list[dict[str, Any]], np.ndarray]:
    """An area GeoJSON's properties and footprints in the canvas's pixels, vertices rounded
    onto pixel corners (every vertex is one; the round trip through lon/lat is ~1e-9 px off)."""
    feats = json.loads(path.read_bytes())["features"]
    geoms = shapely.from_geojson([json.dumps(f["geometry"]) for f in feats]) if feats else []

    def to_px(xy: np.ndarray) -> np.ndarray:
        x, y = _TO_UTM.transform(xy[:, 0], xy[:, 1])
        return np.round(np.column_stack([(x - X0) / PX, (Y0 - y) / PX]))

    return [f["properties"] for f in feats], shapely.transform(np.asarray(geoms, object), to_px)


def overlaps(targets: np.ndarray, items: list[Polygon] | np.ndarray) -> tuple:
    """Every (item, target) pair that intersects, with the area they share."""
    items = np.asarray(items, object)
    i_item, i_target = shapely.STRtree(targets).query(items, predicate="intersects")
    return i_item, i_target, shapely.area(shapely.intersection(items[i_item], targets[i_target]))


def holders(targets: np.ndarray, items: list[Polygon] | np.ndarray) -> list[list[int]]:
    """For each item, the targets it overlaps (by area, not a touch)."""
    out: list[list[int]] = [[] for _ in items]
    for a, t, ar in zip(*overlaps(targets, items), strict=True):
        if ar > 0.5:  # (px^2; a blob is at least one pixel)
            out[a].append(int(t))
    return out


def project_counts(mosaic: dict[str, Any], out: Path) -> dict[str, Any]:
    """Match the canvas's buildings to the project's footprints; raise on any difference but
    buildings joined to a neighbour (see the module's docstring)."""
    props, geoms = read_pixels(out)
    found, tile = mosaic["buildings"], mosaic["tile_px"]
    where = holders(geoms, found)
    split = sum(1 for w in where if len(w) > 1)
    lost = sum(1 for w in where if not w)
    if split or lost:
        raise RuntimeError(f"{out}: {split} of the canvas's buildings in more than one "
                           f"footprint, {lost} in none")
    held = np.bincount([w[0] for w in where], minlength=len(geoms))
    joined = int((held[held > 1] - 1).sum())
    if not held.all() or len(geoms) != len(found) - joined:
        raise RuntimeError(f"{out}: {len(geoms)} footprints for {len(found)} buildings, "
                           f"{joined} of them joined to another, {int((held == 0).sum())} "
                           "footprints with no building")
    # NOTE: with every seed component a footprint of its tile (--no-seedless, area 0), a
    # building over a tile edge has a piece on each side, sharing the edge: its footprint must
    # be merged; a footprint of one building that does not cross must not be
    cut = np.zeros(len(geoms), bool)
    for b, w in zip(found, where, strict=True):
        cut[w[0]] |= _crosses(b.bounds, tile)
    want = cut | (held > 1)
    got = np.array(["ImageIds" in p for p in props], bool)
    if (want != got).any():
        raise RuntimeError(f"{out}: {int((want & ~got).sum())} footprints over a tile edge not "
                           f"merged, {int((got & ~want).sum())} merged that are not")
    drawn: dict[int, set[int]] = defaultdict(set)  # footprint -> the drawn footprints in it
    for w, d in zip(where, mosaic["drawn"], strict=True):
        drawn[w[0]].add(d)
    return {"canvas_buildings": len(found), "joined": joined,
            "joined_drawn": sum(len(d) - 1 for d in drawn.values()),
            "crossing": mosaic["crossing"], "merged": int(got.sum())}


def baseline_counts(project_out: Path, baseline_out: Path) -> dict[str, Any]:
    """How the baseline's parts differ from the project's footprints: the project's footprints
    that one part holds, by how they touch, and those the baseline left in pieces."""
    _, mine = read_pixels(project_out)
    _, parts = read_pixels(baseline_out)
    where = holders(parts, mine)
    split = sum(1 for w in where if len(w) > 1)
    groups: dict[int, list[int]] = defaultdict(list)
    for i, w in enumerate(where):
        for p in w:
            groups[p].append(i)
    wall = corner = 0
    for members in groups.values():
        for k, i in enumerate(members):
            for j in members[k + 1:]:
                touch = shapely.intersection(mine[i], mine[j])
                if not touch.is_empty:
                    dim = int(shapely.get_dimensions(shapely.get_parts(touch)).max())
                    wall += dim >= 1
                    corner += dim == 0
    return {"baseline_out": len(parts), "touch_wall": wall, "touch_corner": corner,
            "baseline_split": split}


# ---- main ---------------------------------------------------------------------------------------

def _grids(text: str) -> list[int]:
    """Comma-separated mosaic sizes (tiles a side), each >= 2 (a mosaic has inner edges)."""
    return sizes(text, 2, "tiles a side")


def row(variant: str, n: int, tile: int, m: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"variant": variant, "grid": f"{n}x{n}", "tiles": m["tiles"], "tile_px": tile,
            "footprints_in": m["footprints_in"], "footprints_out": m["footprints_out"],
            "held": m["held"], "seconds": m["seconds"], "tiles_per_s": m["tiles"] / m["seconds"],
            "footprints_per_s": m["footprints_in"] / m["seconds"],
            "peak_rss_mb": m["peak_rss_mb"], "rss_start_mb": m["rss_start_mb"],
            "work_mb": m["peak_rss_mb"] - m["rss_start_mb"], **extra}


def bench_size(n: int, tile: int, repeat: int, work: Path) -> list[dict[str, Any]]:
    """The project's and the baseline's rows for an n x n mosaic made under ``work``."""
    mosaic = make_mosaic(n, tile, work)
    outs = {"project": work / "area.geojson", "baseline": work / "area-baseline.geojson"}
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in outs}
    for _ in range(repeat):
        for variant, out in outs.items():  # (alternating: a busy neighbour slows both alike)
            runs[variant].append(measured(variant, mosaic, out))
    # the fastest run's seconds; the memory of the run that peaked highest (the runs differ by
    # well under 1 MiB: one input, one fresh process each)
    best = {v: {**max(ms, key=lambda m: m["peak_rss_mb"]),
                "seconds": min(m["seconds"] for m in ms)} for v, ms in runs.items()}
    return [row(PROJECT, n, tile, best["project"], **project_counts(mosaic, outs["project"])),
            row(BASELINE, n, tile, best["baseline"],
                **baseline_counts(outs["project"], outs["baseline"]))]


COLUMNS = ["variant", "grid", "tiles", "footprints_in", "footprints_out", "held", "seconds",
           "tiles_per_s", "footprints_per_s", "peak_rss_mb", "work_mb"]
COUNTS = ["grid", "canvas_buildings", "crossing", "merged", "joined", "joined_drawn",
          "project_out", "baseline_out", "touch_wall", "touch_corner", "baseline_split"]
UNITS = {"seconds": "s (the work after the imports; best of --repeat)", "tiles_per_s": "tiles/s",
         "footprints_per_s": "footprints read/s", "peak_rss_mb": "MiB (VmHWM; the largest run)",
         "rss_start_mb": "MiB (VmRSS after the imports)",
         "work_mb": "MiB (peak_rss_mb - rss_start_mb)", "held": "footprints",
         "footprints_in": "footprints", "footprints_out": "footprints",
         "canvas_buildings": "buildings", "crossing": "buildings", "merged": "footprints",
         "joined": "buildings", "joined_drawn": "drawn buildings", "baseline_out": "footprints",
         "touch_wall": "pairs of footprints", "touch_corner": "pairs of footprints",
         "baseline_split": "footprints"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser("merge", __doc__)
    p.add_argument("--grids", type=_grids, default=[4, 8, 16],
                   help="mosaic sizes, tiles a side, comma-separated (default 4,8,16)")
    p.add_argument("--tile-px", type=count, default=256, help="tile size in px (default 256)")
    p.add_argument("--repeat", type=count, default=3, help="runs of each variant (default 3)")
    args = parse_args(p, argv)
    if args.tile_px < 64:
        p.error(f"--tile-px {args.tile_px}: at least 64 (buildings are up to 50 px across)")
    rows: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="bench-merge-"))
    try:
        for n in args.grids:
            rows += bench_size(n, args.tile_px, args.repeat, work / f"{n}x{n}")
            shutil.rmtree(work / f"{n}x{n}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    counts = []
    for mine, base in zip(rows[::2], rows[1::2], strict=True):
        mine["speedup_vs_baseline"] = base["seconds"] / mine["seconds"]
        counts.append({**mine, **base, "project_out": mine["footprints_out"]})
    info = machine_info()
    print(f"{info['cores']} cores: {info['cpu']}; mosaics of {args.tile_px}x{args.tile_px} px "
          f"tiles (0.3 m, {UTM}), ~{DENSITY * args.tile_px ** 2:.0f} buildings a tile")
    print_table(rows, [*COLUMNS, "speedup_vs_baseline"])
    print("\ncounts: the canvas's buildings, those over a tile edge, the project's merged and "
          "joined footprints; the baseline's parts and the touches it joins")
    print_table(counts, COUNTS)
    return write_json(args.json, "merge", rows, settings=args, units={
        **UNITS, "speedup_vs_baseline": "ratio (baseline seconds / project seconds)"},
        tile_px=args.tile_px, crs=UTM, pixel_m=PX, buildings_per_px2=DENSITY)


if __name__ == "__main__":
    sys.exit(run("merge", main))
