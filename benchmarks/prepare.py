"""Ingest rate and shard sizes: ``dataio.prepare`` against per-tile mask GeoTIFFs.

    python -m benchmarks.prepare [--tiles 96] [--workers N] [--json OUT]

The baseline is what the SpaceNet utilities do (``createRasterFromGeoJson``): for every tile,
rasterise its GeoJSON into a mask GeoTIFF next to the image, one file per tile, serially. The
project reads the same AOI and writes verified, DALI-indexed shards (image, 3-class mask, meta),
truth CSVs and the manifest, with 1 and N worker processes.
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import rasterio
from pyproj import CRS

from benchmarks.common import base_parser, count, parse_args, print_table, run, write_json
from dataio.geo import gdal_env
from dataio.labels import make_mask, read_footprints
from dataio.prepare import PrepareConfig, prepare
from dataio.synth import SynthConfig, write_aoi


def baseline(raw: Path, out: Path) -> int:
    """Per-tile mask GeoTIFFs beside nothing else: read, rasterise, write (serial)."""
    out.mkdir(parents=True, exist_ok=True)
    n = 0
    with gdal_env():
        for tif in sorted((raw / "RGB-PanSharpen").glob("*.tif")):
            iid = tif.stem[len("RGB-PanSharpen_"):]
            with rasterio.open(tif) as ds:
                ds.read()  # the image is read too, as a training pipeline would
                profile = ds.profile | {"count": 1, "dtype": "uint8", "compress": "deflate"}
                crs, transform, w, h = CRS.from_wkt(ds.crs.to_wkt()), ds.transform, ds.width, \
                    ds.height
            label = raw / "geojson" / "buildings" / f"buildings_{iid}.geojson"
            mask = make_mask(read_footprints(label, crs, transform, w, h).polygons, (h, w))
            with rasterio.open(out / f"mask_{iid}.tif", "w", **profile) as dst:
                dst.write(mask[None])
            n += 1
    return n


def _size(path: Path, pattern: str) -> int:
    return sum(p.stat().st_size for p in path.rglob(pattern))


def main(argv: list[str] | None = None) -> int:
    p = base_parser("prepare", __doc__)
    p.add_argument("--tiles", type=count, default=96,
                   help="synthetic 650x650 tiles to ingest (default 96)")
    p.add_argument("--workers", type=count, default=len(os.sched_getaffinity(0)),
                   help="prepare's worker processes for the second project row (the first has "
                        "1; default: all usable cores)")
    args = parse_args(p, argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        write_aoi(SynthConfig(out=raw, tiles=args.tiles, seed=0, workers=args.workers))
        image_bytes = _size(raw / "RGB-PanSharpen", "*.tif")
        t0 = time.perf_counter()
        n = baseline(raw, Path(tmp) / "masks")
        dt = time.perf_counter() - t0
        rows.append({"variant": "baseline: per-tile mask GeoTIFFs", "workers": 1, "tiles": n,
                     "seconds": dt, "tiles_per_s": n / dt,
                     "bytes_per_tile": (image_bytes + _size(Path(tmp) / "masks", "*.tif")) / n})
        for workers in sorted({1, args.workers}):
            out = Path(tmp) / f"data{workers}"
            t0 = time.perf_counter()
            m = prepare(PrepareConfig([raw], out, workers=workers, shard_size=32),
                        progress=False)
            dt = time.perf_counter() - t0
            n = sum(m["splits"][s]["samples"] for s in ("train", "val", "test"))
            shards = [i for s in ("train", "val", "test") for i in m["splits"][s]["shards"]]
            full = [i["bytes"] / i["samples"] for i in shards if i["samples"] == 32]
            rows.append({"variant": "dataio.prepare -> shards", "workers": workers, "tiles": n,
                         "seconds": dt, "tiles_per_s": n / dt,
                         "bytes_per_tile": _size(out, "*.tar") / n,
                         "shard_bytes_200": float(np.mean(full)) * 200 if full else None})
    print_table(rows, ["variant", "workers", "tiles", "seconds", "tiles_per_s", "bytes_per_tile",
                       "shard_bytes_200"])
    write_json(args.json, "prepare", rows, settings=args,
               units={"seconds": "s", "tiles_per_s": "tiles/s",
                      "bytes_per_tile": "bytes on disk per tile",
                      "shard_bytes_200": "bytes of a 200-sample shard (the default size)"})
    return 0


if __name__ == "__main__":
    sys.exit(run("prepare", main))
