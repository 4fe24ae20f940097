"""Masks drawn from footprints, checked pixel by pixel against the geometry they come from: the
band of ``boundary_width`` px on both sides of every outline (holes included), touching buildings
kept apart, no band along the tile edge on any side."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import shapely
from affine import Affine
from pyproj import CRS, Transformer
from rasterio.features import rasterize
from shapely import affinity
from shapely.geometry import LineString, MultiPolygon, Polygon, box
from shapely.geometry.base import BaseGeometry

from dataio.band import band_mask
from dataio.classes import BACKGROUND, BOUNDARY, BUILDING
from dataio.labels import (
    DEFAULT_BOUNDARY_WIDTH,
    LabelError,
    make_mask,
    outlines,
    rasterize_footprints,
    read_footprints,
)


def _expected(polygons: list[Polygon], shape_hw: tuple[int, int], width: float,
              tol: float = 0.25) -> tuple[np.ndarray, np.ndarray]:
    """The mask by definition (distance of each pixel centre to the outlines), and where it is
    unambiguous (centres within ``tol`` of the band's edge or of an outline may fall either way)."""
    h, w = shape_hw
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    centres = shapely.points(xs.ravel(), ys.ravel())
    outline = shapely.union_all([p.boundary for p in polygons])
    area = shapely.union_all(polygons)
    d = shapely.distance(outline, centres).reshape(h, w)
    inside = shapely.contains_xy(area, xs.ravel(), ys.ravel()).reshape(h, w)
    want = np.where(d < width, BOUNDARY, np.where(inside, BUILDING, BACKGROUND))
    sure = (np.abs(d - width) > tol) & (d > tol)
    return want.astype(np.uint8), sure


def test_the_band_is_every_pixel_within_the_width_of_an_outline_holes_included() -> None:
    courtyard = Polygon([(10, 10), (50, 10), (50, 40), (10, 40)],
                        [[(22, 20), (38, 20), (38, 30), (22, 30)]])
    ell = Polygon([(60, 12), (75, 12), (75, 22), (68, 22), (68, 37), (60, 37)])
    polys = [courtyard, ell]
    for width in (DEFAULT_BOUNDARY_WIDTH, 1.0, 4.0):
        mask = make_mask(polys, (50, 90), width)
        want, sure = _expected(polys, (50, 90), width)
        assert sure.mean() > 0.8
        bad = np.argwhere(sure & (mask != want))
        assert len(bad) == 0, (width, bad[:5].tolist())
    mask = make_mask(polys, (50, 90))
    assert (mask[24:27, 28:33] == BACKGROUND).all()  # the courtyard is no roof
    assert (mask[18:22, 30] == BOUNDARY).all() and (mask[28:32, 30] == BOUNDARY).all()


def _distance_to_outlines(polygons: list[Polygon], shape_hw: tuple[int, int]) -> np.ndarray:
    """Brute force: shapely's distance from every pixel centre to the outlines make_mask bands."""
    h, w = shape_hw
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    lines = shapely.union_all(outlines(polygons, shape_hw))
    return shapely.distance(lines, shapely.points(xs.ravel(), ys.ravel())).reshape(h, w)


@pytest.mark.parametrize("width", [DEFAULT_BOUNDARY_WIDTH, 1.0, 1.5, 3.0])
def test_the_band_of_a_box_at_integer_coordinates_is_symmetric_and_inclusive(width) -> None:
    """What failed: rasterize's edge rule took centres exactly 2.5 px from a wall on one side
    only: 6 px across the top wall (3 + 3), 5 across the others (3 + 2 or 2 + 3)."""
    shape_hw = (60, 60)
    polys = [box(20, 20, 40, 40)]
    mask = make_mask(polys, shape_hw, width)
    d = _distance_to_outlines(polys, shape_hw)
    assert np.array_equal(mask == BOUNDARY, d <= width)
    for same in (mask[::-1], mask[:, ::-1], mask.T):
        assert np.array_equal(mask, same)
    across = int(np.floor(width + 0.5)) * 2  # centres at k + 0.5 from the wall, k + 0.5 <= w
    assert (mask[20 - across // 2: 20 + across // 2, 30] == BOUNDARY).all()
    assert (mask[:, 30] == BOUNDARY).sum() == 2 * across


@pytest.mark.parametrize("seed", range(4))
def test_the_band_is_every_centre_within_the_width_of_an_outline_corners_included(seed) -> None:
    """The rule, checked on every pixel against shapely's distance: boundary exactly where the
    centre lies within ``width`` of an outline (inclusive), for rotated buildings with holes,
    some cut by the tile edge. What failed: corner arcs drawn as chords (radius ~2.45) left out
    the centres 2.45-2.5 px from a corner (0.13% of the band)."""
    rng = np.random.default_rng(seed)
    shape_hw = (120, 150)
    polys: list[Polygon] = []
    while len(polys) < 8:
        cx, cy = rng.uniform(0, 150), rng.uniform(0, 120)
        sx, sy = rng.uniform(6, 40, 2)
        outer = affinity.rotate(box(cx - sx, cy - sy, cx + sx, cy + sy), rng.uniform(0, 90),
                                origin=(cx, cy))
        hole = affinity.scale(outer, 0.4, 0.4) if rng.random() < 0.5 else None
        p = Polygon(outer.exterior.coords, [hole.exterior.coords] if hole else None)
        p = p.intersection(box(0, 0, 150, 120))
        if isinstance(p, Polygon) and not p.is_empty and all(p.distance(q) > 0 for q in polys):
            polys.append(p)
    d = _distance_to_outlines(polys, shape_hw)
    for width in (DEFAULT_BOUNDARY_WIDTH, 1.0, 4.0):
        band = make_mask(polys, shape_hw, width) == BOUNDARY
        # (a centre within float rounding of the band's edge may go either way)
        sure = np.abs(d - width) > 1e-9 * width
        assert sure.mean() > 0.9999
        bad = np.argwhere(sure & (band != (d <= width)))
        assert len(bad) == 0, (width, bad[:5].tolist(), d[tuple(bad[0])] if len(bad) else None)


@pytest.mark.parametrize("cut", [box(-10, 10, 20, 30), box(10, -10, 30, 20), box(25, 10, 50, 30),
                                 box(10, 25, 30, 45)])
def test_the_band_of_a_box_cut_by_the_tile_edge_is_inclusive_too(cut) -> None:
    """What failed: outlines() ends a wall cut by the tile edge 1e-6 px inside it, so the wall's
    length is no integer and its centres exactly 2.5 px away were rounded out, on both sides:
    4 px across the walls that reach the edge, 6 across the other (rows 8-11 for a wall at
    y = 10, not 7-12)."""
    shape_hw = (40, 40)
    polys = [cut.intersection(box(0, 0, 40, 40))]
    band = make_mask(polys, shape_hw) == BOUNDARY
    # (the outline in exact coordinates, the tile edge left out: shapely's distances are exact)
    x0, y0, x1, y1 = polys[0].bounds
    walls = [LineString([(x0, y0), (x1, y0)]), LineString([(x1, y0), (x1, y1)]),
             LineString([(x1, y1), (x0, y1)]), LineString([(x0, y1), (x0, y0)])]
    walls = [g for g in walls if not g.within(box(0, 0, 40, 40).exterior)]
    ys, xs = np.mgrid[0:40, 0:40] + 0.5
    d = shapely.distance(shapely.union_all(walls), shapely.points(xs.ravel(), ys.ravel()))
    assert np.array_equal(band, d.reshape(shape_hw) <= DEFAULT_BOUNDARY_WIDTH)
    # across the two walls that reach the tile edge, through the middle of the box
    across = band[:, int(x0 + x1) // 2] if y0 > 0 and y1 < 40 else band[int(y0 + y1) // 2]
    assert across.sum() == 12  # (6 px on each)


def test_a_segment_of_no_length_bands_the_disc_around_its_point() -> None:
    """A repeated vertex is a segment of no length: its band is the disc of the width."""
    ys, xs = np.mgrid[0:20, 0:20] + 0.5
    want = (xs - 10) ** 2 + (ys - 10.5) ** 2 <= 2.5 ** 2
    line = LineString([(10, 10.5), (10, 10.5)])
    # (22 centres, 6 of them exactly 2.5 px away: (10 ± 2.5, 10.5), (10 ± 1.5, 10.5 ± 2))
    assert np.array_equal(band_mask([line], (20, 20), 2.5), want) and want.sum() == 22


def test_touching_buildings_are_separated_by_the_boundary_class() -> None:
    left, right = box(10, 10, 30, 40), box(30, 10, 55, 40)  # one shared wall at x = 30
    mask = make_mask([left, right], (50, 70))
    assert (mask[14:36, 28:32] == BOUNDARY).all()
    # no 4-connected path of building pixels from one to the other
    assert not ((mask[:, 29] == BUILDING) | (mask[:, 30] == BUILDING)).any()
    assert (mask[20:30, 15:25] == BUILDING).all() and (mask[20:30, 36:50] == BUILDING).all()


def test_no_band_along_any_tile_edge_of_a_tile_that_is_not_square() -> None:
    h, w = 60, 100
    right = box(80, 10, 100, 30)  # cut by the right edge (x = w), which lies beyond y = h
    bottom = box(20, 40, 45, 60)  # cut by the bottom edge (y = h)
    mask = make_mask([right, bottom], (h, w))
    assert (mask[14:27, w - 1] == BUILDING).all()
    assert (mask[h - 1, 24:42] == BUILDING).all()
    assert (mask[14:27, 78:82] == BOUNDARY).all() and (mask[44:h, 18:22] == BOUNDARY).all()


def _collection(*rings: list[tuple[float, float]]) -> str:
    feats = [{"type": "Feature", "properties": {},
              "geometry": {"type": "Polygon", "coordinates": [[list(p) for p in r]]}}
             for r in rings]
    return json.dumps({"type": "FeatureCollection", "features": feats,
                       "crs": {"type": "name", "properties": {"name": "EPSG:32611"}}})


def test_footprints_smaller_than_a_pixel_are_kept(tmp_path: Path) -> None:
    """A shed of 0.5 px x 1.5 px is still a footprint in the truth (the scorer decides what is
    too small, by its own threshold), not dropped while reading the labels."""
    origin = (500000.0, 4000000.0)
    transform = Affine(0.3, 0, origin[0], 0, -0.3, origin[1])
    path = tmp_path / "buildings.geojson"

    def ring(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
        gx = [origin[0] + 0.3 * x for x in (x0, x1)]
        gy = [origin[1] - 0.3 * y for y in (y0, y1)]
        return [(gx[0], gy[0]), (gx[1], gy[0]), (gx[1], gy[1]), (gx[0], gy[1]), (gx[0], gy[0])]

    path.write_text(_collection(ring(10, 10, 30, 30), ring(40, 40, 40.5, 41.5)))
    fp = read_footprints(path, CRS.from_epsg(32611), transform, 64, 64)
    assert sorted(round(p.area, 3) for p in fp.polygons) == [0.75, 400.0]


def test_a_multipolygon_feature_gives_each_of_its_parts(tmp_path: Path) -> None:
    """One feature may be a MultiPolygon (a building in two parts): both are footprints."""
    transform = Affine(0.3, 0, 500000.0, 0, -0.3, 4000000.0)
    parts = [[[[500000.0 + 0.3 * x, 4000000.0 - 0.3 * y] for x, y in
               ((x0, 5), (x0 + 10, 5), (x0 + 10, 15), (x0, 15), (x0, 5))]] for x0 in (5, 30)]
    doc = {"type": "FeatureCollection",
           "crs": {"type": "name", "properties": {"name": "EPSG:32611"}},
           "features": [{"type": "Feature", "properties": {},
                         "geometry": {"type": "MultiPolygon", "coordinates": parts}}]}
    path = tmp_path / "buildings.geojson"
    path.write_text(json.dumps(doc))
    fp = read_footprints(path, CRS.from_epsg(32611), transform, 64, 64)
    assert sorted(round(p.bounds[0], 6) for p in fp.polygons) == [5.0, 30.0]
    assert [round(p.area, 6) for p in fp.polygons] == [100.0, 100.0]


def _utm_doc(*rects: tuple[float, float, float, float]) -> str:
    """Pixel rectangles (x0, y0, x1, y1) as a GeoJSON in UTM under ``_UTM``'s 0.3 m grid."""
    def ring(x0: float, y0: float, x1: float, y1: float) -> list[tuple[float, float]]:
        xy = ((x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0))
        return [(_UTM.c + _UTM.a * x, _UTM.f + _UTM.e * y) for x, y in xy]
    return _collection(*(ring(*r) for r in rects))


_UTM = Affine(0.3, 0, 500000.0, 0, -0.3, 4000000.0)


def test_footprints_are_clipped_to_a_tile_that_is_not_square(tmp_path: Path) -> None:
    """Width is x, height is y: on a 64 x 40 (w x h) tile a roof at x 50..60 is on the image,
    and one crossing y = 40 is cut there."""
    path = tmp_path / "buildings.geojson"
    path.write_text(_utm_doc((50, 10, 60, 20), (10, 30, 20, 50)))
    fp = read_footprints(path, CRS.from_epsg(32611), _UTM, 64, 40)
    bounds = sorted(tuple(round(v, 6) for v in p.bounds) for p in fp.polygons)
    assert bounds == [(10.0, 30.0, 20.0, 40.0), (50.0, 10.0, 60.0, 20.0)]


def test_a_polygon_with_no_area_is_noted_as_ignored_not_as_repaired(tmp_path: Path) -> None:
    """A building whose corners lie on one line (or whose ring repeats its points) repairs to
    lines, and the area filter dropped it: it was in neither the mask nor truth.csv, while the
    manifest's note said "repaired with make_valid", as for a bow-tie that keeps its area."""
    path = tmp_path / "buildings.geojson"
    on_a_line = [(10, 10), (20, 10), (30, 10), (10, 10)]
    repeated = [(40, 10), (50, 10), (50, 10), (40, 10), (40, 10)]
    bow_tie = [(10, 30), (30, 50), (30, 30), (10, 50), (10, 30)]
    rings = [[(_UTM.c + _UTM.a * x, _UTM.f + _UTM.e * y) for x, y in r]
             for r in (on_a_line, repeated, bow_tie)]
    path.write_text(_collection(*rings))
    fp = read_footprints(path, CRS.from_epsg(32611), _UTM, 64, 64)
    assert sorted(round(p.area, 6) for p in fp.polygons) == [100.0, 100.0]  # the bow-tie's two
    assert [re.sub(r" \(.*\)", "", n) for n in fp.notes] == [
        "feature 0: polygon with no area, ignored",
        "feature 1: polygon with no area, ignored",
        "feature 2: invalid polygon, repaired with make_valid"]


def test_a_polygon_on_one_line_in_lon_lat_is_ignored_despite_float_noise(tmp_path: Path) -> None:
    """SpaceNet's labels are lon/lat: a building whose three corners lie on one line maps to
    pixels with ~1e-8 px of float noise, a valid sliver of area > 0 that the exact check above
    kept: a truth.csv row of no area, a building in the counts, and a boundary band carved
    around a line in the mask. It is ignored and noted as the exact line is."""
    t = Affine(2.7e-6, 0, -115.3, 0, -2.7e-6, 36.3)  # dataio.synth's EPSG:4326 grid
    on_a_line = [t @ (x, 5 + 0.7 * x) for x in (3, 17, 41)] + [t @ (3, 5 + 0.7 * 3)]
    square = [t @ xy for xy in ((44, 40), (60, 40), (60, 56), (44, 56), (44, 40))]
    doc = json.loads(_collection(on_a_line, square))
    del doc["crs"]  # (RFC 7946: lon/lat)
    path = tmp_path / "buildings.geojson"
    path.write_text(json.dumps(doc))
    fp = read_footprints(path, CRS.from_epsg(4326), t, 64, 64)
    assert [round(p.area, 6) for p in fp.polygons] == [256.0]
    assert [re.sub(r" \(.*\)", "", n) for n in fp.notes] == [
        "feature 0: polygon with no area, ignored"]
    mask = make_mask(fp.polygons, (64, 64))
    assert (mask[:30, :42] == BACKGROUND).all()  # no band around the line


def test_an_empty_polygon_is_noted_as_ignored(tmp_path: Path) -> None:
    """A feature with "coordinates": [] was dropped without a word, while a feature with no
    geometry, or a Point, was noted in the manifest as ignored."""
    path = tmp_path / "buildings.geojson"
    doc = json.loads(_utm_doc((10, 10, 20, 20)))
    doc["features"][:0] = [{"type": "Feature", "properties": {},
                            "geometry": {"type": kind, "coordinates": []}}
                           for kind in ("Polygon", "MultiPolygon")]
    path.write_text(json.dumps(doc))
    fp = read_footprints(path, CRS.from_epsg(32611), _UTM, 64, 40)
    assert [p.bounds for p in fp.polygons] == [(10.0, 10.0, 20.0, 20.0)]
    assert fp.notes == ["feature 0: empty Polygon (no coordinates), ignored",
                        "feature 1: empty MultiPolygon (no coordinates), ignored"]


def test_a_label_file_with_a_byte_order_mark_is_read(tmp_path: Path) -> None:
    """(saved by Notepad: json refused the BOM, and the tile was skipped as malformed GeoJSON;
    RFC 7946 lets a reader ignore it)"""
    path = tmp_path / "buildings.geojson"
    path.write_bytes(b"\xef\xbb\xbf" + _utm_doc((10, 10, 20, 20)).encode())
    fp = read_footprints(path, CRS.from_epsg(32611), _UTM, 64, 40)
    assert [p.bounds for p in fp.polygons] == [(10.0, 10.0, 20.0, 20.0)]


def test_a_missing_label_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "buildings_AOI_9_x_img1.geojson"
    with pytest.raises(LabelError, match=f"^{re.escape(str(path))}: label file missing"):
        read_footprints(path, CRS.from_epsg(32611), _UTM, 64, 40)


def _project(geom: BaseGeometry, src: CRS | str, dst: CRS | str) -> BaseGeometry:
    tr = Transformer.from_crs(src, dst, always_xy=True)
    return shapely.transform(geom, lambda xy: np.column_stack(tr.transform(xy[:, 0], xy[:, 1])))


# In pixels of a 200 x 150 tile: a courtyard house, a triangle crossing the top and right edges,
# a building in two parts. Corners off the half-pixel grid, so no pixel centre is a tie.
_CROSS_CRS_PX = [
    Polygon([(10.3, 12.7), (60.2, 15.1), (55.9, 70.4), (8.1, 66.6)],
            [[(25.2, 30.3), (40.7, 31.1), (39.4, 45.8), (24.1, 44.2)]]),
    Polygon([(150.4, -20.2), (230.6, 10.3), (180.3, 80.8)]),
    MultiPolygon([box(100.2, 100.3, 120.7, 130.1), box(125.1, 100.4, 140.3, 120.9)]),
]


@pytest.mark.parametrize("image_crs,label_crs", [("EPSG:32611", "OGC:CRS84"),
                                                 ("EPSG:4326", "EPSG:32611")])
def test_labels_in_another_crs_give_rasterios_pixels_in_the_tiles_grid(
        tmp_path: Path, image_crs: str, label_crs: str) -> None:
    """Lon/lat labels on a UTM tile and UTM labels on a lon/lat one: the footprint pixels are
    those rasterio.features.rasterize burns for the same buildings in the tile's own CRS and
    transform (pixel centres inside, holes left out, parts of a MultiPolygon both, a building
    crossing the edge cut there)."""
    if image_crs == "EPSG:32611":
        t = Affine(0.3, 0, 660000.0, 0, -0.3, 4000000.0)
    else:
        t = Affine(2.7e-6, 0, -115.25, 0, -2.7e-6, 36.13)
    h, w = 150, 200
    in_image = [shapely.transform(g, lambda xy: np.column_stack(t @ (xy[:, 0], xy[:, 1])))
                for g in _CROSS_CRS_PX]
    doc: dict = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {},
         "geometry": shapely.geometry.mapping(_project(g, image_crs, label_crs))}
        for g in in_image]}
    if label_crs != "OGC:CRS84":  # (RFC 7946 lon/lat needs no member)
        doc["crs"] = {"type": "name", "properties": {"name": label_crs}}
    path = tmp_path / "buildings.geojson"
    path.write_text(json.dumps(doc))
    fp = read_footprints(path, CRS.from_user_input(image_crs), t, w, h)
    assert len(fp.polygons) == 4 and fp.notes == []
    want = rasterize([(g, 1) for g in in_image], out_shape=(h, w), transform=t, dtype="uint8")
    assert 4000 < want.sum() < 6000  # (the buildings are on the tile)
    np.testing.assert_array_equal(rasterize_footprints(fp.polygons, (h, w)), want)
    mask = make_mask(fp.polygons, (h, w))
    # the band is carved out of the footprints and around them, never elsewhere
    assert ((mask == BUILDING) <= (want == 1)).all()
    assert (mask[want == 1] != BACKGROUND).all()
