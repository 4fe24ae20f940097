"""The augmentation's random draws (seeded, so exact): crops reach every position of the tile,
brightness and contrast span their configured ranges on both sides of 1; a tile smaller than
the crop on one side only is padded on that side."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dataio.augment import AugSpec, Draws, Geometry
from dataio.fixtures import ALIGNED_P2, ALIGNED_P98, aligned_tile, mask_from_aligned, write_dataset
from dataio.loader import IGNORE_INDEX, LoaderConfig, build_loader


def test_crops_reach_every_position_rows_and_columns_independently() -> None:
    h, w, n = 72, 88, 3000
    spec = AugSpec(crop=48)
    draws = Draws.draw(n, seed=0, epoch=0, spec=spec)
    assert draws is not None
    geoms = [Geometry.resolve(h, w, spec, draws, i) for i in range(n)]
    # the last row and column of the tile are seen too (anchors 0..H-crop and 0..W-crop)
    assert {g.ay for g in geoms} == set(range(h - 48 + 1))
    assert {g.ax for g in geoms} == set(range(w - 48 + 1))
    # row and column anchors are drawn apart: not only crops along one diagonal
    assert len({(g.ay, g.ax) for g in geoms}) > 0.5 * (h - 47) * (w - 47)


def test_brightness_and_contrast_span_their_own_ranges_both_ways() -> None:
    draws = Draws.draw(2000, seed=1, epoch=3, spec=AugSpec(brightness=0.1, contrast=0.3))
    assert draws is not None
    b, k = draws.bk[:, 0], draws.bk[:, 1]
    assert 0.9 <= b.min() < 0.91 and 1.09 < b.max() <= 1.1
    assert 0.7 <= k.min() < 0.71 and 1.29 < k.max() <= 1.3
    assert abs(np.mean(b < 1) - 0.5) < 0.05 and abs(np.mean(k < 1) - 0.5) < 0.05


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_a_tile_narrower_than_the_crop_but_taller_is_padded_on_its_short_side(
        tmp_path: Path, backend: str) -> None:
    """64 rows x 40 columns, crop 48: a 48 x 40 crop (40 x 48 when transposed), the rest of the
    48 x 48 sample is padding (image 0, mask ignored); the mask still follows the image."""
    g = Geometry.resolve(64, 40, AugSpec(crop=48), Draws.draw(1, 0, 0, AugSpec(crop=48)), 0)
    assert (g.ch, g.cw, g.ax) == (48, 40, 0)
    tiles = [(f"AOI_9_Test_img{i}", *aligned_tile(64, 40, i)) for i in range(6)]
    data = write_dataset(tmp_path / "d", {"train": tiles}, shard_size=3, p2=ALIGNED_P2,
                         p98=ALIGNED_P98)
    cfg = LoaderConfig(backend=backend, batch_size=3, crop_size=48,
                       num_threads=0 if backend == "torch" else 1)
    seen = 0
    with build_loader(data, "train", cfg, train=True) as loader:
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            for b in loader:
                assert b.image.shape[1:] == (3, 48, 48) and b.mask.shape[1:] == (48, 48)
                for img, msk in zip(b.image.numpy(), b.mask.numpy(), strict=True):
                    pad = msk == IGNORE_INDEX
                    assert pad.sum() == 48 * 8 and (pad[:, 40:].all() or pad[40:].all())
                    assert (img[:, pad] == 0).all()
                    np.testing.assert_array_equal(mask_from_aligned(img)[~pad], msk[~pad])
                    seen += 1
    assert seen == 12
