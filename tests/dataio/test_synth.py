"""dataio.synth writes a real SpaceNet-2 layout AOI with scenes worth learning."""

from __future__ import annotations

import csv
import hashlib
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.features
import shapely
from proc_helpers import interrupt_when
from pyproj import CRS
from shapely.geometry import box, shape

from dataio.geo import reproject_geometry
from dataio.render import render
from dataio.scene import Scene, make_scene
from dataio.synth import SynthConfig, main, write_aoi


def test_rasters_are_georeferenced_11bit_rgb(synthetic_aoi: Path) -> None:
    tifs = sorted((synthetic_aoi / "RGB-PanSharpen").glob("RGB-PanSharpen_AOI_2_Vegas_img*.tif"))
    assert len(tifs) == 10
    for tif in tifs:
        with rasterio.open(tif) as ds:
            assert (ds.count, ds.width, ds.height) == (3, 650, 650)
            assert ds.dtypes == ("uint16",) * 3
            assert CRS.from_user_input(ds.crs.to_wkt()).to_epsg() == 4326
            px_m = ds.transform.a * 111_320
            assert 0.25 < px_m < 0.35 and ds.transform.e == -ds.transform.a
            assert -116 < ds.transform.c < -115 and 36 < ds.transform.f < 37  # Las Vegas
            # pixel-interleaved like SpaceNet's (a planar TIFF decodes to garbage in DALI)
            assert ds.profile["interleave"] == "pixel"
            data = ds.read()
        assert data.max() <= 2047 and data.std() > 50  # 11-bit and not a flat image
        # 0 is SpaceNet's no-data (prepare leaves it out of the band statistics): no roof or
        # ground pixel of a synthetic tile may read as missing
        assert data.min() > 0


def test_geojson_and_solutions_csv_agree(synthetic_aoi: Path) -> None:
    csv_path = synthetic_aoi / "summaryData" / "AOI_2_Vegas_Train_Building_Solutions.csv"
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["ImageId", "BuildingId", "PolygonWKT_Pix", "PolygonWKT_Geo"]
    per_image: dict[str, list[dict[str, str]]] = {}
    for r in rows:
        per_image.setdefault(r["ImageId"], []).append(r)
    assert len(per_image) == 10
    for iid, image_rows in per_image.items():
        gj = json.loads((synthetic_aoi / "geojson" / "buildings" / f"buildings_{iid}.geojson")
                        .read_text())
        assert gj["type"] == "FeatureCollection"
        # spelled as SpaceNet ships it: the legacy CRS84 member, lon/lat/0 positions
        assert gj["crs"] == {"type": "name",
                             "properties": {"name": "urn:ogc:def:crs:OGC:1.3:CRS84"}}
        assert all(len(xyz) == 3 and xyz[2] == 0 for f in gj["features"]
                   for ring in f["geometry"]["coordinates"] for xyz in ring)
        polys = [shape(f["geometry"]) for f in gj["features"]]
        assert all(p.is_valid and p.geom_type == "Polygon" for p in polys)
        if not polys:
            assert [r["BuildingId"] for r in image_rows] == ["-1"]
            assert image_rows[0]["PolygonWKT_Pix"] == "POLYGON EMPTY"
            continue
        # buildings numbered 1..n alike in both files, so a row finds its feature by id
        assert [int(r["BuildingId"]) for r in image_rows] == list(range(1, len(polys) + 1))
        assert [f["properties"]["OBJECTID"] for f in gj["features"]] == \
            list(range(1, len(polys) + 1))
        for r, p in zip(image_rows, polys, strict=True):
            geo = shapely.force_2d(shapely.from_wkt(r["PolygonWKT_Geo"]))
            # the CSV rounds to 1e-9 degrees: a thousandth of a (2.7e-6 degree) pixel. NOTE: a
            # distance, not the area between the two, which grows with the outline's length (a
            # large block of another seed exceeded an area bound from rounding alone)
            assert geo.hausdorff_distance(shapely.force_2d(p)) < 1e-3 * 2.7e-6
            pix = shapely.from_wkt(r["PolygonWKT_Pix"])
            assert pix.is_valid and pix.bounds[0] >= 0 and pix.bounds[2] <= 650


@pytest.mark.parametrize("crs, gsd", [("EPSG:4326", 0.3), ("EPSG:32611", 0.5)])
def test_the_csvs_geo_wkt_is_its_pixel_wkt_on_the_map(tmp_path: Path, crs: str, gsd: float) -> None:
    """PolygonWKT_Geo is PolygonWKT_Pix through the tile's geotransform, to a hundredth of a
    pixel in degrees and in a projected CRS alike (metres rounded to 1 m passed every test)."""
    raw = tmp_path / "aoi"
    write_aoi(SynthConfig(out=raw, tiles=2, seed=1, size=128, crs=crs, gsd_m=gsd))
    with open(raw / "summaryData" / "AOI_2_Vegas_Train_Building_Solutions.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["BuildingId"] != "-1"]
    assert len(rows) >= 5
    for r in rows:
        tif = raw / "RGB-PanSharpen" / f"RGB-PanSharpen_{r['ImageId']}.tif"
        with rasterio.open(tif) as ds:
            transform = ds.transform
        pix = shapely.from_wkt(r["PolygonWKT_Pix"])
        geo = shapely.force_2d(shapely.from_wkt(r["PolygonWKT_Geo"]))
        mapped = shapely.affinity.affine_transform(shapely.force_2d(pix), transform.to_shapely())
        assert mapped.hausdorff_distance(geo) < 0.01 * transform.a, r["BuildingId"]

def test_deterministic_for_a_seed_whatever_the_workers(tmp_path: Path) -> None:
    def digest(root: Path) -> dict[str, str]:
        return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(root.rglob("*")) if p.is_file()}

    write_aoi(SynthConfig(out=tmp_path / "a", tiles=4, seed=5, size=200))
    write_aoi(SynthConfig(out=tmp_path / "b", tiles=4, seed=5, size=200, workers=2))
    write_aoi(SynthConfig(out=tmp_path / "c", tiles=4, seed=6, size=200))
    assert digest(tmp_path / "a") == digest(tmp_path / "b")
    assert digest(tmp_path / "a") != digest(tmp_path / "c")

    # another seed is another AOI, not this one's tiles shifted by one (seed + index would be)
    def pixels(root: Path) -> set[bytes]:
        out = set()
        for tif in (root / "RGB-PanSharpen").glob("*.tif"):
            with rasterio.open(tif) as ds:
                out.add(ds.read().tobytes())
        return out

    assert len(pixels(tmp_path / "a")) == 4 and not pixels(tmp_path / "a") & pixels(tmp_path / "c")


def _gaps(polys: list[shapely.Polygon]) -> list[float]:
    tree = shapely.STRtree(polys)
    out = []
    for i, p in enumerate(polys):
        for j in tree.query(p.buffer(5)):
            if j > i:
                out.append(p.distance(polys[j]))
    return out


def test_scenes_hold_the_hard_cases() -> None:
    """Across seeds: near-touching rows (1-4 px gaps), L-shapes, edge-cut buildings, empty tiles,
    house and block sizes, and clutter that is not building."""
    kinds, areas, gaps, l_shapes, partial = set(), [], [], 0, 0
    clutter = {"roads": 0, "trees": 0, "pools": 0}
    for seed in range(30):
        scene = make_scene(np.random.default_rng(seed))
        kinds.add(scene.kind)
        areas += [p.area for p in scene.buildings]
        gaps += _gaps(scene.buildings)
        # houses beside the streets and pools, never standing on them
        assert all(b.distance(c) >= 0.99 for b in scene.buildings
                   for c in scene.roads + scene.pools), seed
        l_shapes += sum(len(p.exterior.coords) == 7 for p in scene.buildings)
        partial += sum(scene.partial)
        for k in clutter:
            clutter[k] += len(getattr(scene, k))
    assert kinds == {"suburban", "commercial", "sparse", "empty"}
    gaps_arr = np.array(gaps)
    assert ((gaps_arr >= 1) & (gaps_arr <= 4)).sum() > 50  # rows of near-touching houses
    assert gaps_arr.min() >= 0.99  # never overlapping or touching
    assert l_shapes > 20 and partial > 20
    # houses of ~10x15 m (33x50 px = 1650 px^2 at 0.3 m) up to blocks of thousands of m^2
    assert 1000 < np.median(areas) < 3000 and max(areas) > 20_000
    assert all(v > 0 for v in clutter.values())


def test_render_draws_the_cues_that_separate_buildings() -> None:
    """Roofs overlap the ground's colours, so the image must carry the other cues the renderer
    promises, where the scene puts them: shadows on the sun's offset, a darker eave along every
    outline, a dimmer side of a gabled roof, and trees (dropping any of them passed every test)."""
    houses = [box(x, y, x + 60, y + 40) for x in (20, 110) for y in (20, 110)]
    tree = shapely.Point(95, 185).buffer(6)
    scene = Scene(size=(200, 200), kind="sparse", buildings=houses, partial=[False] * 4,
                  trees=[tree], sun=(6.0, 5.0))
    img = render(scene, np.random.default_rng(0)).astype(np.float32)
    lum = img.mean(axis=0)

    def burn(*geoms: shapely.Geometry) -> np.ndarray:
        return rasterio.features.rasterize(geoms, out_shape=(200, 200)).astype(bool)

    near = burn(*(shapely.affinity.translate(h, 6, 5).buffer(3) for h in houses), tree.buffer(3))
    ground = np.median(lum[~near & ~burn(*(h.buffer(3) for h in houses))])
    shadows = burn(*(shapely.affinity.translate(h, 6, 5).difference(h.buffer(1)) for h in houses))
    assert np.median(lum[shadows]) < 0.7 * ground
    gabled = 0
    for x, y in ((20, 20), (110, 20), (20, 110), (110, 110)):
        cols = slice(x + 5, x + 55)
        # the top eave row against the row 3 px in, both in the roof's upper half
        assert np.median(lum[y, cols]) < 0.92 * np.median(lum[y + 3, cols]), (x, y)
        upper, lower = np.median(lum[y + 5:y + 15, cols]), np.median(lum[y + 25:y + 35, cols])
        ratio = min(upper, lower) / max(upper, lower)
        assert ratio < 0.88 or ratio > 0.95, (x, y)  # one side at 0.82, or no ridge at all
        gabled += ratio < 0.88
    assert gabled >= 1
    leaves = img[:, burn(tree.buffer(-1))]
    assert np.median(leaves[1]) > np.median(leaves[0])  # green over red, unlike the ground

def test_cli_rejects_bad_arguments(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--out", str(tmp_path / "x"), "--tiles", "0"]) == 2
    assert "--tiles" in capsys.readouterr().err
    assert main(["--out", str(tmp_path / "x"), "--crs", "EPSG:999999"]) == 2


@pytest.mark.parametrize("bad, named", [
    (["--size", "31"], "--size must be >= 32 px, got 31"),
    (["--aoi", "AOI_2.Vegas"], "--aoi 'AOI_2.Vegas' must be a plain name"),  # ImageId of a dot
    (["--label-crs", "EPSG:999999"], "--label-crs 'EPSG:999999': not a CRS")])
def test_bad_arguments_are_named_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], bad: list[str], named: str) -> None:
    out = tmp_path / "x"
    assert main(["--out", str(out), "--tiles", "1", *bad]) == 2
    err = capsys.readouterr().err
    assert err.startswith("dataio.synth: error: ") and named in err
    assert not out.exists()


def test_a_size_too_large_to_draw_is_one_line(tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """--size 100000000 (a tile of petabytes) was a numpy MemoryError traceback, exit 1."""
    out = tmp_path / "x"
    assert main(["--out", str(out), "--tiles", "1", "--size", "100000000"]) == 2
    lines = capsys.readouterr().err.replace("\r", "\n").splitlines()
    assert [line for line in lines if line and not line.startswith("synth:")] == [
        "dataio.synth: error: --size 100000000: not enough memory to draw one 100000000 x "
        f"100000000 px tile; choose a smaller --size; {out} holds an incomplete AOI "
        "(.synth-incomplete): rerun with --overwrite"]


def test_an_overwrite_without_mul_leaves_no_mul_folder(tmp_path: Path) -> None:
    """--overwrite without --mul emptied MUL-PanSharpen/ and left it: the AOI then seemed to
    hold that product (prepare's error listed it), and prepare --product MUL-PanSharpen found
    the folder but no tile. A folder holding other files (the user's) is left alone."""
    out = tmp_path / "aoi"
    write_aoi(SynthConfig(out=out, tiles=1, size=64, mul=True))
    assert (out / "MUL-PanSharpen").is_dir()
    write_aoi(SynthConfig(out=out, tiles=1, size=64, overwrite=True))
    assert not (out / "MUL-PanSharpen").exists()
    assert sorted(p.name for p in out.iterdir()) == ["RGB-PanSharpen", "geojson", "summaryData"]
    write_aoi(SynthConfig(out=out, tiles=1, size=64, mul=True, overwrite=True))
    (out / "MUL-PanSharpen" / "notes.txt").write_text("mine")
    write_aoi(SynthConfig(out=out, tiles=1, size=64, overwrite=True))
    assert [p.name for p in (out / "MUL-PanSharpen").iterdir()] == ["notes.txt"]


def test_an_aoi_already_there_is_refused_or_replaced(tmp_path: Path) -> None:
    out = tmp_path / "aoi"
    write_aoi(SynthConfig(out=out, tiles=3, size=64))
    with pytest.raises(ValueError, match="already holds an AOI.*--overwrite"):
        write_aoi(SynthConfig(out=out, tiles=1, size=64))
    write_aoi(SynthConfig(out=out, tiles=1, size=64, seed=1, overwrite=True))
    # only the new tile: images, labels and the solutions CSV agree again
    assert len(list((out / "RGB-PanSharpen").glob("*.tif"))) == 1
    assert len(list((out / "geojson" / "buildings").glob("*.geojson"))) == 1
    with open(out / "summaryData" / "AOI_2_Vegas_Train_Building_Solutions.csv") as f:
        assert len({row["ImageId"] for row in csv.DictReader(f)}) == 1


def test_an_interrupted_synth_is_refused_by_prepare(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiles get their final names one by one; a synth that stops midway must not pass for a
    complete AOI (prepare accepted the first tiles of a killed run as the whole AOI)."""
    from dataio import synth
    from dataio.prepare import PrepareConfig, prepare

    real = synth.fsync_file
    written: list[Path] = []

    def dying(path: Path) -> None:  # killed while the third tile's image is being written
        written.append(Path(path))
        if len(written) == 3:
            raise KeyboardInterrupt
        real(path)

    monkeypatch.setattr(synth, "fsync_file", dying)
    out = tmp_path / "aoi"
    with pytest.raises(KeyboardInterrupt):
        write_aoi(SynthConfig(out=out, tiles=4, size=64))
    assert len(list((out / "RGB-PanSharpen").glob("*.tif"))) == 2  # what a kill leaves
    assert written[2].name.endswith(".tmp") and not list(out.rglob("*.tmp"))  # its part gone
    with pytest.raises(ValueError, match=r"incomplete.*\.synth-incomplete.*--overwrite"):
        prepare(PrepareConfig(raw=[out], out=tmp_path / "d"), progress=False)
    with pytest.raises(ValueError, match="interrupted synth's AOI.*--overwrite"):
        write_aoi(SynthConfig(out=out, tiles=4, size=64))
    monkeypatch.undo()
    write_aoi(SynthConfig(out=out, tiles=4, size=64, overwrite=True))
    m = prepare(PrepareConfig(raw=[out], out=tmp_path / "d", workers=0), progress=False)
    assert sum(m["splits"][s]["samples"] for s in ("train", "val", "test")) == 4


# A synth killed outright (SIGKILL: no clean-up runs) as tile N's GeoTIFF is synced, under its
# temporary name, before it is renamed.
_KILLED_SYNTH = """
import os, signal, sys
from dataio import synth
calls = []
def dying(path):
    calls.append(path)
    if len(calls) == int(sys.argv[1]):
        os.kill(os.getpid(), signal.SIGKILL)
synth.fsync_file = dying
synth.main(sys.argv[2:])
"""


def _tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) and a digest of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow  # a process of its own, killed
def test_a_killed_synth_leaves_nothing_complete_and_a_rerun_writes_a_fresh_aoi(
        tmp_path: Path) -> None:
    """Killed outright midway, synth leaves an AOI that prepare refuses; the rerun (with fewer
    tiles here) must give what a fresh synth gives, byte for byte. It kept the killed run's
    hidden GeoTIFF temporary of a tile it no longer writes."""
    from proc_helpers import worker_env

    from dataio.prepare import PrepareConfig, prepare

    out, fresh = tmp_path / "aoi", tmp_path / "fresh"
    args = ["--out", str(out), "--tiles", "4", "--size", "64", "--seed", "3"]
    res = subprocess.run([sys.executable, "-c", _KILLED_SYNTH, "3", *args], env=worker_env(),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == -signal.SIGKILL, res.stderr[-2000:]
    assert (out / "RGB-PanSharpen" / ".RGB-PanSharpen_AOI_2_Vegas_img3.tif.tmp").is_file()
    assert not list((out / "summaryData").glob("*.csv"))  # (written last, whole)
    with pytest.raises(ValueError, match=r"incomplete.*\.synth-incomplete"):
        prepare(PrepareConfig(raw=[out], out=tmp_path / "d"), progress=False)
    again = ["--out", str(out), "--tiles", "2", "--size", "64", "--seed", "3", "--overwrite"]
    assert main(again) == 0
    assert main(["--out", str(fresh), "--tiles", "2", "--size", "64", "--seed", "3"]) == 0
    assert _tree(out) == _tree(fresh)


def test_the_tiles_are_durable_before_the_aoi_loses_its_mark(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The marker says "incomplete" until every tile is in place; its removal must come after
    the tiles' directories are synced, or a power cut after it could lose renames of tiles
    (the GeoTIFFs' directory was never synced) in an AOI that no longer says it is
    incomplete."""
    from dataio import synth

    out = tmp_path / "aoi"
    synced: list[tuple[Path, bool]] = []
    real = synth.fsync_dir

    def recording(path: Path) -> None:
        synced.append((Path(path), (out / ".synth-incomplete").exists()))
        real(path)

    monkeypatch.setattr(synth, "fsync_dir", recording)
    write_aoi(SynthConfig(out=out, tiles=2, size=64, mul=True))
    marked = {path for path, mark in synced if mark}
    for sub in ("RGB-PanSharpen", "MUL-PanSharpen", "geojson/buildings", "summaryData"):
        assert out / sub in marked, (sub, synced)


@pytest.mark.slow  # the real command in a process of its own
@pytest.mark.multiproc  # and its pool of 2 workers
@pytest.mark.timeout(120)
def test_ctrl_c_is_one_line_and_leaves_an_aoi_marked_incomplete(tmp_path: Path) -> None:
    """Ctrl-C mid-run was a KeyboardInterrupt traceback (exit -2); the workers took it too and
    dropped the chunks they were making, and the pool then made every chunk still queued (the
    rest of the AOI) before the command let go. Now: one line, exit 130, the workers finish the
    chunks they started, and the AOI keeps the mark that makes prepare refuse it."""
    out = tmp_path / "aoi"
    worker = str(Path(__file__).with_name("synth_ctrl_c_worker.py"))  # slow tiles, says which
    res = interrupt_when([sys.executable, worker, "--out", str(out), "--tiles", "24", "--size",
                          "64", "--workers", "2"], "tile ", times=2)
    lines = res.stderr.replace("\r", "\n").splitlines()
    assert [line for line in lines if line and not line.startswith("synth:")] == [
        f"dataio.synth: interrupted; {out} holds an incomplete AOI (.synth-incomplete): rerun "
        "with --overwrite"], res.stderr[-3000:]
    assert res.returncode == 130
    started = {int(line.split()[1]) for line in res.stdout.splitlines()}
    chunks = {i // 4 for i in started}  # (synth maps 4 tiles per chunk)
    made = {int(p.stem.rsplit("img", 1)[1]) - 1 for p in (out / "RGB-PanSharpen").glob("*.tif")}
    assert made == {i for c in chunks for i in range(4 * c, 4 * c + 4)}, (started, made)
    assert (out / ".synth-incomplete").exists() and not list(out.rglob("*.tmp"))


def test_each_tiles_labels_lie_on_its_pixels(tmp_path: Path) -> None:
    """Read as a user would: every GeoJSON in the CRS its file names, mapped through its raster's
    transform, outlines the roofs in the pixels (edges there, not elsewhere); partialBuilding
    marks the buildings cut by the tile edge; tiles img1..imgN of different scenes on a grid."""
    size = 128
    raw = tmp_path / "aoi"
    write_aoi(SynthConfig(out=raw, tiles=4, seed=1, size=size, label_crs="EPSG:32611"))
    assert sorted(p.name for p in (raw / "RGB-PanSharpen").iterdir()) == [
        f"RGB-PanSharpen_AOI_2_Vegas_img{n}.tif" for n in range(1, 5)]
    bounds, images, labelled = [], [], 0
    for n in range(1, 5):
        with rasterio.open(raw / "RGB-PanSharpen" / f"RGB-PanSharpen_AOI_2_Vegas_img{n}.tif") as ds:
            img, to_pixels = ds.read().astype(np.float32), ~ds.transform
            img_crs = CRS.from_user_input(ds.crs.to_wkt())
            bounds.append(ds.bounds)
        images.append(img)
        gj = json.loads((raw / "geojson" / "buildings" / f"buildings_AOI_2_Vegas_img{n}.geojson")
                        .read_text())
        lab_crs = CRS.from_user_input(gj["crs"]["properties"]["name"])
        assert lab_crs.to_epsg() == 32611
        pix = [shapely.affinity.affine_transform(
            reproject_geometry(shapely.force_2d(shape(f["geometry"])), lab_crs, img_crs),
            to_pixels.to_shapely()) for f in gj["features"]]
        for f, p in zip(gj["features"], pix, strict=True):
            x0, y0, x1, y1 = p.bounds
            assert min(x0, y0) > -1e-3 and max(x1, y1) < size + 1e-3
            cut = min(x0, y0) < 1e-3 or max(x1, y1) > size - 1e-3
            assert f["properties"]["partialBuilding"] == int(cut)
        if not pix:
            continue
        labelled += 1
        gy, gx = np.gradient(img.mean(axis=0))
        grad = np.hypot(gx, gy)
        outline = rasterio.features.rasterize([p.boundary.buffer(1.0) for p in pix],
                                              out_shape=(size, size)).astype(bool)
        # stronger on the outlines than on the same outlines mirrored across the diagonal (a
        # transposed raster, or labels of another place, would swap the two)
        assert grad[outline].mean() > 1.5 * grad[outline.T].mean(), n
    assert labelled >= 2
    assert all(not np.array_equal(a, b) for i, a in enumerate(images) for b in images[i + 1:])
    # a 2x2 grid: img2 east of img1, img3 south of it, edge to edge
    assert bounds[1].left == pytest.approx(bounds[0].right, abs=1e-12)
    assert bounds[2].top == pytest.approx(bounds[0].bottom, abs=1e-12)
    assert bounds[2].left == bounds[0].left and bounds[3].left == bounds[1].left
