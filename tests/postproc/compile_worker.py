"""Run every postproc kernel once (cold or warm numba cache: NUMBA_CACHE_DIR) and print, as
JSON, what numba compiled: {dispatcher's qualified name: [argument types, ...]}.
Used by test_compile.py; with NUMBA_CACHE_DIR set to an empty directory, it lists a cold
compile (e.g. how many times each kernel is compiled: once, unless its argument types differ).
``compile_worker.py PRED TRUTH OUT``: the commands a user runs instead (``commands``)."""

from __future__ import annotations

import contextlib
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


def kernels() -> None:
    """Each kernel, called directly."""
    warmup()  # polygonize_tile and label_values
    prob = np.zeros((8, 8, 3), np.uint8)
    prob[..., 0] = 255
    prob[2:6, 2:6] = (0, 255, 0)
    polygons_from_instances(find_instances(prob, PolygonizeConfig()))  # one kernel a call
    squares = np.array([box(0, 0, 4, 4), box(1, 1, 5, 5)], object)
    intersection_areas(squares, squares, np.array([0, 1]), np.array([0, 1]))  # the scorer's


def commands(pred: str, truth: str, out: str) -> None:
    """What a user runs: polygonize (one process: --workers 1), score and merge on ``pred``'s
    shards, and a training validation's F1 (float probabilities, ``trainer.validate``)."""
    from postproc import merge, polygonize, score
    from postproc.predio import iter_pred_samples, list_pred_shards
    from postproc.score import ScoreConfig, score_image

    csv, gj = f"{out}/p.csv", f"{out}/gj"
    for cmd, argv in ((polygonize.main, ["--pred", pred, "--out", csv, "--geojson", gj,
                                         "--workers", "1", "--no-tuned"]),
                      (score.main, ["--truth", truth, "--proposals", csv, "--workers", "1"]),
                      (merge.main, ["--pred", pred, "--geojson", gj, "--out", f"{out}/a.json"])):
        with contextlib.redirect_stdout(sys.stderr):
            assert cmd(argv) == 0, cmd
    prob = next(iter_pred_samples(list_pred_shards(pred)[0]))[1]
    probs = prob.astype(np.float32) / 255  # (validation's softmax, not a shard's bytes)
    found = [p for p, _ in polygonize.polygonize_probs(probs, PolygonizeConfig())]
    score_image(found, found, ScoreConfig())


def main() -> None:
    with event.install_recorder("numba:compile") as rec:
        if len(sys.argv) == 4:
            commands(*sys.argv[1:])
        else:
            kernels()
    compiled: dict[str, list[str]] = defaultdict(list)
    for _, ev in rec.buffer:
        if ev.is_start:
            d = ev.data["dispatcher"]
            compiled[f"{d.py_func.__module__}.{d.py_func.__qualname__}"].append(
                str(ev.data["args"]))
    json.dump(compiled, sys.stdout)


if __name__ == "__main__":
    main()
