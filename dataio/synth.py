"""Write a synthetic AOI in the exact SpaceNet-2 layout (as downloaded for AOI_2_Vegas_Train).

    python -m dataio.synth --out RAW --tiles N --seed S [--overwrite] [--mul]

gives ``RAW/RGB-PanSharpen/RGB-PanSharpen_<AOI>_img<N>.tif`` (georeferenced, 3-band uint16 with
11-bit values), ``RAW/geojson/buildings/buildings_<AOI>_img<N>.geojson`` (one FeatureCollection per
tile, lon/lat) and ``RAW/summaryData/<AOI>_Train_Building_Solutions.csv``. Tiles are laid out on a
grid like a real AOI. The same seed gives the same bytes whatever the worker count.

With ``--mul`` also ``RAW/MUL-PanSharpen/MUL-PanSharpen_<AOI>_img<N>.tif``: 8 bands on the same
grid, derived from the RGB ones (``dataio.render.mul_from_rgb``), for ``prepare --product
MUL-PanSharpen``. NOTE: behind a flag: 2.7 times the RGB tile's bytes (6.8 MB a 650 px tile
against 2.5), which most tests, and the demo without its ``--product MUL-PanSharpen``, never
read.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import glob
import json
import math
import sys
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from pyproj import CRS, Transformer
from pyproj.exceptions import CRSError
from shapely.geometry import mapping
from tqdm import tqdm

from dataio.atomic import (
    TMP_SUFFIX,
    atomic_open,
    atomic_write_text,
    check_writable,
    fsync_dir,
    fsync_file,
)
from dataio.geo import gdal_env, reproject_geometry, to_geo
from dataio.render import mul_from_rgb, render
from dataio.scene import make_scene
from dataio.spacenet import (
    EMPTY,
    IMAGE_DIR,
    IMAGE_PREFIX,
    INCOMPLETE_MARKER,
    LABEL_DIR,
    TRUTH_HEADER,
    image_prefix,
    wkt_xyz,
)
from postproc.pools import (
    close_pool,
    ignore_further_sigint,
    ignore_sigint,
    starting_workers,
    stop_code,
    stop_signals,
    stopped_by,
)

MUL_PRODUCT = "MUL-PanSharpen"
METRES_PER_DEGREE = 111_320.0  # at the equator; SpaceNet uses square pixels in degrees
LEGACY_CRS84 = {"type": "name", "properties": {"name": "urn:ogc:def:crs:OGC:1.3:CRS84"}}


@dataclass
class SynthConfig:
    """What to generate. Defaults mimic SpaceNet-2 Vegas (650 px at ~0.3 m, EPSG:4326)."""

    out: Path
    tiles: int = 20
    seed: int = 0
    aoi: str = "AOI_2_Vegas"
    size: int = 650
    gsd_m: float = 0.3
    crs: str = "EPSG:4326"
    label_crs: str = "OGC:CRS84"  # GeoJSON in lon/lat, as SpaceNet ships it
    origin_lon: float = -115.30
    origin_lat: float = 36.30
    workers: int = 1
    overwrite: bool = False  # replace the tiles of an AOI already in ``out``
    mul: bool = False  # also write MUL-PanSharpen/ (8 bands derived from the RGB ones)

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.tiles < 1:
            raise ValueError(f"--tiles must be >= 1, got {self.tiles}")
        if self.seed < 0:  # numpy's generators take no negative seed
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.size < 32:
            raise ValueError(f"--size must be >= 32 px, got {self.size}")
        if not (math.isfinite(self.gsd_m) and self.gsd_m > 0):  # else a degenerate geotransform
            raise ValueError(f"--gsd must be a finite number of metres per pixel > 0, "
                             f"got {self.gsd_m}")
        if not self.aoi or any(c in self.aoi for c in "./ "):
            raise ValueError(f"--aoi {self.aoi!r} must be a plain name like AOI_2_Vegas")
        for flag, value in (("--crs", self.crs), ("--label-crs", self.label_crs)):
            try:
                CRS.from_user_input(value)
            except CRSError as e:
                raise ValueError(f"{flag} {value!r}: not a CRS that PROJ knows ({e})") from None


def image_id(cfg: SynthConfig, index: int) -> str:
    return f"{cfg.aoi}_img{index + 1}"


def tile_transform(cfg: SynthConfig, index: int) -> Affine:
    """Affine of tile ``index`` on a square grid of tiles starting at the origin."""
    cols = math.ceil(math.sqrt(cfg.tiles))
    row, col = divmod(index, cols)
    crs = CRS.from_user_input(cfg.crs)
    if crs.is_geographic:
        px = cfg.gsd_m / METRES_PER_DEGREE
        x0, y0 = cfg.origin_lon, cfg.origin_lat
    else:
        px = cfg.gsd_m
        tr = Transformer.from_crs("OGC:CRS84", crs, always_xy=True)
        x0, y0 = tr.transform(cfg.origin_lon, cfg.origin_lat)
    return Affine(px, 0.0, x0 + col * cfg.size * px, 0.0, -px, y0 - row * cfg.size * px)


def make_tile(cfg: SynthConfig, index: int) -> dict[str, Any]:
    """Generate, render and write one tile; returns its rows for the solutions CSV."""
    rng = np.random.default_rng([cfg.seed, index])
    scene = make_scene(rng, (cfg.size, cfg.size))
    pixels = render(scene, rng)
    transform = tile_transform(cfg, index)
    iid = image_id(cfg, index)
    _write_tif(cfg, cfg.out / IMAGE_DIR / f"{IMAGE_PREFIX}{iid}.tif", pixels, transform)
    if cfg.mul:
        _write_tif(cfg, cfg.out / MUL_PRODUCT / f"{image_prefix(MUL_PRODUCT)}{iid}.tif",
                   mul_from_rgb(pixels), transform)

    img_crs = CRS.from_user_input(cfg.crs)
    lab_crs = CRS.from_user_input(cfg.label_crs)
    features, rows = [], []
    for k, (poly, partial) in enumerate(zip(scene.buildings, scene.partial, strict=True)):
        geo = to_geo(poly, transform)
        lab = reproject_geometry(geo, img_crs, lab_crs)
        gj = mapping(lab)
        gj["coordinates"] = [[[x, y, 0.0] for x, y in ring] for ring in gj["coordinates"]]
        features.append({"type": "Feature", "geometry": gj,
                         "properties": {"OBJECTID": k + 1, "building": "yes",
                                        "partialBuilding": int(partial)}})
        rows.append([iid, k + 1, wkt_xyz(poly, 2), wkt_xyz(geo, 9 if img_crs.is_geographic else 3)])
    if not rows:
        rows.append([iid, -1, EMPTY, EMPTY])
    collection: dict[str, Any] = {"type": "FeatureCollection", "features": features}
    if lab_crs != CRS.from_user_input("OGC:CRS84"):
        collection["crs"] = {"type": "name", "properties": {"name": lab_crs.to_string()}}
    else:
        collection["crs"] = LEGACY_CRS84
    gj_path = cfg.out / LABEL_DIR / f"buildings_{iid}.geojson"
    atomic_write_text(gj_path, json.dumps(collection))
    return {"image_id": iid, "rows": rows, "kind": scene.kind}


def _write_tif(cfg: SynthConfig, tif: Path, pixels: np.ndarray, transform: Affine) -> None:
    """``pixels`` (bands, H, W) as an uncompressed GeoTIFF at ``tif``, under a temporary name."""
    profile = {
        "driver": "GTiff", "width": cfg.size, "height": cfg.size, "count": pixels.shape[0],
        "dtype": "uint16", "crs": cfg.crs, "transform": transform, "tiled": False,
        "interleave": "pixel",
    }
    tmp = tif.with_name(f".{tif.name}.tmp")
    try:
        with gdal_env(), rasterio.open(tmp, "w", **profile) as dst:
            dst.write(pixels)
        fsync_file(tmp)
        tmp.replace(tif)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _tiles(cfg: SynthConfig) -> Iterator[dict[str, Any]]:
    if cfg.workers <= 1:
        for i in range(cfg.tiles):
            yield make_tile(cfg, i)
        return
    # NOTE: Ctrl-C is the parent's (postproc.pools): a worker that took it failed its chunk, and
    # the pool's exit then made every chunk still queued, the rest of the AOI, before it let go.
    pool = ProcessPoolExecutor(cfg.workers, initializer=ignore_sigint)
    try:
        with starting_workers():  # (map submits every chunk, and starts the workers)
            tiles = pool.map(make_tile, [cfg] * cfg.tiles, range(cfg.tiles), chunksize=4)
        yield from tiles
    finally:  # (queued chunks dropped, running ones finish)
        close_pool(pool)


def _existing_aoi(out: Path) -> list[Path]:
    """The files of an AOI in ``out`` that synth writes (images, labels, solutions CSVs)."""
    return [*(out / IMAGE_DIR).glob(f"{IMAGE_PREFIX}*.tif"),
            *(out / MUL_PRODUCT).glob(f"{image_prefix(MUL_PRODUCT)}*.tif"),
            *(out / LABEL_DIR).glob("buildings_*.geojson"),
            *(out / "summaryData").glob("*_Train_Building_Solutions.csv")]


def _stale_temps(out: Path) -> list[Path]:
    """The temporary files of synth's outputs that a killed synth left (a SIGKILL skips the
    clean-up): ``_write_tif``'s ``.<name>.tmp`` and ``atomic_open``'s ``.<name>.<random>.tmp``.

    NOTE: a rerun replaces only the temporaries of the tiles it writes again: one with fewer
    tiles (or without --mul) kept the rest, hidden files that a fresh synth does not make."""
    names = ((IMAGE_DIR, IMAGE_PREFIX), (MUL_PRODUCT, image_prefix(MUL_PRODUCT)),
             (LABEL_DIR, "buildings_"), ("summaryData", ""))
    return [p for sub, prefix in names
            for p in (out / sub).glob(f".{glob.escape(prefix)}*{TMP_SUFFIX}") if p.is_file()]


def write_aoi(cfg: SynthConfig, progress: bool = False) -> Path:
    """Write the whole AOI under ``cfg.out``; returns the solutions CSV path.

    An AOI already there is refused, or with ``overwrite`` removed first: new tiles mixed into
    old ones would make an AOI whose images and solutions CSV disagree.
    """
    marker = cfg.out / INCOMPLETE_MARKER
    # (an --out that is a file, or under one, was "[Errno 17] File exists: 'OUT'", no flag)
    check_writable(marker, "--out", given=cfg.out)
    old = _existing_aoi(cfg.out)
    if (old or marker.exists()) and not cfg.overwrite:
        what = "an interrupted synth's AOI" if marker.exists() else "an AOI"
        raise ValueError(f"--out {cfg.out}: already holds {what} ({len(old)} files); pass "
                         "--overwrite to replace it")
    # NOTE: tiles get their final names one by one, so the marker says "incomplete" until the
    # solutions CSV is in place: dataio.prepare refuses an AOI that has it (a killed synth).
    atomic_write_text(marker, "dataio.synth is writing this AOI; rerun it with --overwrite if "
                      "it was interrupted\n")
    for path in [*old, *_stale_temps(cfg.out)]:
        path.unlink()
    # (without --mul, an emptied MUL-PanSharpen/ made the AOI seem to hold that product)
    mul_dir = cfg.out / MUL_PRODUCT
    if not cfg.mul and mul_dir.is_dir() and not any(mul_dir.iterdir()):
        mul_dir.rmdir()
    subs = [Path(IMAGE_DIR), LABEL_DIR, Path("summaryData")] + [Path(MUL_PRODUCT)] * cfg.mul
    for sub in subs:
        (cfg.out / sub).mkdir(parents=True, exist_ok=True)
    csv_path = cfg.out / "summaryData" / f"{cfg.aoi}_Train_Building_Solutions.csv"
    with atomic_open(csv_path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(TRUTH_HEADER)
        # (both closed however it ends: a Ctrl-C while rows were written left the bar open on
        # the terminal's line, and the pool running, until garbage collection)
        with contextlib.closing(_tiles(cfg)) as tiles, tqdm(
                tiles, total=cfg.tiles, desc="synth", unit="tile", disable=not progress) as bar:
            for tile in bar:
                writer.writerows(tile["rows"])
    # NOTE: the tiles' renames are durable only once their directories are synced (the
    # GeoTIFFs' were not: _write_tif syncs the file, not its directory); the marker goes after
    # them, or a power cut could leave an AOI without its mark but with tiles missing.
    for sub in subs:
        fsync_dir(cfg.out / sub)
    marker.unlink()
    fsync_dir(cfg.out)
    return csv_path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dataio.synth", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="AOI directory to create")
    p.add_argument("--tiles", type=int, default=20, help="tiles to write (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="scene seed (default %(default)s)")
    p.add_argument("--aoi", default="AOI_2_Vegas",
                   help="AOI name used in file names and ImageIds (default %(default)s)")
    p.add_argument("--size", type=int, default=650,
                   help="tile width and height in pixels (default %(default)s)")
    p.add_argument("--gsd", type=float, default=0.3, dest="gsd_m",
                   help="metres per pixel (default %(default)s)")
    p.add_argument("--crs", default="EPSG:4326",
                   help="raster CRS (default %(default)s; e.g. EPSG:32611 for UTM)")
    p.add_argument("--label-crs", default="OGC:CRS84",
                   help="GeoJSON CRS (legacy crs member; default %(default)s)")
    p.add_argument("--workers", type=int, default=1,
                   help="worker processes (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace an AOI already in --out")
    p.add_argument("--mul", action="store_true",
                   help=f"also write {MUL_PRODUCT}/ beside {IMAGE_DIR}/: 8 bands (coastal, blue, "
                   "green, yellow, red, red edge, NIR1, NIR2) derived from the RGB ones, for "
                   f"dataio.prepare --product {MUL_PRODUCT}")
    args = p.parse_args(argv)
    try:
        # NOTE: the first Ctrl-C (or SIGTERM) sets both aside (postproc.pools), so a second one
        # cannot cut the pool's shutdown short
        with stop_signals():
            cfg = SynthConfig(**vars(args))
            path = write_aoi(cfg, progress=True)
    except (ValueError, OSError) as e:
        print(f"dataio.synth: error: {e}", file=sys.stderr)
        return 2
    except MemoryError:  # (a tile is drawn whole, in float32: a typo'd --size was a traceback)
        left = (f"; {args.out} holds an incomplete AOI ({INCOMPLETE_MARKER}): rerun with "
                "--overwrite" if (args.out / INCOMPLETE_MARKER).exists() else "")
        print(f"dataio.synth: error: --size {args.size}: not enough memory to draw one "
              f"{args.size} x {args.size} px tile; choose a smaller --size{left}",
              file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        ignore_further_sigint()  # (a further Ctrl-C in the interpreter's exit: a traceback)
        if (args.out / INCOMPLETE_MARKER).exists():  # (prepare refuses the AOI while it is there)
            print(f"dataio.synth: {stopped_by()}; {args.out} holds an incomplete AOI "
                  f"({INCOMPLETE_MARKER}): rerun with --overwrite", file=sys.stderr)
        else:
            print(f"dataio.synth: {stopped_by()}; {args.out} is left as it was", file=sys.stderr)
        return stop_code()
    print(f"wrote {cfg.tiles} tiles to {cfg.out} ({path.name})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
