"""One measured run of ``benchmarks.merge`` in a process of its own: the project's merge or the
baseline, on the tile GeoJSON of a mosaic; prints one JSON line of figures.

    python -m benchmarks.merge_run project --pred PRED --geojson DIR --out AREA.geojson
    python -m benchmarks.merge_run baseline --geojson DIR --out AREA.geojson

- project: ``postproc.merge.main`` (the command's own entry point), its ``Merger`` counting the
  pieces it holds at the end (the border footprints).
- baseline: the way a user would do it with the field's libraries (geopandas' ``read_file``,
  ``to_crs``, ``dissolve`` and ``explode``, in plain shapely: geopandas is not installed): every
  ``DIR/*.geojson`` read whole, every footprint reprojected to WGS 84 (pyproj, one transformer
  per CRS), ``shapely.union_all`` of all of them, exploded into parts, written as one
  FeatureCollection. It holds every footprint until the union.

Figures: ``seconds`` of the work (after the imports: a fresh interpreter's start is no part of
either), ``tiles``, ``footprints_in`` (read from the tiles' GeoJSON), ``footprints_out``
(written), ``held`` (footprints in memory at once), ``rss_start_mb`` (VmRSS after the imports)
and ``peak_rss_mb`` (VmHWM: the process's exact peak, not a sample).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from pyproj import Transformer
from shapely.geometry import mapping, shape

from benchmarks.common import run
from dataio.atomic import atomic_open

MB = 1024 * 1024
WGS84 = "EPSG:4326"


def proc_status_mb(field: str) -> float:
    """A memory line of ``/proc/self/status`` (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024 / MB
    raise OSError(f"/proc/self/status has no {field} (not Linux?)")


def project(pred: Path, geojson: Path, out: Path) -> dict[str, Any]:
    """``python -m postproc.merge`` in this process; tiles, footprints and held pieces."""
    from postproc import merge

    held: list[int] = []

    class Counting(merge.Merger):
        def finish(self) -> None:
            held.append(len(self.pieces))  # (what it held until now: the border pieces)
            super().finish()

    # NOTE: main looks Merger up in its module when it runs: the command as users run it,
    # with a count of its pieces on the side
    merge.Merger = Counting  # type: ignore[misc]
    merge.main(["--pred", str(pred), "--geojson", str(geojson), "--out", str(out)])
    return {"held": held[0]}


def _to_wgs84(transformers: dict[str, Transformer], crs: str):
    if crs not in transformers:
        transformers[crs] = Transformer.from_crs(crs, WGS84, always_xy=True)
    tr = transformers[crs]
    return lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1]))


def baseline(geojson: Path, out: Path) -> dict[str, Any]:
    """Read every tile, reproject, union all, explode, write; see the module's docstring."""
    transformers: dict[str, Transformer] = {}
    geoms = []
    tiles = 0
    paths = sorted(geojson.glob("*.geojson"))
    if not paths:  # (an empty layer and "0 tiles" otherwise)
        raise ValueError(f"--geojson {geojson}: no tile GeoJSON (*.geojson) in it")
    for path in paths:
        doc = json.loads(path.read_bytes())
        crs = (doc.get("crs") or {}).get("properties", {}).get("name", WGS84)
        polys = [shape(f["geometry"]) for f in doc["features"]]
        geoms += list(shapely.transform(polys, _to_wgs84(transformers, crs)))
        tiles += 1
    parts = shapely.get_parts(shapely.union_all(geoms))
    parts = shapely.orient_polygons(parts, exterior_cw=False)
    with atomic_open(out, "w", encoding="utf-8") as f:
        f.write('{"type":"FeatureCollection","features":[\n')
        f.write(",\n".join(json.dumps({"type": "Feature", "geometry": mapping(g),
                                       "properties": {"Id": i}}, separators=(",", ":"))
                           for i, g in enumerate(parts, start=1)))
        f.write("\n]}\n")
    return {"tiles": tiles, "held": len(geoms)}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.merge_run",
                                description=" ".join(__doc__.split("\n\n")[0].split()))
    p.add_argument("variant", choices=("project", "baseline"))
    p.add_argument("--pred", type=Path, default=None,
                   help="the mosaic's prediction shards (project: the tiles' extents)")
    p.add_argument("--geojson", type=Path, required=True, help="the tiles' GeoJSON directory")
    p.add_argument("--out", type=Path, required=True, help="the area's GeoJSON to write")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.variant == "project":
        if args.pred is None:
            raise ValueError("project: give --pred, the shards the tiles' GeoJSON came from")
        # (imported before the start figure: the command imports them while it runs)
        import postproc.cli  # noqa: F401
        import postproc.merge  # noqa: F401
        import postproc.pools  # noqa: F401
        import postproc.pushmetrics  # noqa: F401
    start = proc_status_mb("VmRSS")
    t0 = time.perf_counter()
    figures = (project(args.pred, args.geojson, args.out) if args.variant == "project"
               else baseline(args.geojson, args.out))
    seconds = time.perf_counter() - t0
    peak = proc_status_mb("VmHWM")
    tiles = sorted(args.geojson.glob("*.geojson"))
    # (counted after the timing, from the files: the same way for both variants)
    footprints_in = sum(len(json.loads(p.read_bytes())["features"]) for p in tiles)
    footprints_out = len(json.loads(args.out.read_bytes())["features"])
    print(json.dumps({"seconds": seconds, "tiles": len(tiles), "footprints_in": footprints_in,
                      "footprints_out": footprints_out, "rss_start_mb": start,
                      "peak_rss_mb": peak, **{k: v for k, v in figures.items() if k != "tiles"}}))
    return 0


if __name__ == "__main__":
    sys.exit(run("merge_run", main))
