"""dataio.chips: the grid a scene is cut into for ``prepare --images-only --chip-size N``."""

from __future__ import annotations

import numpy as np
import pytest
from affine import Affine
from rasterio.windows import transform as window_transform

from dataio.chips import MIN_CHIP_SIZE, Chip, check_chip_size, chip_grid, needs_chips
from dataio.geo import IMAGE_ID_RE


def test_a_scene_is_cut_from_its_top_left_corner_with_smaller_remainders() -> None:
    chips = chip_grid(200, 300, 128)
    assert chips == [Chip(0, 0, 128, 128), Chip(0, 128, 128, 128), Chip(0, 256, 128, 44),
                     Chip(128, 0, 72, 128), Chip(128, 128, 72, 128), Chip(128, 256, 72, 44)]
    # every pixel in exactly one chip: no overlap, no gap
    cover = np.zeros((200, 300), int)
    for c in chips:
        cover[c.row0:c.row0 + c.height, c.col0:c.col0 + c.width] += 1
    assert (cover == 1).all()


def test_an_exact_multiple_has_no_remainder_and_a_small_scene_one_chip() -> None:
    assert {(c.height, c.width) for c in chip_grid(256, 512, 128)} == {(128, 128)}
    assert len(chip_grid(256, 512, 128)) == 8
    assert chip_grid(100, 128, 128) == [Chip(0, 0, 100, 128)]
    assert not needs_chips(128, 128, 128) and not needs_chips(1, 64, 64)
    assert needs_chips(129, 10, 128) and needs_chips(10, 129, 128)


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
    assert len(set(ids)) == len(ids) == 16 * 11 and all(IMAGE_ID_RE.match(i) for i in ids)


@pytest.mark.parametrize("bad", [MIN_CHIP_SIZE - 1, 0, -128, True, 128.0, "128"])
def test_a_chip_size_below_the_floor_or_not_an_int_is_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="--chip-size must be an integer >= 64"):
        check_chip_size(bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="--chip-size"):
        chip_grid(200, 300, bad)  # type: ignore[arg-type]
    assert check_chip_size(MIN_CHIP_SIZE) == MIN_CHIP_SIZE
