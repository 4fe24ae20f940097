"""Compile every postproc numba kernel into numba's cache now, not in the middle of a run.

``make setup`` runs it once. A fresh install then loads the kernels (~1 s) at the first
training validation (its F1 runs the polygonizer and the scorer), the first polygonize, score,
tune, merge or render, instead of compiling them there: ~15-25 s, which on an H200 was a third of
the demo's training stage (its first validation took 24 s with an empty cache, 3 s with a warm
one; benchmarks/RESULTS.md, "Fifth lease"). The cache is where ``postproc.numbacache`` puts it
for the account running this: run it as the account, and with the ``NUMBA_CACHE_DIR``, that
will run the commands (for a container image: in its build).
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from shapely.geometry import box


def compile_all() -> None:
    """Run each kernel once on a tiny input, with the argument types the commands use."""
    from postproc import pngfast
    from postproc.iou import intersection_areas
    from postproc.polygonize import (
        PolygonizeConfig,
        find_instances,
        polygons_from_instances,
        warmup,
    )

    warmup()  # the one-call polygonizer (with a holed blob) and the labels' tracer
    prob = np.zeros((8, 8, 3), np.uint8)
    prob[..., 0] = 255
    prob[2:6, 2:6] = (0, 255, 0)
    # (the staged path: one kernel a call, as benchmarks.postproc's stage rows run it)
    polygons_from_instances(find_instances(prob, PolygonizeConfig()))
    # (a prediction shard's PNG, as polygonize, merge and render read it)
    pngfast.decode_rgb8(pngfast.encode_rgb8(prob))
    # the scorer's exact areas (validation, score, tune: score_image's candidate pairs)
    squares = np.array([box(0, 0, 4, 4), box(1, 1, 5, 5)], object)
    intersection_areas(squares, squares, np.array([0, 1]), np.array([0, 1]))


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(
        prog="python -m postproc.precompile",
        description="Compile every postproc numba kernel into numba's cache (make setup runs "
                    "this), so that a run's first validation, polygonize or score loads them "
                    "instead of compiling them (~15-25 s). Run it as the account, and with the "
                    "NUMBA_CACHE_DIR, that will run the commands.").parse_args(argv)
    t0 = time.monotonic()
    compile_all()
    print(f"postproc kernels compiled (or loaded from the cache) in {time.monotonic() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
