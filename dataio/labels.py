"""Building labels: GeoJSON -> footprints in pixel coordinates -> 3-class masks.

Masks: 0 background, 1 building interior, 2 boundary, the band of ``boundary_width`` pixels on each
side of every outline (SpaceNet utilities' default of 2.5), so touching buildings stay separate.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import shapely
from affine import Affine
from pyproj import CRS
from rasterio.features import rasterize
from shapely.geometry import Polygon, box, shape
from shapely.geometry.base import BaseGeometry

from dataio.geo import geojson_crs, reproject_geometry, to_pixel

BACKGROUND, BUILDING, BOUNDARY = 0, 1, 2
NUM_CLASSES = 3
DEFAULT_BOUNDARY_WIDTH = 2.5


class LabelError(ValueError):
    """A label file that cannot be used at all; the message names the file and the problem."""


@dataclass
class Footprints:
    """A tile's building footprints in pixel coordinates, with notes on what was repaired."""

    polygons: list[Polygon] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # repairs and ignored features, per feature


def _polygon_parts(geom: BaseGeometry) -> list[Polygon]:
    """The polygons inside any geometry (make_valid may return a collection)."""
    if isinstance(geom, Polygon):
        return [] if geom.is_empty else [geom]
    return [p for g in getattr(geom, "geoms", []) for p in _polygon_parts(g)]


def read_footprints(path: Path, image_crs: CRS, transform: Affine, width: int,
                    height: int) -> Footprints:
    """Read a buildings GeoJSON and return its footprints in the image's pixel grid.

    Labels in any CRS are reprojected to the image's (RFC 7946 lon/lat by default, or the legacy
    ``crs`` member). Invalid (e.g. self-intersecting) polygons are repaired with ``make_valid`` and
    noted; polygons are clipped to the tile. A missing or malformed file raises :class:`LabelError`.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LabelError(f"{path}: label file missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LabelError(f"{path}: cannot read label file ({e})") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
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

    out = Footprints()
    tile = box(0, 0, width, height)
    for k, feat in enumerate(features):
        gj = feat.get("geometry") if isinstance(feat, dict) else None
        if gj is None:
            out.notes.append(f"feature {k}: no geometry, ignored")
            continue
        try:
            geom = shapely.force_2d(shape(gj))
        except Exception as e:
            raise LabelError(f"{path}: feature {k} has a malformed geometry ({e})") from None
        if geom.geom_type not in ("Polygon", "MultiPolygon"):
            out.notes.append(f"feature {k}: {geom.geom_type} is not a footprint, ignored")
            continue
        pix = to_pixel(reproject_geometry(geom, src_crs, image_crs), transform)
        if not pix.is_valid:
            reason = shapely.is_valid_reason(pix)
            pix = shapely.make_valid(pix)
            out.notes.append(f"feature {k}: invalid polygon ({reason}), repaired with make_valid")
        for part in _polygon_parts(pix.intersection(tile)):
            if part.area > 0:
                out.polygons.append(shapely.normalize(part))
    return out


def rasterize_footprints(polygons: list[Polygon], shape_hw: tuple[int, int]) -> np.ndarray:
    """uint8 raster with 1 where a pixel centre lies in a footprint (before the band is carved)."""
    if not polygons:
        return np.zeros(shape_hw, np.uint8)
    return rasterize(((p, 1) for p in polygons), out_shape=shape_hw, fill=0, dtype="uint8")


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
    outline (not along the tile edge, see :func:`outlines`)."""
    mask = rasterize_footprints(polygons, shape_hw)
    if polygons and boundary_width > 0:
        bands = [o.buffer(boundary_width, quad_segs=4) for o in outlines(polygons, shape_hw)]
        bands = [b for b in bands if not b.is_empty]
        if bands:
            band = rasterize(((b, 1) for b in bands), out_shape=shape_hw, fill=0, dtype="uint8")
            mask[band > 0] = BOUNDARY
    return mask
