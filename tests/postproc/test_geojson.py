"""GeoJSON per tile: the affine transform, the CRS member, ring orientation, safe file names."""

from __future__ import annotations

import contextlib
import json
import os

import pytest
import shapely
from affine import Affine
from pyproj import CRS
from shapely.geometry import box, shape

from dataio.atomic import WriteError, discard_staging_dir, fresh_staging_dir, missing_dirs
from postproc.geojson import MAX_IMAGE_ID_BYTES, tile_feature_collection, write_tile_geojson
from postproc.predio import PredError

UTM = {"crs": "EPSG:32611", "transform": [0.3, 0.0, 500000.0, 0.0, -0.3, 4000000.0]}


def test_utm_tile_gets_map_coordinates_and_a_crs_member():
    hole = box(0, 0, 10, 10).difference(box(4, 4, 6, 6))
    doc = tile_feature_collection("img1", [hole], [0.9], UTM)
    assert doc["crs"]["properties"]["name"] == "urn:ogc:def:crs:EPSG::32611"
    (feat,) = doc["features"]
    assert feat["properties"] == {"ImageId": "img1", "BuildingId": 1, "Confidence": 0.9}
    g = shape(feat["geometry"])
    assert g.equals(box(500000, 4000000 - 3, 500003, 4000000).difference(
        box(500001.2, 3999998.2, 500001.8, 3999998.8)))
    assert g.exterior.is_ccw and not g.interiors[0].is_ccw  # RFC 7946 winding


def test_wgs84_tile_has_no_crs_member(tmp_path):
    meta = {"crs": "EPSG:4326", "transform": [1e-5, 0, -115.0, 0, -1e-5, 36.0]}
    path = write_tile_geojson(tmp_path, "img2", [box(0, 0, 2, 2)], [1.0], meta)
    doc = json.loads(path.read_text())
    assert path.name == "img2.geojson" and "crs" not in doc
    assert shapely.geometry.shape(doc["features"][0]["geometry"]).bounds == \
        pytest.approx((-115.0, 35.99998, -114.99998, 36.0))


def test_bad_meta_and_unsafe_ids_are_refused(tmp_path):
    with pytest.raises(PredError, match="transform"):
        tile_feature_collection("a", [box(0, 0, 1, 1)], [1.0], {"transform": [1, 0, 0]})
    with pytest.raises(PredError, match="has no crs"):
        tile_feature_collection("a", [box(0, 0, 1, 1)], [1.0], {"transform": UTM["transform"]})
    with pytest.raises(PredError, match="has no crs"):
        tile_feature_collection("a", [], [], {**UTM, "crs": None})
    with pytest.raises(PredError, match="no transform"):
        tile_feature_collection("a", [box(0, 0, 1, 1)], [1.0], {"crs": "EPSG:4326"})
    with pytest.raises(PredError, match="unknown CRS"):
        tile_feature_collection("a", [], [], {**UTM, "crs": "EPSG:99999999"})
    with pytest.raises(PredError):
        write_tile_geojson(tmp_path, "../escape", [], [], UTM)
    assert list(tmp_path.iterdir()) == []


def test_the_longest_image_id_that_gets_a_geojson_is_max_image_id_bytes(tmp_path):
    """What failed, and where: a chip of a long scene ImageId (dataio.prepare --chip-size adds
    _r<row>_c<col>) reached polygonize --geojson, whose first such tile stopped the run with
    "[Errno 36] File name too long", after the prediction: the temporary name,
    .<ImageId>.geojson.<8 random>.tmp, is 22 bytes longer than the ImageId, so 234 bytes failed
    although <ImageId>.geojson, 242, fits the 255 bytes of a file name. MAX_IMAGE_ID_BYTES,
    which prepare checks, is the longest that is written."""
    if os.pathconf(tmp_path, "PC_NAME_MAX") != 255:
        pytest.skip("a file system whose names are not limited to 255 bytes")
    assert MAX_IMAGE_ID_BYTES == 233
    key = "a" * MAX_IMAGE_ID_BYTES
    assert write_tile_geojson(tmp_path, key, [], [], UTM).name == f"{key}.geojson"
    with pytest.raises(PredError, match="File name too long"):
        write_tile_geojson(tmp_path, key + "b", [], [], UTM)


def test_a_concurrent_writers_temp_file_is_left_alone(tmp_path):
    """Pool workers write tiles into one staging directory at once: a tile's write must not
    delete another live writer's temp file of the same name (a duplicate ImageId across shards
    then failed with FileNotFoundError instead of the runner naming the duplicate)."""
    live = tmp_path / ".img3.geojson.x1y2z3.tmp"
    live.write_text("being written")
    write_tile_geojson(tmp_path, "img3", [box(0, 0, 2, 2)], [1.0], UTM)
    assert live.read_text() == "being written" and (tmp_path / "img3.geojson").exists()


@pytest.mark.parametrize("transform", [None, 5, "0.3 0 0 0 -0.3 0"])
def test_a_transform_that_is_not_a_list_is_refused(transform):
    """(None or a number raised a TypeError from len())."""
    with pytest.raises(PredError, match="transform .* is not six finite numbers"):
        tile_feature_collection("a", [box(0, 0, 1, 1)], [1.0], {**UTM, "transform": transform})


@pytest.mark.parametrize("transform", [[0, 0, 0, 0, 0, 0], [0.3, 0.6, 5e5, 0.1, 0.2, 4e6]])
def test_a_degenerate_transform_is_refused(transform):
    """A singular transform (zeros, or proportional rows) put every footprint of the tile on one
    point or line in its GeoJSON, without a word: polygonize --geojson exited 0."""
    with pytest.raises(PredError, match=r"transform \[.*\] is degenerate"):
        tile_feature_collection("a", [box(0, 0, 1, 1)], [1.0], {**UTM, "transform": transform})


def test_a_rotated_transform_maps_each_corner_as_rasterio_does():
    """North-up tests cannot tell the affine from its transpose: a rotated or sheared tile can."""
    t = Affine(0.3, 0.1, 500000.0, 0.2, -0.3, 4000000.0)
    doc = tile_feature_collection("img1", [box(0, 0, 4, 2)], [1.0], {**UTM, "transform": list(t)})
    got = shape(doc["features"][0]["geometry"])
    want = shapely.Polygon([t @ xy for xy in [(0, 0), (4, 0), (4, 2), (0, 2)]])
    assert got.equals(want) and got.exterior.is_ccw


def test_a_crs_without_an_epsg_code_is_named_by_its_wkt():
    """A local projection has no EPSG code: the crs member must carry its WKT, or a reader has
    nothing to place the map coordinates with (an EPSG urn of None named no CRS at all)."""
    local = "+proj=tmerc +lat_0=36 +lon_0=-115.1 +k=1 +x_0=0 +y_0=0 +ellps=GRS80 +units=m"
    doc = tile_feature_collection("img1", [box(0, 0, 1, 1)], [1.0], {**UTM, "crs": local})
    assert CRS.from_user_input(doc["crs"]["properties"]["name"]) == CRS.from_user_input(local)


def test_a_tile_written_after_the_stage_was_removed_makes_no_directory(tmp_path):
    """Under torchrun, a stopped run's rank 0 removes DIR/.partial (and a DIR it made) once its
    own pool is closed, while another rank's pool may still finish a chunk: that chunk's write
    made DIR/.partial, and DIR, again, and they stayed behind holding its tiles. Now the write
    fails (that rank is stopping anyway) and leaves nothing."""
    stage = tmp_path / "gj" / ".partial"  # (already removed: neither exists)
    with pytest.raises(WriteError, match="cannot write"):
        write_tile_geojson(stage, "img4", [box(0, 0, 2, 2)], [1.0], UTM)
    assert list(tmp_path.iterdir()) == []


def test_a_tile_written_while_the_stage_is_removed_does_not_keep_it(tmp_path, monkeypatch):
    """The same race one step earlier: the other rank's tile lands in DIR/.partial after rank 0's
    rmtree has listed it, so rmtree could not remove the stage (not empty: an error it ignores),
    and DIR, made for the run, stayed with it. (The tile lands as rmtree's os.scandir returns.)"""
    gj = tmp_path / "gj"
    made = missing_dirs(gj)
    stage = fresh_staging_dir(gj)
    write_tile_geojson(stage, "img5", [box(0, 0, 2, 2)], [1.0], UTM)  # rank 0's
    real_scandir, landed = os.scandir, []

    def scandir(*args):
        with real_scandir(*args) as it:
            entries = list(it)
        if not landed:  # another rank's worker ends its chunk now
            landed.append(1)
            with contextlib.suppress(WriteError):
                write_tile_geojson(stage, "img6", [box(0, 0, 2, 2)], [1.0], UTM)
        return contextlib.nullcontext(iter(entries))

    monkeypatch.setattr(os, "scandir", scandir)
    discard_staging_dir(gj, made)
    monkeypatch.undo()
    assert landed and list(tmp_path.iterdir()) == []
