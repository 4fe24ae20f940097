"""dataio.prepare: splits, shards both DALI and webdataset read, masks, truth, round trip."""

from __future__ import annotations

import csv
import hashlib
import json
import re
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import webdataset as wds
from dali_helpers import dali_read
from pyproj import CRS
from rasterio.features import shapes
from shapely.geometry import shape

from dataio.labels import make_mask, rasterize_footprints, read_footprints
from dataio.manifest import BandStats, ManifestError, load_manifest
from dataio.prepare import PrepareConfig, prepare, split_counts
from dataio.shards import check_shard, decode_sample, iter_tar_samples

SPLITS = ("train", "val", "test")


def _keys(data: Path, split: str) -> list[str]:
    return [k for shard in sorted((data / split).glob("shard-*.tar"))
            for k, _ in iter_tar_samples(shard)]


def test_every_tile_in_exactly_one_split(prepared_dataset: Path, synthetic_aoi: Path) -> None:
    m = load_manifest(prepared_dataset)
    keys = {s: _keys(prepared_dataset, s) for s in SPLITS}
    all_keys = [k for s in SPLITS for k in keys[s]]
    tifs = sorted((synthetic_aoi / "RGB-PanSharpen").glob("*.tif"))
    assert sorted(all_keys) == sorted(t.name[len("RGB-PanSharpen_"):-4] for t in tifs)
    assert len(set(all_keys)) == len(all_keys)
    assert [len(keys[s]) for s in SPLITS] == [7, 2, 1]  # 70:15:15 of 10
    for s in SPLITS:
        assert m.samples(s) == len(keys[s]) == sum(i["samples"] for i in m.shards(s))
        for info in m.shards(s):
            assert check_shard(prepared_dataset / s, info) is None
    assert m.data["skipped"] == []


@pytest.mark.parametrize(("n", "weights", "want"), [
    (10, (70, 15, 15), (7, 2, 1)),
    (5, (70, 15, 15), (3, 1, 1)),    # rounding each share alone gave 4/1/0: no test tile
    (3, (70, 15, 15), (2, 1, 0)),
    (0, (70, 15, 15), (0, 0, 0)),
    (5, (90, 10, 0), (5, 0, 0)),     # a 0-weight split never gets a tile (it got 1 of 5)
    (25, (90, 10, 0), (23, 2, 0)),
    (1, (50, 50, 0), (1, 0, 0)),     # the one tile trains (it went to the 0-weight test split)
    (100, (1, 1, 1), (34, 33, 33)),
    (20, (0.7, 0.15, 0.15), (14, 3, 3)),
    (5, (1e308, 1, 1), (5, 0, 0)),   # a huge weight: its share, not an overflow
])
def test_split_counts(n: int, weights: tuple[float, float, float],
                      want: tuple[int, int, int]) -> None:
    got = split_counts(n, weights)
    assert got == want
    exact = [n * (w / sum(weights)) for w in weights]
    # every split is within one tile of its exact share, and 0-weight splits stay empty
    assert all(abs(c - x) < 1 for c, x in zip(got, exact, strict=True))
    assert all(c == 0 for c, w in zip(got, weights, strict=True) if w == 0)


def test_manifest_statistics(prepared_dataset: Path) -> None:
    m = load_manifest(prepared_dataset)
    p2, p98 = m.percentiles()
    assert len(p2) == m.bands == 3
    assert all(0 < lo < hi <= 2047 for lo, hi in zip(p2, p98, strict=True))
    freqs = m.class_frequencies
    assert abs(sum(freqs) - 1) < 1e-9 and freqs[0] > freqs[1] > 0 and freqs[2] > 0
    # the train percentiles are those of the training pixels
    pix = np.concatenate([decode_sample(mem)[0].reshape(-1, 3)
                          for shard in sorted((prepared_dataset / "train").glob("*.tar"))
                          for _, mem in iter_tar_samples(shard)])
    np.testing.assert_allclose(np.percentile(pix, 2, axis=0), p2, atol=1)
    np.testing.assert_allclose(np.percentile(pix, 98, axis=0), p98, atol=1)


def test_a_nearly_constant_band_still_gets_a_scale_the_loader_takes() -> None:
    """(p2 == p98 went into the manifest, and the loader refused it only when training)"""
    from dataio.augment import Normaliser
    from dataio.manifest import BandStats

    img = np.zeros((100, 100, 3), np.uint16)
    img[..., 0] = 5  # constant
    img[:3, :, 1] = 1000  # 97% no-data, 3% signal
    img[..., 2] = np.arange(100)[None, :]  # an ordinary band (its column of 0s is no-data)
    stats = BandStats(3)
    stats.add(BandStats.of_image(img))
    got = stats.to_json()
    assert got["p2"] == [5.0, 0.0, 2.0] and got["p98"] == [6.0, 1000.0, 98.0]
    Normaliser(got["p2"], got["p98"])  # what the loader builds from them


def test_no_data_zeros_are_left_out_of_the_percentiles_as_the_spacenet2_winner_did() -> None:
    """Tiles at a strip's edge are black (0, SpaceNet's no-data) in part; XD_XD's percentiles
    leave 0 out ("Remove sensored mask"). Ours counted it: with a third of the pixels black, p2
    was 0 for every band, and the image kept a third less contrast than the winner's recipe."""
    from dataio.manifest import BandStats

    rng = np.random.default_rng(0)
    img = rng.integers(200, 1800, (90, 90, 3)).astype(np.uint16)
    img[:, :30] = 0  # a black margin
    stats = BandStats(3)
    stats.add(BandStats.of_image(img))
    got = stats.to_json()
    valid = img[:, 30:].reshape(-1, 3)
    np.testing.assert_allclose(got["p2"], np.percentile(valid, 2, axis=0), atol=1)
    np.testing.assert_allclose(got["p98"], np.percentile(valid, 98, axis=0), atol=1)
    assert got["min"] == [0.0] * 3  # (the extremes and moments stay those of every pixel)


def test_shards_read_by_webdataset(prepared_dataset: Path) -> None:
    urls = [str(p) for p in sorted((prepared_dataset / "train").glob("shard-*.tar"))]
    ds = wds.WebDataset(urls, shardshuffle=False).decode("l8")
    n = 0
    for sample in ds:
        img, mask, meta = sample["img.npy"], sample["mask.png"], sample["meta.json"]
        assert img.dtype == np.uint16 and img.shape == (650, 650, 3)
        assert mask.shape[:2] == (650, 650)
        assert meta["image_id"] == sample["__key__"]
        n += 1
    assert n == 7


def test_shards_read_by_dali_cpu_pipeline(prepared_dataset: Path) -> None:

    tars = sorted((prepared_dataset / "train").glob("shard-*.tar"))

    img, mask, meta = dali_read(tars, 7)
    keys = sorted(json.loads(bytes(meta.at(i)))["image_id"] for i in range(7))
    assert keys == sorted(_keys(prepared_dataset, "train"))
    for i in range(7):
        assert np.asarray(img.at(i)).dtype == np.uint16
        assert set(np.unique(np.asarray(mask.at(i)))) <= {0, 1, 2}


@pytest.mark.parametrize("split", SPLITS)
def test_masks_hold_three_classes_and_match_truth(prepared_dataset: Path, split: str) -> None:
    with open(prepared_dataset / split / "truth.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    checked = 0
    for shard in sorted((prepared_dataset / split).glob("*.tar")):
        for key, mem in iter_tar_samples(shard):
            _, mask, meta = decode_sample(mem)
            polys = [shapely.from_wkt(r["PolygonWKT_Pix"]) for r in rows if r["ImageId"] == key]
            polys = [p for p in polys if not p.is_empty]
            assert meta["building_count"] == len(polys)
            want = {0, 1, 2} if polys else {0}
            assert set(np.unique(mask)) == want
            # the stored mask is the mask of the truth polygons. The CSV's WKT is rounded to
            # 1e-4 px, so a pixel whose centre lies on the band's edge may fall either side:
            # allow a few, and only across the band's edges (never building <-> background).
            want_mask = make_mask(polys, mask.shape)
            diff = mask != want_mask
            assert diff.sum() <= 1e-5 * mask.size, (key, int(diff.sum()))
            assert not (mask[diff] + want_mask[diff] == 1).any()  # a 0/1 pair sums to 1
            checked += 1
    assert checked == len({r["ImageId"] for r in rows}) > 0


def test_same_split_and_bytes_whatever_the_workers(small_aoi: Path, tmp_path: Path) -> None:
    # (the 24 small tiles: more tiles and shards for the pool to reorder than the 10 full-size
    # ones, a tenth of the pixels to prepare three times)
    def digests(out: Path) -> dict[str, str]:
        return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in sorted(out.rglob("*")) if p.suffix in (".tar", ".idx", ".csv")}

    a = prepare(PrepareConfig([small_aoi], tmp_path / "a", shard_size=4, workers=0), False)
    b = prepare(PrepareConfig([small_aoi], tmp_path / "b", shard_size=4, workers=2), False)
    assert digests(tmp_path / "a") == digests(tmp_path / "b")
    assert a["splits"] == b["splits"]
    prepare(PrepareConfig([small_aoi], tmp_path / "c", shard_size=4, seed=1), False)
    assert _keys(tmp_path / "a", "train") != _keys(tmp_path / "c", "train")


def test_round_trip_footprints_polygonise_back(synthetic_aoi: Path,
                                               prepared_dataset: Path) -> None:
    """The footprints prepare rasterises polygonise back to the source (IoU >= 0.9 > 100 px),
    and truth.csv holds the source footprints in pixel coordinates."""
    truth = {}
    for s in SPLITS:
        with open(prepared_dataset / s / "truth.csv", newline="") as f:
            for r in csv.DictReader(f):
                truth.setdefault(r["ImageId"], []).append(shapely.from_wkt(r["PolygonWKT_Pix"]))
    checked = 0
    for tif in sorted((synthetic_aoi / "RGB-PanSharpen").glob("*.tif")):
        iid = tif.name[len("RGB-PanSharpen_"):-4]
        with rasterio.open(tif) as ds:
            crs, transform, w, h = CRS.from_wkt(ds.crs.to_wkt()), ds.transform, ds.width, ds.height
        src = read_footprints(synthetic_aoi / "geojson" / "buildings" / f"buildings_{iid}.geojson",
                              crs, transform, w, h).polygons
        raster = rasterize_footprints(src, (h, w))
        # label each footprint so touching ones come back separately
        ids = np.zeros((h, w), np.int32)
        for k, p in enumerate(src):
            ids[rasterize_footprints([p], (h, w)) > 0] = k + 1
        assert ((ids > 0) == (raster > 0)).all()
        back = {int(v): shape(g) for g, v in shapes(ids, mask=ids > 0)}
        for k, p in enumerate(src):
            if p.area > 100:
                q = back[k + 1]
                assert p.intersection(q).area / p.union(q).area >= 0.9, (iid, k)
                checked += 1
        rows = [g for g in truth[iid] if not g.is_empty]
        assert len(rows) == len(src)
        for p, q in zip(src, rows, strict=True):
            assert p.symmetric_difference(shapely.force_2d(q)).area < 1e-3 * p.length  # 1e-4 px WKT
    assert checked > 100


def test_the_split_depends_on_the_image_ids_not_their_order(tmp_path: Path) -> None:
    """(several --raw directories list their tiles in the order given)"""
    from dataio.prepare import Tile, assign_splits

    tiles = [Tile(f"AOI_9_X_img{i}", tmp_path / f"{i}.tif", tmp_path / f"{i}.geojson")
             for i in range(20)]
    splits = [{t.image_id: t.split for t in assign_splits(order, (70, 15, 15), 3)}
              for order in (tiles, tiles[::-1], tiles[7:] + tiles[:7])]
    assert splits[0] == splits[1] == splits[2]
    assert sorted(splits[0].values()).count("train") == 14
    from dataio.prepare import PrepareConfig

    with pytest.raises(ValueError, match="--split"):  # a negative weight is no proportion
        PrepareConfig(raw=[tmp_path], out=tmp_path / "o", split=(80, -10, 30))


@pytest.mark.parametrize("bad", ["0", "a,b,c", "70,30"])
def test_bad_split_argument(bad: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dataio.prepare import main

    with pytest.raises(SystemExit) as e:
        main(["--raw", str(tmp_path), "--out", str(tmp_path / "o"), "--split", bad])
    assert e.value.code == 2
    assert "--split" in capsys.readouterr().err


def test_an_empty_training_split_is_refused_before_any_work(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dataio.prepare import main
    from dataio.synth import SynthConfig, write_aoi

    raw = tmp_path / "raw"
    write_aoi(SynthConfig(out=raw, tiles=1, size=64))
    assert main(["--raw", str(raw), "--out", str(tmp_path / "a"), "--split", "0,50,50"]) == 2
    assert "train > 0" in capsys.readouterr().err
    # one tile at 10:45:45 goes to val by largest remainder: nothing to train on
    assert main(["--raw", str(raw), "--out", str(tmp_path / "b"), "--split", "10,45,45"]) == 2
    assert "training split would be empty: 1 tile(s)" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    # a refused --overwrite leaves the dataset it would have replaced
    # (--workers 1: in this process; the default pool's spawned workers import for seconds)
    assert main(["--raw", str(raw), "--out", str(tmp_path / "c"), "--quiet", "--workers",
                 "1"]) == 0
    before = (tmp_path / "c" / "manifest.json").read_bytes()
    assert main(["--raw", str(raw), "--out", str(tmp_path / "c"), "--split", "10,45,45",
                 "--overwrite"]) == 2
    assert (tmp_path / "c" / "manifest.json").read_bytes() == before
    assert list((tmp_path / "c" / "train").glob("shard-*.tar"))
    # weights whose sum overflows are refused naming --split (they crashed in the split), and
    # are not called non-finite (each one is finite)
    assert main(["--raw", str(raw), "--out", str(tmp_path / "d"), "--split", "1e308,1e308,1"]) == 2
    err = capsys.readouterr().err
    assert "--split weights (1e+308, 1e+308, 1.0) are too large: their sum is not finite" in err
    assert "finite non-negative" not in err


def test_no_boundary_band_along_the_tile_edge() -> None:
    """A building cut by the tile edge keeps its interior up to the edge: the cut is not a wall."""
    from shapely.geometry import box

    cut = box(0, 20, 30, 50)  # touches the left tile edge at x=0
    inside = box(60, 20, 90, 50)
    mask = make_mask([cut, inside], (80, 100))
    assert (mask[25:45, 0] == 1).all()  # interior reaches the tile edge
    assert (mask[25:45, 28:32] == 2).all()  # the real wall at x=30 is banded on both sides
    assert (mask[20:50, 58:62] == 2).all() and (mask[25:45, 63] == 1).all()


def test_band_statistics_are_those_of_every_image_added() -> None:
    stats = BandStats(1)
    with pytest.raises(ManifestError, match="no training pixels"):
        stats.to_json()
    stats.add(BandStats.of_image(np.full((10, 10, 1), 4, np.uint16)))
    stats.add(BandStats.of_image(np.array([[[1], [7]]], np.uint16)))  # a longer histogram
    got = stats.to_json()
    # the extremes are the pixels', not the 2nd..98th percentiles (4 and 4)
    assert (got["min"], got["max"], got["mean"]) == ([1.0], [7.0], [4.0])
    assert got["std"] == [pytest.approx(np.sqrt(18 / 102))]  # of the pixels, not a sample's


@pytest.mark.parametrize("module", ["dataio.prepare", "postproc.polygonize", "postproc.score"])
def test_a_pool_workers_modules_do_not_load_torch(module: str) -> None:
    """prepare's spawned workers import dataio.prepare (their task's module) and nothing else of
    ours; it imported webdataset at the top of dataio.shards, and webdataset imports torch: ~3 s
    and ~300 MB in every worker, for a tar writer only the parent uses. The same for the
    postproc commands through postproc.predio (forked workers, but a plain run paid it too)."""
    import subprocess
    import sys

    code = f"import sys, {module}; print(sorted({{'torch', 'webdataset'}} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[2], check=True)
    assert out.stdout.strip() == "[]", f"importing {module} loads {out.stdout.strip()}"


def test_the_summary_line_says_one_tile_in_the_singular(tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """(it said "prepared 1 tiles")"""
    from dataio.prepare import main
    from dataio.synth import SynthConfig, write_aoi

    raw = tmp_path / "raw"
    write_aoi(SynthConfig(out=raw, tiles=1, size=64))
    out = tmp_path / "o"
    assert main(["--raw", str(raw), "--out", str(out), "--quiet", "--split", "100,0,0",
                 "--workers", "1"]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert line.startswith(f"prepared 1 tile into {out} (train 1, val 0, test 0) in "), line
    assert re.search(r" tiles/s, in this process\); skipped 0$", line), line


@pytest.mark.parametrize(("workers", "said"), [("0", "in this process"),
                                               ("1", "in this process"), ("2", "2 workers")])
def test_the_summary_line_says_how_the_tiles_were_read(
        workers: str, said: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """--workers 0 and 1 read every tile in this process; the line said "1 workers" and
    "0 workers" for them."""
    from dataio.prepare import main
    from dataio.synth import SynthConfig, write_aoi

    raw = tmp_path / "raw"
    write_aoi(SynthConfig(out=raw, tiles=2, size=64))
    assert main(["--raw", str(raw), "--out", str(tmp_path / "o"), "--quiet", "--split",
                 "100,0,0", "--workers", workers]) == 0
    line = capsys.readouterr().out.splitlines()[-1]
    assert re.search(rf" tiles/s, {said}\); skipped 0$", line), line
