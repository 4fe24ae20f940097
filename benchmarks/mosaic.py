"""A prediction as one Cloud-Optimized GeoTIFF: postproc.mosaic against rasterio.merge.

    python -m benchmarks.mosaic [--grids 4,16] [--tile-px 512] [--repeat 3] [--json OUT]

Input, per size N: prediction shards (``postproc.predio``, a shard per row of tiles) of N x N
tiles of --tile-px on one UTM grid (0.3 m pixels), but for the bottom-left tile, left out as a
chip of nodata is (so that the mask has a hole to show). Each tile holds soft probabilities:
``postproc.synthmask``'s buildings (~100 per 650x650 px), one-hot, blurred by a 5x5 box (uint8,
as ``trainer.predict`` writes them).

- mosaic, project: ``python -m postproc.mosaic --pred PRED --out AREA.tif`` (tiles written one at
  a time through windows into a temporary tiled GTiff, then GDAL's COG copy).
- mosaic, baseline: the shards read with ``webdataset``, each tile written as a GeoTIFF,
  ``rasterio.merge.merge(masked=True)`` of them into one array of the area, written with its mask
  and copied into a COG with the same settings (``benchmarks.mosaic_run``).

Each run is a fresh process (``benchmarks.mosaic_run``); the variants alternate, --repeat times.
Figures: seconds of the work after the imports (best run), tiles/s, Mpx/s (the area's pixels),
peak RSS (VmHWM, exact), work MiB (the peak over the RSS after the imports: what the work itself
needed) and the COG's size. The run fails unless the two COGs hold the same pixels and the same
mask, so the baseline also checks the project's placement.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

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
from benchmarks.merge import DENSITY, PX, UTM, tile_meta
from postproc.synthmask import SynthConfig, make_mask, one_hot, synth_footprints

REPO = Path(__file__).resolve().parents[1]
PROJECT, BASELINE = "mosaic, project", "mosaic, baseline (rasterio.merge)"


def blurred(prob: np.ndarray, k: int = 5) -> np.ndarray:
    """A k x k box blur of uint8 HxWxC (edges clamped): soft probabilities, as a net gives."""
    x = np.pad(prob.astype(np.float32), ((k // 2, k // 2), (k // 2, k // 2), (0, 0)),
               mode="edge")
    for axis in (0, 1):
        c = np.cumsum(x, axis=axis)
        c = np.concatenate([np.zeros_like(np.take(c, [0], axis=axis)), c], axis=axis)
        x = (np.take(c, range(k, c.shape[axis]), axis=axis)
             - np.take(c, range(c.shape[axis] - k), axis=axis)) / k
    return np.rint(x).astype(np.uint8)


def make_pred(n: int, tile: int, out: Path) -> int:
    """The n x n tiles' shards in ``out`` (the bottom-left one left out); returns the tiles."""
    from postproc.predio import write_pred_shard

    rng = np.random.default_rng(n)
    cfg = SynthConfig(size=tile, buildings=max(1, round(DENSITY * tile * tile)))
    tiles = 0
    for r in range(n):
        samples = []
        for c in range(n):
            if (r, c) == (n - 1, 0) and n > 1:
                continue
            mask = make_mask(synth_footprints(rng, cfg), tile, cfg.boundary_width)
            samples.append((f"AOI_9_Mosaic_r{r}c{c}", blurred(one_hot(mask)),
                            tile_meta(r, c, tile)))
        tiles += write_pred_shard(out / f"pred-{r:06d}.tar", samples)
    return tiles


def measured(variant: str, pred: Path, out: Path) -> dict[str, Any]:
    """One ``benchmarks.mosaic_run`` process; its JSON line."""
    cmd = [sys.executable, "-m", "benchmarks.mosaic_run", variant, "--pred", str(pred),
           "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1200)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def same_raster(a: Path, b: Path) -> None:
    """Both COGs hold the same grid, pixels and mask (ValueError naming what differs)."""
    import rasterio

    with rasterio.open(a) as x, rasterio.open(b) as y:
        for what in ("crs", "transform", "shape", "count"):
            if getattr(x, what) != getattr(y, what):
                raise ValueError(f"{a} and {b}: another {what} ({getattr(x, what)} vs "
                                 f"{getattr(y, what)})")
        mx, my = x.dataset_mask(), y.dataset_mask()
        if not np.array_equal(mx, my):
            raise ValueError(f"{a} and {b}: their masks differ at {int((mx != my).sum())} px")
        valid = mx > 0
        px, py = x.read(), y.read()
        if not np.array_equal(px[:, valid], py[:, valid]):
            raise ValueError(f"{a} and {b}: their pixels differ under the mask")


def bench_size(n: int, tile: int, repeat: int, work: Path) -> list[dict[str, Any]]:
    pred = work / "pred"
    tiles = make_pred(n, tile, pred)
    outs = {"project": work / "area.tif", "baseline": work / "area-baseline.tif"}
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in outs}
    for _ in range(repeat):
        for variant, out in outs.items():  # (alternating: a busy neighbour slows both alike)
            runs[variant].append(measured(variant, pred, out))
    same_raster(outs["project"], outs["baseline"])
    rows = []
    for variant, name in (("project", PROJECT), ("baseline", BASELINE)):
        m = {**max(runs[variant], key=lambda m: m["peak_rss_mb"]),
             "seconds": min(r["seconds"] for r in runs[variant])}
        rows.append({"variant": name, "grid": f"{n}x{n}", "tiles": tiles, "tile_px": tile,
                     "area_mpx": m["pixels"] / 1e6, "seconds": m["seconds"],
                     "tiles_per_s": tiles / m["seconds"],
                     "mpx_per_s": m["pixels"] / 1e6 / m["seconds"],
                     "peak_rss_mb": m["peak_rss_mb"], "rss_start_mb": m["rss_start_mb"],
                     "work_mb": m["peak_rss_mb"] - m["rss_start_mb"], "out_mb": m["out_mb"],
                     "scratch_mb": m.get("scratch_mb")})
    rows[0]["speedup_vs_baseline"] = rows[1]["seconds"] / rows[0]["seconds"]
    return rows


def _grids(text: str) -> list[int]:
    """Comma-separated area sizes (tiles a side), each >= 1 (one tile is an area too)."""
    return sizes(text, 1, "tiles a side")


COLUMNS = ["variant", "grid", "tiles", "area_mpx", "seconds", "tiles_per_s", "mpx_per_s",
           "peak_rss_mb", "work_mb", "out_mb", "speedup_vs_baseline"]
UNITS = {"area_mpx": "megapixels (the COG's width x height)",
         "seconds": "s (the work after the imports; best of --repeat)", "tiles_per_s": "tiles/s",
         "mpx_per_s": "megapixels/s", "peak_rss_mb": "MiB (VmHWM; the largest run)",
         "rss_start_mb": "MiB (VmRSS after the imports)",
         "work_mb": "MiB (peak_rss_mb - rss_start_mb)", "out_mb": "MiB (the COG)",
         "scratch_mb": "MiB (the baseline's per-tile GeoTIFFs)",
         "speedup_vs_baseline": "ratio (baseline seconds / project seconds)"}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser("mosaic", __doc__)
    p.add_argument("--grids", type=_grids, default=[4, 16],
                   help="areas, tiles a side, comma-separated (default 4,16)")
    p.add_argument("--tile-px", type=count, default=512, help="tile size in px (default 512)")
    p.add_argument("--repeat", type=count, default=3, help="runs of each variant (default 3)")
    args = parse_args(p, argv)
    if args.tile_px < 64:
        p.error(f"--tile-px {args.tile_px}: at least 64 (buildings are up to 40 px across)")
    rows: list[dict[str, Any]] = []
    work = Path(tempfile.mkdtemp(prefix="bench-mosaic-"))
    try:
        for n in args.grids:
            rows += bench_size(n, args.tile_px, args.repeat, work / f"{n}x{n}")
            shutil.rmtree(work / f"{n}x{n}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info = machine_info()
    print(f"{info['cores']} cores: {info['cpu']}; areas of {args.tile_px}x{args.tile_px} px tiles "
          f"({PX} m, {UTM}), the bottom-left tile missing; the two COGs compared pixel by pixel")
    print_table(rows, COLUMNS)
    return write_json(args.json, "mosaic", rows, settings=args, units=UNITS,
                      tile_px=args.tile_px, crs=UTM, pixel_m=PX)


if __name__ == "__main__":
    sys.exit(run("mosaic", main))
