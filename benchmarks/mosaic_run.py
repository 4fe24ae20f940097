"""One measured run of ``benchmarks.mosaic`` in a process of its own: the project's mosaic or the
baseline, from a directory of prediction shards to one COG; prints one JSON line of figures.

    python -m benchmarks.mosaic_run project --pred PRED --out AREA.tif
    python -m benchmarks.mosaic_run baseline --pred PRED --out AREA.tif

- project: ``postproc.mosaic.main`` (the command's own entry point).
- baseline: the way a user would do it with the field's libraries: the shards read with
  ``webdataset`` (``.decode("rgb8")``: Pillow), every tile written as a GeoTIFF of its own
  (rasterio, its ``meta.json`` transform and CRS), ``rasterio.merge.merge(..., masked=True)`` of
  them all into one array of the area (merge masks by value, a band's 0: no tile lies where all
  three bands are masked, as a tile's probabilities sum to ~255), written with that mask into an
  in-memory GTiff and copied by GDAL into a COG with the project's COG settings.
  It holds the whole area in memory.

Figures: ``seconds`` of the work (after the imports: a fresh interpreter's start is no part of
either), ``tiles``, ``pixels`` (the area's), ``rss_start_mb`` (VmRSS after the imports),
``peak_rss_mb`` (VmHWM: the process's exact peak), ``out_mb`` (the COG's size) and, for the
baseline, ``scratch_mb`` (its per-tile GeoTIFFs on disk).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import run
from benchmarks.merge_run import proc_status_mb

MB = 1024 * 1024


def project(pred: Path, out: Path) -> dict[str, Any]:
    from postproc import mosaic

    mosaic.main(["--pred", str(pred), "--out", str(out)])
    return {}


def baseline(pred: Path, out: Path) -> dict[str, Any]:
    """Shards -> per-tile GeoTIFFs -> rasterio.merge (masked) -> COG; see the docstring."""
    import numpy as np
    import rasterio
    import rasterio.shutil
    import webdataset as wds
    from rasterio.io import MemoryFile
    from rasterio.merge import merge

    from postproc.mosaic import BANDS, COG_OPTIONS, WRITE_ENV

    shards = sorted(str(p) for p in pred.glob("pred-*.tar"))
    if not shards:
        raise ValueError(f"--pred {pred}: no pred-*.tar shards")
    with tempfile.TemporaryDirectory(prefix="bench-mosaic-tiles-") as tmp, \
            rasterio.Env(**WRITE_ENV):
        paths = []
        # (shardshuffle=False: read in order; the decoded PNG is uint8 HxWx3)
        for s in wds.WebDataset(shards, shardshuffle=False, empty_check=False).decode("rgb8"):
            meta, prob = s["meta.json"], s["prob.png"]
            path = Path(tmp) / f"{s['__key__']}.tif"
            with rasterio.open(path, "w", driver="GTiff", width=meta["width"],
                               height=meta["height"], count=3, dtype="uint8", crs=meta["crs"],
                               transform=rasterio.Affine(*meta["transform"][:6])) as dst:
                dst.write(prob.transpose(2, 0, 1))
            paths.append(path)
        scratch = sum(p.stat().st_size for p in paths) / MB
        area, transform = merge(paths, masked=True)
        with rasterio.open(paths[0]) as first:
            crs = first.crs
        _, h, w = area.shape
        with MemoryFile() as mem:
            with mem.open(driver="GTiff", width=w, height=h, count=3, dtype="uint8", crs=crs,
                          transform=transform, tiled=True, blockxsize=512,
                          blockysize=512) as dst:
                for i, name in enumerate(BANDS, start=1):
                    dst.set_band_description(i, name)
                dst.write(area.filled(0))
                # NOTE: merge masks by value (== its nodata, 0 here), band by band: no tile
                # only where all three are 0, which a tile never holds (they sum to ~255)
                dst.write_mask(np.where(np.ma.getmaskarray(area).all(axis=0), 0, 255
                                        ).astype(np.uint8))
            rasterio.shutil.copy(mem.name, out, driver="COG", **COG_OPTIONS)
    return {"tiles": len(paths), "scratch_mb": scratch}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.mosaic_run",
                                description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("variant", choices=("project", "baseline"))
    p.add_argument("--pred", type=Path, required=True, help="the prediction shards")
    p.add_argument("--out", type=Path, required=True, help="the COG to write")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # (imported before the start figure: each variant imports them while it runs)
    import rasterio.merge  # noqa: F401
    import rasterio.shutil  # noqa: F401
    import webdataset  # noqa: F401

    import postproc.cli  # noqa: F401
    import postproc.mosaic  # noqa: F401
    import postproc.pools  # noqa: F401
    start = proc_status_mb("VmRSS")
    t0 = time.perf_counter()
    figures = (project(args.pred, args.out) if args.variant == "project"
               else baseline(args.pred, args.out))
    seconds = time.perf_counter() - t0
    peak = proc_status_mb("VmHWM")
    import rasterio

    with rasterio.open(args.out) as d:
        pixels = d.width * d.height
    print(json.dumps({"seconds": seconds, "pixels": pixels, "rss_start_mb": start,
                      "peak_rss_mb": peak, "out_mb": args.out.stat().st_size / MB, **figures}))
    return 0


if __name__ == "__main__":
    sys.exit(run("mosaic_run", main))
