"""postproc.merge: tiles' GeoJSON -> one WGS 84 layer, buildings cut by tile edges merged.

The mosaic is real use: prediction shards of 2 x 3 georeferenced UTM tiles (24 px, 0.3 m, tile
origins off by up to 5e-7 m, as float origins are) cut from one probability raster, then
``postproc.polygonize --geojson``; the unsplit raster polygonized as one tile is the truth.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import shapely
from pp_helpers import (
    STDOUT_ENDS,
    TRANSFORM_4326,
    assert_no_png_read,
    check_stdout_failure,
    count_shard_reads,
    full_disk_at_commit,
    unbuffered_stdout,
)
from pyproj import Transformer
from shapely.geometry import mapping, shape

from postproc import merge, polygonize
from postproc.cli import exit_on_error
from postproc.geojson import to_map, write_tile_geojson
from postproc.polygonize import PolygonizeConfig, polygonize_probs
from postproc.predio import iter_raw_samples, quantize_probs, write_pred_shard

T, PX, X0, Y0 = 24, 0.3, 500000.0, 4000000.0  # tile size, pixel size, the area's corner
UTM = "EPSG:32611"
TO_LONLAT = Transformer.from_crs(UTM, "EPSG:4326", always_xy=True)
TO_UTM = Transformer.from_crs("EPSG:4326", UTM, always_xy=True)
# (rows, cols) of the unsplit raster, 48 x 72 px: tiles r0c0 r0c1 r0c2 / r1c0 r1c1 r1c2
ACROSS_TWO = (slice(3, 9), slice(18, 30))  # tiles r0c0 | r0c1
RING = (slice(18, 30), slice(18, 30))  # around the corner of four tiles; hole 22:26
POINT_TOUCH = [(slice(36, 40), slice(20, 24)), (slice(40, 44), slice(24, 28))]  # r1c0, r1c1
CORNER_TOUCH = [(slice(18, 24), slice(43, 48)), (slice(24, 30), slice(48, 53))]  # r0c1, r1c2
INTERIOR = [(slice(5, 12), slice(55, 65)), (slice(28, 33), slice(3, 9))]  # r0c2, r1c0
AREA_EDGE = (slice(40, 48), slice(60, 66))  # r1c2, on the area's outer edge


def _raster() -> np.ndarray:
    b = np.zeros((2 * T, 3 * T), bool)
    for rows, cols in [ACROSS_TWO, RING, *POINT_TOUCH, *CORNER_TOUCH, *INTERIOR, AREA_EDGE]:
        b[rows, cols] = True
    b[22:26, 22:26] = False
    p = np.where(b, 0.55 + 0.4 * np.arange(3 * T) / (3 * T), 0.0)  # confidences differ by piece
    return quantize_probs(np.stack([1 - p, p, np.zeros_like(p)], axis=2).astype(np.float32))


def _key(r: int, c: int) -> str:
    return f"AOI_9_Mosaic_r{r}c{c}"


def _tile_meta(r: int, c: int, crs: str = UTM) -> dict:
    jitter = 1e-7 * (3 * r + c)  # (m) tiles of one mosaic line up only up to float error
    return {"crs": crs, "transform": [PX, 0.0, X0 + c * T * PX + jitter, 0.0, -PX,
                                      Y0 - r * T * PX - jitter], "width": T, "height": T}


def _lonlat(g):
    return shapely.transform(g, lambda xy: np.column_stack(TO_LONLAT.transform(xy[:, 0],
                                                                               xy[:, 1])))


def _pixels(g):
    """lon/lat -> the unsplit raster's pixel coordinates, rounded: all vertices are pixel
    corners (the tiles' origins are up to 2e-6 px off)."""
    return shapely.transform(g, lambda xy: np.round((np.column_stack(
        TO_UTM.transform(xy[:, 0], xy[:, 1])) - (X0, Y0)) / (PX, -PX)))


def run(argv: list[str]) -> int:
    return exit_on_error(lambda: merge.main(argv))


@pytest.fixture(scope="module")
def mosaic(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mosaic")
    prob = _raster()
    for r in range(2):  # a shard per row of tiles
        write_pred_shard(root / "pred" / f"pred-{r:06d}.tar", [
            (_key(r, c), prob[r * T:(r + 1) * T, c * T:(c + 1) * T], _tile_meta(r, c))
            for c in range(3)])
    argv = ["--pred", str(root / "pred"), "--out", str(root / "p.csv"), "--geojson",
            str(root / "gj"), "--min-polygon-area", "0", "--no-tuned", "--workers", "1"]
    assert exit_on_error(lambda: polygonize.main(argv)) == 0
    return root / "pred", root / "gj"


@pytest.fixture(scope="module")
def merged(mosaic, tmp_path_factory) -> dict:
    pred, gj = mosaic
    out = tmp_path_factory.mktemp("out") / "area.geojson"
    assert run(["--pred", str(pred), "--geojson", str(gj), "--out", str(out)]) == 0
    return json.loads(out.read_text())


def _truth() -> list[tuple[shapely.Polygon, float]]:
    """The unsplit raster polygonized as one tile, in lon/lat."""
    found = polygonize_probs(_raster(), PolygonizeConfig(min_polygon_area=0))
    geoms = to_map([g for g, _ in found], [PX, 0.0, X0, 0.0, -PX, Y0])
    return [(_lonlat(g), c) for g, (_, c) in zip(geoms, found, strict=True)]


def _tile_features(gj: Path) -> list[dict]:
    return [f for p in sorted(gj.glob("*.geojson")) for f in json.loads(p.read_text())["features"]]


def _only(feats: list[dict], where: shapely.Point) -> dict:
    (f,) = [f for f in feats if shape(f["geometry"]).intersects(where)]
    return f


def test_buildings_cut_by_tile_edges_come_out_whole(mosaic, merged):
    _, gj = mosaic
    feats = merged["features"]
    truth = _truth()
    assert len(feats) == len(truth) == 9
    for want, conf in truth:  # each building of the unsplit raster is one output footprint
        (got,) = [f for f in feats
                  if shape(f["geometry"]).intersection(want).area > want.area / 2]
        g = shape(got["geometry"])
        assert g.geom_type == "Polygon"
        # (an unmerged piece keeps its tile's origin, up to 5e-7 m off the unsplit raster's)
        assert g.symmetric_difference(want).area <= 1e-5 * want.area
        assert got["properties"]["Confidence"] == pytest.approx(conf, abs=2e-6)
    at = {name: _lonlat(to_map([shapely.Point(c + 0.5, r + 0.5)], _tile_meta(0, 0)["transform"])
                         [0]) for name, (r, c) in {"two": (3, 18), "ring": (18, 18)}.items()}
    two, ring = _only(feats, at["two"]), _only(feats, at["ring"])
    assert two["properties"]["ImageIds"] == [_key(0, 0), _key(0, 1)]
    assert sorted(ring["properties"]["ImageIds"]) == sorted(_key(r, c) for r in (0, 1)
                                                            for c in (0, 1))
    assert len(shape(ring["geometry"]).interiors) == 1
    assert {two["properties"]["MergedId"], ring["properties"]["MergedId"]} == {1, 2}
    # the merged footprint's area equals the union of the pieces' (the tiles' GeoJSON)
    pieces = [shape(f["geometry"]) for f in _tile_features(gj)]
    for m in (two, ring):
        mine = [p for p in pieces if _lonlat(p).intersects(shape(m["geometry"]))]
        assert len(mine) == len(m["properties"]["ImageIds"])
        union = shapely.union_all([_pixels(_lonlat(p)) for p in mine])
        assert _pixels(shape(m["geometry"])).area == pytest.approx(union.area, rel=1e-12)
        # Confidence: the pieces' area-weighted mean
        confs = [f["properties"]["Confidence"] for f in _tile_features(gj)
                 if _lonlat(shape(f["geometry"])).intersects(shape(m["geometry"]))]
        areas = [p.area for p in mine]
        assert m["properties"]["Confidence"] == pytest.approx(
            np.dot(areas, confs) / sum(areas), abs=1e-6)


def test_pieces_that_touch_at_a_point_stay_apart(merged):
    feats = merged["features"]
    tf = _tile_meta(0, 0)["transform"]
    for pair in (POINT_TOUCH, CORNER_TOUCH):
        for rows, cols in pair:
            f = _only(feats, _lonlat(to_map([shapely.Point(cols.start + 0.5, rows.start + 0.5)],
                                            tf)[0]))
            assert "ImageIds" not in f["properties"] and "ImageId" in f["properties"]


def test_output_is_rfc7946(merged):
    assert merged["type"] == "FeatureCollection" and "crs" not in merged
    for f in merged["features"]:
        assert f["type"] == "Feature"
        g = shape(f["geometry"])
        assert g.is_valid
        x0, y0, x1, y1 = g.bounds
        assert -180 <= x0 <= x1 <= 180 and -90 <= y0 <= y1 <= 90
        assert -118 < x0 < -116 and 36 < y0 < 37  # (X0, Y0 in UTM zone 11N)
        assert g.exterior.is_ccw and not any(r.is_ccw for r in g.interiors)


def test_interior_features_pass_through_and_are_not_held(mosaic, merged):
    pred, gj = mosaic
    feats = merged["features"]
    out = io.StringIO()
    m = merge.Merger(out)
    border = 0
    for shard in sorted(pred.glob("pred-*.tar")):
        for key, _, meta in iter_raw_samples(shard):
            m.add_tile(key, meta, gj / f"{key}.geojson", shard)
            doc = json.loads((gj / f"{key}.geojson").read_text())
            _, _, x0, _, _, y1 = meta["transform"]
            for f in doc["features"]:
                b = np.array(shape(f["geometry"]).bounds)
                edges = np.array([x0, y1 - T * PX, x0 + T * PX, y1])
                border += bool(np.isclose(b, edges, rtol=0, atol=1e-6).any())
    # only the footprints on a tile border are held; the interior ones are written already
    assert len(m.pieces) == border == 11
    assert out.getvalue().count('"type":"Feature"') == 2
    m.finish()
    assert json.loads(out.getvalue()) == merged
    interior = [f for f in _tile_features(gj)
                if not any(shape(f["geometry"]).equals(p.geom) for p in m.pieces)]
    assert len(interior) == 2
    for f in interior:  # unchanged: the same properties, the coordinates reprojected
        (got,) = [g for g in feats if g["properties"] == f["properties"]]
        assert shape(got["geometry"]).equals_exact(_lonlat(shape(f["geometry"])), 1e-12)


def test_merge_agrees_with_a_union_of_all_border_pieces(mosaic, merged):
    """Reference: unary_union of every border piece (in the unsplit raster's pixels), then each
    of its polygons matched to the output's: the same set."""
    _, gj = mosaic
    pieces = [_pixels(_lonlat(shape(f["geometry"]))) for f in _tile_features(gj)]
    border = [p for p in pieces
              if any(v % T == 0 for v in p.bounds)]  # on a tile edge (the raster's: in pixels)
    ref = shapely.get_parts(shapely.union_all(border))
    got = [_pixels(shape(f["geometry"])) for f in merged["features"]
           if "ImageIds" in f["properties"]
           or any(v % T == 0 for v in _pixels(shape(f["geometry"])).bounds)]
    assert len(ref) == len(got) == 7
    assert sorted(shapely.normalize(g).wkt for g in ref) == \
        sorted(shapely.normalize(g).wkt for g in got)


def test_tiles_off_the_grid_beyond_the_tolerance_are_not_merged(mosaic, tmp_path, capsys):
    pred, gj = mosaic
    out = tmp_path / "area.geojson"
    assert run(["--pred", str(pred), "--geojson", str(gj), "--out", str(out),
                "--tolerance", "1e-9"]) == 0  # below the tiles' 3e-7 px float offsets
    feats = json.loads(out.read_text())["features"]
    assert len(feats) == 13 and not any("ImageIds" in f["properties"] for f in feats)
    assert "pixel grids" in capsys.readouterr().err


def _two_tiles(root: Path, crs_b: str = "EPSG:4326", buildings: tuple = ((4, 10, 10, 22),),
               min_polygon_area: float = 0.0) -> tuple[Path, Path]:
    """Two EPSG:4326 tiles side by side (the second in ``crs_b``), ``buildings`` (rows and cols
    of the 16 x 32 px pair; by default one across both), written with polygonize's own writers
    (polygonize's --min-polygon-area: ``min_polygon_area``)."""
    prob = np.zeros((16, 32, 3), np.uint8)
    prob[..., 0] = 255
    for r0, r1, c0, c1 in buildings:
        prob[r0:r1, c0:c1] = (0, 230, 25)
    a, b, c, d, e, f = TRANSFORM_4326
    samples, gj = [], root / "gj"
    gj.mkdir(parents=True)
    for k, crs in enumerate(["EPSG:4326", crs_b]):
        meta = {"crs": crs, "transform": [a, b, c + 16 * k * a, d, e, f], "width": 16,
                "height": 16}
        tile = prob[:, 16 * k:16 * (k + 1)]
        found = polygonize_probs(tile, PolygonizeConfig(min_polygon_area=min_polygon_area))
        write_tile_geojson(gj, f"t{k}", [g for g, _ in found], [s for _, s in found], meta)
        samples.append((f"t{k}", tile, meta))
    write_pred_shard(root / "pred" / "pred-000000.tar", samples)
    return root / "pred", gj


def test_a_lonlat_mosaic_merges_and_other_crs_do_not(tmp_path, capsys):
    for crs_b, n in (("EPSG:4326", 1), ("EPSG:32611", 2)):
        pred, gj = _two_tiles(tmp_path / crs_b.replace(":", ""), crs_b)
        doc = json.loads((gj / "t0.geojson").read_text())
        for f in doc["features"]:  # (another writer's rings: clockwise)
            f["geometry"] = mapping(shapely.orient_polygons(shape(f["geometry"]),
                                                            exterior_cw=True))
        (gj / "t0.geojson").write_text(json.dumps(doc))
        out = tmp_path / f"{crs_b.replace(':', '')}.geojson"
        assert run(["--pred", str(pred), "--geojson", str(gj), "--out", str(out)]) == 0
        feats = json.loads(out.read_text())["features"]
        assert len(feats) == n
        assert all(shape(f["geometry"]).exterior.is_ccw for f in feats)
        if n == 1:
            assert feats[0]["properties"]["ImageIds"] == ["t0", "t1"]
            want = shapely.box(-115.2 + 10 * 3e-6, 36.2 - 10 * 3e-6, -115.2 + 22 * 3e-6,
                               36.2 - 4 * 3e-6)
            assert shape(feats[0]["geometry"]).symmetric_difference(want).area < 1e-9 * want.area
        else:
            assert "2 pixel grids (2 CRS)" in capsys.readouterr().err


def _drawn(gj: Path, tiles: dict[str, tuple[int, int, list[tuple[int, int, int, int]]]],
           size: int = 16) -> dict[str, dict]:
    """Footprints drawn by hand, as polygonize writes them (``write_tile_geojson``): per ImageId
    its tile's (row, col) in the area's EPSG:4326 pixels and its footprints, boxes (r0, r1, c0,
    c1) of those pixels. Returns each tile's meta.json."""
    a, b, c, d, e, f = TRANSFORM_4326
    gj.mkdir(parents=True, exist_ok=True)
    metas = {}
    for key, (row, col, boxes) in tiles.items():
        metas[key] = {"crs": "EPSG:4326", "width": size, "height": size,
                      "transform": [a, b, c + col * a, d, e, f + row * e]}
        polys = [shapely.box(c0 - col, r0 - row, c1 - col, r1 - row) for r0, r1, c0, c1 in boxes]
        write_tile_geojson(gj, key, polys, [0.9] * len(polys), metas[key])
    return metas


def _merge_drawn(gj: Path, metas: dict[str, dict]) -> list[dict]:
    out = io.StringIO()
    m = merge.Merger(out)
    for key, meta in metas.items():
        m.add_tile(key, meta, gj / f"{key}.geojson", gj / "pred-000000.tar")
    m.finish()
    return json.loads(out.getvalue())["features"]


def _drawn_pixels(g: dict) -> shapely.Geometry:
    """An output footprint in the area's pixels (as ``_drawn`` counts them)."""
    a, _, c, _, e, f = TRANSFORM_4326
    return shapely.transform(shape(g["geometry"]), lambda xy: np.round((xy - (c, f)) / (a, e)))


def _ids(feats: list[dict]) -> list[tuple]:
    return sorted((tuple(f["properties"].get("ImageIds", [f["properties"].get("ImageId")])),
                   tuple(f["properties"].get("BuildingIds", [f["properties"].get("BuildingId")])))
                  for f in feats)


def test_pieces_of_one_tile_do_not_merge_with_each_other(tmp_path):
    """Two touching buildings of tile t1 (B above C, a wall between them; polygonize's decision:
    two instances), both on t1's edge with t0, where t0's piece A meets B alone: A and B are one
    building, C stays apart (merge joins pieces across tile edges only, never within a tile)."""
    metas = _drawn(tmp_path, {"t0": (0, 0, [(2, 6, 12, 16)]),
                              "t1": (0, 16, [(2, 6, 16, 20), (6, 10, 16, 20)])})
    feats = _merge_drawn(tmp_path, metas)
    assert _ids(feats) == [(("t0", "t1"), (1, 1)), (("t1",), (2,))]
    (ab,) = [f for f in feats if "ImageIds" in f["properties"]]
    assert _drawn_pixels(ab).equals(shapely.box(12, 2, 20, 6))


def test_overlapping_pieces_of_one_tile_do_not_merge_on_its_edge(tmp_path):
    """Another tool's instances may overlap (t1's B and C share rows 5-7 of the edge): their
    segments of t1's edge overlap, yet they are still two instances of one tile; t0's A meets B
    alone. On the area's outer edge (t1's right one) the same pair is left apart, unmerged."""
    metas = _drawn(tmp_path, {"t0": (0, 0, [(2, 4, 12, 16)]),
                              "t1": (0, 16, [(2, 7, 16, 20), (5, 10, 16, 20),
                                             (2, 7, 28, 32), (5, 10, 28, 32)])})
    feats = _merge_drawn(tmp_path, metas)
    assert _ids(feats) == [(("t0", "t1"), (1, 1)), (("t1",), (2,)), (("t1",), (3,)),
                           (("t1",), (4,))]


def test_a_piece_across_two_touching_pieces_of_the_next_tile_joins_all_three(tmp_path):
    """t0's A meets both of t1's touching B and C along the edge: the tiles disagree (one
    building, or two that t0 did not separate), and merge keeps A whole: one footprint of the
    three pieces (union-find, transitively; the README's shared wall on a tile edge)."""
    metas = _drawn(tmp_path, {"t0": (0, 0, [(2, 10, 12, 16)]),
                              "t1": (0, 16, [(2, 6, 16, 20), (6, 10, 16, 20)])})
    (f,) = _merge_drawn(tmp_path, metas)
    assert _ids([f]) == [(("t0", "t1", "t1"), (1, 1, 2))]
    assert _drawn_pixels(f).equals(shapely.box(12, 2, 20, 10))


# README's case: a 6 x 6 px building cut down its middle by the tiles' edge (two 18 px pieces),
# and a 10 px blob inside the first tile
CUT_6X6, BLOB_10 = (4, 10, 13, 19), (11, 13, 2, 7)


def _merged(pred: Path, gj: Path, out: Path, *extra: str) -> list[dict]:
    assert run(["--pred", str(pred), "--geojson", str(gj), "--out", str(out), *extra]) == 0
    return json.loads(out.read_text())["features"]


def test_min_area_applies_after_the_merge(tmp_path, capsys):
    """polygonize's min_polygon_area drops the pieces per tile, before merge: the building is
    lost. polygonize at 0, then merge --min-area 20: the one 36 px footprint, and the 10 px blob
    dropped; at --min-area 40 the building too (its area is the union's, not a piece's)."""
    lost = _two_tiles(tmp_path / "per_tile", buildings=(CUT_6X6, BLOB_10), min_polygon_area=20)
    assert _merged(*lost, tmp_path / "lost.geojson") == []  # (what README warns of)
    pred, gj = _two_tiles(tmp_path / "kept", buildings=(CUT_6X6, BLOB_10))
    capsys.readouterr()
    feats = _merged(pred, gj, tmp_path / "all.geojson")
    assert len(feats) == 2 and "dropped" not in capsys.readouterr().out  # default 0: keep all
    (f,) = _merged(pred, gj, tmp_path / "area.geojson", "--min-area", "20")
    assert f["properties"]["ImageIds"] == ["t0", "t1"] and f["properties"]["MergedId"] == 1
    a, _, c, _, e, f0 = TRANSFORM_4326
    want = shapely.box(c + 13 * a, f0 + 10 * e, c + 19 * a, f0 + 4 * e)
    assert shape(f["geometry"]).symmetric_difference(want).area < 1e-9 * want.area
    assert want.area / abs(a * e) == pytest.approx(36)
    assert "2 tiles, 1 footprints (1 merged from 2 pieces; 1 under --min-area 20 px dropped)" \
        in capsys.readouterr().out
    assert _merged(pred, gj, tmp_path / "big.geojson", "--min-area", "40") == []
    assert "0 footprints (0 merged from 0 pieces; 2 under --min-area 40 px dropped)" in \
        capsys.readouterr().out
    # a piece of 18 px on the tile edge that merges with nothing is dropped alone, at 20
    alone = _two_tiles(tmp_path / "alone", buildings=((4, 10, 13, 16),))
    assert _merged(*alone, tmp_path / "alone.geojson", "--min-area", "20") == []
    assert len(_merged(*alone, tmp_path / "alone18.geojson", "--min-area", "18")) == 1


def test_overlapping_tiles_are_named_and_counted(tmp_path, capsys, monkeypatch):
    """Tiles of one grid whose extents overlap (t2 straddles t0 | t1; t1 also given again as
    t1b: 4 pairs): every footprint of each is written, so the overlaps come out twice; merge
    goes on and says so, naming the first pair read, and pushes the count (0 too). Tiles that
    meet at an edge (t0 | t1) or a corner (t1, t3) do not overlap, nor does a tile of another
    grid over t0 (t4, half a pixel off: its extent is not on t0's grid)."""
    from postproc import pushmetrics

    pushed = []  # (the registry each push would have sent)
    monkeypatch.setattr(pushmetrics, "push_to_gateway",
                        lambda _url, job, registry, **_kw: pushed.append((job, registry)))
    push = ("--pushgateway", "http://127.0.0.1:9091")
    gj, pred = tmp_path / "gj", tmp_path / "pred"
    metas = _drawn(gj, {"t0": (0, 0, [(2, 6, 2, 6)]), "t1": (0, 16, [(2, 6, 20, 24)]),
                        "t2": (0, 8, [(8, 12, 10, 14)]), "t1b": (0, 16, [(2, 6, 20, 24)]),
                        "t3": (16, 32, [(20, 24, 36, 40)])})
    a, b, c, d, e, f = TRANSFORM_4326
    metas["t4"] = {**metas["t0"], "transform": [a, b, c + a / 2, d, e, f]}
    write_tile_geojson(gj, "t4", [shapely.box(1, 1, 3, 3)], [0.9], metas["t4"])
    write_pred_shard(pred / "pred-000000.tar",
                     [(k, np.zeros((16, 16, 3), np.uint8), m) for k, m in metas.items()])
    feats = _merged(pred, gj, tmp_path / "area.geojson", *push)
    assert len(feats) == 6  # (t1's footprint and t1b's: two)
    err, out = capsys.readouterr()[::-1]
    assert "merge: 4 pairs of tiles overlap on their pixel grid (first: t0 and t2;" in err
    assert "6 tiles, 6 footprints (0 merged from 0 pieces; 4 pairs of tiles overlap)" in out
    del metas["t2"], metas["t1b"]  # (the same tiles without the overlapping two: no note)
    write_pred_shard(pred / "pred-000000.tar",
                     [(k, np.zeros((16, 16, 3), np.uint8), m) for k, m in metas.items()])
    assert len(_merged(pred, gj, tmp_path / "apart.geojson", *push)) == 4
    err, out = capsys.readouterr()[::-1]
    assert "tiles overlap" not in err + out
    assert "4 tiles, 4 footprints (0 merged from 0 pieces) ->" in out
    assert [(job, r.get_sample_value("footprints_merge_overlapping_tile_pairs_total"),
             r.get_sample_value("footprints_postproc_polygons_total")) for job, r in pushed] == [
        ("footprints_merge", 4, 6), ("footprints_merge", 0, 4)]


@pytest.mark.parametrize("bad", ["-1", "nan", "inf"])
def test_a_bad_min_area_is_refused_naming_the_flag(bad, tmp_path, capsys):
    pred, gj = _two_tiles(tmp_path)
    out = tmp_path / "area.geojson"
    assert run(["--pred", str(pred), "--geojson", str(gj), "--out", str(out),
                "--min-area", bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --min-area {float(bad)} px must be a finite number >= 0")
    assert not out.exists()


@pytest.fixture
def copy(mosaic, tmp_path) -> tuple[Path, Path, Path]:
    pred, gj = mosaic
    shutil.copytree(pred, tmp_path / "pred")
    shutil.copytree(gj, tmp_path / "gj")
    return tmp_path / "pred", tmp_path / "gj", tmp_path / "area.geojson"


def _refused(copy, capsys, *extra: str) -> str:
    pred, gj, out = copy
    assert run(["--pred", str(pred), "--geojson", str(gj), "--out", str(out), *extra]) == 2
    assert not out.exists() and not list(out.parent.glob(".area.geojson*"))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    return err


def test_a_malformed_file_is_named(copy, capsys):
    tile = copy[1] / f"{_key(1, 1)}.geojson"
    tile.write_text('{"type": "FeatureCollection", "features": [')
    assert f"{tile}: malformed GeoJSON" in _refused(copy, capsys)
    tile.write_text('{"type": "FeatureCollection", "features": [{"type": "Feature", '
                    '"geometry": {"type": "Polygon", "coordinates": [[1, 2]]}}]}')
    assert f"{tile}: feature 0" in _refused(copy, capsys)


@pytest.mark.parametrize("coordinates, said", [
    ([], "empty Polygon (no coordinates)"),  # (was "invalid polygon (Valid Geometry)")
    ([[[0, 0], [1, float("nan")], [1, 1], [0, 0]]], "non-finite coordinates (NaN or Infinity)"),
    ([[[0, 0], [1, 1], [1, 0], [0, 1], [0, 0]]], "invalid polygon (Self-intersection")])
@pytest.mark.filterwarnings("error::RuntimeWarning")  # (a warning is a second stderr line)
def test_an_unusable_polygon_is_named_with_what_is_wrong(copy, capsys, coordinates, said):
    tile = copy[1] / f"{_key(1, 1)}.geojson"
    doc = json.loads(tile.read_text())
    doc["features"][0]["geometry"] = {"type": "Polygon", "coordinates": coordinates}
    tile.write_text(json.dumps(doc))
    assert f"{tile}: feature 0: {said}" in _refused(copy, capsys)


def test_a_file_without_crs_that_is_not_lonlat_is_named(copy, capsys):
    tile = copy[1] / f"{_key(0, 2)}.geojson"
    doc = json.loads(tile.read_text())
    del doc["crs"]
    tile.write_text(json.dumps(doc))
    assert f"{tile}: no crs member, and its coordinates are not lon/lat" in \
        _refused(copy, capsys)


def test_empty_missing_and_half_published_directories_are_refused(copy, capsys):
    pred, gj, _ = copy
    (gj / f"{_key(0, 1)}.geojson").unlink()
    assert f"{gj / _key(0, 1)}.geojson: missing" in _refused(copy, capsys)
    (gj / ".publishing").write_text("")
    assert "interrupted" in _refused(copy, capsys)
    shutil.rmtree(gj)
    gj.mkdir()
    assert "no tile GeoJSON" in _refused(copy, capsys)


def test_duplicate_image_ids_are_refused(copy, capsys):
    pred, gj, _ = copy
    tile = gj / f"{_key(0, 0)}.geojson"
    before = tile.read_text()
    doc = json.loads(before)
    doc["features"][0]["properties"]["ImageId"] = _key(0, 1)  # a second file for r0c1
    tile.write_text(json.dumps(doc))
    err = _refused(copy, capsys)
    assert str(tile) in err and f"ImageId '{_key(0, 1)}' is not the file's tile" in err
    tile.write_text(before)
    shutil.copy(copy[0] / "pred-000000.tar", pred / "pred-000002.tar")
    assert f"ImageId '{_key(0, 0)}' also appears in an earlier shard" in _refused(copy, capsys)


def test_an_unusable_out_or_tolerance_is_refused_before_the_work(copy, capsys, monkeypatch):
    pred, gj, out = copy
    monkeypatch.setattr(merge, "iter_metas", None)  # (the work would fail otherwise)
    tile = gj / f"{_key(0, 0)}.geojson"
    before = tile.read_bytes()
    assert run(["--pred", str(pred), "--geojson", str(gj), "--out", str(tile)]) == 2
    assert "is the --geojson input" in capsys.readouterr().err and tile.read_bytes() == before
    assert run(["--pred", str(pred), "--geojson", str(gj), "--out", str(gj)]) == 2
    assert "is a directory" in capsys.readouterr().err
    assert "--tolerance" in _refused(copy, capsys, "--tolerance", "0.5")


def test_the_same_command_runs_again_with_its_out_beside_the_tiles(copy, capsys):
    """(an --out in --geojson DIR was written once, then refused as "the --geojson input" when
    the same command ran again: every DIR/*.geojson counted as an input, not only the tiles')"""
    pred, gj, _ = copy
    out = gj / "area.geojson"
    argv = ["--pred", str(pred), "--geojson", str(gj), "--out", str(out)]
    assert run(argv) == 0
    first = out.read_bytes()
    capsys.readouterr()
    assert run(argv) == 0, capsys.readouterr().err
    assert out.read_bytes() == first and "not tiles of --pred" not in capsys.readouterr().err


def test_merge_loads_no_numba() -> None:
    """merge reads meta.json and GeoJSON only: importing numba through predio's PNG codec cost
    it ~0.3 s and ~65 MiB before any work (benchmarks.merge: 116 MiB against the baseline's 50)."""
    code = "import sys, postproc.merge; print(sorted(m for m in sys.modules if m == 'numba'))"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).parents[2],
                         env={**os.environ, "PYTHONPATH": "."})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_merge_reads_no_png(mosaic, tmp_path, monkeypatch):
    """Merge needs each tile's meta.json alone (its grid): the prob.png members are seeked
    over. (They were read, the whole prediction once more, only to be thrown away.)"""
    pred, gj = mosaic
    got = count_shard_reads(monkeypatch)
    assert run(["--pred", str(pred), "--geojson", str(gj), "--out",
                str(tmp_path / "area.geojson")]) == 0
    assert_no_png_read(got, sorted(pred.glob("pred-*.tar")))


def test_a_full_disk_while_writing_exits_1_naming_the_file(tmp_path, monkeypatch, capsys):
    """An OSError while the area's GeoJSON is written (its commit: a full disk) is a failure
    of the run, exit code 1, in one line naming the file; it was 2, as for bad input. The
    earlier output stays as it was; a missing input is still 2."""
    pred, gj = _two_tiles(tmp_path)
    out = tmp_path / "area.geojson"
    out.write_text("earlier")
    full_disk_at_commit(monkeypatch, merge)
    assert run(["--pred", str(pred), "--geojson", str(gj), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: [Errno 28] No space left on device: '{out}'"], err
    assert out.read_text() == "earlier"
    assert run(["--pred", str(tmp_path / "missing"), "--geojson", str(gj),
                "--out", str(out)]) == 2


@pytest.mark.parametrize("where", STDOUT_ENDS)
def test_a_full_or_closed_unbuffered_stdout_exits_1(tmp_path, capsys, monkeypatch, where):
    """``python -u -m postproc.merge ... > /dev/full``: the report's print raised a bare OSError,
    exit 2 ("fix the input"), where polygonize and score exit 1 (a failure of the run); a
    closed stdout (``| head -0``) ends quietly with 1. The area's file is written before, and
    its metrics pushed (they were not: the push came after the report)."""
    from postproc import pushmetrics

    pushed = []
    monkeypatch.setattr(pushmetrics, "push_to_gateway",
                        lambda _url, job, registry, **_kw: pushed.append((job, registry)))
    pred, gj = _two_tiles(tmp_path)
    out = tmp_path / "area.geojson"
    with unbuffered_stdout(where):
        code = run(["--pred", str(pred), "--geojson", str(gj), "--out", str(out),
                    "--pushgateway", "http://127.0.0.1:9091"])
    check_stdout_failure(where, code, capsys.readouterr().err)
    assert out.exists()
    [(job, registry)] = pushed
    assert job == "footprints_merge"
    assert registry.get_sample_value("footprints_postproc_polygons_total") == 1


def test_a_link_loop_among_the_geojson_is_counted_as_not_a_tile(tmp_path, capsys):
    """A *.geojson in DIR that is a link to itself: the count of DIR's files that are not
    tiles followed every file's links, and Python's RuntimeError ("Symlink loop") left as a
    traceback with exit 1 after the layer was written. It is one more file that is not a tile."""
    pred, gj = _two_tiles(tmp_path)
    loop = gj / "zz.geojson"
    loop.symlink_to(loop.name)
    out = tmp_path / "area.geojson"
    assert run(["--pred", str(pred), "--geojson", str(gj), "--out", str(out)]) == 0
    assert len(json.loads(out.read_text())["features"]) == 1  # (the building across both)
    assert f"1 *.geojson in {gj} are not tiles" in capsys.readouterr().err


@pytest.mark.parametrize("crs", ["missing", None, ""])
def test_a_tile_whose_meta_has_no_crs_is_refused_naming_shard_and_tile(tmp_path, capsys, crs):
    """What failed: a missing crs was read as WGS 84 without a word (a UTM tile's footprints in
    the wrong place), and "crs": null as the CRS "None"; polygonize --geojson refuses both."""
    pred, gj = _two_tiles(tmp_path)
    a, b, c, d, e, f = TRANSFORM_4326
    samples = []
    for k in range(2):
        meta = {"crs": "EPSG:4326", "transform": [a, b, c + 16 * k * a, d, e, f], "width": 16,
                "height": 16}
        if k == 1:
            if crs == "missing":
                del meta["crs"]
            else:
                meta["crs"] = crs
        samples.append((f"t{k}", np.zeros((16, 16, 3), np.uint8), meta))
    shard = pred / "pred-000000.tar"
    write_pred_shard(shard, samples)
    out = tmp_path / "area.geojson"
    assert run(["--pred", str(pred), "--geojson", str(gj), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert f'{shard}: t1: meta.json has no crs (a tile in lon/lat says "crs": "EPSG:4326")' in err
    assert not out.exists()
