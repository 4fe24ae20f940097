"""dataio on bad values inside well-formed files: non-finite or far-off coordinates, degenerate
geotransforms, manifests of the wrong shape, non-finite flags. A clear outcome, not a traceback."""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import rasterio
import rasterio.crs
import shapely
import shapely.errors
from affine import Affine
from pyproj import CRS

from dataio import prepare as prep
from dataio.fixtures import write_dataset
from dataio.labels import LabelError, read_footprints
from dataio.loader import LoaderConfig
from dataio.manifest import ManifestError, load_manifest
from dataio.prepare import PrepareConfig, prepare
from dataio.shards import ShardWriter, encode_sample
from dataio.synth import SynthConfig, write_aoi

SIZE = 64
IMG1 = "AOI_2_Vegas_img1"


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    out = tmp_path / "raw"
    write_aoi(SynthConfig(out=out, tiles=2, seed=3, size=SIZE))
    return out


def _tif(raw: Path, n: int) -> Path:
    return raw / "RGB-PanSharpen" / f"RGB-PanSharpen_AOI_2_Vegas_img{n}.tif"


def _geojson(raw: Path, n: int) -> Path:
    return raw / "geojson" / "buildings" / f"buildings_AOI_2_Vegas_img{n}.geojson"


def _run(raw: Path, out: Path) -> dict[str, Any]:
    return prepare(PrepareConfig(raw=[raw], out=out, split=(1, 0, 0)), progress=False)


def _skipped(m: dict[str, Any]) -> dict[str, str]:
    return {s["image_id"]: s["reason"] for s in m["skipped"]}


def _ring(raw: Path, n: int, x0: float, y0: float, x1: float, y1: float) -> list[list[float]]:
    """A closed lon/lat ring around pixels (x0..x1, y0..y1) of tile ``n``."""
    with rasterio.open(_tif(raw, n)) as ds:
        t = ds.transform
    corners = [(x0, y0), (x1, y0), (x1, y1), (x0, y1), (x0, y0)]
    return [[t.c + t.a * x, t.f + t.e * y] for x, y in corners]


def _collection(*rings: list[list[float]], crs: str | None = None) -> dict[str, Any]:
    doc: dict[str, Any] = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon", "coordinates": [r]}}
        for r in rings]}
    if crs:
        doc["crs"] = {"type": "name", "properties": {"name": crs}}
    return doc


# ---- 1. coordinates GEOS cannot take -------------------------------------------------------------

@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_coordinates_skip_the_tile(raw: Path, tmp_path: Path, bad: float) -> None:
    ring = _ring(raw, 1, 10, 10, 30, 30)
    ring[1][0] = bad
    ok = _ring(raw, 1, 40, 40, 50, 50)
    _geojson(raw, 1).write_text(json.dumps(_collection(ok, ring)))  # json writes NaN, Infinity
    m = _run(raw, tmp_path / "d")
    reason = _skipped(m)[IMG1]
    assert str(_geojson(raw, 1)) in reason and "feature 1" in reason and "non-finite" in reason
    assert m["splits"]["train"]["samples"] == 1


def test_huge_projected_coordinates_skip_the_tile(raw: Path, tmp_path: Path) -> None:
    ring = [[0.0, 0.0], [1e300, 0.0], [1e300, 1e300], [0.0, 0.0]]
    _geojson(raw, 1).write_text(json.dumps(_collection(ring, crs="EPSG:32611")))
    m = _run(raw, tmp_path / "d")
    reason = _skipped(m)[IMG1]
    assert reason.startswith(f"{_geojson(raw, 1)}: feature 0") and "\n" not in reason
    assert m["splits"]["train"]["samples"] == 1


def test_a_geos_failure_names_the_file_and_feature(raw: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    bowtie = _ring(raw, 1, 10, 10, 30, 30)
    bowtie[1], bowtie[2] = bowtie[2], bowtie[1]  # self-intersecting: make_valid runs on it
    _geojson(raw, 1).write_text(json.dumps(_collection(_ring(raw, 1, 40, 40, 50, 50), bowtie)))

    def fails(*_: object, **__: object) -> None:
        raise shapely.errors.GEOSException("IllegalArgumentException: as GEOS says")

    monkeypatch.setattr(shapely, "make_valid", fails)
    with rasterio.open(_tif(raw, 1)) as ds:
        crs, transform = CRS.from_wkt(ds.crs.to_wkt()), ds.transform
    with pytest.raises(LabelError, match=r"buildings_AOI_2_Vegas_img1\.geojson: feature 1"):
        read_footprints(_geojson(raw, 1), crs, transform, SIZE, SIZE)


# ---- 2. an aborted shard leaves nothing for the garbage collector --------------------------------

def test_abort_closes_the_tar_writer(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ignored: list[str] = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: ignored.append(repr(u.exc_value)))
    w = ShardWriter(tmp_path, 0)
    image, mask = np.zeros((4, 4, 3), np.uint16), np.zeros((4, 4), np.uint8)
    w.write(encode_sample("a", image, mask, {"image_id": "a"}))
    w.abort()
    del w
    gc.collect()
    assert ignored == []
    assert list(tmp_path.iterdir()) == []


# ---- 3. a geotransform that cannot be inverted ---------------------------------------------------

def test_degenerate_geotransform_skips_the_tile(raw: Path, tmp_path: Path) -> None:
    with rasterio.open(_tif(raw, 1)) as ds:
        profile, data = ds.profile, ds.read()
    t = profile["transform"]
    profile["transform"] = Affine(0.0, 0.0, t.c, 0.0, 0.0, t.f)  # pixel size 0 (GDAL keeps it)
    with rasterio.open(_tif(raw, 1), "w", **profile) as ds:
        ds.write(data)
    m = _run(raw, tmp_path / "d")
    assert _skipped(m) == {IMG1: "image has a degenerate geotransform"}


@pytest.mark.parametrize("gsd", [0.0, -0.3, float("nan"), float("inf")])
def test_synth_refuses_a_gsd_that_is_not_a_positive_number(tmp_path: Path, gsd: float) -> None:
    with pytest.raises(ValueError, match="--gsd"):
        SynthConfig(out=tmp_path, gsd_m=gsd)


# ---- 4. footprints that all miss the image -------------------------------------------------------

def test_labels_in_a_wrong_crs_skip_the_tile(raw: Path, tmp_path: Path) -> None:
    # lon/lat coordinates under a UTM crs member: metres near the zone's origin, far off the tile
    doc = _collection(_ring(raw, 1, 10, 10, 30, 30), crs="EPSG:32611")
    _geojson(raw, 1).write_text(json.dumps(doc))
    m = _run(raw, tmp_path / "d")
    reason = _skipped(m)[IMG1]
    assert str(_geojson(raw, 1)) in reason
    assert "no footprint overlaps the image (wrong CRS in the GeoJSON?)" in reason


@pytest.mark.parametrize("side", ["label", "image"])
def test_a_crs_with_no_transform_to_the_images_skips_the_tile(raw: Path, tmp_path: Path,
                                                              side: str) -> None:
    """PROJ reads the CRS but has no way to the other one: that tile goes, the rest are made."""
    if side == "label":  # another planet's CRS in the legacy member
        doc = json.loads(_geojson(raw, 1).read_text())
        doc["crs"] = {"type": "name", "properties": {"name": "IAU_2015:30100"}}
        _geojson(raw, 1).write_text(json.dumps(doc))
    else:  # a site grid with no datum
        with rasterio.open(_tif(raw, 1), "r+") as ds:
            ds.crs = rasterio.crs.CRS.from_wkt('LOCAL_CS["site grid",UNIT["metre",1]]')
    m = _run(raw, tmp_path / "d")
    reason = _skipped(m)[IMG1]
    assert reason.startswith(f"{_geojson(raw, 1)}: cannot transform its CRS")
    assert sum(s["samples"] for s in m["splits"].values()) == 1


@pytest.mark.parametrize("member", [
    {"type": "link", "properties": {"href": "http://example.com/crs/42", "type": "proj4"}},
    {"type": "name", "properties": {}}])
def test_a_crs_member_without_a_name_skips_the_tile(raw: Path, tmp_path: Path,
                                                   member: dict[str, Any]) -> None:
    """A linked (or nameless) legacy CRS says the coordinates are not lon/lat without saying
    what they are: that tile is skipped with the reason, not read as lon/lat."""
    doc = json.loads(_geojson(raw, 1).read_text())
    doc["crs"] = member
    _geojson(raw, 1).write_text(json.dumps(doc))
    m = _run(raw, tmp_path / "d")
    reason = _skipped(m)[IMG1]
    assert reason.startswith(f"{_geojson(raw, 1)}: unknown CRS in the 'crs' member")
    assert "expected a named CRS" in reason
    assert sum(s["samples"] for s in m["splits"].values()) == 1

def test_no_features_is_still_an_empty_tile(raw: Path, tmp_path: Path) -> None:
    _geojson(raw, 1).write_text(json.dumps(_collection()))
    m = _run(raw, tmp_path / "d")
    assert m["skipped"] == [] and m["splits"]["train"]["samples"] == 2


def test_one_feature_off_the_tile_is_dropped_alone(raw: Path) -> None:
    inside, outside = _ring(raw, 1, 10, 10, 30, 30), _ring(raw, 1, 100, 100, 120, 120)
    _geojson(raw, 1).write_text(json.dumps(_collection(inside, outside)))
    with rasterio.open(_tif(raw, 1)) as ds:
        crs, transform = CRS.from_wkt(ds.crs.to_wkt()), ds.transform
    fp = read_footprints(_geojson(raw, 1), crs, transform, SIZE, SIZE)
    assert len(fp.polygons) == 1
    assert abs(fp.polygons[0].area - 400) < 1e-3


# ---- 5. a manifest of the wrong shape ------------------------------------------------------------

def _set(data: dict[str, Any], dotted: str, value: Any) -> None:
    keys: list[Any] = [int(k) if k.isdigit() else k for k in dotted.split(".")]
    for key in keys[:-1]:
        data = data[key]
    if value is _DELETE:
        del data[keys[-1]]
    else:
        data[keys[-1]] = value


_DELETE = object()


@pytest.mark.parametrize(("dotted", "value", "named"), [
    ("bands", "three", "bands"),
    ("bands", 0, "bands"),
    ("bands", True, "bands"),
    ("splits", [], "splits"),
    ("splits.val", "x", "splits.val"),
    ("splits.val.shards", _DELETE, "splits.val has no 'shards'"),
    ("splits.val.shards", {"name": "x"}, "splits.val.shards"),
    ("splits.val.samples", "1", "splits.val.samples"),
    ("splits.val.shards.0", "shard-000000.tar", "splits.val.shards[0]"),
    ("splits.val.shards.0.bytes", "12", "splits.val.shards[0].bytes"),
    ("splits.val.shards.0.index_bytes", _DELETE, "splits.val.shards[0] has no 'index_bytes'"),
    ("splits.val.shards.0.name", "../../etc/passwd", "splits.val.shards[0].name"),
    ("splits.val.shards.0.index", 7, "splits.val.shards[0].index"),
    ("band_stats.p2", _DELETE, "band_stats has no 'p2'"),
    ("band_stats.p98", [1100.0], "band_stats.p98"),
    ("band_stats.p2", ["a", 1, 2], "band_stats.p2"),
    ("band_stats.p2", [float("nan"), 1, 2], "band_stats.p2"),
    ("band_stats", [1, 2], "band_stats"),
    ("class_frequencies", [0.5, 0.5], "class_frequencies"),
    ("class_frequencies", "0.6,0.2,0.2", "class_frequencies"),
])
def test_manifest_of_the_wrong_shape_is_named(tmp_path: Path, dotted: str, value: Any,
                                              named: str) -> None:
    image, mask = np.zeros((8, 8, 3), np.uint16), np.zeros((8, 8), np.uint8)
    root = write_dataset(tmp_path / "d", {"val": [("a", image, mask)]})
    load_manifest(root)  # as written, it loads
    path = root / "manifest.json"
    data = json.loads(path.read_text())
    _set(data, dotted, value)
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError) as e:
        load_manifest(root)
    msg = str(e.value)
    assert msg.startswith(f"{path}: ") and named in msg and "\n" not in msg


def test_a_negative_seed_names_its_flag_before_anything_is_written(
        raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """numpy takes no negative seed; it said "expected non-negative integer", after the scan
    (prepare) or after making the AOI's folders, which then refused the next synth (synth)."""
    from dataio import synth
    assert synth.main(["--out", str(tmp_path / "s"), "--tiles", "1", "--seed", "-1"]) == 2
    assert "--seed must be >= 0, got -1" in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
    assert prep.main(["--raw", str(raw), "--out", str(tmp_path / "o"), "--seed", "-1",
                      "--quiet"]) == 2
    assert "--seed must be >= 0, got -1" in capsys.readouterr().err
    with pytest.raises(ValueError, match=r"data.seed must be in \[0, 4294967295\], got -1"):
        LoaderConfig(seed=-1)


def test_a_manifest_that_is_not_utf8_is_named(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_bytes(b"\xff\xfe{}")
    with pytest.raises(ManifestError, match=f"^{tmp_path / 'manifest.json'}: not valid UTF-8 JSON"):
        load_manifest(tmp_path)


# ---- 6. non-finite --split weights ---------------------------------------------------------------

@pytest.mark.parametrize("split", ["nan,1,1", "inf,1,1", "1,nan,1", "1,1,inf"])
def test_non_finite_split_weights_name_the_flag(raw: Path, tmp_path: Path, split: str,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    # (it failed with "cannot convert float NaN to integer", after the scan)
    assert prep.main(["--raw", str(raw), "--out", str(tmp_path / "o"),
                      "--split", split, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--split" in err and "finite" in err
    assert not (tmp_path / "o").exists()
