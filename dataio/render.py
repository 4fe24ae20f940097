"""Render a :class:`dataio.scene.Scene` to an 11-bit, 3-band pan-sharpened-looking image.

Values are uint16 in [0, 2047] like SpaceNet's RGB-PanSharpen product. Roof colours deliberately
overlap the ground's (tan roofs on tan desert), so that colour alone does not separate buildings:
shadows, ridges and edges do, as in real imagery.
"""

from __future__ import annotations

import numpy as np
from PIL import Image
from rasterio.features import rasterize
from shapely import affinity
from shapely.geometry import Polygon
from shapely.geometry.base import BaseGeometry

from dataio.scene import Scene

MAX_DN = 2047  # 11-bit sensor range

# Typical 11-bit DN of RGB-PanSharpen Vegas tiles, roughly.
GROUND = np.array([[620, 560, 430], [560, 520, 440], [480, 470, 400], [700, 600, 470]], np.float32)
ASPHALT = np.array([300, 300, 320], np.float32)
CONCRETE = np.array([760, 740, 700], np.float32)
GRASS = np.array([260, 380, 210], np.float32)
TREE = np.array([170, 250, 150], np.float32)
POOL = np.array([330, 720, 900], np.float32)
ROOFS = np.array([
    [1150, 1130, 1100],  # white / light grey
    [820, 470, 360],  # terracotta tiles
    [380, 380, 400],  # dark shingles
    [600, 540, 460],  # brown
    [0, 0, 0],  # placeholder: "like the ground" (filled per tile)
], np.float32)
ROOF_P = np.array([0.25, 0.2, 0.15, 0.15, 0.25])


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], cells: int,
                  amp: float) -> np.ndarray:
    """Low-frequency multiplicative variation: a coarse random grid resized bilinearly."""
    h, w = shape
    coarse = rng.normal(0.0, amp, size=(cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(coarse, mode="F").resize((w, h), Image.BILINEAR)) + 1.0


def _burn(shape: tuple[int, int], geoms: list[BaseGeometry]) -> np.ndarray:
    """Boolean raster of pixels whose centre lies in any of ``geoms``."""
    geoms = [g for g in geoms if not g.is_empty]
    if not geoms:
        return np.zeros(shape, bool)
    return rasterize(((g, 1) for g in geoms), out_shape=shape, fill=0, dtype="uint8").astype(bool)


def _paint(img: np.ndarray, where: np.ndarray, colour: np.ndarray, rng: np.random.Generator,
           texture: float) -> None:
    n = int(where.sum())
    if n:
        jitter = 1.0 + rng.normal(0.0, texture, size=(n, 1)).astype(np.float32)
        img[where] = colour[None, :] * jitter


def _ridge_half(poly: Polygon) -> BaseGeometry:
    """The half of a roof on one side of its ridge (the long axis of its bounding rectangle)."""
    rect = poly.minimum_rotated_rectangle
    if not isinstance(rect, Polygon):
        return Polygon()
    xs, ys = rect.exterior.coords.xy
    p = np.column_stack([xs[:4], ys[:4]])
    e1, e2 = p[1] - p[0], p[3] - p[0]
    if np.hypot(*e1) < np.hypot(*e2):  # halve across the short side: the ridge runs lengthwise
        e1, e2 = e2, e1
    half = Polygon([p[0], p[0] + e1, p[0] + e1 + e2 / 2, p[0] + e2 / 2])
    return poly.intersection(half)


def render(scene: Scene, rng: np.random.Generator) -> np.ndarray:
    """Draw the scene; returns uint16 (3, H, W) with 11-bit values."""
    h, w = scene.size
    shape = (h, w)
    ground = GROUND[rng.integers(len(GROUND))] * rng.uniform(0.9, 1.1)
    img = np.empty((h, w, 3), np.float32)
    img[:] = ground
    img *= _smooth_noise(rng, shape, 12, 0.08)[..., None]
    img *= _smooth_noise(rng, shape, 60, 0.04)[..., None]

    _paint(img, _burn(shape, scene.lots), CONCRETE * rng.uniform(0.85, 1.1), rng, 0.03)
    _paint(img, _burn(shape, scene.roads), ASPHALT * rng.uniform(0.85, 1.15), rng, 0.04)
    _paint(img, _burn(shape, scene.lawns), GRASS, rng, 0.12)
    _paint(img, _burn(shape, scene.pools), POOL * rng.uniform(0.9, 1.1), rng, 0.03)

    # Shadows fall on the ground beside each building, away from the sun.
    dx, dy = scene.sun
    shadows = [affinity.translate(b, dx, dy) for b in scene.buildings]
    shadow = _burn(shape, shadows)
    img[shadow] *= rng.uniform(0.45, 0.6)

    _paint(img, _burn(shape, scene.trees), TREE, rng, 0.2)

    if scene.buildings:
        _draw_roofs(img, scene, ground, rng)

    img += rng.normal(0.0, 10.0, size=img.shape).astype(np.float32)
    np.clip(img, 0, MAX_DN, out=img)
    return np.ascontiguousarray(np.rint(img).astype(np.uint16).transpose(2, 0, 1))


def _draw_roofs(img: np.ndarray, scene: Scene, ground: np.ndarray,
                rng: np.random.Generator) -> None:
    shape = scene.size
    n = len(scene.buildings)
    palette = ROOFS.copy()
    palette[-1] = ground
    choice = rng.choice(len(palette), size=n, p=ROOF_P)
    colours = palette[choice] * rng.uniform(0.88, 1.12, size=(n, 1)).astype(np.float32)
    ids = rasterize(((b, i + 1) for i, b in enumerate(scene.buildings)), out_shape=shape,
                    fill=0, dtype="int32")
    roof = ids > 0
    lut = np.vstack([np.zeros((1, 3), np.float32), colours])
    img[roof] = lut[ids[roof]] * (1.0 + rng.normal(0, 0.03, size=(int(roof.sum()), 1)))
    # Gabled roofs: one side of the ridge catches less light.
    halves = [_ridge_half(b) for b in scene.buildings if rng.random() < 0.7]
    img[_burn(shape, halves) & roof] *= 0.82
    # A thin darker eave along every outline: the edge cue that separates near-touching houses.
    eaves = [b.difference(b.buffer(-1.2)) for b in scene.buildings]
    img[_burn(shape, eaves) & roof] *= 0.85


def mul_from_rgb(rgb: np.ndarray) -> np.ndarray:
    """uint16 (8, H, W) MUL-PanSharpen-like bands derived from a rendered (3, H, W) RGB image.

    Bands in WorldView-2's order: coastal, blue, green, yellow, red, red edge, NIR1, NIR2.
    NOTE: derived, not rendered: 8 bands that move together with the RGB ones (so a model can
    learn from them alike) and where plants are bright in the near infrared, as in real imagery;
    no random numbers, so the RGB tiles of a seed stay the bytes they were.
    """
    r, g, b = (rgb[i].astype(np.float32) for i in range(3))
    green_excess = np.clip((g - r) / (g + r + 1.0), 0.0, 1.0)  # grass, trees: a vegetation cue
    nir1 = 0.7 * r + 0.5 * g + 2400.0 * green_excess
    bands = [0.85 * b + 0.1 * g, b, g, 0.5 * (r + g), r, 0.5 * (r + nir1), nir1, 0.95 * nir1]
    out = np.stack(bands)
    np.clip(out, 0, MAX_DN, out=out)
    return np.rint(out).astype(np.uint16)
