"""GeoJSON per tile: footprints in the tile's CRS via its affine transform.

EPSG:4326 tiles follow RFC 7946 (lon/lat, no ``crs`` member); any other CRS is named in a legacy
``crs`` member (``urn:ogc:def:crs:EPSG::<code>``, or the WKT when there is no EPSG code), which
GDAL and ``dataio`` read. Exterior rings are counter-clockwise in map coordinates. A tile whose
meta.json has no ``crs`` is refused rather than guessed.
"""

from __future__ import annotations

import errno
import functools
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from pyproj import CRS
from pyproj.exceptions import CRSError
from shapely.geometry import mapping
from shapely.geometry.base import BaseGeometry

from dataio.atomic import NAME_MAX, TMP_NAME_EXTRA, WriteError, atomic_write_text
from postproc.predio import PredError, check_key

GEOJSON_SUFFIX = ".geojson"
# The longest ImageId (in bytes) whose GeoJSON can be written: <ImageId>.geojson's temporary
# name must fit a file name. dataio.prepare skips a tile beyond it, before any work.
MAX_IMAGE_ID_BYTES = NAME_MAX - TMP_NAME_EXTRA - len(GEOJSON_SUFFIX)


@functools.lru_cache(maxsize=64)
def crs_member(crs_text: str) -> dict[str, Any] | None:
    """The legacy ``crs`` member for a CRS (None for WGS 84 lon/lat, RFC 7946's default)."""
    try:
        crs = CRS.from_user_input(crs_text)
    except CRSError as e:
        raise PredError(f"unknown CRS {crs_text[:60]!r} in meta.json ({e})") from None
    epsg = crs.to_epsg()
    if epsg == 4326:
        return None
    name = f"urn:ogc:def:crs:EPSG::{epsg}" if epsg is not None else crs.to_wkt()
    return {"type": "name", "properties": {"name": name}}


def to_map(polys: Sequence[BaseGeometry], transform: Sequence[float]) -> np.ndarray:
    """Pixel-coordinate polygons -> map coordinates with a rasterio Affine (a, b, c, d, e, f)."""
    if not isinstance(transform, list | tuple) or len(transform) < 6 or not all(
            isinstance(v, int | float) and math.isfinite(v) for v in transform[:6]):
        raise PredError(f"meta.json transform {transform!r} is not six finite numbers")
    a, b, c, d, e, f = (float(v) for v in transform[:6])
    m = np.array([[a, b], [d, e]])
    # NOTE: a singular matrix (all zeros, or rows in proportion) maps every footprint onto one
    # point or line: GeoJSON of nothing, written as if it were the tile's (postproc.merge and
    # postproc.mosaic refuse such a tile too; dataio.prepare skips its image)
    if np.linalg.det(m) == 0:
        raise PredError(f"meta.json transform {transform!r} is degenerate (it maps the tile "
                        "onto a point or a line)")
    arr = np.empty(len(polys), dtype=object)
    arr[:] = list(polys)
    out = shapely.transform(arr, lambda xy: xy @ m.T + (c, f))
    return shapely.orient_polygons(out, exterior_cw=False)


def tile_feature_collection(image_id: str, polys: Sequence[BaseGeometry],
                            confidences: Sequence[float], meta: dict[str, Any]) -> dict[str, Any]:
    """A FeatureCollection of one tile's footprints (BuildingId from 1, most confident first)."""
    if "transform" not in meta:
        raise PredError("meta.json has no transform (needed for --geojson)")
    geoms = to_map(polys, meta["transform"])
    feats = [{"type": "Feature", "geometry": mapping(g),
              "properties": {"ImageId": image_id, "BuildingId": k, "Confidence": round(c, 6)}}
             for k, (g, c) in enumerate(zip(geoms, confidences, strict=True), start=1)]
    doc: dict[str, Any] = {"type": "FeatureCollection", "features": feats}
    # NOTE: no default: a shard made by hand or by another tool without a crs was written as
    # lon/lat (RFC 7946, no crs member) whatever its transform, e.g. UTM metres read as degrees
    # by every GIS; dataio.prepare always writes one, so only foreign shards lack it.
    if not meta.get("crs"):  # (missing, null or "", as postproc.mosaic checks it)
        raise PredError('meta.json has no crs (needed for --geojson; a tile in lon/lat says '
                        '"crs": "EPSG:4326")')
    member = crs_member(str(meta["crs"]))
    if member is not None:
        doc["crs"] = member
    return doc


def write_tile_geojson(out_dir: Path, image_id: str, polys: Sequence[BaseGeometry],
                       confidences: Sequence[float], meta: dict[str, Any]) -> Path:
    """Write ``out_dir/<ImageId>.geojson`` atomically (the key is validated: no path tricks).

    ``postproc.polygonize --geojson DIR`` passes ``DIR/.partial`` and publishes the directory
    whole once the CSV is committed (``postproc.runner``), so one file's atomicity is not all
    a reader of DIR relies on.
    """
    path = Path(out_dir) / f"{check_key(image_id)}{GEOJSON_SUFFIX}"
    doc = tile_feature_collection(image_id, polys, confidences, meta)
    # NOTE: no sweep: pool workers write here at once, and a duplicate ImageId across shards (an
    # input error the runner names) would let one delete the other's live temp file; the
    # staging directory is emptied before each run anyway. No directory is made: the stage
    # exists (rank 0 makes it before any rank writes) unless a stopped run's rank 0 has
    # removed it, while another rank's pool still finished its last chunk; that write made
    # DIR/.partial (and a DIR the run had made) again, left behind with the chunk's tiles.
    try:
        atomic_write_text(path, json.dumps(doc, separators=(",", ":")) + "\n", sweep=False,
                          make_dirs=False)
    except OSError as e:  # (a shard's error, then: every rank stops with it, not only this one)
        if e.errno == errno.ENAMETOOLONG:  # (the input's: an ImageId over MAX_IMAGE_ID_BYTES)
            raise PredError(f"cannot write {path} ({e})") from None
        # (a full disk, EIO: the run's failure, exit 1; the directory was checked up front)
        raise WriteError(f"cannot write {path} ({e})") from None
    return path
