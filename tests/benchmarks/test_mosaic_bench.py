"""benchmarks.mosaic: its soft tiles are a real box blur, its check of the two COGs fails on a
pixel or a mask that differs, and a run on the smallest area writes both rows to the JSON with
the outputs agreeing (its speed is measured, not asserted)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
from affine import Affine

from benchmarks import mosaic as bench


def test_blurred_is_a_box_blur_with_clamped_edges():
    rng = np.random.default_rng(0)
    prob = rng.integers(0, 256, (9, 7, 3)).astype(np.uint8)
    padded = np.pad(prob.astype(float), ((2, 2), (2, 2), (0, 0)), mode="edge")
    want = np.zeros(prob.shape)
    for y in range(9):
        for x in range(7):
            want[y, x] = padded[y:y + 5, x:x + 5].mean(axis=(0, 1))
    assert np.array_equal(bench.blurred(prob), np.rint(want).astype(np.uint8))


def _cog(path: Path, pixels: np.ndarray, mask: np.ndarray) -> Path:
    with rasterio.Env(GDAL_TIFF_INTERNAL_MASK=True), rasterio.open(
            path, "w", driver="GTiff", width=8, height=8, count=3, dtype="uint8",
            crs="EPSG:32611", transform=Affine(0.3, 0, 500000, 0, -0.3, 4000000)) as d:
        d.write(pixels)
        d.write_mask(mask)
    return path


def test_the_output_check_names_a_pixel_or_a_mask_that_differs(tmp_path: Path):
    pixels = np.arange(192, dtype=np.uint8).reshape(3, 8, 8)
    mask = np.full((8, 8), 255, np.uint8)
    mask[6:, :2] = 0
    a = _cog(tmp_path / "a.tif", pixels, mask)
    bench.same_raster(a, _cog(tmp_path / "same.tif", pixels, mask))
    other = pixels.copy()
    other[1, 0, 5] += 1
    with pytest.raises(ValueError, match="pixels differ"):
        bench.same_raster(a, _cog(tmp_path / "pixel.tif", other, mask))
    other = pixels.copy()
    other[:, 7, 0] += 1  # (under the mask: not a difference)
    bench.same_raster(a, _cog(tmp_path / "hidden.tif", other, mask))
    holes = mask.copy()
    holes[0, 0] = 0
    with pytest.raises(ValueError, match="masks differ at 1 px"):
        bench.same_raster(a, _cog(tmp_path / "mask.tif", pixels, holes))


@pytest.mark.timeout(300)
def test_a_run_on_the_smallest_area_writes_both_rows(tmp_path: Path):
    out = tmp_path / "mosaic.json"
    bench.main(["--grids", "2", "--tile-px", "64", "--repeat", "1", "--json", str(out)])
    rows = json.loads(out.read_text())["rows"]
    assert [r["variant"] for r in rows] == [bench.PROJECT, bench.BASELINE]
    for r in rows:  # (one tile of the 2 x 2 left out; the area is still 128 x 128 px)
        assert (r["tiles"], r["area_mpx"]) == (3, 128 * 128 / 1e6)
        assert r["seconds"] > 0 and r["peak_rss_mb"] > r["rss_start_mb"] > 0
    assert rows[0]["speedup_vs_baseline"] == pytest.approx(rows[1]["seconds"] / rows[0]["seconds"])
