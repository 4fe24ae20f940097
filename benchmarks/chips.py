"""What ``--chip-margin`` buys: a large scene predicted as chips with 0, 32 or 64 px of context,
against the same scene predicted whole, by a trained U-Net.

    python -m benchmarks.chips [--run-dir RUN] [--scene-px 1280] [--chip-size 256]
                               [--margins 0,32,64] [--repeat 3] [--json OUT]

Input: a trained run (``--run-dir RUN``, its ``checkpoints/best.pt``); without it, a short run of
the demo is trained first (``launch.demo``'s synth, prepare, train, predict_val and tune stages,
configs/demo.toml, --train-tiles tiles, --epochs epochs; about 3 minutes on 2 cores). The
scene: one synthetic GeoTIFF of --scene-px px a side with its truth (``dataio.synth --tiles 1
--size PX``, UTM zone 11N; --seed 1 lays out a suburban street grid of ~360 buildings).

Variants, each through the project's commands as a user runs them (README "A large scene"):
``dataio.prepare --images-only`` (with ``--chip-size N --chip-margin M`` for the chips),
``trainer.predict``, ``postproc.polygonize --min-polygon-area 0`` (with the run's tuned
thresholds, ``RUN/postproc.json``, where it has them) and ``postproc.merge --min-area A`` (A: the
run's tuned ``min_polygon_area``, else 20 px): a cut building's pieces are kept until merged.

- whole scene (reference): one sample, no chip edges.
- chips N, margin M: the scene cut into N px chips, each predicted with M px of context.

Figures per variant:

- samples, px_ratio: samples predicted and their pixels over the scene's (what a margin costs);
  predict_s: trainer.predict's wall time in this process (best of --repeat, after one untimed
  warm-up prediction; the loader's start included, as a user pays it).
- dp_A_B: the mean |building probability - the whole scene's| over the pixels A to B px from the
  nearest chip edge (an edge between two chips; the scene's own border is none), and flip_A_B:
  the share of those pixels whose most probable class differs from the whole scene's (both read
  back from the 8-bit prediction shards).
- footprints, f1_truth: the merged footprints and their SpaceNet F1 against the scene's truth
  (postproc.score: IoU >= 0.5, truth <= 20 px dropped); f1_whole: their F1 against the whole
  scene's merged footprints (all of them kept): how far the chips change the answer.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from affine import Affine
from pyproj import Transformer

from benchmarks.common import (
    base_parser,
    count,
    machine_info,
    parse_args,
    print_table,
    run,
    write_json,
)
from dataio.chips import MIN_CHIP_SIZE, Chip, chip_grid, needs_chips
from dataio.classes import BUILDING

REPO = Path(__file__).resolve().parents[1]
AOI, CRS = "AOI_9_Scene", "EPSG:32611"
WHOLE = "whole scene (reference)"
# px from the nearest chip edge: [lo, hi); None: no upper end
BINS: tuple[tuple[int, int | None], ...] = ((0, 8), (8, 32), (32, 64), (64, None))
MIN_AREA = 20.0  # px: merge --min-area of a run not tuned, as the README's chip commands


def bin_name(lo: int, hi: int | None) -> str:
    return f"{lo}_{hi}" if hi is not None else f"{lo}_"


def chip_variant(size: int, margin: int) -> str:
    return f"chips {size}, margin {margin}"


# ---- the scene and the run ---------------------------------------------------------------------

@dataclass
class Scene:
    """The synthetic scene: its raw AOI directory, ImageId, grid and truth (scene pixels)."""

    raw: Path
    image_id: str
    height: int
    width: int
    transform: Affine
    truth: list[Any]


def make_scene(work: Path, size: int, seed: int) -> Scene:
    """One ``dataio.synth`` tile of ``size`` px: a GeoTIFF and its truth CSV under ``work``."""
    import rasterio

    from dataio.synth import SynthConfig, write_aoi
    from postproc.csvio import read_truth_csv

    raw = work / "raw" / f"{AOI}_Train"
    write_aoi(SynthConfig(out=raw, tiles=1, seed=seed, size=size, aoi=AOI, crs=CRS))
    tif = next((raw / "RGB-PanSharpen").glob("*.tif"))
    with rasterio.open(tif) as ds:
        height, width, transform = ds.height, ds.width, ds.transform
    image_id = f"{AOI}_img1"
    truth = read_truth_csv(next((raw / "summaryData").glob("*.csv"))).polygons.get(image_id, [])
    return Scene(raw, image_id, height, width, transform, truth)


def check_run_dir(run_dir: Path) -> None:
    """ValueError naming --run-dir unless it holds a trained run's best checkpoint."""
    if not run_dir.is_dir():
        raise ValueError(f"--run-dir {run_dir}: no such directory (a trained run, with "
                         "checkpoints/best.pt; leave the flag out to train a short one)")
    best = run_dir / "checkpoints" / "best.pt"
    if not best.is_file():
        raise ValueError(f"--run-dir {run_dir}: {best} not found (train first, or let the "
                         "benchmark train a short run: leave --run-dir out)")
    if not (run_dir / "config.json").is_file():
        raise ValueError(f"--run-dir {run_dir}: no config.json (not a run directory)")


def min_area(run_dir: Path) -> float:
    """merge --min-area for ``run_dir``'s footprints: its tuned ``min_polygon_area``, else 20 px.

    NOTE: the tuned minimum applies to whole buildings: polygonize keeps every piece (area 0) so
    that a building cut by a chip edge is not lost before merge joins it (postproc.merge)."""
    from postproc.polygonize import PolygonizeConfig
    from postproc.provenance import SETTINGS

    tuned = run_dir / SETTINGS
    return PolygonizeConfig.from_json(tuned).min_polygon_area if tuned.is_file() else MIN_AREA


# the demo's stages that give a run with tuned postprocessing
TRAIN_STAGES = ("synth", "prepare", "train", "predict_val", "tune")


def train_run(work: Path, tiles: int, epochs: int, seed: int) -> Path:
    """A short demo run (``launch.demo``'s ``TRAIN_STAGES``, configs/demo.toml): its run
    directory."""
    from launch.demo import Demo, run_stage

    # NOTE: one validation, at the end: best.pt is marked there (val_every > epochs never marks)
    demo = Demo(out=work / "demo", tiles=tiles, seed=seed,
                config=REPO / "configs" / "demo.toml",
                overrides=[f"train.epochs={epochs}", f"train.val_every={epochs}"])
    for name, cmd in [s for s in demo.stages() if s[0] in TRAIN_STAGES]:
        print(f"training a short run: {name}", flush=True)
        if run_stage(cmd) != 0:
            raise RuntimeError(f"launch.demo's {name} stage failed: {' '.join(cmd)}")
    return demo.run


# ---- one variant --------------------------------------------------------------------------------

def _quiet(fn: Callable[[list[str]], int], argv: list[str], what: str) -> None:
    """A project command's ``main(argv)`` in this process, its output kept unless it fails."""
    said = io.StringIO()
    with contextlib.redirect_stdout(said), contextlib.redirect_stderr(said):
        rc = fn(argv)
    if rc == 130:  # NOTE: the command caught the Ctrl-C itself (its line is kept with the rest)
        raise KeyboardInterrupt
    if rc != 0:
        raise RuntimeError(f"{what} {' '.join(argv)} exited with {rc}:\n{said.getvalue()[-2000:]}")


def prepare(scene: Scene, out: Path, size: int | None, margin: int) -> None:
    from dataio import prepare as prep

    argv = ["--raw", str(scene.raw), "--out", str(out), "--images-only", "--workers", "0",
            "--quiet"]
    if size is not None:
        argv += ["--chip-size", str(size), "--chip-margin", str(margin)]
    _quiet(prep.main, argv, "dataio.prepare")


def predict(run_dir: Path, data: Path, out: Path) -> float:
    """``trainer.predict`` of ``data``'s test split into ``out``: its wall time in s."""
    from trainer import predict as pred

    t0 = time.perf_counter()
    _quiet(pred.main, ["--run-dir", str(run_dir), "--data", str(data), "--split", "test",
                       "--out", str(out)], "trainer.predict")
    return time.perf_counter() - t0


def footprints(pred: Path, scene: Scene, work: Path, area_px: float) -> list[Any]:
    """Polygonize + merge ``pred`` as the README's chip commands do (merge --min-area
    ``area_px``); the merged footprints in scene pixels, by confidence (highest first, as
    polygonize writes them)."""
    from postproc import merge, polygonize

    gj, area = work / "geojson", work / "area.geojson"
    _quiet(polygonize.main, ["--pred", str(pred), "--out", str(work / "proposals.csv"),
                             "--geojson", str(gj), "--min-polygon-area", "0", "--workers", "1"],
           "postproc.polygonize")
    _quiet(merge.main, ["--pred", str(pred), "--geojson", str(gj), "--out", str(area),
                        "--min-area", str(area_px)], "postproc.merge")
    feats = json.loads(area.read_bytes())["features"]
    feats.sort(key=lambda f: -float(f["properties"].get("Confidence", 0.0)))
    geoms = shapely.from_geojson([json.dumps(f["geometry"]) for f in feats]) if feats else []
    to_utm = Transformer.from_crs("EPSG:4326", CRS, always_xy=True)
    inv = ~scene.transform

    def to_px(xy: np.ndarray) -> np.ndarray:
        x, y = map(np.asarray, to_utm.transform(xy[:, 0], xy[:, 1]))
        return np.column_stack([inv.a * x + inv.b * y + inv.c, inv.d * x + inv.e * y + inv.f])

    return list(shapely.transform(np.asarray(geoms, object), to_px))


def read_probs(pred: Path, scene: Scene) -> np.ndarray:
    """The prediction shards of ``pred`` as one HxWx3 uint8 map of the scene (chips placed at
    their ``source_offset``); ValueError unless every pixel is predicted exactly once."""
    from postproc.predio import iter_pred_samples, list_pred_shards

    out = np.zeros((scene.height, scene.width, 3), np.uint8)
    seen = np.zeros((scene.height, scene.width), np.uint8)
    for shard in list_pred_shards(pred):
        for _key, prob, meta in iter_pred_samples(shard):
            r, c = meta.get("source_offset", [0, 0])
            h, w = prob.shape[:2]
            out[r:r + h, c:c + w] = prob
            seen[r:r + h, c:c + w] += 1
    if (seen != 1).any():
        raise ValueError(f"{pred}: {int((seen == 0).sum())} scene pixels not predicted, "
                         f"{int((seen > 1).sum())} predicted twice")
    return out


# ---- measures -----------------------------------------------------------------------------------

def edge_distance(height: int, width: int, chips: list[Chip]) -> np.ndarray:
    """Per scene pixel, px to the nearest edge between two chips (0: a pixel on one); the
    scene's own border is none. Without chips: the largest int32 everywhere."""
    def axis(length: int, cuts: set[int]) -> np.ndarray:
        idx = np.arange(length)
        d = np.full(length, np.iinfo(np.int32).max, np.int64)
        for cut in cuts:  # (pixels cut-1 and cut lie on the edge between them)
            d = np.minimum(d, np.where(idx >= cut, idx - cut, cut - 1 - idx))
        return d

    rows = axis(height, {c.row0 for c in chips if c.row0 > 0})
    cols = axis(width, {c.col0 for c in chips if c.col0 > 0})
    return np.minimum(rows[:, None], cols[None, :]).astype(np.int32)


def agreement(prob: np.ndarray, ref: np.ndarray, dist: np.ndarray) -> dict[str, float | None]:
    """dp_* (mean |building probability difference|, 0-1) and flip_* (share of pixels whose
    argmax class differs) per distance bin; None for a bin with no pixels."""
    dp = np.abs(prob[..., BUILDING].astype(np.int16) - ref[..., BUILDING]) / 255.0
    flip = prob.argmax(-1) != ref.argmax(-1)
    out: dict[str, float | None] = {}
    for lo, hi in BINS:
        sel = (dist >= lo) & (dist < hi if hi is not None else True)
        n = int(sel.sum())
        out[f"dp_{bin_name(lo, hi)}"] = float(dp[sel].mean()) if n else None
        out[f"flip_{bin_name(lo, hi)}"] = float(flip[sel].mean()) if n else None
        out[f"px_{bin_name(lo, hi)}"] = n
    return out


def f1(truth: list[Any], proposals: list[Any], min_truth_area: float) -> float:
    from postproc.score import ScoreConfig, f1_from_counts, score

    res = score({"scene": truth}, {"scene": proposals}, ScoreConfig(min_truth_area=min_truth_area))
    return f1_from_counts(res.tp, res.fp, res.fn)[2]


# ---- main ---------------------------------------------------------------------------------------

def _margins(text: str) -> list[int]:
    """Comma-separated chip margins in px, each >= 0, given once."""
    try:
        ms = [int(x) for x in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not whole numbers like 0,32,64") from None
    if any(m < 0 for m in ms) or len(set(ms)) != len(ms):
        raise argparse.ArgumentTypeError(f"{text!r}: each margin >= 0 px, given once")
    return sorted(ms)


def build_parser() -> argparse.ArgumentParser:
    p = base_parser("chips", __doc__)
    p.add_argument("--run-dir", type=Path, default=None,
                   help="a trained run (RUN/checkpoints/best.pt); default: train a short one")
    p.add_argument("--scene-px", type=count, default=1280,
                   help="the scene's side in px (default 1280)")
    p.add_argument("--chip-size", type=count, default=256, help="chip size N in px (default 256)")
    p.add_argument("--margins", type=_margins, default=[0, 32, 64],
                   help="chip margins M in px, comma-separated (default 0,32,64)")
    p.add_argument("--seed", type=int, default=1,
                   help="the scene's synth seed (default 1: a suburban street grid)")
    p.add_argument("--repeat", type=count, default=3,
                   help="predictions of each variant, the fastest timed (default 3)")
    p.add_argument("--train-tiles", type=count, default=120,
                   help="without --run-dir: synthetic 650 px tiles to train on (default 120)")
    p.add_argument("--epochs", type=count, default=30,
                   help="without --run-dir: training epochs (default 30)")
    return p


def _check(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.chip_size < MIN_CHIP_SIZE:
        p.error(f"--chip-size {args.chip_size}: at least {MIN_CHIP_SIZE} (dataio.prepare's)")
    if max(args.margins) > args.chip_size:
        p.error(f"--margins: at most the --chip-size ({args.chip_size}), as dataio.prepare's "
                "--chip-margin")
    if args.seed < 0:
        p.error(f"--seed must be >= 0, got {args.seed}")
    if not needs_chips(args.scene_px, args.scene_px, args.chip_size):
        p.error(f"--scene-px {args.scene_px} gives one chip of --chip-size {args.chip_size} "
                "(no chip edges): make the scene at least 1.5 chips a side")


def bench(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    """The rows: the whole scene first, then each margin's chips."""
    # (the demo's seed 0 for its training tiles: the scene's --seed then draws another layout)
    run_dir = args.run_dir or train_run(work, args.train_tiles, args.epochs, 0)
    scene = make_scene(work, args.scene_px, args.seed)
    chips = chip_grid(scene.height, scene.width, args.chip_size)
    dist = edge_distance(scene.height, scene.width, chips)
    scene_px = scene.height * scene.width
    variants: list[tuple[str, int | None, int, int, int]] = [(WHOLE, None, 0, 1, scene_px)]
    for m in args.margins:
        windows = [c.grown(m, scene.height, scene.width) for c in chips]
        variants.append((chip_variant(args.chip_size, m), args.chip_size, m, len(chips),
                         sum(w.height * w.width for w in windows)))
    for name, size, m, *_ in variants:
        prepare(scene, work / name / "data", size, m)
    # NOTE: warm-up, not timed: the first prediction in this process also paid the imports of
    # the model, loader and PNG code (the whole scene's took 9 s against 1-2 s later)
    predict(run_dir, work / WHOLE / "data", work / WHOLE / "pred")
    seconds: dict[str, float] = {v[0]: float("inf") for v in variants}
    for _ in range(args.repeat):
        for name, *_ in variants:  # (alternating: a busy neighbour slows each alike)
            seconds[name] = min(seconds[name],
                                predict(run_dir, work / name / "data", work / name / "pred"))
    ref = read_probs(work / WHOLE / "pred", scene)
    area_px = min_area(run_dir)
    ref_fp = footprints(work / WHOLE / "pred", scene, work / WHOLE, area_px)
    rows = []
    for name, size, m, samples, px in variants:
        fp = (ref_fp if name == WHOLE
              else footprints(work / name / "pred", scene, work / name, area_px))
        rows.append({"variant": name, "chip_px": size, "margin_px": m, "samples": samples,
                     "px_predicted": px, "px_ratio": px / scene_px, "predict_s": seconds[name],
                     **agreement(read_probs(work / name / "pred", scene), ref, dist),
                     "footprints": len(fp), "truth": len(scene.truth), "min_area_px": area_px,
                     "f1_truth": f1(scene.truth, fp, 20.0), "f1_whole": f1(ref_fp, fp, 0.0)})
    return rows


UNITS = {"px_predicted": "px (the samples' pixels, margins included)",
         "px_ratio": "ratio (px_predicted / the scene's px)",
         "predict_s": "s (trainer.predict's wall time; best of --repeat)",
         **{f"dp_{bin_name(*b)}": "probability (mean |p - p_whole| of the building class)"
            for b in BINS},
         **{f"flip_{bin_name(*b)}": "share of pixels (argmax class differs from the whole's)"
            for b in BINS},
         **{f"px_{bin_name(*b)}": "px (scene pixels in the bin)" for b in BINS},
         "footprints": "footprints (merged)", "min_area_px": "px (merge --min-area)",
         "truth": "buildings (the scene's truth)",
         "f1_truth": "F1 (SpaceNet, IoU >= 0.5, against the truth)",
         "f1_whole": "F1 (SpaceNet, IoU >= 0.5, against the whole scene's footprints)"}
COLUMNS = ["variant", "samples", "px_ratio", "predict_s", "footprints", "f1_truth", "f1_whole"]


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = build_parser()
    args = parse_args(p, argv)
    _check(p, args)
    if args.run_dir is not None:
        check_run_dir(args.run_dir)
    work = Path(tempfile.mkdtemp(prefix="bench-chips-"))
    try:
        rows = bench(args, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    info = machine_info()
    print(f"{info['cores']} cores: {info['cpu']}; a {args.scene_px} px scene "
          f"({rows[0]['truth']} buildings), chips of {args.chip_size} px, run "
          f"{args.run_dir or 'trained here'}")
    print_table(rows, COLUMNS)
    print("\nagreement with the whole scene's prediction by px from the nearest chip edge: "
          "mean |dp| of the building probability, share of pixels whose class flips")
    bins = [bin_name(*b) for b in BINS]
    print_table(rows, ["variant", *[f"dp_{b}" for b in bins], *[f"flip_{b}" for b in bins]])
    return write_json(args.json, "chips", rows, settings=args, units=UNITS,
                      scene_px=args.scene_px, chip_px=args.chip_size, crs=CRS,
                      bins_px=[list(b) for b in BINS])


if __name__ == "__main__":
    sys.exit(run("chips", main))
