"""dataio.chips: the grid a scene is cut into for ``prepare --images-only --chip-size N``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine
from rasterio.enums import ColorInterp
from rasterio.windows import transform as window_transform

from dataio.chips import (
    MIN_CHIP_SIZE,
    Chip,
    check_chip_margin,
    check_chip_size,
    chip_count,
    chip_grid,
    core_is_nodata,
    needs_chips,
)
from dataio.geo import gdal_env
from dataio.imageid import IMAGE_ID_RE


def _covered_once(chips: list[Chip], height: int, width: int) -> bool:
    """Every pixel of the scene in exactly one chip: no overlap, no gap."""
    cover = np.zeros((height, width), int)
    for c in chips:
        cover[c.row0:c.row0 + c.height, c.col0:c.col0 + c.width] += 1
    return bool((cover == 1).all())


def test_a_scene_is_cut_from_its_top_left_corner_the_last_chips_taking_the_rest() -> None:
    """300 x 200 at 128: 2 columns (128 + 172), 2 rows (128 + 72), not a 44 px column."""
    chips = chip_grid(200, 300, 128)
    assert chips == [Chip(0, 0, 128, 128), Chip(0, 128, 128, 172),
                     Chip(128, 0, 72, 128), Chip(128, 128, 72, 172)]
    assert _covered_once(chips, 200, 300)


@pytest.mark.parametrize("length, sizes", [
    (128, [128]), (512, [128] * 4),          # exact multiples: unchanged
    (129, [129]), (191, [191]),              # N + 1 and just under 1.5N: one chip
    (192, [128, 64]),                        # 1.5N: two chips, N + N/2
    (257, [128, 129]),                       # 2N + 1: N and N + 1, not N, N and 1
    (319, [128, 191]), (320, [128, 128, 64]),
    (63, [63]), (1, [1]),                    # under N/2: the image itself
])
def test_the_last_chip_of_an_axis_is_between_half_and_one_and_a_half_n(
        length: int, sizes: list[int]) -> None:
    row = chip_grid(64, length, 128)  # (one row of chips: 64 px is N/2)
    assert [c.width for c in row] == sizes and chip_count(length, 128) == len(sizes)
    assert [c.col0 for c in row] == [128 * i for i in range(len(sizes))]
    column = chip_grid(length, 64, 128)
    assert [c.height for c in column] == sizes and {c.width for c in column} == {64}


def test_no_chip_is_thin_and_every_pixel_is_in_one_chip() -> None:
    for size in (64, 100, 128):
        for height, width in ((size - 1, 5 * size + 1), (2 * size + 1, 3 * size // 2),
                              (size // 2 + 1, 7 * size // 2), (5 * size // 2, size * 3 - 1)):
            chips = chip_grid(height, width, size)
            assert _covered_once(chips, height, width), (height, width, size)
            for c in chips:  # N/2 <= a side < 1.5N, unless the scene's own side is under N/2
                for side, scene in ((c.height, height), (c.width, width)):
                    assert (side == scene < size / 2) or size / 2 <= side < 1.5 * size


def test_an_image_that_gives_one_chip_both_ways_stays_whole() -> None:
    assert chip_grid(100, 128, 128) == [Chip(0, 0, 100, 128)]
    assert chip_grid(191, 129, 128) == [Chip(0, 0, 191, 129)]
    assert not needs_chips(128, 128, 128) and not needs_chips(1, 64, 64)
    assert not needs_chips(129, 10, 128) and not needs_chips(10, 191, 128)  # N + 1, 1.5N - 1
    assert needs_chips(192, 10, 128) and needs_chips(10, 192, 128)  # 1.5N: two chips


def test_a_chips_window_and_image_id() -> None:
    chip = Chip(128, 256, 72, 44)
    w = chip.window()
    assert (w.row_off, w.col_off, w.height, w.width) == (128, 256, 72, 44)
    t = Affine(0.3, 0.0, 500000.0, 0.0, -0.3, 4000000.0)
    # (what prepare writes into the chip's meta.json: its corner on the scene's grid)
    assert window_transform(w, t) == Affine(0.3, 0.0, 500000.0 + 256 * 0.3,
                                            0.0, -0.3, 4000000.0 - 128 * 0.3)
    assert chip.image_id("AOI_2_Vegas_img1") == "AOI_2_Vegas_img1_r128_c256"
    ids = [c.image_id("AOI_2_Vegas_img1") for c in chip_grid(1000, 700, 64)]
    assert len(set(ids)) == len(ids) == 16 * 11 and all(IMAGE_ID_RE.fullmatch(i) for i in ids)


@pytest.mark.parametrize("bad", [MIN_CHIP_SIZE - 1, 0, -128, True, 128.0, "128"])
def test_a_chip_size_below_the_floor_or_not_an_int_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="--chip-size must be an integer >= 64"):
        check_chip_size(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--chip-size"):
        chip_grid(200, 300, bad)  # type: ignore[arg-type]
    assert check_chip_size(MIN_CHIP_SIZE) == MIN_CHIP_SIZE


def test_a_chips_sample_window_is_grown_by_the_margin_and_clipped_to_the_scene() -> None:
    """--chip-margin 16 on a 400 x 330 scene at 128 px (3 x 3 chips, the last column 74 px):
    an interior chip grows 16 px every way, an edge chip not across the scene's edge, a corner
    chip only inward; the core is the chip's place in its window."""
    chips = chip_grid(400, 330, 128)
    assert [(c.row0, c.col0) for c in chips][:3] == [(0, 0), (0, 128), (0, 256)]
    grown = {(c.row0, c.col0): c.grown(16, 400, 330) for c in chips}
    assert grown[(128, 128)] == Chip(112, 112, 160, 160)  # interior
    assert grown[(0, 128)] == Chip(0, 112, 144, 160)  # top edge
    assert grown[(128, 256)] == Chip(112, 240, 160, 90)  # right edge: 256 + 74 = 330, the end
    assert grown[(0, 0)] == Chip(0, 0, 144, 144)  # corners
    assert grown[(256, 256)] == Chip(240, 240, 160, 90)
    assert Chip(128, 128, 128, 128).core_in(grown[(128, 128)]) == [16, 16, 128, 128]
    assert Chip(0, 256, 128, 74).core_in(grown[(0, 256)]) == [0, 16, 128, 74]
    # a margin wider than the room left: clipped at the scene's edges, never padded
    assert Chip(0, 128, 128, 128).grown(128, 200, 300) == Chip(0, 0, 200, 300)
    assert Chip(64, 64, 64, 64).grown(0, 200, 300) == Chip(64, 64, 64, 64)


@pytest.mark.parametrize("bad", [-1, 129, True, 8.0, "8"])
def test_a_chip_margin_below_zero_above_the_chip_size_or_not_an_int_is_refused(
        bad: object) -> None:
    with pytest.raises(ValueError, match=r"^--chip-margin must be a whole number of px from 0 "
                                         r"to the --chip-size \(128\), got "):
        check_chip_margin(bad, 128)  # type: ignore[arg-type]
    assert check_chip_margin(0, 128) == 0 and check_chip_margin(128, 128) == 128


# (kind, dtype, nodata): the ways GDAL marks pixels invalid, and none
MASKS = [("none", "uint16", None), ("nodata", "uint16", 0), ("nodata", "uint8", 7),
         ("nodata-fraction", "uint8", 7.5), ("mask", "uint16", None),
         ("alpha", "uint8", None), ("alpha", "uint8", 0)]


@pytest.mark.parametrize("kind, dtype, nodata", MASKS, ids=[f"{k}-{d}-{n}" for k, d, n in MASKS])
def test_core_is_nodata_is_rasterio_dataset_mask_of_the_chip(kind: str, dtype: str,
                                                             nodata: float | None,
                                                             tmp_path: Path) -> None:
    """A 12 x 16 px image whose left half is invalid (nodata in every band, or masked out) but
    for one pixel valid in a single band: every chip of a 4 px grid, read with a margin of 0
    or 4 px, is all nodata exactly where rasterio's ``dataset_mask`` of the chip says so."""
    fill = int(nodata) if kind.startswith("nodata") else 0
    rng = np.random.default_rng(3)
    px = rng.integers(10, 200, (3, 12, 16)).astype(dtype)
    px[:, :, :8] = fill
    px[1, 6, 2] = 9  # (one band valid: the pixel is valid)
    mask = np.full((12, 16), 255, np.uint8)
    mask[:, :8] = 0
    mask[6, 2] = 255
    if kind == "alpha":
        px = np.concatenate([px, mask[None].astype(dtype)])
    tif = tmp_path / "img.tif"
    profile = {"driver": "GTiff", "width": 16, "height": 12, "count": len(px), "dtype": dtype,
               "crs": "EPSG:32611", "transform": Affine(0.3, 0, 500000, 0, -0.3, 4000000)}
    if kind.startswith("nodata"):
        profile["nodata"] = nodata
    with gdal_env(), rasterio.open(tif, "w", **profile) as ds:
        ds.write(px)
        if kind == "mask":
            ds.write_mask(mask)
        if kind == "alpha":
            ds.colorinterp = [ColorInterp.red, ColorInterp.green, ColorInterp.blue,
                              ColorInterp.alpha]
    got = []
    with gdal_env(), rasterio.open(tif) as ds:
        for chip in (Chip(r, c, 4, 4) for r in range(0, 12, 4) for c in range(0, 16, 4)):
            want = not ds.dataset_mask(window=chip.window()).any()
            for margin in (0, 4):
                window = chip.grown(margin, 12, 16)
                sample = ds.read(window=window.window())
                assert core_is_nodata(ds, sample, chip, window) == want, (chip, margin)
            got.append(want)
    # (both answers are met where GDAL marks the left half invalid; a nodata value that a uint8
    # cannot hold is left to GDAL, whatever it makes of it)
    assert sum(got) == (0 if kind == "none" else 5) or kind == "nodata-fraction"


def test_with_a_nodata_value_the_pixels_already_read_decide(tmp_path: Path) -> None:
    """No second read of the image: the sample passed in is what is looked at (here made all
    nodata over valid pixels in the file, as a stand-in for it)."""
    tif = tmp_path / "img.tif"
    with gdal_env(), rasterio.open(tif, "w", driver="GTiff", width=8, height=8, count=3,
                                   dtype="uint16", nodata=0, crs="EPSG:32611",
                                   transform=Affine(0.3, 0, 500000, 0, -0.3, 4000000)) as ds:
        ds.write(np.full((3, 8, 8), 5, np.uint16))
    chip = Chip(0, 0, 4, 4)
    with gdal_env(), rasterio.open(tif) as ds:
        assert not core_is_nodata(ds, ds.read(window=chip.window()), chip, chip)
        assert core_is_nodata(ds, np.zeros((3, 4, 4), np.uint16), chip, chip)
