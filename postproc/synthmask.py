"""Synthetic 3-class masks with known footprints, for the polygonizer's tests and benchmark.

Footprints are rotated rectangles, L-shapes and rows of buildings with 0-4 px gaps (touching
walls included), rasterised much as ``dataio.labels.make_mask`` does it: a pixel is building
when its centre lies in a footprint, and the boundary class is the band of ``boundary_width`` px
on each side of every outline, here a rasterised ``buffer`` (its corners cut as chords, centres
exactly on its edge on one side only), not make_mask's exact rule (``dataio.band``); polygonize's
tests and benchmarks need plausible masks, not the labels' exact ones.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import shapely
from rasterio.features import rasterize
from shapely import affinity
from shapely.geometry import Polygon, box

from dataio.classes import BOUNDARY, BUILDING


@dataclass
class SynthConfig:
    size: int = 650
    buildings: int = 100
    boundary_width: float = 2.5
    min_side: float = 10.0
    max_side: float = 40.0


def _rect(cx: float, cy: float, w: float, h: float, angle: float) -> Polygon:
    return affinity.rotate(box(cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), angle,
                           origin=(cx, cy))


def _l_shape(cx: float, cy: float, w: float, h: float, angle: float) -> Polygon:
    a = box(cx - w / 2, cy - h / 2, cx + w / 2, cy)
    b = box(cx - w / 2, cy - h / 2, cx - w / 2 + w / 3, cy + h / 2)
    return affinity.rotate(shapely.union(a, b).normalize(), angle, origin=(cx, cy))


def _row(rng: np.random.Generator, cx: float, cy: float, cfg: SynthConfig) -> list[Polygon]:
    """2-5 axis-aligned buildings side by side with 0-4 px gaps (0 = a shared wall)."""
    k = int(rng.integers(2, 6))
    h = rng.uniform(cfg.min_side, cfg.max_side)
    x = cx
    out = []
    for _ in range(k):
        w = rng.uniform(cfg.min_side, cfg.max_side * 0.7)
        out.append(box(x, cy, x + w, cy + h))
        x += w + float(rng.integers(0, 5))
    return out


def synth_footprints(rng: np.random.Generator, cfg: SynthConfig, cell: int = 64
                     ) -> list[Polygon]:
    """About ``cfg.buildings`` non-overlapping footprints inside a ``cfg.size`` square (a tile,
    or a canvas of many tiles' worth: ``benchmarks.merge``)."""
    tile = box(0, 0, cfg.size, cfg.size)
    placed: list[Polygon] = []
    # NOTE: the placed footprints near a candidate come from a grid of ``cell`` px: checking
    # each candidate against every placed footprint was O(n^2) shapely calls (2.1 s for a
    # canvas of 1,000 buildings, 0.27 s with the grid), and decides the same
    cells: dict[tuple[int, int], list[int]] = defaultdict(list)

    def keys(bounds: tuple[float, ...], pad: float) -> list[tuple[int, int]]:
        x0, y0, x1, y1 = bounds
        return [(i, j) for i in range(int((x0 - pad) // cell), int((x1 + pad) // cell) + 1)
                for j in range(int((y0 - pad) // cell), int((y1 + pad) // cell) + 1)]

    tries = 0
    while len(placed) < cfg.buildings and tries < cfg.buildings * 50:
        tries += 1
        cx, cy = rng.uniform(0, cfg.size, 2)
        kind = rng.random()
        w, h = rng.uniform(cfg.min_side, cfg.max_side, 2)
        if kind < 0.15:
            cands = _row(rng, cx, cy, cfg)
        elif kind < 0.3:
            cands = [_l_shape(cx, cy, w * 1.3, h * 1.3, rng.uniform(0, 90))]
        elif kind < 0.6:
            cands = [_rect(cx, cy, w, h, 0.0)]
        else:
            cands = [_rect(cx, cy, w, h, rng.uniform(0, 90))]
        cands = [c.intersection(tile) for c in cands]
        cands = [c for c in cands if isinstance(c, Polygon) and c.area >= 30]
        # NOTE: a row's own members may touch (shared walls); other buildings keep 3 px apart.
        if cands and not any(c.distance(placed[k]) < 3 for c in cands
                             for k in {k for key in keys(c.bounds, 3) for k in cells[key]}):
            for c in cands:
                for key in keys(c.bounds, 0):
                    cells[key].append(len(placed))
                placed.append(c)
    return placed[: cfg.buildings]


def make_mask(polygons: list[Polygon], size: int, boundary_width: float = 2.5) -> np.ndarray:
    """uint8 mask: 1 where a pixel centre is in a footprint, 2 in the band around each outline."""
    shape_hw = (size, size)
    if not polygons:
        return np.zeros(shape_hw, np.uint8)
    mask = rasterize(((p, BUILDING) for p in polygons), out_shape=shape_hw, fill=0,
                     dtype="uint8")
    bands = [p.boundary.buffer(boundary_width, quad_segs=4) for p in polygons]
    band = rasterize(((b, 1) for b in bands), out_shape=shape_hw, fill=0, dtype="uint8")
    mask[band > 0] = BOUNDARY
    return mask


def one_hot(mask: np.ndarray) -> np.ndarray:
    """A mask as a perfect prediction: uint8 HxWx3 with 255 in its class channel."""
    out = np.zeros((*mask.shape, 3), np.uint8)
    for k in range(3):
        out[..., k][mask == k] = 255
    return out


def soften(prob: np.ndarray, rng: np.random.Generator, noise: float = 0.15) -> np.ndarray:
    """A plausible model output: one-hot blurred by noise, renormalised, as uint8."""
    p = prob.astype(np.float32) / 255.0 + rng.uniform(0, noise, prob.shape).astype(np.float32)
    p /= p.sum(axis=2, keepdims=True)
    return np.rint(p * 255).astype(np.uint8)


def synth_tile(seed: int, cfg: SynthConfig | None = None) -> tuple[np.ndarray, list[Polygon]]:
    """One tile: (mask, footprints in pixel coordinates)."""
    cfg = cfg or SynthConfig()
    rng = np.random.default_rng(seed)
    polys = synth_footprints(rng, cfg)
    return make_mask(polys, cfg.size, cfg.boundary_width), polys

