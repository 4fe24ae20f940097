"""Geospatial helpers shared by synth and prepare: GDAL defaults, CRS parsing, pixel<->geo.

GDAL environment defaults live here and nowhere else (``gdal_env``).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import rasterio
import shapely
from affine import Affine
from pyproj import CRS, Transformer
from shapely.geometry.base import BaseGeometry

# NOTE: one thread per GDAL call; parallelism comes from our own process pool, and nested
# thread pools on 2 cores only add contention. Disable directory scans on open (SpaceNet folders
# hold thousands of tiles and GDAL would list them all looking for sidecar files).
GDAL_DEFAULTS: dict[str, Any] = {
    "GDAL_NUM_THREADS": 1,
    "GDAL_DISABLE_READDIR_ON_OPEN": "EMPTY_DIR",
    "GDAL_CACHEMAX": 64,
    "CPL_LOG_ERRORS": "OFF",
}
# NOTE: EMPTY_DIR takes the folder for empty, so an external mask (``<image>.msk``, a sidecar)
# is never found; where the mask matters (prepare --chip-size leaves out chips all nodata) GDAL
# looks for sidecars by name, still without listing the folder, and with PAM off, so that an
# ``.aux.xml`` changes nothing else (nodata, georeferencing) against the other reads.
SIDECAR_MASKS: dict[str, Any] = {"GDAL_DISABLE_READDIR_ON_OPEN": "TRUE", "GDAL_PAM_ENABLED": "NO"}

# GeoJSON (RFC 7946) coordinates are lon/lat WGS84 unless a legacy ``crs`` member says otherwise.
GEOJSON_DEFAULT_CRS = CRS.from_user_input("OGC:CRS84")


def gdal_env(sidecar_masks: bool = False) -> rasterio.Env:
    """The rasterio/GDAL environment every raster read and write runs under; with
    ``sidecar_masks``, one that finds an image's external mask too (see SIDECAR_MASKS)."""
    return rasterio.Env(**{**GDAL_DEFAULTS, **(SIDECAR_MASKS if sidecar_masks else {})})


def read_error(e: BaseException) -> str:
    """What a failed raster open or read says to a user: GDAL's own message too.

    NOTE: rasterio raises ``RasterioIOError("Read failed. See previous exception for
    details.")`` for a damaged strip or tile, with GDAL's message (the band and the block that
    failed) only as its cause, which a skip reason in the manifest would lose.
    """
    msg = str(e)
    cause = e.__cause__
    if cause is not None and str(cause) and str(cause) not in msg:
        msg = f"{msg.removesuffix(' See previous exception for details.').rstrip('.')}: {cause}"
    return msg


def geojson_crs(collection: dict[str, Any]) -> CRS:
    """The CRS of a GeoJSON object: its legacy ``crs`` member if present, else CRS84 (lon/lat)."""
    member = collection.get("crs")
    if not member:
        return GEOJSON_DEFAULT_CRS
    props = member.get("properties", {}) if isinstance(member, dict) else {}
    name = props.get("name") if isinstance(props, dict) else None
    if not name:
        raise ValueError(f"unsupported legacy 'crs' member {member!r} (expected a named CRS)")
    return CRS.from_user_input(name)


def reproject_geometry(geom: BaseGeometry, src: CRS, dst: CRS) -> BaseGeometry:
    """Transform ``geom`` from ``src`` to ``dst`` (x=east/lon, y=north/lat axis order)."""
    if src == dst or src.equals(dst, ignore_axis_order=True):
        return geom
    tr = Transformer.from_crs(src, dst, always_xy=True)
    return shapely.transform(geom, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))


def is_invertible(transform: Affine) -> bool:
    """Whether ``transform`` maps pixels to the CRS one-to-one with finite numbers both ways.

    NOTE: a GeoTIFF may carry a pixel size of 0 (or NaN); inverting it raises, and a determinant
    near the float limit gives an inverse of infinities, which GEOS rejects later.
    """
    if not all(math.isfinite(v) for v in transform[:6]) or transform.is_degenerate:
        return False
    return all(math.isfinite(v) for v in (~transform)[:6])


def to_pixel(geom: BaseGeometry, transform: Affine) -> BaseGeometry:
    """Map a geometry in the raster's CRS to pixel coordinates (x=column, y=row)."""
    inv = ~transform
    return shapely.transform(geom, lambda xy: _apply(inv, xy))


def to_geo(geom: BaseGeometry, transform: Affine) -> BaseGeometry:
    """Map a geometry in pixel coordinates to the raster's CRS."""
    return shapely.transform(geom, lambda xy: _apply(transform, xy))


def _apply(t: Affine, xy: np.ndarray) -> np.ndarray:
    x, y = xy[:, 0], xy[:, 1]
    return np.column_stack((t.a * x + t.b * y + t.c, t.d * x + t.e * y + t.f))


def crs_to_string(crs: CRS | rasterio.crs.CRS) -> str:
    """A compact, round-trippable CRS string: ``EPSG:NNNN`` where one exists, else WKT."""
    crs = CRS.from_user_input(crs.to_wkt() if hasattr(crs, "to_wkt") else crs)
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg is not None else crs.to_wkt()
