"""The polygonizer against its previous implementation (``ref_polygonize``, a frozen copy).

Instances are defined by their algorithm down to the tie-breaks (provisional labels, layer by
layer growth), so the rewrite must give the same instance labels, pixel counts, confidences and
polygons on every tile: synthetic tiles like the benchmark's, and random rasters whose seeds
and bands are dense and tangled enough to make ties and multi-label components common.
"""

from __future__ import annotations

import numpy as np
import pytest
from ref_polygonize import ref_instances

from postproc.polygonize import PolygonizeConfig, find_instances, polygonize_probs, warmup
from postproc.synthmask import SynthConfig, one_hot, soften, synth_tile

RADII = (0.0, 0.5, 1.0, 1.5, 2.0, 2.9, 3.0, 4.5, 7.0, 12.0)


@pytest.fixture(scope="module", autouse=True)
def _compiled():
    warmup()


def assert_equivalent(prob: np.ndarray, cfg: PolygonizeConfig) -> None:
    ref = ref_instances(prob, cfg.building_threshold, cfg.footprint_threshold, cfg.grow_radius,
                        cfg.seedless)
    inst = find_instances(prob, cfg)
    assert inst.n == ref["n"]
    np.testing.assert_array_equal(inst.labels(), ref["labels"])
    np.testing.assert_array_equal(inst.count[1:inst.n + 1], ref["count"][1:ref["n"] + 1])
    np.testing.assert_array_equal(inst.fsum[1:inst.n + 1], ref["fsum"][1:ref["n"] + 1])
    ours = polygonize_probs(prob, cfg)
    polys = ref["polys"]  # blob id -> GDAL's polygon of the reference blob
    ids = np.array(sorted(polys), dtype=np.int64)
    conf = ref["fsum"][ids] / (255.0 * ref["count"][ids])
    keep = ref["count"][ids] >= cfg.min_polygon_area
    order = [i for i in np.argsort(-conf, kind="stable") if keep[i]]
    expected = [(polys[int(ids[i])], float(conf[i])) for i in order]
    assert len(ours) == len(expected)
    for (g, c), (h, d) in zip(ours, expected, strict=True):
        assert c == d
        assert g.is_valid
        # the same region: symmetric difference area 0 (GDAL starts rings elsewhere)
        assert g.symmetric_difference(h).area == 0, (g.wkt, h.wkt)


def random_classes(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """uint8 probabilities of random blobby seeds and bands: many touching instances, U-shaped
    seeds (several provisional labels), seedless pieces, ties."""
    noise = rng.random((h + 4, w + 4))
    k = int(rng.integers(0, 3))
    for _ in range(k):  # smooth into blobs of a few px
        noise = (noise[:-2, 1:-1] + noise[2:, 1:-1] + noise[1:-1, :-2] + noise[1:-1, 2:]
                 + noise[1:-1, 1:-1]) / 5.0
        noise = np.pad(noise, 1, mode="edge")
    noise = noise[:h, :w]
    lo, hi = np.sort(rng.uniform(noise.min(), noise.max(), 2))
    b = np.where(noise > hi, rng.integers(150, 256, (h, w)), rng.integers(0, 100, (h, w)))
    band = np.where((noise > lo) & (noise <= hi), rng.integers(60, 200, (h, w)), 0)
    band = np.minimum(band, 255 - b)
    prob = np.zeros((h, w, 3), np.uint8)
    prob[..., 1] = b
    prob[..., 2] = band
    prob[..., 0] = 255 - b - band
    return prob


@pytest.mark.parametrize("seed", range(8))
def test_random_tiles_match_the_previous_implementation(seed):
    rng = np.random.default_rng(seed)
    for _ in range(25):
        h, w = (int(v) for v in rng.integers(1, 70, 2))
        prob = random_classes(rng, h, w)
        bt = float(rng.choice([0.3, 0.5, 0.6, 0.8]))
        ft = float(rng.choice([0.05, 0.2, 0.3])) if rng.random() < 0.5 else bt
        cfg = PolygonizeConfig(building_threshold=bt, footprint_threshold=min(ft, bt),
                               grow_radius=float(rng.choice(RADII)),
                               min_polygon_area=float(rng.choice([0.0, 0.0, 5.0, 20.0])),
                               seedless=bool(rng.random() < 0.7))
        assert_equivalent(prob, cfg)


@pytest.mark.parametrize("radius", RADII)
def test_synthetic_tiles_match_the_previous_implementation(radius):
    for seed in range(3):
        mask, _ = synth_tile(seed + 10 * int(radius), SynthConfig(size=256, buildings=30))
        prob = one_hot(mask)
        if seed:
            prob = soften(prob, np.random.default_rng(seed))
        for seedless in (True, False):
            assert_equivalent(prob, PolygonizeConfig(grow_radius=radius, seedless=seedless,
                                                     min_polygon_area=0.0))


@pytest.mark.parametrize("seed", range(3))
def test_benchmark_tiles_match_the_previous_implementation(seed):
    mask, _ = synth_tile(1000 + seed, SynthConfig(size=650, buildings=100))
    assert_equivalent(one_hot(mask), PolygonizeConfig())
    assert_equivalent(soften(one_hot(mask), np.random.default_rng(seed)), PolygonizeConfig())


def test_odd_widths_and_degenerate_tiles_match():
    rng = np.random.default_rng(7)
    for h, w in ((1, 1), (1, 8), (8, 1), (3, 7), (5, 8), (5, 16), (9, 17), (2, 64), (64, 63)):
        for _ in range(6):
            assert_equivalent(random_classes(rng, h, w), PolygonizeConfig(min_polygon_area=0))
    full = np.zeros((16, 24, 3), np.uint8)
    full[..., 1] = 255
    assert_equivalent(full, PolygonizeConfig(min_polygon_area=0))
    band = np.zeros((16, 24, 3), np.uint8)
    band[..., 2] = 255
    assert_equivalent(band, PolygonizeConfig(min_polygon_area=0))


@pytest.mark.parametrize("radius", [25.0, 50.0])
def test_long_growth_through_the_candidate_ring_matches(radius):
    """Radii above RADII's 12 px: growth's layers (up to 71) share the ring of best candidates
    (``Workspace.queue``: 128 or 256 rows here), so tiles taller than it wrap it while far
    layers still hold offers; sparse seeds in a full band make those layers busy."""
    rng = np.random.default_rng(int(radius))
    for _ in range(4):
        h, w = int(rng.integers(300, 600)), int(rng.integers(3, 24))
        b = np.where(rng.random((h, w)) < 0.004, 200, 10).astype(np.uint8)
        band = np.where(rng.random((h, w)) < 0.995, 80, 0).astype(np.uint8)
        prob = np.stack([255 - b - band, b, band], -1).astype(np.uint8)
        assert_equivalent(prob, PolygonizeConfig(building_threshold=0.5, footprint_threshold=0.2,
                                                 grow_radius=radius, min_polygon_area=0.0))
