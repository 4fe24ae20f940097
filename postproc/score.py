"""The SpaceNet building F1, exact, per image and in total.

Semantics (SpaceNet ``evaluateScene.py``): per image, proposals in the given (file) order;
each takes the unmatched truth polygon with the highest IoU (ties, up to ``IOU_RTOL``: the
first in file order); IoU >= 0.5 (``> 0.5`` with ``strict``, as solaris; up to float rounding,
``IOU_RTOL``) is a true positive and removes that truth polygon, anything else is a false
positive; unmatched truth polygons are false negatives. Truth polygons with area <=
``min_truth_area`` px (up to ``IOU_RTOL``, relative) are dropped first. Images in only one file:
truth without proposals count as false negatives, proposals without truth as false positives
(solaris).
Besides the pooled F1, each AOI's (ImageIds ``AOI_2_Vegas_img1``) and their mean, which is how
the SpaceNet-2 contest combined its cities.

Speed: IoU is needed only where it can reach the threshold. Candidate pairs come from an STRtree
of bounding boxes, pairs whose bound min(box overlap, areas) cannot reach the threshold are
dropped, and the rest get exact GEOS intersection areas in one vectorised call.

CLI: ``python -m postproc.score --truth DATA/test/truth.csv --proposals PROPOSALS.csv
[--json OUT] [--workers N]``; also under torchrun (ranks split the images, counts are summed).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import multiprocessing as mp
import os
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import shapely
from shapely.geometry.base import BaseGeometry

from postproc.iou import intersection_areas
from postproc.pools import close_pool, ignore_sigint, raise_if_interrupted, starting_workers

CHUNK_IMAGES = 64
# NOTE: an IoU this close to the threshold (relative) counts as on it. Areas computed from pixel
# coordinates carry rounding errors (measured up to 1e-11 relative on 650 px tiles, 1.7e-9 at
# 12,000 px), so an exact tie, a proposal that is half its truth polygon in decimal
# coordinates, came out as 0.4999999999 or 0.5000000001 and was won or lost by the rounding.
IOU_RTOL = 1e-8


@dataclass
class ScoreConfig:
    iou_threshold: float = 0.5
    strict: bool = False  # IoU > threshold instead of >= (solaris)
    min_truth_area: float = 20.0  # px; truth polygons with area <= this are dropped

    def __post_init__(self) -> None:
        # (named by their flags: the command line is where they come from)
        if not 0.0 < self.iou_threshold <= 1.0:
            raise ValueError(f"--iou-threshold {self.iou_threshold} must be in (0, 1]")
        if not (math.isfinite(self.min_truth_area) and self.min_truth_area >= 0):
            raise ValueError(f"--min-truth-area {self.min_truth_area} must be a finite number "
                             ">= 0")

    def keeps_truth(self, areas: np.ndarray) -> np.ndarray:
        """Which truth polygons (by area, px) are scored: area > ``min_truth_area``, where an
        area within ``IOU_RTOL`` (relative) of it counts as equal to it, so dropped.

        NOTE: a 20 px^2 polygon in decimal coordinates (4 x 5 px at x = 0.1) has a float area of
        19.999999999999996 or 20.000000000000018 by where it lies, so it was dropped or kept by
        the rounding; the same tolerance as IoU ties, for the same reason.
        """
        return np.asarray(areas) > self.min_truth_area * (1 + IOU_RTOL)


def f1_from_counts(tp: int, fp: int, fn: int) -> tuple[float, float, float]:
    """(precision, recall, F1), each 0 where its denominator is 0."""
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    f = 2 * p * r / (p + r) if p + r else 0.0
    return p, r, f


@dataclass
class ScoreResult:
    tp: int = 0
    fp: int = 0
    fn: int = 0
    per_image: list[dict[str, Any]] = field(default_factory=list)
    images_without_proposals: int = 0
    images_without_truth: int = 0
    repaired: int = 0  # invalid polygons made valid while reading (see postproc.csvio)

    @property
    def precision(self) -> float:
        return f1_from_counts(self.tp, self.fp, self.fn)[0]

    @property
    def recall(self) -> float:
        return f1_from_counts(self.tp, self.fp, self.fn)[1]

    @property
    def f1(self) -> float:
        return f1_from_counts(self.tp, self.fp, self.fn)[2]

    def per_aoi(self) -> dict[str, dict[str, Any]]:
        """Counts and F1 per AOI (``AOI_2_Vegas`` of ``AOI_2_Vegas_img1``), as the SpaceNet-2
        contest scorer groups images; {} if any ImageId is not named so."""
        counts: dict[str, list[int]] = {}
        for row in self.per_image:
            aoi = aoi_of(row["image_id"])
            if aoi is None:
                return {}
            c = counts.setdefault(aoi, [0, 0, 0, 0])
            c[0] += row["tp"]
            c[1] += row["fp"]
            c[2] += row["fn"]
            c[3] += 1
        out = {}
        for aoi, (tp, fp, fn, images) in sorted(counts.items()):
            precision, recall, f1 = f1_from_counts(tp, fp, fn)
            out[aoi] = {"tp": tp, "fp": fp, "fn": fn, "precision": precision, "recall": recall,
                        "f1": f1, "images": images}
        return out

    def to_json(self) -> dict[str, Any]:
        aois = self.per_aoi()
        return {"tp": self.tp, "fp": self.fp, "fn": self.fn, "precision": self.precision,
                "recall": self.recall, "f1": self.f1, "images": len(self.per_image),
                "images_without_proposals": self.images_without_proposals,
                "images_without_truth": self.images_without_truth,
                "per_aoi": aois, "aoi_mean_f1": aoi_mean_f1(aois),
                "per_image": self.per_image}


def aoi_of(image_id: str) -> str | None:
    """``AOI_2_Vegas`` for ``AOI_2_Vegas_img1`` (the contest scorer's first three '_' parts);
    None for an ImageId not named after its AOI."""
    parts = image_id.split("_")
    if len(parts) < 4 or parts[0] != "AOI" or not parts[1].isdigit():
        return None
    return "_".join(parts[:3])


def aoi_mean_f1(per_aoi: Mapping[str, Mapping[str, Any]]) -> float | None:
    """The mean of the AOIs' F1s: the SpaceNet-2 contest's overall score (None without AOIs).

    NOTE: not the pooled F1 (one F1 over all images), which weighs an AOI by its buildings; the
    published leaderboard averaged the cities, so a user comparing with it needs this one.
    """
    return (sum(a["f1"] for a in per_aoi.values()) / len(per_aoi)) if per_aoi else None


def _as_array(polys: Sequence[BaseGeometry]) -> np.ndarray:
    arr = np.empty(len(polys), dtype=object)
    arr[:] = list(polys)
    return arr


def candidate_ious(truth: np.ndarray, proposals: np.ndarray, cfg: ScoreConfig
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(proposal index, truth index, IoU) of every pair that can reach the threshold, sorted by
    proposal, then IoU descending (up to ``IOU_RTOL``), then truth index (the order the greedy
    matching wants)."""
    if truth.size == 0 or proposals.size == 0:
        e = np.empty(0, np.int64)
        return e, e, np.empty(0)
    ta = shapely.area(truth)
    pa = shapely.area(proposals)
    tree = shapely.STRtree(truth)
    pi, ti = tree.query(proposals)
    if pi.size:
        tb = shapely.bounds(truth)[ti]
        pb = shapely.bounds(proposals)[pi]
        w = np.minimum(tb[:, 2], pb[:, 2]) - np.maximum(tb[:, 0], pb[:, 0])
        h = np.minimum(tb[:, 3], pb[:, 3]) - np.maximum(tb[:, 1], pb[:, 1])
        m = np.minimum(np.clip(w, 0, None) * np.clip(h, 0, None), np.minimum(ta[ti], pa[pi]))
        denom = ta[ti] + pa[pi] - m
        with np.errstate(divide="ignore", invalid="ignore"):
            bound = np.where(denom > 0, m / denom, 0.0)
        # NOTE: a slack (wider than IOU_RTOL) keeps pairs whose bound rounds a hair below the
        # threshold.
        keep = bound >= cfg.iou_threshold * (1 - 10 * IOU_RTOL)
        pi, ti = pi[keep], ti[keep]
    if pi.size == 0:
        e = np.empty(0, np.int64)
        return e, e, np.empty(0)
    inter = intersection_areas(truth, proposals, pi, ti)
    union = pa[pi] + ta[ti] - inter
    with np.errstate(divide="ignore", invalid="ignore"):
        iou = np.where(union > 0, inter / union, 0.0)
    tol = cfg.iou_threshold * IOU_RTOL
    passed = iou > cfg.iou_threshold + tol if cfg.strict else iou >= cfg.iou_threshold - tol
    pi, ti, iou = pi[passed], ti[passed], iou[passed]
    order = np.lexsort((ti, -iou, pi))
    pi, ti, iou = pi[order], ti[order], iou[order]
    # NOTE: IoUs of one proposal within IOU_RTOL of the highest of their group count as equal,
    # so a tie goes to the first truth in file order: a proposal merging two adjacent buildings
    # (IoU exactly 0.5 with each) took the one whose float IoU rounded higher.
    order = np.lexsort((ti, np.cumsum(_tie_groups(pi, iou))))
    return pi[order], ti[order], iou[order]


def _tie_groups(pi: np.ndarray, iou: np.ndarray) -> np.ndarray:
    """Where a group of equal IoUs begins (bool), in pairs sorted by proposal, then IoU
    descending: at a proposal's first pair and at an IoU more than ``IOU_RTOL`` (relative) below
    its group's first, the highest.

    NOTE: not below the pair before: steps each within the tolerance chained into one group
    wider than it (three truth polygons at IoU 0.6, 0.599999995 and 0.59999999 were all tied,
    and the lowest, first in file order, was taken over 0.6). Vectorised against the pair before;
    the loop runs only where such a chain is found (nearly never: at IoU >= 0.5 with truth
    polygons that do not overlap, a proposal has at most two)."""
    start = np.ones(pi.size, bool)
    start[1:] = (pi[1:] != pi[:-1]) | (iou[:-1] - iou[1:] > IOU_RTOL * iou[:-1])
    first = iou[np.maximum.accumulate(np.where(start, np.arange(pi.size), 0))]
    if np.any(first - iou > IOU_RTOL * first):
        lead = 0
        for k in range(1, pi.size):
            start[k] = pi[k] != pi[k - 1] or iou[lead] - iou[k] > IOU_RTOL * iou[lead]
            lead = k if start[k] else lead
    return start


def score_image(truth: Sequence[BaseGeometry], proposals: Sequence[BaseGeometry],
                cfg: ScoreConfig | None = None) -> tuple[int, int, int]:
    """(tp, fp, fn) of one image; ``proposals`` are taken in the given order. Pure and cheap."""
    cfg = cfg or ScoreConfig()
    t = _as_array(truth)
    if t.size:
        t = t[cfg.keeps_truth(shapely.area(t))]
    p = _as_array(proposals)
    if p.size == 0 or t.size == 0:
        return 0, int(p.size), int(t.size)
    pi, ti, _ = candidate_ious(t, p, cfg)
    matched = np.zeros(t.size, bool)
    tp = 0
    # candidates of one proposal are contiguous and best first: take the first unmatched one
    starts = np.searchsorted(pi, np.arange(p.size + 1))
    for k in np.flatnonzero(starts[1:] > starts[:-1]):
        for j in ti[starts[k]:starts[k + 1]]:
            if not matched[j]:
                matched[j] = True
                tp += 1
                break
    return tp, int(p.size) - tp, int(t.size) - tp


def score(truth: Mapping[str, list[BaseGeometry]], proposals: Mapping[str, list[BaseGeometry]],
          cfg: ScoreConfig | None = None, image_ids: Sequence[str] | None = None) -> ScoreResult:
    """Score every image in either dict (or only ``image_ids``); counts summed over images."""
    cfg = cfg or ScoreConfig()
    ids = sorted(set(truth) | set(proposals)) if image_ids is None else list(image_ids)
    res = ScoreResult()
    for image_id in ids:
        tp, fp, fn = score_image(truth.get(image_id, []), proposals.get(image_id, []), cfg)
        res.per_image.append({"image_id": image_id, "tp": tp, "fp": fp, "fn": fn})
        res.tp += tp
        res.fp += fp
        res.fn += fn
    res.images_without_proposals = sum(1 for i in ids if i not in proposals)
    res.images_without_truth = sum(1 for i in ids if i not in truth)
    return res


def check_same_split(truth_ids: Collection[str], proposal_ids: Collection[str], truth: str,
                     proposals: str) -> None:
    """Refuse proposals that share no ImageId with the truth, naming both (``truth`` and
    ``proposals`` say which flag or file each is).

    NOTE: that is another split's file (val proposals against test truth): it scored F1 0 with
    exit 0 and drew every building as missed, read as a useless model. An empty proposal file
    (no building found anywhere) is legitimate and not refused.
    """
    if truth_ids and proposal_ids and set(truth_ids).isdisjoint(proposal_ids):
        raise ValueError(f"{proposals}: no ImageId in common with {truth} (e.g. "
                         f"{next(iter(proposal_ids))!r} and {next(iter(truth_ids))!r}): is it "
                         "the same split?")


def merge_results(parts: Sequence[ScoreResult]) -> ScoreResult:
    """Sum partial results (ranks, workers); per-image rows sorted by image id."""
    out = ScoreResult()
    for r in parts:
        out.tp += r.tp
        out.fp += r.fp
        out.fn += r.fn
        out.per_image.extend(r.per_image)
        out.images_without_proposals += r.images_without_proposals
        out.images_without_truth += r.images_without_truth
        out.repaired += r.repaired
    out.per_image.sort(key=lambda d: d["image_id"])
    return out


# Worker state: set before the pool forks, so the tables are shared, not pickled per task.
_TABLES: tuple[Mapping, Mapping, ScoreConfig] | None = None


def _repairs(table: Mapping) -> int:
    return getattr(table, "repaired", 0)  # a PolygonIndex counts the repairs it makes


def _score_chunk(ids: list[str]) -> ScoreResult:
    assert _TABLES is not None
    truth, props, cfg = _TABLES
    before = _repairs(truth) + _repairs(props)
    res = score(truth, props, cfg, image_ids=ids)
    res.repaired = _repairs(truth) + _repairs(props) - before
    return res


def score_parallel(truth: Mapping[str, list[BaseGeometry]],
                   proposals: Mapping[str, list[BaseGeometry]], cfg: ScoreConfig,
                   image_ids: Sequence[str], workers: int, progress: bool = False) -> ScoreResult:
    """``score`` over ``image_ids`` with a pool of forked worker processes (chunks of images).

    The tables may be plain dicts or indexes (:class:`postproc.csvio.PolygonIndex`: each worker
    parses the images it scores, so memory stays flat however many images there are).
    """
    from tqdm import tqdm

    global _TABLES
    chunks = [list(image_ids[i:i + CHUNK_IMAGES]) for i in range(0, len(image_ids), CHUNK_IMAGES)]
    bar = tqdm(total=len(image_ids), unit="image", disable=not progress, desc="score")
    parts: list[ScoreResult] = []
    _TABLES = (truth, proposals, cfg)
    try:
        if workers <= 1 or len(chunks) <= 1 or "fork" not in mp.get_all_start_methods():
            for c in chunks:
                parts.append(_score_chunk(c))
                bar.update(len(c))
        else:
            ctx = mp.get_context("fork")
            pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx,
                                          initializer=ignore_sigint)
            try:
                with starting_workers():  # (map submits every chunk and forks the workers)
                    results = pool.map(_score_chunk, chunks)
                for c, r in zip(chunks, results, strict=True):
                    parts.append(r)
                    bar.update(len(c))
            finally:  # (Ctrl-C: the parent stops the workers, see postproc.pools)
                close_pool(pool)
    finally:
        _TABLES = None
        bar.close()
    return merge_results(parts)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m postproc.score",
        description="SpaceNet building F1 of a proposal CSV against a truth CSV: precision, "
                    "recall, F1, TP, FP, FN in total and per image. Also runs under torchrun "
                    "(ranks split the images; counts are summed).")
    p.add_argument("--truth", type=Path, required=True,
                   help="truth CSV (ImageId,BuildingId,PolygonWKT_Pix,PolygonWKT_Geo)")
    p.add_argument("--proposals", type=Path, required=True,
                   help="proposal CSV (ImageId,BuildingId,PolygonWKT_Pix,Confidence)")
    p.add_argument("--json", type=Path, default=None, help="write the result as JSON here")
    d = ScoreConfig()
    p.add_argument("--iou-threshold", type=float, default=d.iou_threshold,
                   help=f"IoU for a true positive (default {d.iou_threshold})")
    p.add_argument("--strict", action="store_true",
                   help="require IoU > threshold (solaris) instead of >= (SpaceNet)")
    p.add_argument("--min-truth-area", type=float, default=d.min_truth_area,
                   help=f"drop truth polygons with area <= this many px (default "
                        f"{d.min_truth_area})")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes per rank (default: this rank's share of the cores)")
    from postproc.cli import add_push_args

    add_push_args(p, job="footprints_score")
    return p


def main(argv: list[str] | None = None) -> int:
    t0 = time.monotonic()
    args = build_parser().parse_args(argv)
    cfg = ScoreConfig(iou_threshold=args.iou_threshold, strict=args.strict,
                      min_truth_area=args.min_truth_area)
    from dataio.atomic import check_writable
    from postproc.csvio import index_proposal_csv, index_truth_csv
    from trainer import dist

    env = dist.DistEnv.from_env()
    if args.json is not None:
        check_writable(args.json, "--json",
                       (("--truth", args.truth), ("--proposals", args.proposals)))
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers {args.workers} must be at least 1")
    workers = args.workers or max(1, len(os.sched_getaffinity(0)) // env.local_world_size)
    # NOTE: indexes, not tables: the polygons of all images at once grew by ~0.3 MB a tile
    # (benchmarks.load); the workers parse the images they score, so a malformed WKT is found
    # by the rank that scores its image, and agreed once the process group exists.
    truth = index_truth_csv(args.truth)
    if not truth:
        # NOTE: e.g. the truth.csv of a split prepare left empty: it scored F1 0 with exit 0 (and
        # pushed it), a figure for nothing; postproc.tune refuses it too.
        raise ValueError(f"--truth {args.truth}: no images in the truth CSV; nothing to score "
                         "against")
    props = index_proposal_csv(args.proposals)
    ids = sorted(set(truth) | set(props))
    check_same_split(truth, props, f"--truth {args.truth}", f"--proposals {args.proposals}")
    # NOTE: score this rank's images before the process group starts its threads: the pool forks.
    # The agent watcher starts first (one sleeping thread, safe to fork beside): a worker whose
    # torchrun agent is killed mid-scoring stops then, instead of scoring its share to the end.
    dist.watch_agent(env)
    try:
        mine, error = score_parallel(truth, props, cfg, ids[env.rank::env.world_size], workers,
                                     progress=env.is_main), None
    except Exception as e:
        # NOTE: a Ctrl-C that numba reported as a SystemError (the IoU kernel in this process,
        # --workers 1) is no failure of this rank's images: it waited in dist.init for the
        # interrupted peers, which never come, until the timeout
        raise_if_interrupted(e)
        mine, error = None, e
    try:
        env = dist.init(env)
    except Exception:
        if error is not None:  # the others were not there in time: this rank's reason first
            raise error from None
        raise
    try:
        # agreed: a bad row in one rank's images stops every rank with its reason
        dist.agree_on("scoring", error)
        result = merge_results(dist.gather_objects(mine))
        # NOTE: agreed too, before the teardown: rank 0's --json failing (EIO, a full disk)
        # exited 1 there and 0 on the other ranks, a run that looked half done
        out = dist.on_main(env, "reporting" if args.json is None else f"writing {args.json}",
                           lambda: _report(args, cfg, result, len(ids)))
    finally:
        dist.teardown()
    if out is None:  # (not rank 0)
        return 0
    from postproc.cli import push_metrics
    from postproc.pushmetrics import PostprocRun

    figures = {k: out[k] for k in ("f1", "precision", "recall", "tp", "fp", "fn")}
    push_metrics(args, PostprocRun(len(ids), result.tp + result.fp, time.monotonic() - t0,
                                   score=figures))
    return 0


def _report(args: argparse.Namespace, cfg: ScoreConfig, result: ScoreResult, images: int
            ) -> dict[str, Any]:
    """Rank 0's output: the figures printed, and written to ``--json`` if given; returns the
    JSON object."""
    out = result.to_json()
    out.update(truth_file=str(args.truth), proposal_file=str(args.proposals),
               iou_threshold=cfg.iou_threshold, strict=cfg.strict,
               min_truth_area=cfg.min_truth_area, repaired_polygons=result.repaired)
    from dataio.atomic import atomic_write_text, writing

    # NOTE: inside writing(): a full disk under stdout (> report.txt) or at --json is a failure
    # of the run, exit 1 (on every rank: relayed as a WriteError), not bad input (2); --json's
    # path was checked up front. Flushed here, in the agreed report (on_main): a buffered stdout
    # (no -u: torchrun --no-python python -m ...) met a closed pipe only at the end, after the
    # process group, and rank 0 alone exited 1
    with writing():
        print(f"F1 {result.f1:.4f}  precision {result.precision:.4f}  "
              f"recall {result.recall:.4f}  TP {result.tp}  FP {result.fp}  FN {result.fn}  "
              f"({images} images; {result.images_without_proposals} without proposals, "
              f"{result.images_without_truth} without truth)")
        if len(out["per_aoi"]) > 1:  # (with one AOI its F1 is the line above)
            for aoi, a in out["per_aoi"].items():
                print(f"  {aoi}: F1 {a['f1']:.4f}  TP {a['tp']}  FP {a['fp']}  FN {a['fn']}  "
                      f"({a['images']} images)")
            print(f"mean of the AOIs' F1s {out['aoi_mean_f1']:.4f} (how the SpaceNet-2 "
                  "contest combined its cities)")
        if args.json is not None:
            atomic_write_text(args.json, json.dumps(out, indent=1) + "\n")
        sys.stdout.flush()
    return out


if __name__ == "__main__":
    from postproc.cli import exit_on_error

    sys.exit(exit_on_error(main))
