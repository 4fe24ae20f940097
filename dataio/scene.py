"""Procedural suburban scenes in pixel space: building footprints plus the clutter around them.

The layout half of ``dataio.synth`` (the rendering half is ``dataio.render``). Everything is in
pixel coordinates (x = column, y = row) of one tile; ``dataio.synth`` georeferences it.

What a scene holds, so that a model has something real to learn (issue 2):
- houses of ~10x15 m (33x50 px at 0.3 m) in rows along a rotated street grid, with 1-4 px gaps
  between near-touching neighbours; L-shapes; large commercial blocks; buildings cut by the tile
  edge; tiles with no buildings at all;
- clutter that is not building: roads, trees and lawns, pools, parking lots, shadows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import shapely
from shapely import affinity
from shapely.geometry import LineString, Point, Polygon, box
from shapely.geometry.base import BaseGeometry

# Tile kinds and how often each occurs (Vegas is mostly suburban, with some commercial and empty).
KINDS = ("suburban", "commercial", "sparse", "empty")
KIND_P = (0.55, 0.15, 0.18, 0.12)
MIN_PART_AREA = 20.0  # px; slivers cut off by the tile edge below this are not labelled


@dataclass
class Scene:
    """Footprints and clutter of one tile, all in pixel coordinates."""

    size: tuple[int, int]  # (height, width)
    kind: str
    buildings: list[Polygon] = field(default_factory=list)
    partial: list[bool] = field(default_factory=list)  # cut by the tile edge
    roads: list[BaseGeometry] = field(default_factory=list)
    lots: list[BaseGeometry] = field(default_factory=list)  # parking lots, bare concrete
    trees: list[BaseGeometry] = field(default_factory=list)
    lawns: list[BaseGeometry] = field(default_factory=list)
    pools: list[BaseGeometry] = field(default_factory=list)
    sun: tuple[float, float] = (5.0, 4.0)  # shadow offset in px (dx, dy)


class _Occupancy:
    """Collision checks for placement: nothing may come closer than a gap to what is placed."""

    def __init__(self) -> None:
        self.geoms: list[BaseGeometry] = []
        self.bounds = np.empty((0, 4))

    def free(self, g: BaseGeometry, gap: float) -> bool:
        if not self.geoms:
            return True
        x0, y0, x1, y1 = g.bounds
        b = self.bounds
        near = ~((x0 - gap > b[:, 2]) | (b[:, 0] - gap > x1) | (y0 - gap > b[:, 3])
                 | (b[:, 1] - gap > y1))
        return all(g.distance(self.geoms[i]) >= gap for i in np.flatnonzero(near))

    def add(self, g: BaseGeometry) -> None:
        self.geoms.append(g)
        self.bounds = np.vstack([self.bounds, g.bounds])


def _rect(u0: float, v0: float, w: float, d: float) -> Polygon:
    return box(u0, v0, u0 + w, v0 + d)


def _house(rng: np.random.Generator, u0: float, v0: float, w: float, d: float) -> Polygon:
    """A rectangle or, one time in four, an L-shape inside the slot [u0, u0+w] x [v0, v0+d]."""
    if rng.random() >= 0.25:
        return _rect(u0, v0, w, d)
    # NOTE: built from explicit vertices; rect.difference(corner) leaves 1e-14 slivers that make
    # GEOS fail later ("side location conflict").
    a = w * rng.uniform(0.5, 0.7)  # the full-width arm keeps this much of the width
    b = d * rng.uniform(0.5, 0.7)
    l_shape = Polygon([(0, 0), (w, 0), (w, b), (a, b), (a, d), (0, d)])
    # one of four orientations of the L, then into the slot
    if rng.random() < 0.5:
        l_shape = affinity.scale(l_shape, -1, 1, origin=(w / 2, d / 2))
    if rng.random() < 0.5:
        l_shape = affinity.scale(l_shape, 1, -1, origin=(w / 2, d / 2))
    return affinity.translate(shapely.normalize(l_shape), u0, v0)


def _to_tile(g: BaseGeometry, angle: float, cx: float, cy: float) -> BaseGeometry:
    """From the street frame (u along the street, v across) to tile pixels."""
    return affinity.translate(affinity.rotate(g, angle, origin=(0, 0)), cx, cy)


def _street_grid(rng: np.random.Generator, scene: Scene, occ: _Occupancy, dense: bool) -> None:
    """Streets on a rotated grid with rows of houses on both sides."""
    h, w = scene.size
    cx, cy = w / 2 + rng.uniform(-40, 40), h / 2 + rng.uniform(-40, 40)
    angle = rng.uniform(0, 180)
    reach = 0.75 * math.hypot(h, w)
    road_w = rng.uniform(14, 22)
    setback = rng.uniform(6, 14)
    block = rng.uniform(140, 190)  # distance between parallel streets
    cross = rng.uniform(280, 420)  # distance between cross streets
    v_start = rng.uniform(-block, 0) - reach
    u_off = rng.uniform(0, cross)
    tile = box(0, 0, w, h)
    for v_road in np.arange(v_start, reach, block):
        road = _to_tile(_rect(-reach, v_road, 2 * reach, road_w), angle, cx, cy)
        if road.intersects(tile):
            scene.roads.append(road)
            occ.add(road)
    for u_road in np.arange(-reach + u_off, reach, cross):
        road = _to_tile(_rect(u_road, -reach, road_w * 1.1, 2 * reach), angle, cx, cy)
        if road.intersects(tile):
            scene.roads.append(road)
            occ.add(road)
    half = (block - road_w) / 2
    for v_road in np.arange(v_start, reach, block):
        # one row facing this street (below it) and one backing onto it from the next street
        for v0, facing in ((v_road + road_w + setback, True), (v_road + block - setback, False)):
            _house_row(rng, scene, occ, angle, cx, cy, v0, facing, half - setback, reach, dense)


def _house_row(rng: np.random.Generator, scene: Scene, occ: _Occupancy, angle: float, cx: float,
               cy: float, v0: float, facing: bool, max_depth: float, reach: float,
               dense: bool) -> None:
    townhouses = rng.random() < (0.5 if dense else 0.25)
    u = -reach + rng.uniform(0, 30)
    tile = box(-60, -60, scene.size[1] + 60, scene.size[0] + 60)
    while u < reach:
        width = rng.uniform(28, 55) if not townhouses else rng.uniform(22, 34)
        depth = min(rng.uniform(34, 56), max_depth - 2)
        vv = v0 if facing else v0 - depth
        if depth > 15:
            poly = _to_tile(_house(rng, u, vv, width, depth), angle, cx, cy)
            if poly.intersects(tile) and occ.free(poly, 1.0) and rng.random() < 0.92:
                _add_building(scene, occ, poly)
                lawn_v = vv - 6 if facing else vv + depth + 1
                lawn = _to_tile(_rect(u, lawn_v, width, 5), angle, cx, cy)
                if rng.random() < 0.5 and occ.free(lawn, 0.5):
                    scene.lawns.append(lawn)
                _backyard(rng, scene, occ, angle, cx, cy, u, vv, width, depth, facing)
        # NOTE: 1-4 px gaps are the hard case the boundary class exists for (touching buildings).
        gap = rng.integers(1, 5) if townhouses else rng.uniform(8, 26)
        u += width + gap


def _backyard(rng: np.random.Generator, scene: Scene, occ: _Occupancy, angle: float, cx: float,
              cy: float, u: float, v: float, width: float, depth: float, facing: bool) -> None:
    """A pool or a tree behind some houses: bright or textured clutter next to roofs."""
    vb = v + depth + 4 if facing else v - 18
    r = rng.random()
    if r < 0.25:
        pw, pd = rng.uniform(8, 16), rng.uniform(6, 12)
        pool = _to_tile(_rect(u + rng.uniform(0, max(1, width - pw)), vb, pw, pd), angle, cx, cy)
        pool = pool.buffer(1.5, quad_segs=4)
        if occ.free(pool, 2.0):
            scene.pools.append(pool)
            occ.add(pool)
    elif r < 0.6:
        c = _to_tile(Point(u + rng.uniform(0, width), vb + rng.uniform(2, 12)), angle, cx, cy)
        tree = c.buffer(rng.uniform(3, 8), quad_segs=6)
        # trees may overhang nothing labelled: keep them off roofs so labels stay honest
        if occ.free(tree, 1.0):
            scene.trees.append(tree)


def _add_building(scene: Scene, occ: _Occupancy, poly: BaseGeometry) -> None:
    """Clip to the tile and record every part big enough to label (SpaceNet clips likewise)."""
    h, w = scene.size
    tile = box(0, 0, w, h)
    occ.add(poly)
    clipped = poly.intersection(tile)
    partial = not poly.within(tile)
    for part in getattr(clipped, "geoms", [clipped]):
        if isinstance(part, Polygon) and part.area >= MIN_PART_AREA:
            scene.buildings.append(shapely.normalize(part))
            scene.partial.append(partial)


def _random_buildings(rng: np.random.Generator, scene: Scene, occ: _Occupancy, n: int,
                      large: bool) -> None:
    """Free-standing buildings by rejection sampling: rotated rectangles and L-shapes."""
    h, w = scene.size
    for _ in range(n * 20):
        if n <= 0:
            break
        if large:
            bw, bd = rng.uniform(60, 220), rng.uniform(80, 380)
        else:
            bw, bd = rng.uniform(30, 60), rng.uniform(35, 70)
        shape = _house(rng, -bw / 2, -bd / 2, bw, bd)
        x, y = rng.uniform(-bw / 3, w + bw / 3), rng.uniform(-bd / 3, h + bd / 3)
        poly = _to_tile(shape, rng.uniform(0, 180), x, y)
        if not poly.intersects(box(0, 0, w, h)) or not occ.free(poly, 3.0):
            continue
        _add_building(scene, occ, poly)
        if large and rng.random() < 0.7:
            lot = poly.buffer(rng.uniform(15, 40), join_style="mitre").difference(poly.buffer(3))
            scene.lots.append(lot)
        n -= 1


def _roads_only(rng: np.random.Generator, scene: Scene, occ: _Occupancy, count: int) -> None:
    h, w = scene.size
    for _ in range(count):
        p0 = (rng.uniform(-100, w + 100), rng.uniform(-100, 0))
        p1 = (rng.uniform(-100, w + 100), h + rng.uniform(0, 100))
        if rng.random() < 0.5:
            p0, p1 = (p0[1], p0[0]), (p1[1], p1[0])
        road = LineString([p0, p1]).buffer(rng.uniform(7, 12), cap_style="flat")
        scene.roads.append(road)
        occ.add(road)


def _vegetation(rng: np.random.Generator, scene: Scene, occ: _Occupancy, count: int) -> None:
    """Clumps of trees and bushes wherever they do not cover a labelled roof."""
    h, w = scene.size
    for _ in range(count):
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        clump = shapely.union_all([
            Point(cx + rng.normal(0, 15), cy + rng.normal(0, 15)).buffer(rng.uniform(3, 10), 6)
            for _ in range(rng.integers(1, 8))
        ])
        if occ.free(clump, 1.0):
            scene.trees.append(clump)


def make_scene(rng: np.random.Generator, size: tuple[int, int] = (650, 650),
               kind: str | None = None) -> Scene:
    """Lay out one tile: choose its kind, place streets, buildings and clutter."""
    kind = kind or str(rng.choice(KINDS, p=KIND_P))
    if kind not in KINDS:
        raise ValueError(f"unknown scene kind {kind!r}; known: {', '.join(KINDS)}")
    scene = Scene(size=size, kind=kind)
    occ = _Occupancy()
    scene.sun = (rng.uniform(3, 8) * rng.choice([-1, 1]), rng.uniform(3, 8) * rng.choice([-1, 1]))
    if kind == "suburban":
        _street_grid(rng, scene, occ, dense=rng.random() < 0.5)
    elif kind == "commercial":
        _roads_only(rng, scene, occ, int(rng.integers(1, 3)))
        _random_buildings(rng, scene, occ, int(rng.integers(1, 5)), large=True)
        _random_buildings(rng, scene, occ, int(rng.integers(0, 12)), large=False)
    elif kind == "sparse":
        _roads_only(rng, scene, occ, int(rng.integers(0, 2)))
        _random_buildings(rng, scene, occ, int(rng.integers(2, 16)), large=False)
    else:
        _roads_only(rng, scene, occ, int(rng.integers(0, 3)))
        if rng.random() < 0.4:
            # an empty lot or paved area: a big flat shape that is *not* a building
            x, y = rng.uniform(0, size[1]), rng.uniform(0, size[0])
            lot = _to_tile(_rect(-80, -60, 160, 120), rng.uniform(0, 180), x, y)
            scene.lots.append(lot)
    _vegetation(rng, scene, occ, int(rng.integers(3, 25)))
    return scene
