"""dataio.prepare on bad input: a clear outcome for each case, and nothing lost."""

from __future__ import annotations

import csv
import errno
import json
import shutil
import signal
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
from proc_helpers import interrupt_when
from pyproj import CRS
from rasterio.errors import NotGeoreferencedWarning

from dataio import prepare as prep
from dataio.geo import reproject_geometry
from dataio.manifest import load_manifest
from dataio.prepare import PrepareConfig, prepare
from dataio.shards import ShardWriter, decode_sample, iter_tar_samples
from dataio.synth import SynthConfig, write_aoi
from dataio.synth import main as synth_main

TILES = 6


@pytest.fixture(scope="module")
def _raw_written(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("bad_input") / "raw"
    write_aoi(SynthConfig(out=out, tiles=TILES, seed=11, size=160))
    return out


@pytest.fixture
def raw(_raw_written: Path, tmp_path: Path) -> Path:
    """A copy of the AOI for each test, which may break its files.

    NOTE: copied, not written again: write_aoi took ~0.3-0.6 s for each of the tests here."""
    return Path(shutil.copytree(_raw_written, tmp_path / "raw"))


def _tif(raw: Path, n: int) -> Path:
    return raw / "RGB-PanSharpen" / f"RGB-PanSharpen_AOI_2_Vegas_img{n}.tif"


def _geojson(raw: Path, n: int) -> Path:
    return raw / "geojson" / "buildings" / f"buildings_AOI_2_Vegas_img{n}.geojson"


def _run(raw: Path, out: Path, **kw: object) -> dict:
    return prepare(PrepareConfig(raw=[raw], out=out, shard_size=2, **kw), progress=False)


def _samples(data: Path) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    return {k: decode_sample(m) for s in ("train", "val", "test")
            for shard in sorted((data / s).glob("shard-*.tar")) for k, m in iter_tar_samples(shard)}


def _truth(data: Path) -> dict[str, list[shapely.Polygon]]:
    out: dict[str, list[shapely.Polygon]] = {}
    for s in ("train", "val", "test"):
        with open(data / s / "truth.csv", newline="") as f:
            for row in csv.DictReader(f):
                g = shapely.force_2d(shapely.from_wkt(row["PolygonWKT_Pix"]))
                out.setdefault(row["ImageId"], []).extend([] if g.is_empty else [g])
    return out


def _skipped(m: dict) -> dict[str, str]:
    return {s["image_id"]: s["reason"] for s in m["skipped"]}


def test_truncated_tiff_is_skipped_and_reported(raw: Path, tmp_path: Path) -> None:
    tif = _tif(raw, 2)
    tif.write_bytes(tif.read_bytes()[: tif.stat().st_size // 2])
    m = _run(raw, tmp_path / "d")
    assert list(_skipped(m)) == ["AOI_2_Vegas_img2"]
    reason = _skipped(m)["AOI_2_Vegas_img2"]
    assert "unreadable image" in reason
    # GDAL's own words, which strip of which band: rasterio's alone, "Read failed. See previous
    # exception for details.", pointed at an exception the manifest did not hold
    assert "previous exception" not in reason and "band 1" in reason
    assert len(_samples(tmp_path / "d")) == TILES - 1


def test_garbage_tiff_is_skipped_and_reported(raw: Path, tmp_path: Path) -> None:
    _tif(raw, 3).write_bytes(b"this is not a tiff" * 100)
    m = _run(raw, tmp_path / "d")
    assert "unreadable image" in _skipped(m)["AOI_2_Vegas_img3"]
    assert str(_tif(raw, 3)) in [s["path"] for s in m["skipped"]]


def test_the_cli_lists_ten_skipped_tiles_and_counts_the_rest(raw: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]
                                                             ) -> None:
    """A large AOI's summary names the first ten skips and points to the manifest for the rest."""
    bad = [_tif(raw, 100 + i) for i in range(13)]
    for tif in bad:
        tif.write_bytes(b"this is not a tiff" * 100)
    out = tmp_path / "d"
    assert prep.main(["--raw", str(raw), "--out", str(out), "--workers", "0", "--quiet"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].endswith("skipped 13")
    listed = [line for line in lines if line.startswith("  skipped ")]
    assert [line.split()[1].rstrip(":") for line in listed] == [str(t) for t in bad[:10]]
    assert all("unreadable image" in line for line in listed)
    assert lines[-1] == f"  ... and 3 more (see {out / 'manifest.json'})"
    assert len(json.loads((out / "manifest.json").read_text())["skipped"]) == 13


def test_an_image_without_a_crs_is_skipped(raw: Path, tmp_path: Path) -> None:
    """A tile with no CRS cannot be placed on the map: it is skipped with the reason, not a
    traceback from the worker that reprojects its labels."""
    with rasterio.open(_tif(raw, 3)) as ds:
        profile, data = ds.profile, ds.read()
    profile["crs"] = None
    with rasterio.open(_tif(raw, 3), "w", **profile) as ds:
        ds.write(data)
    m = _run(raw, tmp_path / "d")
    assert _skipped(m) == {"AOI_2_Vegas_img3": "image has no CRS (not georeferenced)"}
    assert len(_samples(tmp_path / "d")) == TILES - 1


def test_an_image_without_a_geotransform_is_skipped_with_or_without_buildings(
        raw: Path, tmp_path: Path) -> None:
    """A CRS but no geotransform (rasterio reads the identity and warns): no pixel has a place
    on the map, so its labels cannot be placed (nor its predictions' GeoJSON). The tile with
    buildings was skipped as 'all off the image' and the one without was kept, in pixel units."""
    assert json.loads(_geojson(raw, 2).read_text())["features"]  # (synth seed 11: 8 buildings)
    assert not json.loads(_geojson(raw, 3).read_text())["features"]  # (and none)
    for n in (2, 3):
        with rasterio.open(_tif(raw, n)) as ds:
            profile, data = ds.profile, ds.read()
        del profile["transform"]
        with (pytest.warns(NotGeoreferencedWarning),
              rasterio.open(_tif(raw, n), "w", **profile) as ds):
            ds.write(data)
    # what the image says: a CRS, no geotransform
    with pytest.warns(NotGeoreferencedWarning), rasterio.open(_tif(raw, 3)) as ds:
        assert ds.crs is not None and ds.transform.is_identity
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = _run(raw, tmp_path / "d")
    reason = "image has no geotransform (not georeferenced)"
    assert _skipped(m) == {"AOI_2_Vegas_img2": reason, "AOI_2_Vegas_img3": reason}
    assert len(_samples(tmp_path / "d")) == TILES - 2
    # the skip reports it: prepare does not warn as well
    assert not [w for w in caught if issubclass(w.category, NotGeoreferencedWarning)]


def test_an_image_id_in_two_aois_is_kept_once(raw: Path, tmp_path: Path) -> None:
    """Two --raw folders naming the same tiles give one sample per ImageId (the first AOI's), so
    no shard holds a key twice and no truth CSV lists a tile twice; the others are reported."""
    copy = tmp_path / "copy"
    shutil.copytree(raw, copy)
    m = prepare(PrepareConfig(raw=[raw, copy], out=tmp_path / "d", shard_size=2), progress=False)
    assert [s["path"] for s in m["skipped"]] == sorted(str(p) for p in
                                                      (copy / "RGB-PanSharpen").iterdir())
    assert {s["reason"] for s in m["skipped"]} == {
        f"duplicate ImageId (also in {_tif(raw, n)})" for n in range(1, TILES + 1)}
    assert sum(s["samples"] for s in m["splits"].values()) == TILES
    assert sorted(_truth(tmp_path / "d")) == sorted(_samples(tmp_path / "d"))


def test_a_tiff_extension_is_read_like_tif(raw: Path, tmp_path: Path) -> None:
    _tif(raw, 2).rename(_tif(raw, 2).with_suffix(".tiff"))
    m = _run(raw, tmp_path / "d")
    assert m["skipped"] == [] and "AOI_2_Vegas_img2" in _samples(tmp_path / "d")


def test_missing_geojson_is_skipped(raw: Path, tmp_path: Path) -> None:
    _geojson(raw, 1).unlink()
    m = _run(raw, tmp_path / "d")
    assert "label file missing" in _skipped(m)["AOI_2_Vegas_img1"]
    assert "AOI_2_Vegas_img1" not in _samples(tmp_path / "d")


def test_shards_hold_shard_size_and_an_empty_tile_has_its_truth_row(raw: Path,
                                                                   tmp_path: Path) -> None:
    """--shard-size is the most samples a shard holds; a tile without buildings is a sample with
    the truth row ``-1,POLYGON EMPTY`` (the scorer counts its false positives), and the manifest's
    building count is the truth's buildings, not its rows."""
    _geojson(raw, 1).write_text('{"type": "FeatureCollection", "features": []}')
    m = prepare(PrepareConfig(raw=[raw], out=tmp_path / "d", shard_size=2, split=(1, 0, 0)),
                progress=False)
    train = m["splits"]["train"]
    assert [sh["samples"] for sh in train["shards"]] == [2, 2, 2]
    with open(tmp_path / "d" / "train" / "truth.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    assert [r for r in rows if r[0] == "AOI_2_Vegas_img1"] == [
        ["AOI_2_Vegas_img1", "-1", "POLYGON EMPTY", "POLYGON EMPTY"]]
    metas = [meta for _, _, meta in _samples(tmp_path / "d").values()]
    assert train["buildings"] == sum(meta["building_count"] for meta in metas)
    assert train["buildings"] == sum(r[1] != "-1" for r in rows) > 0


def test_malformed_geojson_is_skipped_with_the_file_named(raw: Path, tmp_path: Path) -> None:
    _geojson(raw, 4).write_text('{"type": "FeatureCollection", "features": [')
    _geojson(raw, 5).write_text('{"type": "Feature"}')
    _geojson(raw, 6).write_text("[" * 100_000 + "]" * 100_000)  # deeper than Python recurses
    m = _run(raw, tmp_path / "d")
    reasons = _skipped(m)
    assert "malformed GeoJSON" in reasons["AOI_2_Vegas_img6"]
    assert "malformed GeoJSON" in reasons["AOI_2_Vegas_img4"]
    assert str(_geojson(raw, 4)) in reasons["AOI_2_Vegas_img4"]
    assert "not a FeatureCollection" in reasons["AOI_2_Vegas_img5"]


def test_self_intersecting_polygon_is_repaired_and_noted(raw: Path, tmp_path: Path) -> None:
    with rasterio.open(_tif(raw, 1)) as ds:
        t = ds.transform
    # a bow-tie in lon/lat covering pixels (20..60, 20..60)
    corners = [(20, 20), (60, 60), (60, 20), (20, 60), (20, 20)]
    ring = [[t.c + t.a * x, t.f + t.e * y, 0.0] for x, y in corners]
    gj = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {}, "geometry": {"type": "Polygon",
                                                           "coordinates": [ring]}}]}
    _geojson(raw, 1).write_text(json.dumps(gj))
    m = _run(raw, tmp_path / "d")
    notes = [r for r in m["repaired"] if r["image_id"] == "AOI_2_Vegas_img1"]
    assert len(notes) == 1 and "Self-intersection" in notes[0]["note"]
    _, mask, meta = _samples(tmp_path / "d")["AOI_2_Vegas_img1"]
    assert meta["building_count"] == 2  # the bow-tie's two triangles
    assert mask[40, 25] == 1 and mask[40, 55] == 1  # inside the left and right triangles
    assert mask[24, 40] == 0  # the empty wedge between the triangles stays background


def test_label_in_another_crs_gives_the_same_mask(raw: Path, tmp_path: Path) -> None:
    expected = _run(raw, tmp_path / "lonlat")
    utm = CRS.from_epsg(32611)
    for n in range(1, TILES + 1):
        doc = json.loads(_geojson(raw, n).read_text())
        for f in doc["features"]:
            from shapely.geometry import mapping, shape

            g = reproject_geometry(shape(f["geometry"]), CRS.from_user_input("OGC:CRS84"), utm)
            f["geometry"] = mapping(g)
        doc["crs"] = {"type": "name", "properties": {"name": "urn:ogc:def:crs:EPSG::32611"}}
        _geojson(raw, n).write_text(json.dumps(doc))
    _run(raw, tmp_path / "utm")
    a, b = _samples(tmp_path / "lonlat"), _samples(tmp_path / "utm")
    assert a.keys() == b.keys() and expected["skipped"] == []
    truth = _truth(tmp_path / "lonlat")
    for k in a:
        rows, cols = np.nonzero(a[k][1] != b[k][1])
        # Reprojection round-off (1e-9 px) may flip only a pixel centre lying exactly on an
        # outline or exactly boundary_width (2.5 px) from one, e.g. beside a tile edge.
        outlines = shapely.union_all([p.boundary for p in truth.get(k, [])])
        for r, c in zip(rows, cols, strict=True):
            d = outlines.distance(shapely.Point(c + 0.5, r + 0.5))
            assert min(abs(d - 2.5), d) < 1e-3, (k, r, c, d)  # truth WKT has 1e-4 px


def test_utm_tiles_of_another_size(tmp_path: Path) -> None:
    """SpaceNet-4-like tiles: 900x900 in UTM with labels in lon/lat."""
    raw = tmp_path / "raw"
    write_aoi(SynthConfig(out=raw, tiles=3, seed=2, size=900, crs="EPSG:32611", gsd_m=0.5,
                          aoi="AOI_6_Atlanta"))
    m = _run(raw, tmp_path / "d")
    assert m["skipped"] == []
    samples = _samples(tmp_path / "d")
    assert len(samples) == 3
    for key, (img, mask, meta) in samples.items():
        assert img.shape == (900, 900, 3) and mask.shape == (900, 900)
        assert meta["crs"] == "EPSG:32611" and key.startswith("AOI_6_Atlanta_img")
        assert meta["transform"][0] == 0.5


@pytest.mark.parametrize("four_band", [[6], [4, 5, 6]])  # one, and a tie
def test_band_count_mismatch_is_skipped(raw: Path, tmp_path: Path, four_band: list[int]) -> None:
    """The majority band count decides; on a tie the tiles with more bands are kept."""
    for n in four_band:
        with rasterio.open(_tif(raw, n)) as ds:
            profile, data = ds.profile, ds.read()
        profile["count"] = 4
        with rasterio.open(_tif(raw, n), "w", **profile) as ds:
            ds.write(np.concatenate([data, data[:1]]))
    m = _run(raw, tmp_path / "d")
    if len(four_band) == 1:
        assert _skipped(m) == {"AOI_2_Vegas_img6": "has 4 bands, the rest of the AOI has 3"}
        assert m["bands"] == 3
    else:
        assert _skipped(m) == {f"AOI_2_Vegas_img{n}": "has 3 bands, the rest of the AOI has 4"
                               for n in (1, 2, 3)}
        assert m["bands"] == 4


@pytest.mark.parametrize("eight_bit", [[6], [4, 5, 6]])  # one, and a tie
def test_dtype_mismatch_is_skipped(raw: Path, tmp_path: Path, eight_bit: list[int]) -> None:
    """An 8-bit tile among 16-bit ones would drag the shared normalisation down; on a tie the
    16-bit tiles (SpaceNet's format) are kept."""
    for n in eight_bit:
        with rasterio.open(_tif(raw, n)) as ds:
            profile, data = ds.profile, ds.read()
        profile["dtype"] = "uint8"
        with rasterio.open(_tif(raw, n), "w", **profile) as ds:
            ds.write((data >> 3).astype(np.uint8))
    m = _run(raw, tmp_path / "d")
    assert _skipped(m) == {f"AOI_2_Vegas_img{n}": "is uint8, most tiles are uint16"
                           for n in eight_bit}
    assert sum(s["samples"] for s in m["splits"].values()) == TILES - len(eight_bit)


def test_existing_dataset_is_not_overwritten_silently(raw: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d"
    _run(raw, out)
    before = (out / "manifest.json").read_bytes()
    assert prep.main(["--raw", str(raw), "--out", str(out), "--quiet", "--workers", "0"]) == 2
    err = capsys.readouterr().err
    assert "already holds a dataset" in err and "--overwrite" in err
    assert (out / "manifest.json").read_bytes() == before
    assert prep.main(["--raw", str(raw), "--out", str(out), "--quiet", "--overwrite",
                      "--workers", "0", "--seed", "3"]) == 0
    assert load_manifest(out).data["config"]["seed"] == 3
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    assert prep.main(["--raw", str(raw), "--out", str(tmp_path / "other"), "--quiet"]) == 2
    assert "not empty" in capsys.readouterr().err


def _dying(monkeypatch: pytest.MonkeyPatch, at: int) -> None:
    """Make the ``at``-th tile raise KeyboardInterrupt, as if the user hit Ctrl-C mid-shard."""
    real = prep.process_tile
    calls = {"n": 0}

    def dying(*args: object) -> dict:
        calls["n"] += 1
        if calls["n"] == at:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(prep, "process_tile", dying)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def test_an_out_that_cannot_be_made_is_one_line(raw: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """An OSError (here --out under a regular file) exits 2 with the reason, not a traceback,
    naming --out (it was "[Errno 20] Not a directory: 'file/d/.partial'", after the scan)."""
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert prep.main(["--raw", str(raw), "--out", str(blocker / "d"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == (f"dataio.prepare: error: --out {blocker / 'd'}: "
                           f"{blocker} is not a directory")
    # the same for synth, whose --out that is a file was "[Errno 17] File exists: 'file'"
    for out in (blocker, blocker / "aoi"):
        assert synth_main(["--out", str(out), "--tiles", "1", "--size", "32"]) == 2
        err = capsys.readouterr().err
        assert err.strip() == (f"dataio.synth: error: --out {out}: "
                               f"{blocker} is not a directory")


def test_an_aoi_without_labels_is_refused_before_any_work_naming_images_only(
        raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """SpaceNet's *_Test_public AOIs have no geojson/: prepared without --images-only, every
    image was read and sharded, each then skipped as "label file missing", and prepare stopped
    on "the training split is empty: add tiles or change --split", naming no flag."""
    aoi = tmp_path / "AOI_2_Vegas_Test_public"
    shutil.copytree(raw / "RGB-PanSharpen", aoi / "RGB-PanSharpen")
    assert prep.main(["--raw", str(aoi), "--out", str(tmp_path / "d"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"dataio.prepare: error: --raw {aoi}: no geojson/buildings/ folder (the building "
        "labels); prepare imagery without labels with --images-only (for trainer.predict)")
    assert not (tmp_path / "d").exists()
    assert prep.main(["--raw", str(aoi), "--out", str(tmp_path / "d"), "--quiet",
                      "--images-only"]) == 0


def test_a_raw_that_is_no_directory_says_so(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """A typo in --raw said "no RGB-PanSharpen/ folder (expected the SpaceNet layout ...); RAW
    holds none of RGB-PanSharpen/, MUL-PanSharpen/", as if the directory were there."""
    (tmp_path / "file").write_text("")
    for raw, what in ((tmp_path / "AOI_2_Vegas_Trian", "no such directory"),
                      (tmp_path / "file", "not a directory")):
        assert prep.main(["--raw", str(raw), "--out", str(tmp_path / "d"), "--quiet"]) == 2
        assert capsys.readouterr().err.strip() == (
            f"dataio.prepare: error: --raw {raw}: {what} (a SpaceNet AOI directory, e.g. "
            "AOI_2_Vegas_Train)")


def test_an_empty_product_folder_is_named(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """A product folder with no .tif (a download that failed, or synth --overwrite without
    --mul, which empties MUL-PanSharpen/) said only "no usable tiles in RAW", the same as for
    an AOI whose every tile is unreadable, and named nothing to look at."""
    raw = tmp_path / "AOI"
    (raw / "RGB-PanSharpen").mkdir(parents=True)
    (raw / "geojson" / "buildings").mkdir(parents=True)
    assert prep.main(["--raw", str(raw), "--out", str(tmp_path / "d"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"dataio.prepare: error: --raw {raw}: {raw}/RGB-PanSharpen/ holds no .tif (a download "
        "that failed, or one not unpacked there)")


def test_an_empty_product_folder_without_labels_is_named_before_the_labels(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A download that failed before its images and labels were unpacked (RGB-PanSharpen/ made,
    empty, no geojson/) was refused for its labels, advising --images-only, which then only
    led to "holds no .tif": the empty product folder is what to fix, with or without labels."""
    raw = tmp_path / "AOI"
    (raw / "RGB-PanSharpen").mkdir(parents=True)
    for flags in ([], ["--images-only"]):
        assert prep.main(["--raw", str(raw), "--out", str(tmp_path / "d"), "--quiet",
                          *flags]) == 2
        assert capsys.readouterr().err.strip() == (
            f"dataio.prepare: error: --raw {raw}: {raw}/RGB-PanSharpen/ holds no .tif (a "
            "download that failed, or one not unpacked there)"), flags


def test_an_empty_product_folder_beside_another_aoi_is_refused(
        raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An AOI among several whose product folder held no .tif added 0 tiles without a word (the
    manifest's sources alone said 'tiles: 0'), where one without the folder is refused."""
    empty = tmp_path / "AOI_9_Empty"
    (empty / "RGB-PanSharpen").mkdir(parents=True)
    (empty / "geojson" / "buildings").mkdir(parents=True)
    out = tmp_path / "d"
    assert prep.main(["--raw", str(raw), "--raw", str(empty), "--out", str(out),
                      "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"dataio.prepare: error: --raw {empty}: {empty}/RGB-PanSharpen/ holds no .tif (a "
        "download that failed, or one not unpacked there); leave this --raw out to prepare "
        "the others")
    assert not out.exists()


@pytest.mark.parametrize("stop", ["ctrl_c", "error"])
def test_interrupted_run_leaves_nothing_behind(raw: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch, stop: str) -> None:
    if stop == "ctrl_c":
        _dying(monkeypatch, 5)
    else:  # a shard write that fails (a full disk) after the first shard is in the stage
        real, calls = ShardWriter.write, {"n": 0}

        def full(self: ShardWriter, sample: dict) -> None:
            calls["n"] += 1
            if calls["n"] == 5:
                raise OSError(errno.ENOSPC, "No space left on device")
            real(self, sample)

        monkeypatch.setattr(ShardWriter, "write", full)
    out = tmp_path / "d"
    with pytest.raises(KeyboardInterrupt if stop == "ctrl_c" else OSError):
        _run(raw, out, workers=0)
    # no manifest, no shard, no temp file: the stage went with the run, and the --out it made
    assert not out.exists()
    monkeypatch.undo()
    _run(raw, out)  # nothing to refuse: no --overwrite needed
    assert len(_samples(out)) == TILES


@pytest.mark.slow  # the real command in a process of its own
@pytest.mark.timeout(180)
@pytest.mark.parametrize(("workers", "press_when", "sig"), [
    (0, "tile", signal.SIGINT), (2, "worker starting", signal.SIGINT),
    # a SIGTERM to its processes (Slurm's scancel or time limit), its pool's workers busy
    (2, "tile", signal.SIGTERM)])
def test_ctrl_c_is_one_line_and_leaves_no_dataset(raw: Path, tmp_path: Path, workers: int,
                                                  press_when: str, sig: int) -> None:
    """Ctrl-C mid-run was a KeyboardInterrupt traceback (exit -2) and, with workers, another
    from each worker still starting (importing for seconds before its initializer could set
    Ctrl-C aside). Now: one line, exit 130, and no dataset in --out (the stage is gone). A
    SIGTERM killed it without a word, its stage left in --out: now the same, exit 143."""
    out = tmp_path / "d"
    worker = str(Path(__file__).with_name("ctrl_c_worker.py"))  # slow tiles and worker starts
    res = interrupt_when([sys.executable, worker, "--raw", str(raw), "--out", str(out),
                          "--shard-size", "2", "--workers", str(workers)], press_when, times=2,
                         sig=sig)
    lines = res.stderr.replace("\r", "\n").splitlines()
    how = "interrupted" if sig == signal.SIGINT else "terminated (SIGTERM)"
    assert [line for line in lines if line and not line.startswith("prepare:")] == [
        f"dataio.prepare: {how}; rerun the same command to prepare {out} (a dataset "
        "already there is kept until the new one is complete)"], res.stderr[-3000:]
    assert res.returncode == 128 + sig, res.stderr[-3000:]
    assert not out.exists()  # (no dataset: the stage is gone, and the --out made for it)


def test_interrupted_overwrite_keeps_the_old_dataset(raw: Path, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "d"
    _run(raw, out)
    before = _files(out)
    _dying(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        _run(raw, out, workers=0, overwrite=True)
    assert _files(out) == before  # byte for byte (it was deleted before the new one was built)
    # A run killed outright (no cleanup) leaves its stage; the next run removes it first.
    (out / prep.STAGING / "train").mkdir(parents=True)
    (out / prep.STAGING / "train" / "shard-000000.tar").write_bytes(b"torn")
    with pytest.raises(ValueError, match="already holds a dataset"):
        _run(raw, out)  # the stage does not hide the dataset from the refusal
    monkeypatch.undo()
    _run(raw, out, overwrite=True)
    assert not (out / prep.STAGING).exists() and len(_samples(out)) == TILES


def test_interrupted_swap_deletes_neither_dataset(raw: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """Ctrl-C inside the swap itself (after the old dataset moved aside, before the new one is
    in): no manifest, so readers refuse, but the old dataset is whole in .old and the new one
    whole in the stage (an error handler deleted the finished stage, and the old splits were
    being deleted: both were lost)."""
    out = tmp_path / "d"
    _run(raw, out)
    before = _files(out)
    real, calls = prep.fsync_dir, {"n": 0}

    def cut(path: Path) -> None:
        calls["n"] += 1
        if calls["n"] == 1:  # the old dataset is aside; nothing new has moved in
            raise KeyboardInterrupt
        real(path)

    monkeypatch.setattr(prep, "fsync_dir", cut)
    with pytest.raises(KeyboardInterrupt):
        _run(raw, out, workers=0, overwrite=True, seed=5)
    assert not (out / "manifest.json").exists()
    assert _files(out / prep.OLD) == before
    assert load_manifest(out / prep.STAGING).data["config"]["seed"] == 5  # complete, not deleted
    monkeypatch.undo()
    # .old is now the only copy of the previous dataset: a plain rerun must not delete it
    with pytest.raises(ValueError, match=r"interrupted prepare left the previous dataset in "
                                         r".*\.old.*--overwrite"):
        _run(raw, out, seed=5)
    assert _files(out / prep.OLD) == before
    _run(raw, out, seed=5, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "test", "train", "val"]
    assert load_manifest(out).data["config"]["seed"] == 5 and len(_samples(out)) == TILES


class _DiesOn(prep._Call):
    """prepare's worker call, but the process dies on one tile, as one killed for memory or
    crashed inside GDAL does (pickled by reference: the spawned workers import this module)."""

    def __init__(self, bands: int, boundary_width: float, victim: str = "AOI_2_Vegas_img3"):
        super().__init__(bands, boundary_width)
        self.victim = victim

    def __call__(self, tile: prep.Tile) -> dict:
        if tile.image_id == self.victim:
            import os
            os._exit(9)
        return super().__call__(tile)


@pytest.mark.timeout(120)
def test_a_tile_whose_worker_dies_is_skipped_and_the_rest_prepared(
        raw: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(the pool broke: a BrokenProcessPool traceback naming no tile, and no dataset)"""
    monkeypatch.setattr(prep, "_Call", _DiesOn)
    manifest = _run(raw, tmp_path / "data", workers=2)
    assert [(s["image_id"], "worker process died" in s["reason"])
            for s in manifest["skipped"]] == [("AOI_2_Vegas_img3", True)]
    assert sorted(_samples(tmp_path / "data")) == sorted(
        f"AOI_2_Vegas_img{n}" for n in range(1, TILES + 1) if n != 3)


def _dies_when_told(item: tuple[str, str]) -> dict:
    """A worker call that returns its item's name, but dies on "victim" once ``go`` exists."""
    import os
    import time

    name, go = item
    if name == "victim":
        deadline = time.monotonic() + 60  # (a bound on a broken test, not a timing)
        while not Path(go).exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        os._exit(9)
    return {"tile": name}


@pytest.mark.timeout(120)
def test_a_worker_that_dies_while_the_head_result_is_in_hand_is_recovered(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """(the pool broke after the head tile's result came back, before the next tile was
    submitted: that submit raised BrokenProcessPool outside the recovery, a traceback)"""
    import time

    pools: list = []
    make_pool = prep._pool
    monkeypatch.setattr(prep, "_pool", lambda n: pools.append(make_pool(n)) or pools[-1])
    go = str(tmp_path / "go")
    window = 4 * 2  # _bounded_map's with 2 workers

    def items():
        yield from ((name, go) for name in ["first", "victim", *map(str, range(3, window + 1))])
        # the refill after the head's result: the victim dies, and the pool breaks, first
        Path(go).touch()
        deadline = time.monotonic() + 60
        while not pools[-1]._broken and time.monotonic() < deadline:
            time.sleep(0.01)
        assert pools[-1]._broken
        yield from (("ninth", go), ("tenth", go))

    got = [r.get("tile") if "skip" not in r else ("skipped", r["tile"][0], r["skip"][:30])
           for r in prep._bounded_map(_dies_when_told, items(), 2)]
    assert got == ["first", ("skipped", "victim", "its worker process died readin"),
                   *map(str, range(3, window + 1)), "ninth", "tenth"]
