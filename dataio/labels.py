"""Building labels: GeoJSON -> footprints in pixel coordinates -> 3-class masks.

Masks: 0 background, 1 building interior, 2 boundary, the band of ``boundary_width`` pixels on each
side of every outline (SpaceNet utilities' default of 2.5), so touching buildings stay separate: a
pixel is boundary when its centre lies within ``boundary_width`` of an outline, inclusive.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
import shapely.errors
from affine import Affine
from pyproj import CRS
from pyproj.exceptions import ProjError
from rasterio.features import rasterize
from shapely.geometry import Polygon, box, shape
from shapely.geometry.base import BaseGeometry

from dataio.band import band_mask
from dataio.classes import BOUNDARY, BUILDING
from dataio.geo import geojson_crs, reproject_geometry, to_pixel

DEFAULT_BOUNDARY_WIDTH = 2.5
# NOTE: labels in lon/lat (SpaceNet's, RFC 7946) reach pixels with ~1e-8 px of float noise, so a
# building whose corners lie on one line is a valid sliver of area > 0 there, not the invalid
# polygon of no area it is in exact coordinates. A polygon whose mean width (2 * area /
# perimeter) is under this is a line: ~100x the noise, ~1e5x below the smallest real shed.
NO_AREA_WIDTH_PX = 1e-6


class LabelError(ValueError):
    """A label file that cannot be used at all; the message names the file and the problem."""


@dataclass
class Footprints:
    """A tile's building footprints in pixel coordinates, with notes on what was repaired."""

    polygons: list[Polygon] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # repairs and ignored features, per feature


def _has_area(p: Polygon) -> bool:
    """Whether ``p`` is more than a line (or a point) up to float error: see NO_AREA_WIDTH_PX."""
    return 2 * p.area > NO_AREA_WIDTH_PX * p.length


def _polygon_parts(geom: BaseGeometry) -> list[Polygon]:
    """The polygons inside any geometry (make_valid may return a collection)."""
    if isinstance(geom, Polygon):
        return [] if geom.is_empty else [geom]
    return [p for g in getattr(geom, "geoms", []) for p in _polygon_parts(g)]


@dataclass(frozen=True)
class _Grid:
    """The image that footprints are mapped onto: its CRS, geotransform and outline in pixels."""

    crs: CRS
    transform: Affine
    tile: Polygon


def read_footprints(path: Path, image_crs: CRS, transform: Affine, width: int,
                    height: int) -> Footprints:
    """Read a buildings GeoJSON and return its footprints in the image's pixel grid.

    Labels in any CRS are reprojected to the image's (RFC 7946 lon/lat by default, or the legacy
    ``crs`` member). Invalid (e.g. self-intersecting) polygons are repaired with ``make_valid`` and
    noted; polygons are clipped to the tile. A missing or malformed file, a feature with
    non-finite coordinates, or footprints that all lie off the image (a wrong CRS) raise
    :class:`LabelError`; a file with no footprint at all is a valid empty tile.
    """
    features, src_crs = _read_collection(path)
    grid = _Grid(image_crs, transform, box(0, 0, width, height))
    out = Footprints()
    footprints = overlapping = 0
    # NOTE: non-finite coordinates are checked and reported per feature; numpy's warnings about
    # them (in shapely and the reprojection) would only add noise to the output.
    with np.errstate(invalid="ignore", over="ignore"):
        for k, feat in enumerate(features):
            geom = _footprint(path, k, feat, out.notes)
            if geom is None:
                continue
            try:
                parts, overlaps = _clip_to_tile(path, k, geom, src_crs, grid, out.notes)
            except shapely.errors.GEOSException as e:
                raise LabelError(f"{path}: feature {k}: geometry cannot be processed "
                                 f"({e})") from None
            except ProjError as e:  # e.g. a local engineering CRS, or another planet's
                raise LabelError(f"{path}: cannot transform its CRS ({src_crs.to_string()}) to "
                                 f"the image's ({grid.crs.to_string()}): {e}") from None
            footprints += 1
            overlapping += overlaps
            out.polygons += parts
    if footprints and not overlapping:
        # NOTE: typically coordinates in lon/lat under a projected ``crs`` member (or the
        # reverse); an empty mask would silently teach the model that buildings are background.
        raise LabelError(f"{path}: no footprint overlaps the image (wrong CRS in the GeoJSON?); "
                         f"all {footprints} lie outside it")
    return out


def _read_collection(path: Path) -> tuple[list[Any], CRS]:
    """The features of a GeoJSON FeatureCollection and the CRS of their coordinates."""
    try:
        # NOTE: utf-8-sig: a label file saved by a Windows editor (Notepad) starts with a byte-
        # order mark, which json refused, so its tile was skipped; RFC 7946 lets readers ignore it
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise LabelError(f"{path}: label file missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LabelError(f"{path}: cannot read label file ({e})") from None
    try:
        doc = json.loads(text)
    except (json.JSONDecodeError, RecursionError) as e:  # (nesting deeper than Python recurses)
        raise LabelError(f"{path}: malformed GeoJSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("type") != "FeatureCollection":
        raise LabelError(f"{path}: malformed GeoJSON (not a FeatureCollection)")
    features = doc.get("features")
    if not isinstance(features, list):
        raise LabelError(f"{path}: malformed GeoJSON ('features' is not a list)")
    try:
        src_crs = geojson_crs(doc)
    except Exception as e:  # pyproj raises several types for unknown names
        raise LabelError(f"{path}: unknown CRS in the 'crs' member ({e})") from None
    return features, src_crs


def _footprint(path: Path, k: int, feat: Any, notes: list[str]) -> BaseGeometry | None:
    """Feature ``k``'s (Multi)Polygon in the label CRS; None (noted) if it is not a footprint."""
    gj = feat.get("geometry") if isinstance(feat, dict) else None
    if gj is None:
        notes.append(f"feature {k}: no geometry, ignored")
        return None
    try:
        geom = shapely.force_2d(shape(gj))
    except Exception as e:
        raise LabelError(f"{path}: feature {k} has a malformed geometry ({e})") from None
    if geom.geom_type not in ("Polygon", "MultiPolygon"):
        notes.append(f"feature {k}: {geom.geom_type} is not a footprint, ignored")
        return None
    # NOTE: Python's json reads NaN and Infinity literals; GEOS fails on them much later.
    if not _finite(geom):
        raise LabelError(f"{path}: feature {k} has non-finite coordinates (NaN or Infinity)")
    if geom.is_empty:  # ("coordinates": []: no building, but said, as a null geometry is)
        notes.append(f"feature {k}: empty {geom.geom_type} (no coordinates), ignored")
        return None
    return geom


def _clip_to_tile(path: Path, k: int, geom: BaseGeometry, src_crs: CRS, grid: _Grid,
                  notes: list[str]) -> tuple[list[Polygon], bool]:
    """Feature ``k``'s polygons inside the tile in pixels, and whether it touches the tile."""
    pix = to_pixel(reproject_geometry(geom, src_crs, grid.crs), grid.transform)
    if not _finite(pix):  # e.g. 1e300 m in UTM: no longitude, or far beyond the pixel range
        raise LabelError(f"{path}: feature {k} has coordinates that do not map to finite pixel "
                         "positions (wrong CRS, or out of range?)")
    if not pix.is_valid:
        reason = shapely.is_valid_reason(pix)
        pix = shapely.make_valid(pix)
        if any(_has_area(p) for p in _polygon_parts(pix)):
            notes.append(f"feature {k}: invalid polygon ({reason}), repaired with make_valid")
        else:
            # NOTE: a polygon with no area (its corners on one line, a ring of repeated points)
            # repairs to lines or points, and the area filter below dropped it: no building in
            # the mask or truth.csv, while the manifest listed it as "repaired".
            notes.append(f"feature {k}: polygon with no area ({reason}), ignored")
    elif not any(_has_area(p) for p in _polygon_parts(pix)):
        notes.append(f"feature {k}: polygon with no area (its corners on one line, up to float "
                     "error), ignored")
    clipped = pix.intersection(grid.tile)  # (empty exactly when it does not touch the tile)
    parts = [shapely.normalize(p) for p in _polygon_parts(clipped) if _has_area(p)]
    return parts, not clipped.is_empty


def _finite(geom: BaseGeometry) -> bool:
    return bool(np.isfinite(shapely.get_coordinates(geom)).all())


def rasterize_footprints(polygons: list[Polygon], shape_hw: tuple[int, int]) -> np.ndarray:
    """uint8 raster with 1 where a pixel centre lies in a footprint (before the band is carved)."""
    if not polygons:
        return np.zeros(shape_hw, np.uint8)
    return rasterize(((p, BUILDING) for p in polygons), out_shape=shape_hw, fill=0, dtype="uint8")


def outlines(polygons: list[Polygon], shape_hw: tuple[int, int]) -> list[BaseGeometry]:
    """The real outlines of the footprints: their boundaries minus what lies on the tile edge.

    NOTE: a building cut by the tile edge has no wall there; banding the cut would leave slivers
    along the edge with no interior, which then cannot be told from background.
    """
    h, w = shape_hw
    edge = box(0, 0, w, h).exterior.buffer(1e-6)
    return [p.boundary.difference(edge) for p in polygons]


def make_mask(polygons: list[Polygon], shape_hw: tuple[int, int],
              boundary_width: float = DEFAULT_BOUNDARY_WIDTH) -> np.ndarray:
    """The 3-class mask: footprints, then the band of ``boundary_width`` px on both sides of each
    outline (not along the tile edge, see :func:`outlines`): every pixel whose centre lies within
    ``boundary_width`` of an outline, inclusive (:func:`dataio.band.band_mask`)."""
    mask = rasterize_footprints(polygons, shape_hw)
    if polygons and boundary_width > 0:
        mask[band_mask(outlines(polygons, shape_hw), shape_hw, boundary_width)] = BOUNDARY
    return mask
