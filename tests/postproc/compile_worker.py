"""Run every postproc kernel once (cold or warm numba cache: NUMBA_CACHE_DIR) and print, as
JSON, what numba compiled: {dispatcher's qualified name: [argument types, ...]}.
Used by test_compile.py; with NUMBA_CACHE_DIR set to an empty directory, it lists a cold
compile (e.g. how many times each kernel is compiled: once, unless its argument types differ)."""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import numpy as np
from numba.core import event
from shapely.geometry import box

from postproc.iou import intersection_areas
from postproc.polygonize import (
    PolygonizeConfig,
    find_instances,
    polygons_from_instances,
    warmup,
)


def main() -> None:
    with event.install_recorder("numba:compile") as rec:
        warmup()  # polygonize_tile and label_values
        prob = np.zeros((8, 8, 3), np.uint8)
        prob[..., 0] = 255
        prob[2:6, 2:6] = (0, 255, 0)
        polygons_from_instances(find_instances(prob, PolygonizeConfig()))  # one kernel a call
        squares = np.array([box(0, 0, 4, 4), box(1, 1, 5, 5)], object)
        intersection_areas(squares, squares, np.array([0, 1]), np.array([0, 1]))  # the scorer's
    compiled: dict[str, list[str]] = defaultdict(list)
    for _, ev in rec.buffer:
        if ev.is_start:
            d = ev.data["dispatcher"]
            compiled[f"{d.py_func.__module__}.{d.py_func.__qualname__}"].append(
                str(ev.data["args"]))
    json.dump(compiled, sys.stdout)


if __name__ == "__main__":
    main()
