"""Tune the polygonizer's thresholds and area filter on a validation split (issue 7).

The SpaceNet-2 winner tuned the minimum polygon area per city; here a grid over
``building_threshold``, ``footprint_threshold`` (<= building_threshold), optionally ``grow_radius``,
and ``min_polygon_area`` is scored with the SpaceNet rule (``postproc.score``, ScoreConfig
defaults). The defaults (``PolygonizeConfig()``) are always a grid point, so the tuned F1 is never
below the default F1 on the split tuned on.

Cost: each tile is decoded once; instances are found and traced once per threshold combination,
and every area threshold is scored from that one polygon list by dropping the small ones (the area
filter removes polygons and changes nothing else, not even the order of the rest). Worker processes
take chunks of tiles and return only tp/fp/fn per grid point, so memory stays flat.

Ties (equal F1, compared exactly as fractions) go to the defaults, then to the point that changes
the fewest settings, then the smallest change, then grid order: the same input always gives the
same choice.

CLI: ``python -m postproc.tune --pred PRED_VAL --truth DATA/val/truth.csv [--run-dir RUN]``
writes ``RUN/tune.json`` (every grid point) and then ``RUN/postproc.json`` (picked up by
``postproc.polygonize --pred`` through ``PRED/provenance.json``);
:func:`postproc.provenance.read_tuned` reads the two and refuses a pair that an interrupted tune
left mismatched.
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import sys
import time
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from shapely.geometry.base import BaseGeometry

from postproc.matching import scored_truth, true_positives
from postproc.polygonize import Instances, PolygonizeConfig, find_instances, polygons_from_instances
from postproc.pools import close_pool
from postproc.predio import PredError, decode_sample, iter_raw_samples
from postproc.provenance import TUNE_JSON
from postproc.score import ScoreConfig, candidate_ious, f1_from_counts

CHUNK_TILES = 2  # tiles per task: each costs one polygonize per threshold combination
TUNED = ("building_threshold", "footprint_threshold", "grow_radius", "min_polygon_area")
# NOTE: how far a setting moves "one step", for the tie-break towards the defaults only
STEP = {"building_threshold": 0.1, "footprint_threshold": 0.1, "grow_radius": 1.0,
        "min_polygon_area": 20.0}
# grid axis -> (the PolygonizeConfig setting, its valid range as PolygonizeConfig checks it)
AXES = {"building_thresholds": ("building_threshold", lambda v: 0 <= v < 1, "[0, 1)"),
        "footprint_thresholds": ("footprint_threshold", lambda v: 0 <= v < 1, "[0, 1)"),
        "grow_radii": ("grow_radius", lambda v: 0 <= v <= 50, "[0, 50]"),
        "min_polygon_areas": ("min_polygon_area", lambda v: v >= 0, "[0, inf)")}


@dataclass
class TuneGrid:
    """The values tried per setting; each axis gets the default value added if it lacks it."""

    building_thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7)
    footprint_thresholds: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6)
    grow_radii: tuple[float, ...] = (3.0,)
    min_polygon_areas: tuple[float, ...] = (0, 10, 20, 40, 60, 80, 100, 150, 200, 300, 400, 600)

    def __post_init__(self) -> None:
        d = PolygonizeConfig()
        for axis, (setting, valid, words) in AXES.items():
            values = {float(v) for v in getattr(self, axis)}
            for v in sorted(values):
                if not (math.isfinite(v) and valid(v)):
                    raise ValueError(f"--{axis.replace('_', '-')}: {v} is outside {words}")
            setattr(self, axis, tuple(sorted(values | {float(getattr(d, setting))})))

    def instance_settings(self) -> list[PolygonizeConfig]:
        """Every threshold combination (footprint <= building), area filter at its smallest.

        The settings not tuned (simplify_tolerance, seedless) keep their defaults."""
        return [PolygonizeConfig(building_threshold=b, footprint_threshold=f, grow_radius=r,
                                 min_polygon_area=self.min_polygon_areas[0])
                for b in self.building_thresholds for f in self.footprint_thresholds if f <= b
                for r in self.grow_radii]

    def points(self) -> list[PolygonizeConfig]:
        """Every grid point, in the order of :func:`tile_counts`'s rows (combination, area)."""
        return [PolygonizeConfig(**{**asdict(c), "min_polygon_area": a})
                for c in self.instance_settings() for a in self.min_polygon_areas]

    def to_json(self) -> dict[str, Any]:
        return {k: list(getattr(self, k)) for k in AXES}


def _ordered_polygons(inst: Instances, min_area: float) -> tuple[np.ndarray, np.ndarray]:
    """(polygons, pixel counts) most confident first, exactly as ``polygonize_probs`` orders."""
    if inst.n == 0:
        return np.empty(0, object), np.empty(0, np.int64)
    polys, ids = polygons_from_instances(inst, min_area)
    if ids.size == 0:
        return polys, np.empty(0, np.int64)
    conf = inst.fsum[ids] / (255.0 * inst.count[ids])
    order = np.argsort(-conf, kind="stable")
    return polys[order], inst.count[ids][order]


def tile_counts(prob: np.ndarray, truth: Sequence[BaseGeometry], grid: TuneGrid,
                score_cfg: ScoreConfig | None = None) -> np.ndarray:
    """tp, fp, fn of one tile per (threshold combination, area): int64 C x A x 3."""
    score_cfg = score_cfg or ScoreConfig()
    combos = grid.instance_settings()
    areas = np.asarray(grid.min_polygon_areas, np.float64)
    t = scored_truth(truth, score_cfg)
    out = np.zeros((len(combos), areas.size, 3), np.int64)
    for c, cfg in enumerate(combos):
        polys, px = _ordered_polygons(find_instances(prob, cfg), float(areas[0]))
        # polygonize drops a blob when its pixel count (= its polygon's area) < min_polygon_area
        keep = px[None, :] >= areas[:, None]
        pi, ti, _ = candidate_ious(t, polys, score_cfg)
        tp = true_positives(pi, ti, keep, t.size)
        out[c, :, 0] = tp
        out[c, :, 1] = keep.sum(axis=1) - tp
        out[c, :, 2] = t.size - tp
    return out


def _chunk_counts(chunk: list[tuple[str, bytes, dict]], truth: list[list[BaseGeometry]],
                  shard: str, grid: TuneGrid) -> tuple[list[str], np.ndarray]:
    """Worker task: decode each tile once and sum its counts over the grid."""
    total: np.ndarray | None = None
    for (key, png, meta), t in zip(chunk, truth, strict=True):
        prob = decode_sample(key, png, meta, shard)
        try:
            c = tile_counts(prob, t, grid)
        except ValueError as e:  # a tile the kernels cannot take (its size)
            raise PredError(f"{shard}: {key}: {e}") from None
        total = c if total is None else total + c
    assert total is not None
    return [key for key, _, _ in chunk], total


def _chunks(shards: Sequence[Path]) -> Iterator[tuple[Path, list[tuple[str, bytes, dict]]]]:
    for shard in shards:
        chunk: list[tuple[str, bytes, dict]] = []
        for sample in iter_raw_samples(shard):
            chunk.append(sample)
            if len(chunk) == CHUNK_TILES:
                yield shard, chunk
                chunk = []
        if chunk:
            yield shard, chunk


@dataclass
class Evaluation:
    """Summed counts of every grid point over the tiles of the prediction shards."""

    points: list[PolygonizeConfig]
    counts: np.ndarray  # len(points) x 3: tp, fp, fn
    tiles: list[str]
    missing: list[str]  # truth images without a prediction (their truth counts as missed)
    extra: list[str]  # predicted images without truth (their polygons count as false)


def evaluate(shards: Sequence[Path], truth: dict[str, list[BaseGeometry]], grid: TuneGrid,
             pool: cf.Executor | None, workers: int = 1, progress: bool = False) -> Evaluation:
    """Score every grid point over all tiles of ``shards`` (at most 2 chunks per worker queued)."""
    from tqdm import tqdm

    points = grid.points()
    total = np.zeros((len(grid.instance_settings()), len(grid.min_polygon_areas), 3), np.int64)
    seen: set[str] = set()
    pending: deque[cf.Future] = deque()
    bar = tqdm(total=len(truth) or None, unit="tile", desc="tune", disable=not progress)

    def settle(fut: cf.Future) -> None:
        nonlocal total
        keys, counts = fut.result()
        total += counts
        bar.update(len(keys))

    try:
        for shard, chunk in _chunks(shards):
            keys = [k for k, _, _ in chunk]
            dup = seen.intersection(keys)
            if dup:
                raise PredError(f"{shard}: ImageId {sorted(dup)[0]!r} appears twice in --pred")
            seen.update(keys)
            args = (chunk, [truth.get(k, []) for k in keys], str(shard), grid)
            if pool is None:
                fut: cf.Future = cf.Future()
                fut.set_result(_chunk_counts(*args))
            else:
                fut = pool.submit(_chunk_counts, *args)
            pending.append(fut)
            while len(pending) > (2 * workers if pool is not None else 0):
                settle(pending.popleft())
        while pending:
            settle(pending.popleft())
    finally:
        for fut in pending:
            fut.cancel()
        bar.close()
    counts = total.reshape(len(points), 3)
    missing = sorted(set(truth) - seen)
    score_cfg = ScoreConfig()
    counts[:, 2] += sum(len(scored_truth(truth[k], score_cfg)) for k in missing)
    return Evaluation(points, counts, sorted(seen), missing, sorted(seen - set(truth)))


def exact_f1(tp: int, fp: int, fn: int) -> Fraction:
    """F1 = 2TP / (2TP + FP + FN) as a fraction, so that ties are exact."""
    return Fraction(2 * tp, 2 * tp + fp + fn) if tp else Fraction(0)


def _distance(cfg: PolygonizeConfig, default: PolygonizeConfig) -> tuple[int, float]:
    # NOTE: rounded, as the settings are decimals: in floats building 0.7 was 1.9999999999999996
    # steps from 0.5 and footprint 0.3 two, so float noise, not the grid order, settled that tie
    deltas = [round(abs(getattr(cfg, k) - getattr(default, k)) / STEP[k], 9) for k in TUNED]
    return sum(1 for d in deltas if d > 0), sum(deltas)


def choose(points: Sequence[PolygonizeConfig], counts: np.ndarray) -> int:
    """Index of the best F1; ties to the defaults, then the fewest and smallest changes."""
    default = PolygonizeConfig()
    return min(range(len(points)), key=lambda i: (-exact_f1(*(int(v) for v in counts[i])),
                                                  _distance(points[i], default), i))


def point_json(cfg: PolygonizeConfig, counts: Sequence[int]) -> dict[str, Any]:
    tp, fp, fn = (int(v) for v in counts)
    p, r, f = f1_from_counts(tp, fp, fn)
    return {**{k: getattr(cfg, k) for k in TUNED}, "tp": tp, "fp": fp, "fn": fn,
            "precision": p, "recall": r, "f1": f}


def report(ev: Evaluation, grid: TuneGrid, best: int) -> dict[str, Any]:
    """The ``tune.json`` document: every grid point, the default's and the best's."""
    default = ev.points.index(PolygonizeConfig())
    return {"grid": grid.to_json(), "tiles": len(ev.tiles),
            "truth_images_without_predictions": ev.missing,
            "predicted_images_without_truth": ev.extra,
            "score": asdict(ScoreConfig()),
            "default": {"index": default, **point_json(ev.points[default], ev.counts[default])},
            "best": {"index": best, **point_json(ev.points[best], ev.counts[best]),
                     "settings": asdict(ev.points[best])},
            "points": [point_json(p, c) for p, c in zip(ev.points, ev.counts, strict=True)]}


def _floats(flag: str) -> Any:
    def parse(text: str) -> tuple[float, ...]:
        items = text.split(",")
        if not text.strip():
            raise argparse.ArgumentTypeError(f"{flag} wants at least one number")
        # NOTE: '0.5,,0.6' (a value left out, or a typo) was tuned as 0.5,0.6 without a word
        if any(not v.strip() for v in items):
            raise argparse.ArgumentTypeError(f"{flag} {text!r} has an empty item: give numbers "
                                             "like 0.3,0.5")
        try:
            return tuple(float(v) for v in items)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} wants numbers like 0.3,0.5, got {text!r}"
                                             ) from None
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m postproc.tune",
        description="Grid-search the polygonizer's thresholds and minimum polygon area for the "
                    "best SpaceNet F1 on a validation split; writes RUN/postproc.json (used by "
                    "postproc.polygonize by default) and RUN/tune.json (every grid point).")
    p.add_argument("--pred", type=Path, required=True,
                   help="prediction shards of the validation split (trainer.predict --split val)")
    p.add_argument("--truth", type=Path, required=True, help="truth CSV, e.g. DATA/val/truth.csv")
    p.add_argument("--run-dir", type=Path, default=None,
                   help="where to write postproc.json and tune.json (default: the run_dir in "
                        "PRED/provenance.json)")
    p.add_argument("--json", type=Path, default=None, help="also write tune.json's content here")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes (default: all cores)")
    g = TuneGrid()
    for axis in AXES:
        flag = "--" + axis.replace("_", "-")
        values = ",".join(f"{v:g}" for v in getattr(g, axis))
        p.add_argument(flag, type=_floats(flag), default=getattr(g, axis), dest=axis,
                       metavar="V,..",
                       help=f"comma-separated values (default {values}; the default setting "
                            "is always added)")
    return p


def _run_dir(args: argparse.Namespace) -> Path:
    from postproc.provenance import PROVENANCE, provenance_path, read_provenance

    run = args.run_dir
    where = "--run-dir"
    if run is None:
        run = provenance_path(args.pred, "run_dir")
        where = f"run_dir in {args.pred / PROVENANCE}"
        if run is None:
            raise ValueError(f"no run directory: pass --run-dir (or predict with trainer.predict, "
                             f"which names it in {args.pred / PROVENANCE})")
    if not run.is_dir():
        raise ValueError(f"{where}: {run} is not a directory")
    split = (read_provenance(args.pred) or {}).get("split")
    if split not in (None, "val"):
        print(f"warning: tuning on the {split!r} split ({args.pred / PROVENANCE}); the tuned F1 "
              "is optimistic there", file=sys.stderr)
    return run


def _table(rows: list[tuple[str, dict[str, Any]]]) -> str:
    head = (f"{'':8} {'building':>8} {'footprint':>9} {'grow':>5} {'min_area':>8} {'TP':>7} "
            f"{'FP':>7} {'FN':>7} {'precision':>9} {'recall':>7} {'F1':>7}")
    lines = [head]
    for name, r in rows:
        lines.append(f"{name:8} {r['building_threshold']:8.2f} {r['footprint_threshold']:9.2f} "
                     f"{r['grow_radius']:5.1f} {r['min_polygon_area']:8.1f} {r['tp']:7d} "
                     f"{r['fp']:7d} {r['fn']:7d} {r['precision']:9.4f} {r['recall']:7.4f} "
                     f"{r['f1']:7.4f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dataio.atomic import atomic_write_text, check_writable, writing
    from postproc import runner
    from postproc.csvio import read_truth_csv
    from postproc.predio import list_pred_shards
    from postproc.provenance import SETTINGS
    from trainer import dist

    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers {args.workers} must be at least 1")
    # NOTE: tune has no torchrun path: every rank would run the whole grid and race to write
    # the same two files. It uses all of one machine's cores (--workers), which a grid needs.
    world = dist.DistEnv.from_env().world_size
    if world != 1:
        raise ValueError(f"postproc.tune runs on one machine (WORLD_SIZE={world}): start it with "
                         "python -m postproc.tune, not torchrun; --workers sets its cores")
    grid = TuneGrid(args.building_thresholds, args.footprint_thresholds, args.grow_radii,
                    args.min_polygon_areas)
    shards = list_pred_shards(args.pred)
    run = _run_dir(args)
    # the outputs are checked before the grid runs: it writes them only at the end
    # NOTE: a run directory taken from provenance.json is named so, with the flag that changes
    # it: a user who gave no --run-dir was told "--run-dir RUN/postproc.json" is not writable
    where = ("--run-dir" if args.run_dir is not None
             else f"--run-dir (default: the run_dir in {args.pred / 'provenance.json'})")
    # NOTE: both of the run's files: with postproc.json alone checked, a RUN/tune.json that is a
    # directory (or read-only for this user) was found by its write after the whole grid, exit 1
    # as a full disk, for a path to fix (or replaced without a word, read-only as it was)
    for path, what, given in ((run / TUNE_JSON, where, run), (run / SETTINGS, where, run),
                              (args.json, "--json", None)):
        if path is not None:
            check_writable(path, what, (("--truth", args.truth),), given=given)
    truth = read_truth_csv(args.truth).polygons
    if not truth:
        raise ValueError(f"--truth {args.truth}: no images in the truth CSV")
    workers = args.workers or runner.default_workers()
    t0 = time.perf_counter()
    pool = runner.make_pool(workers)
    try:
        ev = evaluate(shards, truth, grid, pool, workers, progress=True)
    finally:
        close_pool(pool)
    if not set(ev.tiles) & set(truth):
        raise ValueError(f"--truth {args.truth}: no ImageId in common with the predictions in "
                         f"{args.pred} (is it the split that was predicted?)")
    for what, ids in (("truth images have no prediction (counted as missed)", ev.missing),
                      ("predicted images have no truth (counted as false)", ev.extra)):
        if ids:
            print(f"warning: {len(ids)} {what}, e.g. {ids[0]}", file=sys.stderr)
    best = choose(ev.points, ev.counts)
    # NOTE: tp + fn is the truth's building count, the same at every point. Without one, every F1
    # is 0 and the tie goes to the defaults: said, as "F1 0.0000" read as a useless model.
    if int(ev.counts[best, 0] + ev.counts[best, 2]) == 0:
        print(f"warning: --truth {args.truth} has no building (over "
              f"{ScoreConfig().min_truth_area:g} px) in the predicted images: every F1 is 0, so "
              "the default settings are kept; tune on a split with buildings", file=sys.stderr)
    doc = report(ev, grid, best)
    doc.update(pred=str(args.pred), truth=str(args.truth), run_dir=str(run),
               seconds=time.perf_counter() - t0)
    text = json.dumps(doc, indent=1) + "\n"
    # NOTE: two files, two renames. postproc.json (the one that takes effect) goes last, so a
    # kill between them leaves the earlier settings in force beside a tune.json whose
    # best.settings differ from them: read_tuned() tells, instead of reporting the new F1 for them.
    with writing():  # (a full disk: exit 1; a path that cannot be used was refused up front)
        atomic_write_text(run / TUNE_JSON, text)
        atomic_write_text(run / SETTINGS, ev.points[best].to_json())
        if args.json is not None:
            atomic_write_text(args.json, text)
    from postproc import cli

    # (a full disk under stdout: exit 1, as for the files above; see cli.report)
    table = _table([("default", doc["default"]), ("best", doc["best"])])
    cli.report(f"{table}\n{len(ev.points)} grid points on {len(ev.tiles)} tiles in "
               f"{doc['seconds']:.1f} s -> {run / SETTINGS}")
    return 0


if __name__ == "__main__":
    from postproc.cli import exit_on_error

    sys.exit(exit_on_error(main))
