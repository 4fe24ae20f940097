"""Postprocessing throughput: polygonize and score, project against the original sample's way.

    python -m benchmarks.postproc [--tiles 24] [--repeat 5] [--workers N] [--json OUT]

Same run, same tiles: synthetic 650x650 tiles with ~100 buildings (rotated rectangles, L-shapes,
rows with 0-4 px gaps, the 2.5 px boundary band) as one-hot predictions.

- polygonize, project: ``postproc.polygonize.polygonize_probs`` (instances, growth over the band,
  exact polygons, confidences, sorted).
- polygonize, baseline: the original sample: ``rasterio.features.shapes`` on the thresholded
  building mask, ``shapely.geometry.shape`` per blob, area filter (it does less: no instances, no
  growth, no confidence).
- polygons of instance labels: the same instance rasters traced by ``polygonize_labels`` (label
  + exact trace) and by ``shapes`` + ``shape`` + area filter: identical polygons, like for like.
- score, project: ``postproc.score.score_image`` (STRtree + bound pruning + numba exact areas).
- score, baseline: a plain shapely scorer: per proposal, IoU with every unmatched truth polygon
  via ``intersection``/``union``.
- end to end: ``postproc.runner`` on prediction shards (PNG decoding, CSV rows included).
- stages (1 core): the project's polygonize stopped after each stage (classify + label seeds,
  + growth over the band, + exact tracing, + shapely polygons, confidences and order), and the
  floor of any polygonizer here (reading every byte of the tile once), to show where the time
  goes against the goal's budget (the baseline's time / 20).

"1 core" runs in this process; "all cores" is a pool of forked workers over chunks of tiles (made
and warmed before timing: a real run amortises its start over thousands of tiles).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.features import shapes
from shapely.geometry import shape

from benchmarks.baselines import baseline_polygonize, plain_score
from benchmarks.common import (
    base_parser,
    count,
    machine_info,
    parse_args,
    print_table,
    run,
    write_json,
)
from postproc import trace
from postproc.polygonize import (
    PolygonizeConfig,
    find_instances,
    polygonize_labels,
    polygonize_probs,
    warmup,
)
from postproc.pools import ignore_sigint, starting_workers
from postproc.score import ScoreConfig, score_image
from postproc.synthmask import SynthConfig, one_hot, synth_tile

# Set before the pool forks, so workers read the tiles without pickling them.
_TILES: list[np.ndarray] = []
_LABELS: list[np.ndarray] = []
_PAIRS: list[tuple[list, list]] = []
_CFG = PolygonizeConfig()
_NO_GROWTH = PolygonizeConfig(grow_radius=0.0, seedless=False)

# the project's polygonize cut after each stage (see ``stage_rows``)
STAGES = (("read every byte once (floor)", "stage_read"),
          ("classify + label seeds", "stage_label"),
          ("+ growth over the band", "stage_grow"),
          ("+ exact tracing", "stage_trace"),
          ("+ shapely polygons, confidences, order (= polygonize)", "polygonize"))


def _run(task: tuple[str, int, int]) -> int:
    kind, lo, hi = task
    n = 0
    for i in range(lo, hi):
        if kind == "polygonize":
            n += len(polygonize_probs(_TILES[i], _CFG))
        elif kind == "polygonize_baseline":
            n += len(baseline_polygonize(_TILES[i], _CFG.min_polygon_area))
        elif kind == "trace":
            n += len(polygonize_labels(_LABELS[i], _CFG.min_polygon_area))
        elif kind == "trace_baseline":
            v = _LABELS[i]
            polys = [shape(g) for g, _ in shapes(v, mask=v > 0, connectivity=4)]
            n += sum(1 for g in polys if g.area >= _CFG.min_polygon_area)
        elif kind == "stage_read":
            n += int(_TILES[i].max())
        elif kind in ("stage_label", "stage_grow"):  # blob pixels: growth adds the band's
            inst = find_instances(_TILES[i], _NO_GROWTH if kind == "stage_label" else _CFG)
            n += int(inst.count[1:inst.n + 1].sum())
        elif kind == "stage_trace":
            inst = find_instances(_TILES[i], _CFG)
            n += trace.trace_blobs(inst.codes, inst.lab, inst.final, inst.n, inst.first,
                                   inst.count, inst.shape[1], _CFG.min_polygon_area)[3].size
        elif kind == "score":
            n += score_image(*_PAIRS[i])[0]
        else:
            n += plain_score(*_PAIRS[i])[0]
    return n


def _worker_init() -> None:
    # NOTE: Ctrl-C reaches the workers too (the terminal's process group): each idle one died
    # of it with a KeyboardInterrupt traceback before the parent's one line
    ignore_sigint()
    os.environ["OMP_NUM_THREADS"] = "1"


def timed(kinds: tuple[str, ...], n: int, pool: cf.Executor | None, workers: int,
          repeat: int) -> list[float]:
    """Best wall times of each variant over all n tiles, in-process or spread over the pool.

    NOTE: the runs alternate (A, B, A, B, ...), so that a busy neighbour on a shared machine
    slows every variant alike instead of whichever happened to run at the time.
    """
    def once(kind: str) -> float:
        t0 = time.perf_counter()
        if pool is None:
            _run((kind, 0, n))
        else:
            step = max(1, n // (workers * 4))
            list(pool.map(_run, [(kind, lo, min(n, lo + step)) for lo in range(0, n, step)]))
        return time.perf_counter() - t0

    for kind in kinds:  # warm up (the pool's workers too)
        once(kind)
    best = [float("inf")] * len(kinds)
    for _ in range(repeat):
        for k, kind in enumerate(kinds):
            best[k] = min(best[k], once(kind))
    return best


def timed_per_tile(kinds: tuple[str, ...], n: int, repeat: int) -> list[float]:
    """In-process seconds of each variant over all n tiles, best of ``repeat`` rounds; every
    variant runs on a tile before the next tile, in an order that rotates from tile to tile.

    NOTE: this VM's speed drifts by up to 2x over seconds; a round of one variant over all tiles
    after another's put whole variants in the slow phase and once gave a cut-short polygonize
    slower than the whole one. Per tile, the variants are milliseconds apart, and the rotation
    spares each the same share of cold (first-touch) tile reads.
    """
    for kind in kinds:  # warm up
        _run((kind, 0, n))
    best = [float("inf")] * len(kinds)
    m = len(kinds)
    for rep in range(repeat):
        total = [0.0] * m
        for i in range(n):
            for j in range(m):
                k = (i + rep + j) % m
                t0 = time.perf_counter()
                _run((kinds[k], i, i + 1))
                total[k] += time.perf_counter() - t0
        best = [min(b, t) for b, t in zip(best, total, strict=True)]
    return best


def stage_rows(n: int, repeat: int) -> tuple[list[dict[str, Any]], float]:
    """1 core: ms a tile up to and including each stage, and what each stage adds; timed
    tile by tile alongside the baseline (see ``timed_per_tile``), whose ms a tile is returned
    too."""
    *secs, base = timed_per_tile((*(kind for _, kind in STAGES), "polygonize_baseline"), n,
                                 repeat)
    base_ms = 1000 * base / n
    rows, prev = [], 0.0
    for (label, _), sec in zip(STAGES, secs, strict=True):
        ms = 1000 * sec / n
        rows.append({"stage": label, "ms_per_tile": ms,
                     "stage_ms": ms - prev if label[0] == "+" else ms,
                     "x_goal_budget": ms / (base_ms / 20)})
        prev = ms
    return rows, base_ms


def end_to_end(n: int, workers: int, repeat: int) -> float:
    """Best seconds for ``postproc.runner`` over shards of the same tiles (tar reading, PNG
    decoding, polygonizing, CSV rows and writing), with a warm pool made once beforehand."""
    from postproc.predio import write_pred_shard
    from postproc.runner import make_pool, run
    from trainer.dist import DistEnv

    with tempfile.TemporaryDirectory() as tmp:
        meta = {"crs": "EPSG:4326", "transform": [3e-6, 0, -115.2, 0, -3e-6, 36.2]}
        per = max(1, n // 4)
        shards = []
        for s, lo in enumerate(range(0, n, per)):
            path = Path(tmp) / f"pred-{s:06d}.tar"
            write_pred_shard(path, [(f"img{i}", _TILES[i], meta)
                                    for i in range(lo, min(n, lo + per))])
            shards.append(path)
        pool = make_pool(workers)
        try:
            best = float("inf")
            for _ in range(repeat + 1):  # the first run warms the workers up
                t0 = time.perf_counter()
                run(shards, Path(tmp) / "out.csv", _CFG, None, workers, DistEnv(), pool)
                best = min(best, time.perf_counter() - t0)
            return best
        finally:
            if pool is not None:
                pool.shutdown()


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = base_parser("postproc", __doc__)
    p.add_argument("--tiles", type=count, default=24, help="650x650 tiles to time (default 24)")
    p.add_argument("--repeat", type=count, default=5, help="best of this many runs (default 5)")
    p.add_argument("--workers", type=count, default=len(os.sched_getaffinity(0)),
                   help="processes for the all-cores rows (default: all cores)")
    args = parse_args(p, argv)
    n = args.tiles
    cfg = SynthConfig(size=650, buildings=100)
    tiles = [synth_tile(1000 + i, cfg) for i in range(n)]
    _TILES[:] = [one_hot(m) for m, _ in tiles]
    warmup()
    _LABELS[:] = [find_instances(t, _CFG).labels() for t in _TILES]
    props = [[g for g, _ in polygonize_probs(t, _CFG)] for t in _TILES]
    _PAIRS[:] = [(truth, pr) for (_, truth), pr in zip(tiles, props, strict=True)]
    buildings = float(np.mean([len(t) for _, t in tiles]))
    assert [score_image(*pp, ScoreConfig()) for pp in _PAIRS[:4]] == \
        [plain_score(*pp) for pp in _PAIRS[:4]], "scorers disagree"

    ctx = mp.get_context("fork")
    rows: list[dict[str, Any]] = []

    def row(label: str, cores: int, sec: float) -> dict[str, Any]:
        return {"variant": label, "cores": cores, "tiles_per_s": n / sec,
                "ms_per_tile": 1000 * sec / n, "ms_per_tile_per_core": 1000 * sec * cores / n}

    # NOTE: with --workers 1 the all-cores rows would repeat the 1-core ones (same label, same
    # cores), and a speed-up looked up by label would pair one run's project with the other's
    cores_list = (1,) if args.workers == 1 else (1, args.workers)
    with cf.ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_worker_init) as pool:
        # NOTE: the workers fork at the first submit: done here, with a Ctrl-C held until they
        # are started and known to the pool (postproc.pools), or the exit waits for a lost one
        with starting_workers():
            first = pool.submit(int)
        first.result()
        for kinds, labels in ((("polygonize", "polygonize_baseline"),
                               ("polygonize, project", "polygonize, baseline (shapes+shapely)")),
                              (("trace", "trace_baseline"),
                               ("polygons of instance labels, project",
                                "polygons of instance labels, shapes+shapely")),
                              (("score", "score_baseline"),
                               ("score, project", "score, baseline (plain shapely)"))):
            for cores in cores_list:
                a, b = timed(kinds, n, None if cores == 1 else pool, args.workers, args.repeat)
                rows += [row(labels[0], cores, a), row(labels[1], cores, b)]
    for cores in cores_list:
        sec = end_to_end(n, cores, args.repeat)
        rows.append(row("end to end from shards, project", cores, sec))
    stages, base_ms = stage_rows(n, args.repeat)

    def speed(label: str, cores: int) -> float:
        return next(r["tiles_per_s"] for r in rows if r["variant"] == label and
                    r["cores"] == cores)

    for kind, base in (("polygonize, project", "polygonize, baseline (shapes+shapely)"),
                       ("polygons of instance labels, project",
                        "polygons of instance labels, shapes+shapely"),
                       ("score, project", "score, baseline (plain shapely)")):
        for r in rows:
            if r["variant"] == kind:
                r["speedup_vs_baseline"] = speed(kind, r["cores"]) / speed(base, r["cores"])
    print(f"{n} tiles of 650x650 px, {buildings:.0f} buildings per tile on average; "
          f"{machine_info()['cores']} cores: {machine_info()['cpu']}")
    print_table(rows, ["variant", "cores", "tiles_per_s", "ms_per_tile", "ms_per_tile_per_core",
                       "speedup_vs_baseline"])
    print(f"\npolygonize by stage, 1 core (goal budget: the baseline's {base_ms:.2f} ms / 20 = "
          f"{base_ms / 20:.2f} ms a tile, timed tile by tile with these; stage_ms: what the "
          "stage adds)")
    print_table(stages, ["stage", "ms_per_tile", "stage_ms", "x_goal_budget"])
    return write_json(args.json, "postproc", rows, settings=args, tiles=n, tile_px=650,
                      buildings_per_tile=buildings, stages=stages,
                      stages_baseline_ms_per_tile=base_ms,
                      units={"tiles_per_s": "tiles/s (best of --repeat)", "ms_per_tile": "ms",
                             "ms_per_tile_per_core": "ms x cores",
                             "speedup_vs_baseline": "ratio (tiles/s over the baseline row's, "
                                                    "same cores)",
                             "stage_ms": "ms a tile", "stages_baseline_ms_per_tile": "ms",
                             "x_goal_budget": "ratio (ms_per_tile over the baseline's / 20)"})


if __name__ == "__main__":
    sys.exit(run("postproc", main))
