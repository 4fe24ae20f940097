"""Reading ``postproc.merge``'s inputs: a tile's extent and CRS from its meta.json, its
footprints from its GeoJSON, each checked; every error names the file."""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from pyproj import CRS
from pyproj.exceptions import CRSError
from shapely.geometry import shape
from shapely.geometry.base import BaseGeometry

from postproc.mergegrid import WGS84, objects


class MergeError(ValueError):
    """A tile GeoJSON or meta that cannot be merged; the message names the file."""


@functools.lru_cache(maxsize=64)
def crs_key(text: str) -> str:
    """One name per CRS: ``EPSG:<code>``, or the WKT when it has no EPSG code."""
    try:
        crs = CRS.from_user_input(text)
    except CRSError as e:
        raise MergeError(f"unknown CRS {text[:60]!r} ({e})") from None
    epsg = crs.to_epsg()
    return f"EPSG:{epsg}" if epsg is not None else crs.to_wkt()


def meta_extent(meta: dict[str, Any], where: str) -> tuple[np.ndarray, int, int]:
    """A tile's affine (2 x 3), width and height from its meta.json; errors name ``where``."""
    t = meta.get("transform")
    if not isinstance(t, list | tuple) or len(t) < 6 or not all(
            isinstance(v, int | float) and math.isfinite(v) for v in t[:6]):
        raise MergeError(f"{where}: meta.json transform {t!r} is not six finite numbers")
    fwd = np.array([t[:3], t[3:6]], dtype=float)
    if abs(np.linalg.det(fwd[:, :2])) == 0:
        raise MergeError(f"{where}: meta.json transform {t!r} is degenerate")
    w, h = meta.get("width"), meta.get("height")
    if not all(isinstance(v, int | float) and not isinstance(v, bool) and v > 0
               and float(v).is_integer() for v in (w, h)):
        raise MergeError(f"{where}: meta.json needs a width and height in pixels "
                         f"(has {w!r} x {h!r})")
    return fwd, int(w), int(h)


def meta_crs(meta: dict[str, Any], where: str) -> str:
    """A tile's CRS key (:func:`crs_key`) from its meta.json; errors name ``where``.

    NOTE: no default: a missing crs read as WGS 84 put a UTM tile's footprints (or a mosaic's
    raster) in the wrong place without a word, and "crs": null became "None"."""
    if not meta.get("crs"):  # (missing, null or "")
        raise MergeError(f'{where}: meta.json has no crs (a tile in lon/lat says '
                         f'"crs": "EPSG:4326")')
    try:
        return crs_key(str(meta["crs"]))
    except MergeError as e:
        raise MergeError(f"{where}: meta.json: {e}") from None


def _feature(feat: Any, key: str) -> tuple[BaseGeometry, dict[str, Any]]:
    if not isinstance(feat, dict) or feat.get("type") != "Feature":
        raise ValueError("not a Feature")
    geom, props = feat.get("geometry"), feat.get("properties")
    if not isinstance(geom, dict) or geom.get("type") not in ("Polygon", "MultiPolygon"):
        raise ValueError("its geometry is not a Polygon or MultiPolygon")
    try:
        # (NaN coordinates: numpy's "invalid value" warning was a second stderr line beside
        # the one-line error they lead to, below)
        with np.errstate(invalid="ignore"):
            g = shape(geom)
    except (ValueError, TypeError, IndexError, KeyError, AttributeError,
            shapely.errors.ShapelyError) as e:
        raise ValueError(f"unreadable coordinates ({e})") from None
    # (each its own words: an empty one was "invalid polygon (Valid Geometry)", GEOS's reason)
    if g.is_empty:
        raise ValueError(f"empty {g.geom_type} (no coordinates)")
    if not np.isfinite(shapely.get_coordinates(g)).all():
        raise ValueError("non-finite coordinates (NaN or Infinity)")
    if not g.is_valid:
        raise ValueError(f"invalid polygon ({shapely.is_valid_reason(g)})")
    if not isinstance(props, dict) or props.get("ImageId") != key:
        found = props.get("ImageId") if isinstance(props, dict) else None
        raise ValueError(f"ImageId {found!r} is not the file's tile {key!r}: each tile's "
                         "footprints are in DIR/<its ImageId>.geojson, and only there")
    c = props.get("Confidence")
    if isinstance(c, bool) or not isinstance(c, int | float) or not math.isfinite(c):
        raise ValueError(f"Confidence {c!r} is not a number")
    return g, props


def read_tile(path: Path, key: str, crs: str) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """A tile's footprints (in its CRS) and their properties; errors name the file."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise MergeError(f"{path}: missing: tile {key} of --pred has no GeoJSON (--geojson must "
                         "be postproc.polygonize's output for this --pred)") from None
    except OSError as e:
        raise MergeError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MergeError(f"{path}: malformed GeoJSON ({e})") from None
    if (not isinstance(doc, dict) or doc.get("type") != "FeatureCollection"
            or not isinstance(doc.get("features"), list)):
        raise MergeError(f"{path}: not a GeoJSON FeatureCollection")
    geoms, props = [], []
    for i, feat in enumerate(doc["features"]):
        try:
            g, p = _feature(feat, key)
        except ValueError as e:
            raise MergeError(f"{path}: feature {i}: {e}") from None
        geoms.append(g)
        props.append(p)
    arr = objects(geoms)
    member = doc.get("crs")
    if member is None:
        # NOTE: RFC 7946 has no crs member: lon/lat is implied. Coordinates outside its ranges
        # are a projected CRS that the writer did not name (meta.json alone might be wrong).
        x0, y0, x1, y1 = shapely.total_bounds(arr) if len(arr) else (0, 0, 0, 0)
        if not (max(abs(x0), abs(x1)) <= 180 and max(abs(y0), abs(y1)) <= 90):
            raise MergeError(f"{path}: no crs member, and its coordinates are not lon/lat "
                             "(RFC 7946's default): its CRS is unknown")
        found = WGS84
    else:
        try:
            found = crs_key(str(member["properties"]["name"]))
        except (TypeError, KeyError, MergeError) as e:
            raise MergeError(f"{path}: unreadable crs member ({e})") from None
    if found != crs:
        raise MergeError(f"{path}: its CRS {found[:60]} is not tile {key}'s, {crs[:60]} "
                         "(meta.json in --pred)")
    return arr, props
