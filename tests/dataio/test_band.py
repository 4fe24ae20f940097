"""dataio.band: the exact boundary band, and what it costs."""

from __future__ import annotations

import numpy as np
import pytest
import shapely
from shapely.geometry import LineString

from dataio import band


@pytest.mark.parametrize("end", [(999.6, 998.1), (999.6, 333.3), (12.4, 999.1)])
def test_a_long_diagonal_wall_costs_its_band_not_its_bounding_box(monkeypatch, end) -> None:
    """What failed: each segment's distances were computed over its bounding box grown by the
    width, so a wall across the tile at 45 degrees computed ~1e6 distances for a band of ~7,000
    pixels (three such buildings on a 2,000 px tile: 179 ms against rasterize's 5 ms)."""
    computed: list[int] = []
    real = band._segment_d2

    def counting(seg, col0, row0, ncols, nrows):
        computed.append(ncols * nrows)
        return real(seg, col0, row0, ncols, nrows)

    monkeypatch.setattr(band, "_segment_d2", counting)
    line = LineString([(0.3, 0.7), end])
    got = band.band_mask([line], (1000, 1000), 2.5)
    ys, xs = np.mgrid[0:1000, 0:1000] + 0.5
    d = shapely.distance(line, shapely.points(xs.ravel(), ys.ravel())).reshape(1000, 1000)
    sure = np.abs(d - 2.5) > 1e-9  # (a centre within rounding of the edge may go either way)
    assert np.array_equal(got[sure], (d <= 2.5)[sure])
    assert sum(computed) < 10 * got.sum(), (sum(computed), int(got.sum()))


def _shapely_band(lines, shape_hw, width):
    """(the band by shapely's distances, and where a centre is not within rounding of its edge)"""
    h, w = shape_hw
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    pts = shapely.points(xs.ravel(), ys.ravel())
    d = np.min([shapely.distance(line, pts) for line in lines], axis=0).reshape(h, w)
    return d <= width, np.abs(d - width) > 1e-6


@pytest.mark.parametrize("ends", [((-1e6, -1e6), (1e6, 1e6)), ((-1e9, -1e9), (1e9, 1e9)),
                                  ((-1e9, 300.5), (1e9, 310.25)), ((-5e8, 2e8), (4e8, -7e8)),
                                  ((-1e9, -1e9), (-1e9 + 5, 1e9))])
def test_a_segment_far_outside_the_tile_costs_its_part_on_the_tile(monkeypatch, ends) -> None:
    """What failed: a segment from (-1e9, -1e9) to (1e9, 1e9) was cut into ~6e7 pieces (45 s
    on a 650 px tile), nearly all of them off the tile; now only its part near the tile is."""
    pieces: list[int] = []
    real = band._pieces

    def counting(seg):
        idx, got = real(seg)
        pieces.append(len(idx))
        return idx, got

    monkeypatch.setattr(band, "_pieces", counting)
    line = LineString(ends)
    got = band.band_mask([line], (650, 650), 2.5)
    want, sure = _shapely_band([line], (650, 650), 2.5)
    assert np.array_equal(got[sure], want[sure])
    assert sum(pieces) <= 2 * 660 / band.PIECE_PX + 2, pieces


def test_clipping_leaves_the_band_bit_identical(monkeypatch) -> None:
    """Segments inside the tile, crossing its edge, or passing near it give exactly the band
    computed from the unclipped segments (the old way), ties included: integer ends."""
    rng = np.random.default_rng(5)
    lines = [LineString(rng.integers(lo, hi, (2, 2)).astype(float))
             for lo, hi in ((0, 80), (-60, 140), (-400, 500)) for _ in range(60)]
    lines += [LineString([(-3.5, -10), (-3.5, 90)]), LineString([(83.5, 5), (83.5, 70)]),
              LineString([(-40, -40), (120, 120)]), LineString([(-100, 20), (200, 20)])]
    for line in lines:
        got = band.band_mask([line], (80, 80), 2.5)
        with monkeypatch.context() as m:
            m.setattr(band, "_clip", lambda seg, shape_hw, margin: (np.arange(len(seg)), seg))
            old = band.band_mask([line], (80, 80), 2.5)
        assert np.array_equal(got, old), line.wkt
    got = band.band_mask(lines, (80, 80), 2.5)
    want, sure = _shapely_band(lines, (80, 80), 2.5)
    assert np.array_equal(got[sure], want[sure])


@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_a_non_finite_coordinate_is_refused_by_name(bad) -> None:
    """What failed: a NaN coordinate raised numpy's "negative dimensions are not allowed"."""
    lines = [LineString([(1, 1), (5, 5)]), LineString([(2, 3), (bad, 40)])]
    with pytest.raises(ValueError, match="non-finite coordinate"):
        band.band_mask(lines, (650, 650), 2.5)
