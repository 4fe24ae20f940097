"""dataio.prepare --images-only --chip-size N: a scene too large for one sample, cut into chips.

The scene is a 300 x 200 px UTM GeoTIFF: at 128 px, 2 x 2 chips, the last column 172 px wide (the
rest of 300 px: no 44 px column) and the last row 72 px high. With the default --chip-margin of
64 px each chip's sample is that window grown by 64 px inward (every chip is at a corner of the
scene: nothing to grow into outward).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import shapely
import torch
from affine import Affine
from pyproj import Transformer
from shapely.geometry import shape
from tqdm import tqdm

from dataio.augment import MASK_PAD
from dataio.chips import Chip
from dataio.geo import gdal_env
from dataio.manifest import load_manifest
from dataio.prepare import PrepareConfig, Tile, process_tile
from dataio.prepare import main as prepare_main
from dataio.shards import check_shard, decode_sample, iter_tar_samples
from dataio.spacenet import IMAGE_DIR, IMAGE_PREFIX

UTM, PX, X0, Y0 = "EPSG:32611", 0.3, 500123.45, 4012345.6  # (an origin off the metre grid)
SCENE = "AOI_9_Scene_img1"
H, W, N = 200, 300, 128
CHIPS = {f"{SCENE}_r{r}_c{c}": (r, c, h, w) for r, h in ((0, N), (128, H - 128))
         for c, w in ((0, N), (128, W - 128))}
# each chip's sample at the default margin of 64 px: its window (r0, c0, h, w) in the scene and
# its core in it; clipped at the scene's edges (rows 0 and 200, columns 0 and 300)
GROWN = {f"{SCENE}_r0_c0": ((0, 0, 192, 192), [0, 0, 128, 128]),
         f"{SCENE}_r0_c128": ((0, 64, 192, 236), [0, 64, 128, 172]),
         f"{SCENE}_r128_c0": ((64, 0, 136, 192), [64, 0, 72, 128]),
         f"{SCENE}_r128_c128": ((64, 64, 136, 236), [64, 64, 72, 172])}
# buildings of the end-to-end test, (rows, cols) in the scene: across the chips' column edge at
# 128; around the corner of four chips (row 128, column 128); inside one chip; inside the wide
# last column, across column 256 (where a third column of chips began before)
ACROSS_TWO, ACROSS_FOUR, INSIDE, WIDE = ((40, 70), (100, 150)), ((110, 150), (110, 150)), \
    ((160, 190), (20, 60)), ((20, 60), (230, 290))
ROOF = 3000  # band values of a building; the ground is below 1000


def _scene() -> np.ndarray:
    """(3, H, W) uint16: noise with bright roofs."""
    img = np.random.default_rng(5).integers(100, 1000, (3, H, W)).astype(np.uint16)
    for (r0, r1), (c0, c1) in (ACROSS_TWO, ACROSS_FOUR, INSIDE, WIDE):
        img[:, r0:r1, c0:c1] = ROOF
    return img


def _write_tif(raw: Path, iid: str, pixels: np.ndarray, transform: Affine | None = None,
               mask: np.ndarray | None = None, external: bool = False,
               **creation: object) -> Path:
    """A georeferenced GeoTIFF as dataio.synth writes them (uint16, pixel-interleaved), with
    ``mask`` as its mask (0: nodata) if given: internal, or ``<file>.msk`` if ``external``."""
    tif = raw / IMAGE_DIR / f"{IMAGE_PREFIX}{iid}.tif"
    tif.parent.mkdir(parents=True, exist_ok=True)
    bands, h, w = pixels.shape
    profile = {"driver": "GTiff", "width": w, "height": h, "count": bands, "dtype": "uint16",
               "crs": UTM, "transform": transform or Affine(PX, 0, X0, 0, -PX, Y0),
               "interleave": "pixel", **creation}
    with (gdal_env(), rasterio.Env(GDAL_TIFF_INTERNAL_MASK=not external),
          rasterio.open(tif, "w", **profile) as ds):
        ds.write(pixels)
        if mask is not None:
            ds.write_mask(mask)
    return tif


def _run(raw: Path, out: Path, *extra: str) -> dict:
    assert prepare_main(["--raw", str(raw), "--out", str(out), "--images-only",
                         "--workers", "0", "--quiet", *extra]) == 0
    return json.loads((out / "manifest.json").read_text())


def _samples(data: Path) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    return {k: decode_sample(m) for shard in sorted((data / "test").glob("shard-*.tar"))
            for k, m in iter_tar_samples(shard)}


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    """The scene and a 129 x 90 px image beside it (N + 1 px wide: under 1.5N px both ways), which
    stays one sample."""
    raw = tmp_path / "raw"
    _write_tif(raw, SCENE, _scene())
    small = np.random.default_rng(6).integers(0, 2047, (3, 90, N + 1)).astype(np.uint16)
    _write_tif(raw, "AOI_9_Small_img1", small, Affine(PX, 0, X0 + 1000, 0, -PX, Y0))
    return raw


def test_a_scene_is_cut_into_chips_on_its_grid(raw: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Chip count, sizes (remainders), ImageIds, each chip's transform and pixels those of its
    window of the scene; the pool gets chips, the manifest and the progress bar count them."""
    out = tmp_path / "d"
    assert prepare_main(["--raw", str(raw), "--out", str(out), "--images-only", "--chip-size",
                         str(N), "--workers", "2", "--shard-size", "4"]) == 0
    said = capsys.readouterr()
    assert "5/5" in said.err and "chip" in said.err  # the bar: 4 chips and the small image
    # (it said "prepared 5 tiles ... 1 images cut into 4 chips ... tiles/s": the samples, 4
    # chips and the small image whole, counted as tiles of the AOI, which has 2)
    assert said.out.startswith(f"prepared 5 samples into {out} ("), said.out
    assert "; 1 image cut into 4 chips of 128 px, 64 px margin)" in said.out
    assert " samples/s, 2 workers); skipped 0" in said.out
    m = load_manifest(out)
    assert m.samples("test") == 5 and len(m.shards("test")) == 2 and not m.labels
    assert all(check_shard(out / "test", info) is None for info in m.shards("test"))
    assert m.data["config"]["chip_size"] == N and m.data["skipped"] == []
    assert m.data["config"]["chip_margin"] == 64  # the default
    (src,) = m.data["sources"]
    assert src | {"raw": ""} == {"raw": "", "tiles": 2, "labels_ignored": False,
                                 "chip_size": N, "images_chipped": 1, "chips": 4,
                                 "chips_empty": 0}
    got = _samples(out)
    assert sorted(got) == sorted([*CHIPS, "AOI_9_Small_img1"])
    scene = _scene().transpose(1, 2, 0)
    for key, ((r0, c0, h, w), core) in GROWN.items():  # the sample: the grown window's
        img, mask, meta = got[key]
        assert img.shape == (h, w, 3) and (mask == MASK_PAD).all()
        assert np.array_equal(img, scene[r0:r0 + h, c0:c0 + w])
        assert meta["image_id"] == key and (meta["height"], meta["width"]) == (h, w)
        assert meta["source_offset"] == list(CHIPS[key][:2])  # the chip's (the core's) offset
        assert meta["core"] == core and meta["source"] == f"{IMAGE_PREFIX}{SCENE}.tif"
        assert meta["crs"] == UTM
        np.testing.assert_allclose(meta["transform"],
                                   [PX, 0, X0 + c0 * PX, 0, -PX, Y0 - r0 * PX], rtol=0, atol=1e-9)
    img, _, meta = got["AOI_9_Small_img1"]  # under 1.5N both ways: one sample, as without
    assert img.shape == (90, N + 1, 3) and "source_offset" not in meta and "core" not in meta
    # band statistics over the chips' cores: those of the same pixels prepared whole (each
    # pixel once, not again in every margin it lies in)
    whole = _run(raw, tmp_path / "whole")
    assert whole["splits"]["test"]["samples"] == 2
    assert m.data["band_stats"] == whole["band_stats"]


def test_without_chip_size_and_with_small_images_the_output_is_as_before(
        images_only_dataset: Path, unlabelled_aoi: Path, tmp_path: Path) -> None:
    """Images of at most N px stay whole, written byte for byte as without --chip-size, and
    meta.json has the keys it always had."""
    out = _run(unlabelled_aoi, tmp_path / "d", "--chip-size", "128", "--shard-size", "4")
    assert out["sources"][0]["images_chipped"] == out["sources"][0]["chips"] == 0
    before = sorted(p.name for p in (images_only_dataset / "test").iterdir())
    assert sorted(p.name for p in (tmp_path / "d" / "test").iterdir()) == before and before
    for name in before:
        assert (tmp_path / "d" / "test" / name).read_bytes() == \
            (images_only_dataset / "test" / name).read_bytes(), name
    for _, _, meta in _samples(images_only_dataset).values():
        assert set(meta) == {"image_id", "crs", "transform", "width", "height", "bands",
                             "building_count", "source"}
    assert not {"chip_size", "chip_margin"} & set(load_manifest(images_only_dataset).data["config"])


def test_chip_size_without_images_only_or_a_bad_value_is_refused(
        raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d"
    with pytest.raises(SystemExit) as stop:
        prepare_main(["--raw", str(raw), "--out", str(out), "--chip-size", "128"])
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--chip-size needs --images-only" in last and "leakage" in last
    for bad in ("63", "0", "-128", "12.5", "big"):
        with pytest.raises(SystemExit) as stop:
            prepare_main(["--raw", str(raw), "--out", str(out), "--images-only",
                          "--chip-size", bad])
        assert stop.value.code == 2
        assert "--chip-size" in capsys.readouterr().err.strip().splitlines()[-1], bad
    for bad, why in ((["--chip-margin", "8"], "needs --chip-size"),
                     (["--chip-size", "128", "--chip-margin", "-1"], "must be a whole number"),
                     (["--chip-size", "128", "--chip-margin", "129"], "from 0 to the --chip-size"),
                     (["--chip-size", "128", "--chip-margin", "12.5"], "'12.5': expected")):
        with pytest.raises(SystemExit) as stop:
            prepare_main(["--raw", str(raw), "--out", str(out), "--images-only", *bad])
        assert stop.value.code == 2
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("python -m dataio.prepare: error: ") and "--chip-margin" in last
        assert why in last, (bad, last)
    assert not out.exists()  # before any work
    with pytest.raises(ValueError, match="--chip-size needs --images-only"):
        PrepareConfig([raw], out, chip_size=128)
    with pytest.raises(ValueError, match="--chip-size must be an integer >= 64"):
        PrepareConfig([raw], out, images_only=True, chip_size=32)
    with pytest.raises(ValueError, match="--chip-margin needs --chip-size"):
        PrepareConfig([raw], out, images_only=True, chip_margin=8)
    with pytest.raises(ValueError, match=r"--chip-margin must be .* from 0 to the --chip-size"):
        PrepareConfig([raw], out, images_only=True, chip_size=128, chip_margin=200)
    assert PrepareConfig([raw], out, images_only=True, chip_size=128).chip_margin == 64


def _damaged_scene(raw: Path) -> Path:
    """The scene, deflated in strips of 8 rows, with the strip of rows 144-151 (in the second
    row of chips) overwritten: GDAL opens the file and fails to read that strip."""
    tif = _write_tif(raw, SCENE, _scene(), compress="deflate", blockysize=8)
    with rasterio.open(tif) as ds:
        offset = int(ds.get_tag_item("BLOCK_OFFSET_0_18", "TIFF", bidx=1))
        size = int(ds.get_tag_item("BLOCK_SIZE_0_18", "TIFF", bidx=1))
    data = bytearray(tif.read_bytes())
    data[offset:offset + size] = b"\xff" * size
    tif.write_bytes(bytes(data))
    return tif


def test_a_chip_whose_window_cannot_be_read_is_skipped_alone(tmp_path: Path) -> None:
    """A scene that opens but one of whose strips is damaged loses the chips that read it, each
    skipped with its reason and counted; a file that does not open is one skip, not one a chip."""
    raw = tmp_path / "raw"
    tif = _damaged_scene(raw)
    bad = raw / IMAGE_DIR / f"{IMAGE_PREFIX}AOI_9_Broken_img1.tif"
    bad.write_bytes(b"not a tiff" * 100)
    # (a margin of 8 px: the top chips read rows 0-135, the damage is in the bottom ones' alone)
    m = _run(raw, tmp_path / "d", "--chip-size", str(N), "--chip-margin", "8")
    assert sorted(_samples(tmp_path / "d")) == [k for k in sorted(CHIPS) if "_r0_" in k]
    skipped = {s["image_id"]: s for s in m["skipped"]}
    assert sorted(skipped) == sorted(["AOI_9_Broken_img1",
                                      *(k for k in CHIPS if "_r128_" in k)])
    assert "unreadable image" in skipped["AOI_9_Broken_img1"]["reason"]
    for key in CHIPS:
        if "_r128_" in key:
            assert skipped[key]["path"] == str(tif)
            # (its own pixels: read without the margin, they fail too)
            assert skipped[key]["reason"].startswith("unreadable chip, rows 128-199 and columns")
            assert "previous exception" not in skipped[key]["reason"]  # (GDAL's words instead)
            assert "band 1" in skipped[key]["reason"]
    assert m["sources"][0]["chips"] == 4 and m["splits"]["test"]["samples"] == 2


def test_a_chip_whose_margin_cannot_be_read_is_read_without_it(tmp_path: Path) -> None:
    """At the default margin of 64 px the top chips' samples (rows 0-191) take in the damaged
    strip (rows 144-151), which is the bottom chips' own: the top chips are read alone (their
    own pixels, no core: predicted without that context) and noted, not lost with the strip."""
    raw = tmp_path / "raw"
    _damaged_scene(raw)
    m = _run(raw, tmp_path / "d", "--chip-size", str(N))
    got = _samples(tmp_path / "d")
    assert sorted(got) == [k for k in sorted(CHIPS) if "_r0_" in k]
    scene = _scene().transpose(1, 2, 0)
    for key, (r0, c0, h, w) in CHIPS.items():
        if "_r0_" in key:
            img, _, meta = got[key]
            assert np.array_equal(img, scene[r0:r0 + h, c0:c0 + w]) and "core" not in meta
            assert (meta["height"], meta["width"]) == (h, w)
            np.testing.assert_allclose(meta["transform"], [PX, 0, X0 + c0 * PX, 0, -PX,
                                                           Y0 - r0 * PX], rtol=0, atol=1e-9)
    notes = {r["image_id"]: r["note"] for r in m["repaired"]}
    assert sorted(notes) == sorted(got)
    assert notes[f"{SCENE}_r0_c128"].startswith("read without its --chip-margin: rows 0-191 "
                                                "and columns 64-299 of the image could not")
    assert "previous exception" not in notes[f"{SCENE}_r0_c128"]
    skipped = {s["image_id"]: s["reason"] for s in m["skipped"]}
    assert sorted(skipped) == sorted(k for k in CHIPS if "_r128_" in k)
    assert all(r.startswith("unreadable chip, rows 128-199 and columns") for r in skipped.values())


@pytest.mark.parametrize("how", ["nodata", "mask", "external-mask"])
def test_a_chip_all_nodata_is_left_out_and_counted(how: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """The left column of chips invalid (nodata 0 in every band, or a mask, internal or a
    ``.msk`` file beside the image, which prepare's GDAL environment otherwise ignores): the
    bottom chip is left out, although its margin holds data; the top one has one valid pixel
    (in one band) and is kept, as is the small image, all nodata but whole. A scene of nothing
    but nodata leaves nothing to predict: an error saying so."""
    raw = tmp_path / "raw"
    img = _scene()
    invalid = np.zeros((H, W), bool)
    invalid[:, :N] = True
    invalid[5, 5] = False
    mask = np.where(invalid, 0, 255).astype(np.uint8)
    if how == "nodata":
        img[:, invalid] = 0
        img[1, 5, 5] = 7  # (bands 0 and 2 are nodata there: the pixel is valid all the same)
    external = how == "external-mask"
    _write_tif(raw, SCENE, img, **({"nodata": 0} if how == "nodata" else
                                   {"mask": mask, "external": external}))
    assert (raw / IMAGE_DIR / f"{IMAGE_PREFIX}{SCENE}.tif.msk").exists() == external
    small = np.zeros((3, 90, N + 1), np.uint16)
    _write_tif(raw, "AOI_9_Small_img1", small, Affine(PX, 0, X0 + 1000, 0, -PX, Y0),
               **({"nodata": 0} if how == "nodata" else
                  {"mask": np.zeros((90, N + 1), np.uint8), "external": external}))
    m = _run(raw, tmp_path / "d", "--chip-size", str(N))
    assert "1 image cut into 4 chips of 128 px, 64 px margin, 1 all nodata left out" in \
        capsys.readouterr().out
    assert sorted(_samples(tmp_path / "d")) == sorted(
        [f"{SCENE}_r0_c0", f"{SCENE}_r0_c128", f"{SCENE}_r128_c128", "AOI_9_Small_img1"])
    assert m["sources"][0]["chips"] == 4 and m["sources"][0]["chips_empty"] == 1
    assert m["splits"]["test"]["samples"] == 4 and m["skipped"] == []
    (raw / IMAGE_DIR / f"{IMAGE_PREFIX}AOI_9_Small_img1.tif").unlink()
    img[:] = 0
    _write_tif(raw, SCENE, img, nodata=0, mask=np.zeros((H, W), np.uint8))
    assert prepare_main(["--raw", str(raw), "--out", str(tmp_path / "e"), "--images-only",
                         "--workers", "0", "--quiet", "--chip-size", str(N)]) == 2
    assert capsys.readouterr().err.strip() == (f"dataio.prepare: error: nothing to predict in "
                                               f"{raw}: 4 chips are all nodata")


def test_a_chip_beyond_an_image_that_shrank_since_the_scan_is_skipped(raw: Path) -> None:
    """(rasterio crops such a window: the sample was smaller than its chip, at its offset)"""
    tif = raw / IMAGE_DIR / f"{IMAGE_PREFIX}AOI_9_Small_img1.tif"  # 129 x 90 px
    tile = Tile("AOI_9_Small_img1_r0_c64", tif, None, "test", Chip(0, 64, 128, 64))
    assert process_tile(tile, 3, 0.0) == {"skip": "chip rows 0-127 and columns 64-127 run off "
                                          "the image, now 90 x 129 px: it changed since "
                                          "prepare's scan; rerun dataio.prepare"}
    tile = Tile("AOI_9_Small_img1_r0_c64", tif, None, "test", Chip(0, 0, 64, 64))
    assert "sample" in process_tile(tile, 3, 0.0)


def test_an_image_that_would_fail_every_chip_is_skipped_once(tmp_path: Path) -> None:
    """A chip ImageId that an image beside the scene already has (the ImageIds must be unique:
    two samples of one key) and a degenerate geotransform skip the scene once, not per chip."""
    raw = tmp_path / "raw"
    _write_tif(raw, SCENE, _scene())
    clash = _write_tif(raw, f"{SCENE}_r0_c128", _scene()[:, :64, :64])
    other = "AOI_9_Other_img1"
    _write_tif(raw, other, _scene(), Affine(0.0, 0.0, X0, 0.0, 0.0, Y0))  # pixel size 0
    m = _run(raw, tmp_path / "d", "--chip-size", str(N))
    skipped = {s["image_id"]: s["reason"] for s in m["skipped"]}
    assert skipped == {SCENE: f"its chip ImageId '{SCENE}_r0_c128' is that of {clash} too; "
                              "rename one of them",
                       other: "image has a degenerate geotransform"}
    assert sorted(_samples(tmp_path / "d")) == [f"{SCENE}_r0_c128"]  # the image, whole
    assert m["sources"][0]["images_chipped"] == m["sources"][0]["chips"] == 0


def test_an_image_id_too_long_for_a_file_name_downstream_is_skipped_early(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Chip ImageIds of 234 bytes (the scene's own 224 and _r128_c128) would stop polygonize
    --geojson after the prediction (tests/postproc/test_geojson.py): the scene is skipped
    once, in the scan, naming the file and the limit; one whose longest chip ImageId is 233
    bytes is cut as usual. So are images that stay whole: 234 bytes skipped, 233 kept."""
    raw = tmp_path / "raw"
    small = np.zeros((3, 90, N + 1), np.uint16)
    ids = {}
    for n, pixels in ((224, _scene()), (223, _scene()), (234, small), (233, small)):
        iid = ids[n] = "AOI_9_" + "x" * (n - 6)
        assert len(iid.encode()) == n
        _write_tif(raw, iid, pixels)
    m = _run(raw, tmp_path / "d", "--chip-size", str(N))
    long_scene = raw / IMAGE_DIR / f"{IMAGE_PREFIX}{ids[224]}.tif"
    assert {s["image_id"]: (s["path"], s["reason"]) for s in m["skipped"]} == {
        ids[224]: (str(long_scene), "its chip ImageIds are up to 234 bytes ('_r128_c128' "
                   "added), over the 233 bytes an ImageId may have: postproc.polygonize "
                   "--geojson writes <ImageId>.geojson under a temporary name 22 bytes longer, "
                   "and a file name has at most 255; rename the file"),
        ids[234]: (str(raw / IMAGE_DIR / f"{IMAGE_PREFIX}{ids[234]}.tif"),
                   "ImageId of 234 bytes, over the 233 bytes an ImageId may have: "
                   "postproc.polygonize --geojson writes <ImageId>.geojson under a temporary "
                   "name 22 bytes longer, and a file name has at most 255; rename the file")}
    assert sorted(_samples(tmp_path / "d")) == sorted(
        [ids[233], *(f"{ids[223]}_r{r}_c{c}" for r in (0, N) for c in (0, N))])
    assert m["sources"][0]["images_chipped"] == 1
    said = capsys.readouterr().out
    assert "skipped 2" in said and f"  skipped {long_scene}: its chip ImageIds are" in said


def test_with_nothing_left_to_write_the_error_names_a_skipped_file_and_why(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run whose every image is skipped writes no manifest, where the reasons are listed: the
    error names the first (it said "see the skipped tiles' reasons", which were nowhere), in
    the scan (a whole image) and after it (a scene whose chips all fail)."""
    for n, pixels, flags in ((234, np.zeros((3, 90, 90), np.uint16), []),
                             (226, _scene(), ["--chip-size", str(N)])):
        raw = tmp_path / f"raw{n}"
        iid = "AOI_9_" + "x" * (n - 6)
        tif = _write_tif(raw, iid, pixels)
        if not flags:  # (a second skip, listed after it)
            (raw / IMAGE_DIR / f"{IMAGE_PREFIX}AOI_9_zz_img1.tif").write_bytes(b"not a tiff")
        assert prepare_main(["--raw", str(raw), "--out", str(tmp_path / "d"), "--images-only",
                             "--workers", "0", "--quiet", *flags]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith(f"dataio.prepare: error: no usable tiles in {raw}; skipped "
                              if not flags else
                              f"dataio.prepare: error: no tile of {raw} could be read; skipped ")
        assert f"skipped {tif}: " in err and "over the 233 bytes" in err
        assert err.endswith("; rename the file" + ("" if flags else " (and 1 more)")), err
        assert not (tmp_path / "d").exists()


# the scene's georeferencing in the end-to-end test: SpaceNet's own CRS (EPSG:4326, pixels of
# ~2.7e-6 degrees, here also rotated 30 degrees) and a south-up UTM grid (a positive e), beside
# the plain north-up UTM one: merge's grid check must find every chip on the scene's grid
GEOREF = {
    "utm": (UTM, Affine(PX, 0, X0, 0, -PX, Y0)),
    "wgs84-rotated": ("EPSG:4326", Affine.translation(-115.30721312, 36.2541873)
                      @ Affine.rotation(30) @ Affine.scale(2.6949458523585647e-06, -2.7e-06)),
    "utm-south-up": (UTM, Affine(PX, 0, X0, 0, PX, Y0)),
}


@pytest.mark.parametrize("margin", [[], ["--chip-margin", "0"]], ids=["margin64", "margin0"])
@pytest.mark.parametrize("georef", sorted(GEOREF))
def test_a_building_cut_by_chip_edges_comes_out_of_merge_whole(georef: str, margin: list[str],
                                                               tmp_path: Path) -> None:
    """prepare --chip-size -> per-chip predictions -> polygonize --geojson -> merge: one
    footprint for each building, across two chips or four, in the scene's place (the chips'
    meta.json put them on the scene's pixel grid). The predictions are the roofs of each chip's
    sample, as read back from the shards (a net would give them, less exactly), cut to the chip
    as trainer.predict writes them: at the chip's size, with the chip's transform."""
    from postproc.predio import iter_pred_samples

    crs, transform = GEOREF[georef]
    raw = tmp_path / "raw"
    _write_tif(raw, SCENE, _scene(), transform, crs=crs)
    small = np.random.default_rng(6).integers(0, 2047, (3, 90, N + 1)).astype(np.uint16)
    _write_tif(raw, "AOI_9_Small_img1", small, transform @ Affine.translation(W + 1000, 0),
               crs=crs)
    data = tmp_path / "d"
    _run(raw, data, "--chip-size", str(N), *margin)
    for key, (_, _, meta) in _samples(data).items():
        assert ("core" in meta) == (not margin and key in CHIPS), key
    geoms = _merged(data, tmp_path, crs, transform)
    for key, prob, meta in iter_pred_samples(tmp_path / "pred" / "pred-000000.tar"):
        if key in CHIPS:  # what merge reads: the chip's place and size, as without a margin
            r0, c0, h, w = CHIPS[key]
            assert prob.shape[:2] == (h, w) and (meta["height"], meta["width"]) == (h, w)
            assert "core" not in meta and meta["source_offset"] == [r0, c0]
            np.testing.assert_allclose(meta["transform"],
                                       list(transform @ Affine.translation(c0, r0))[:6],
                                       rtol=1e-12, atol=1e-12)
    assert len(geoms) == 4
    want_chips = {ACROSS_TWO: [f"{SCENE}_r0_c0", f"{SCENE}_r0_c128"],
                  ACROSS_FOUR: [f"{SCENE}_r{r}_c{c}" for r in (0, 128) for c in (0, 128)],
                  INSIDE: [f"{SCENE}_r128_c0"], WIDE: [f"{SCENE}_r0_c128"]}
    for ((r0, r1), (c0, c1)), ids in want_chips.items():
        (props,) = [p for g, p in geoms if g.equals(shapely.box(c0, r0, c1, r1))]
        assert sorted(props.get("ImageIds", [props.get("ImageId")])) == sorted(ids)


def _merged(data: Path, tmp_path: Path, crs: str,
            transform: Affine) -> list[tuple[shapely.Geometry, dict]]:
    """Each sample of ``data`` predicted (its roofs), cut to its chip, polygonized with
    --geojson and merged: the footprints in the scene's pixels, with their properties."""
    from postproc.cli import exit_on_error
    from postproc.merge import main as merge_main
    from postproc.polygonize import main as polygonize_main

    _predicted(data, tmp_path / "pred")
    assert exit_on_error(lambda: polygonize_main([
        "--pred", str(tmp_path / "pred"), "--out", str(tmp_path / "p.csv"), "--geojson",
        str(tmp_path / "gj"), "--min-polygon-area", "0", "--no-tuned", "--workers", "1"])) == 0
    out = tmp_path / "area.geojson"
    assert exit_on_error(lambda: merge_main(["--pred", str(tmp_path / "pred"), "--geojson",
                                             str(tmp_path / "gj"), "--out", str(out)])) == 0
    to_crs = Transformer.from_crs("EPSG:4326", crs, always_xy=True)
    inv = ~transform

    def px(xy: np.ndarray) -> np.ndarray:  # lon/lat -> the scene's pixels
        x, y = to_crs.transform(xy[:, 0], xy[:, 1])
        return np.round(np.column_stack(inv @ (x, y)), 6)

    return [(shapely.transform(shape(f["geometry"]), px), f["properties"])
            for f in json.loads(out.read_text())["features"]]


def _roof_probs(img: np.ndarray) -> np.ndarray:
    """What the tests' stand-in net predicts: 0.9 building on a roof, 0.05 elsewhere (uint8)."""
    from postproc.predio import quantize_probs

    p = np.where(img[..., 0] == ROOF, 0.9, 0.05)
    return quantize_probs(np.stack([1 - p, p, 0 * p], axis=2))


def _predicted(data: Path, pred: Path) -> None:
    """Each sample of ``data`` predicted (its roofs) and cut to its chip, as trainer.predict
    writes it, into ``pred``."""
    from postproc.predio import write_pred_shard
    from trainer.predict import to_core

    write_pred_shard(pred / "pred-000000.tar", [
        (key, *to_core(_roof_probs(img), meta))
        for key, (img, _, meta) in sorted(_samples(data).items())])


@pytest.mark.parametrize("georef", sorted(GEOREF))
def test_the_chips_mosaic_is_the_scenes_prediction_on_its_grid(georef: str,
                                                               tmp_path: Path) -> None:
    """prepare --chip-size (with its default margin) -> per-chip predictions cut to their chips
    -> postproc.mosaic: one raster on the scene's own grid (its CRS and transform, also rotated
    or south-up), every pixel of the scene its prediction, the second image in its place 1000 px
    to the right, and the gap between the two masked out."""
    from postproc.mosaic import main as mosaic_main

    crs, transform = GEOREF[georef]
    raw = tmp_path / "raw"
    scene = _scene()
    _write_tif(raw, SCENE, scene, transform, crs=crs)
    small = np.random.default_rng(6).integers(0, 2047, (3, 90, N + 1)).astype(np.uint16)
    _write_tif(raw, "AOI_9_Small_img1", small, transform @ Affine.translation(W + 1000, 0),
               crs=crs)
    data = tmp_path / "d"
    _run(raw, data, "--chip-size", str(N))
    _predicted(data, tmp_path / "pred")
    out = tmp_path / "area.tif"
    assert mosaic_main(["--pred", str(tmp_path / "pred"), "--out", str(out)]) == 0
    with rasterio.open(out) as d:
        assert d.crs == rasterio.crs.CRS.from_user_input(crs)
        np.testing.assert_allclose(list(d.transform)[:6], list(transform)[:6], rtol=1e-12,
                                   atol=1e-12)
        assert (d.height, d.width) == (H, W + 1000 + N + 1)
        got, mask = d.read(), d.dataset_mask()
    want = np.zeros((H, W + 1000 + N + 1, 3), np.uint8)
    want[:, :W] = _roof_probs(scene.transpose(1, 2, 0))
    want[:90, W + 1000:] = _roof_probs(small.transpose(1, 2, 0))
    covered = np.zeros((H, W + 1000 + N + 1), bool)
    covered[:, :W] = covered[:90, W + 1000:] = True
    assert np.array_equal(mask > 0, covered)
    assert np.array_equal(got.transpose(1, 2, 0)[covered], want[covered])


def test_merge_joins_the_chips_around_those_left_out_as_nodata(tmp_path: Path) -> None:
    """The scene's left column of chips all nodata, left out: merge works from the prediction
    shards as they are (no chip missing to it), and joins the pieces in the chips that are
    there: the two cut buildings end at the nodata (column 128), the one across the two
    remaining chips is one footprint."""
    raw = tmp_path / "raw"
    img = _scene()
    img[:, :, :N] = 0
    _write_tif(raw, SCENE, img, nodata=0)
    data = tmp_path / "d"
    m = _run(raw, data, "--chip-size", str(N))
    assert m["sources"][0]["chips_empty"] == 2 and m["splits"]["test"]["samples"] == 2
    geoms = _merged(data, tmp_path, UTM, Affine(PX, 0, X0, 0, -PX, Y0))
    assert len(geoms) == 3
    for (r0, r1), (c0, c1), ids in (((40, 70), (N, 150), [f"{SCENE}_r0_c128"]),
                                    ((110, 150), (N, 150), [f"{SCENE}_r{r}_c128" for r in (0, N)]),
                                    (*WIDE, [f"{SCENE}_r0_c128"])):
        (props,) = [p for g, p in geoms if g.equals(shapely.box(c0, r0, c1, r1))]
        assert sorted(props.get("ImageIds", [props.get("ImageId")])) == ids


def _predicted_chips(data: Path, net: torch.nn.Module,
                     tta: bool) -> dict[str, tuple[np.ndarray, dict]]:
    """What trainer.predict writes for the samples of ``data`` (its own path from a batch:
    per_tile at each sample's size, the flips of TTA, the cut to the core), the samples in one
    batch of mixed sizes padded to the largest, as the loader pads them (pixels / 1000 for its
    normalisation)."""
    from dataio.loader import Batch
    from trainer.amp import resolve
    from trainer.predict import _batches

    got = sorted(_samples(data).items())
    n = len(got)
    hmax, wmax = (max(img.shape[k] for _, (img, _, _) in got) for k in (0, 1))
    image = torch.zeros((n, 3, hmax, wmax))
    for i, (_, (img, _, _)) in enumerate(got):
        image[i, :, :img.shape[0], :img.shape[1]] = torch.from_numpy(
            img.astype(np.float32) / 1000).permute(2, 0, 1)
    batch = Batch(image, torch.zeros((n, hmax, wmax), dtype=torch.int64), [k for k, _ in got],
                  torch.ones(n, dtype=torch.bool), [meta for _, (_, _, meta) in got])
    with tqdm(disable=True) as bar:
        return {key: (prob, meta) for key, prob, meta in
                _batches([batch], net, resolve("off", torch.device("cpu")), tta, bar)}


@pytest.mark.parametrize("tta", [False, True], ids=["plain", "tta"])
def test_with_a_margin_a_chip_is_predicted_as_in_the_whole_scene_up_to_its_edges(
        raw: Path, tmp_path: Path, tta: bool) -> None:
    """The point of --chip-margin: a net that sees 4 px around each pixel (two 5 x 5
    convolutions) predicts every chip, cut to its core, as it predicts the whole scene, with a
    margin of 4 px; without one, the pixels within 4 px of the chips' edges (row 128, column
    128) are predicted from the zeros beyond the chip, and differ."""
    from trainer.predict import predict_probs

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 5, padding=2), torch.nn.ReLU(),
                              torch.nn.Conv2d(8, 3, 5, padding=2)).eval()
    with torch.no_grad():
        whole = predict_probs(net, torch.from_numpy(_scene().astype(np.float32) / 1000)[None],
                              tta)[0].permute(1, 2, 0).numpy()
    error = {}
    for margin in ("4", "0"):
        _run(raw, tmp_path / margin, "--chip-size", str(N), "--chip-margin", margin)
        mosaic = np.full((H, W, 3), np.nan, np.float32)
        for key, (prob, meta) in _predicted_chips(tmp_path / margin, net, tta).items():
            if key in CHIPS:
                r0, c0, h, w = CHIPS[key]
                assert prob.shape == (h, w, 3) and (meta["height"], meta["width"]) == (h, w)
                mosaic[r0:r0 + h, c0:c0 + w] = prob
        assert not np.isnan(mosaic).any()  # the cores tile the scene
        error[margin] = np.abs(mosaic - whole).max(axis=2)
    assert error["4"].max() <= 1e-5
    near = np.zeros((H, W), bool)
    near[128 - 4:128 + 4] = near[:, 128 - 4:128 + 4] = True
    assert error["0"][~near].max() <= 1e-5 and error["0"][near].max() > 0.05


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_both_loader_backends_read_chips_with_a_margin(raw: Path, tmp_path: Path,
                                                       backend: str) -> None:
    """Samples of five sizes (the grown windows and the small image) in one batch, each padded
    to the largest, its meta.json (and so its core) passed through for trainer.predict."""
    from dataio.loader import LoaderConfig, build_loader

    _run(raw, tmp_path / "d", "--chip-size", str(N))
    cfg = LoaderConfig(backend=backend, batch_size=5, num_threads=1, read_ahead=0)
    with build_loader(tmp_path / "d", "test", cfg, train=False,
                      device=torch.device("cpu")) as loader:
        (batch,) = list(loader)
    assert bool(batch.valid.all()) and tuple(batch.image.shape) == (5, 3, 192, 236)
    metas = dict(zip(batch.keys, batch.meta, strict=True))
    assert sorted(metas) == sorted([*GROWN, "AOI_9_Small_img1"])
    for key, ((_, _, h, w), core) in GROWN.items():
        assert (metas[key]["height"], metas[key]["width"], metas[key]["core"]) == (h, w, core)
