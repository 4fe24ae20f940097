"""The ways a user would do it without the project: the original SpaceNet sample's polygonizer and
a plain shapely scorer. Timed by ``benchmarks.postproc``, run as commands by
``benchmarks.load_baseline``.

NOTE: a module of its own that imports only numpy, rasterio and shapely, so a baseline command
does not carry the project's imports (torch, numba: ~250 MB resident) into its memory figures.
"""

from __future__ import annotations

import numpy as np
from rasterio.features import shapes
from shapely.geometry import shape


def baseline_polygonize(prob: np.ndarray, min_area: float) -> list:
    """The sample's way: threshold, rasterio shapes, shapely shape per blob, area filter."""
    mask = (prob[..., 1] > 127).astype(np.uint8)
    polys = [shape(g) for g, _ in shapes(mask, mask=mask > 0, connectivity=4)]
    return [p for p in polys if p.area >= min_area]


def plain_score(truth: list, proposals: list, min_area: float = 20.0) -> tuple[int, int, int]:
    """Every proposal against every unmatched truth polygon with shapely, as scorers used to."""
    truth = [t for t in truth if t.area > min_area]
    matched = [False] * len(truth)
    tp = fp = 0
    for p in proposals:
        best, best_j = -1.0, -1
        for j, t in enumerate(truth):
            if not matched[j]:
                iou = p.intersection(t).area / p.union(t).area
                if iou > best:
                    best, best_j = iou, j
        if best_j >= 0 and best >= 0.5:
            matched[best_j] = True
            tp += 1
        else:
            fp += 1
    return tp, fp, len(truth) - tp
