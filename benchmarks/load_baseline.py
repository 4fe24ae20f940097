"""The baseline rows of ``benchmarks.load``: the script a user would write from the baseline
functions (``benchmarks.baselines``), reading its inputs whole and gathering its results in memory.

    python -m benchmarks.load_baseline polygonize --pred PRED --out CSV [--min-area 20]
    python -m benchmarks.load_baseline score --truth CSV --proposals CSV --json OUT
                                             [--min-truth-area 20]

- polygonize: every tile of every ``PRED/pred-*.tar`` (read as a user's script would, with
  ``tarfile`` and Pillow: the project's reader would bring torch and numba into the figures), the
  original sample's polygonizer (``baseline_polygonize``: building
  channel > 127, ``rasterio.features.shapes``, shapely, area filter), every proposal row gathered
  in one list, and the SpaceNet proposal CSV written at the end (Confidence 1: the sample has
  none). Tiles are decoded one at a time, as the sample read one image at a time.
- score: both CSVs read whole into dicts of shapely polygons per ImageId (``postproc.csvio``'s
  reader: the way the SpaceNet utilities load them), then ``plain_score`` image by image; the JSON
  has ``postproc.score``'s fields (tp, fp, fn, precision, recall, f1, per_image, ...).

One process, no workers: it is the baseline (the sample's scripts ran in one process).
"""

from __future__ import annotations

import argparse
import json
import sys
import tarfile
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks.baselines import baseline_polygonize, plain_score
from benchmarks.common import parse_args, run
from dataio.atomic import atomic_open, atomic_write_text

# NOTE: the defaults of PolygonizeConfig.min_polygon_area and ScoreConfig.min_truth_area (tested
# equal); not imported, since postproc.polygonize and postproc.score bring torch and numba along.
MIN_POLYGON_AREA = 20.0
MIN_TRUTH_AREA = 20.0
IOU_THRESHOLD = 0.5  # plain_score's, SpaceNet's (IoU >= 0.5)


def polygonize(pred: Path, out: Path, min_area: float = MIN_POLYGON_AREA) -> tuple[int, int]:
    """Write the proposal CSV of every tile under ``pred``; returns (tiles, polygons)."""
    from postproc.csvio import proposal_rows, write_rows

    rows: list[list[str]] = []
    tiles = 0
    suffix = ".prob.png"  # postproc.predio's member name: <ImageId>.prob.png (8-bit RGB)
    if pred.is_file():  # (a shard given for its directory was "not found"; postproc.predio's words)
        raise ValueError(f"--pred {pred} is a file; give the directory of prediction shards "
                         f"(pred-*.tar), e.g. {pred.parent}")
    shards = sorted(pred.glob("pred-*.tar"))
    if not shards:  # (it wrote a header-only CSV and said "0 tiles")
        raise ValueError(f"--pred {pred}: no pred-*.tar shards (not found, or empty)")
    for shard in shards:
        try:
            with tarfile.open(shard, "r:") as tar:  # (plain tar, as predio writes them)
                for member in tar:
                    if not (member.isfile() and member.name.endswith(suffix)):
                        continue
                    with Image.open(tar.extractfile(member)) as im:
                        prob = np.asarray(im.convert("RGB"))
                    polys = baseline_polygonize(prob, min_area)
                    rows += proposal_rows(member.name[:-len(suffix)], polys, [1.0] * len(polys))
                    tiles += 1
        except tarfile.TarError as e:
            raise ValueError(f"{shard}: not a readable tar ({e})") from None
    with atomic_open(out, "w", newline="", encoding="utf-8") as f:
        write_rows(f, rows, header=True)
    return tiles, sum(1 for r in rows if r[1] != "-1")


def _ratios(tp: int, fp: int, fn: int) -> dict[str, float]:
    p = tp / (tp + fp) if tp + fp else 0.0
    r = tp / (tp + fn) if tp + fn else 0.0
    return {"precision": p, "recall": r, "f1": 2 * p * r / (p + r) if p + r else 0.0}


def score(truth_csv: Path, proposals_csv: Path, min_truth_area: float = MIN_TRUTH_AREA
          ) -> dict[str, Any]:
    """``postproc.score``'s JSON fields for the two CSVs, scored by ``plain_score``."""
    from postproc.csvio import read_proposal_csv, read_truth_csv

    truth_table, prop_table = read_truth_csv(truth_csv), read_proposal_csv(proposals_csv)
    truth, props = truth_table.polygons, prop_table.polygons
    ids = sorted(set(truth) | set(props))
    per_image = []
    for image_id in ids:
        tp, fp, fn = plain_score(truth.get(image_id, []), props.get(image_id, []),
                                 min_truth_area)
        per_image.append({"image_id": image_id, "tp": tp, "fp": fp, "fn": fn})
    tp, fp, fn = (sum(d[k] for d in per_image) for k in ("tp", "fp", "fn"))
    return {"tp": tp, "fp": fp, "fn": fn, **_ratios(tp, fp, fn), "images": len(ids),
            "images_without_proposals": sum(1 for i in ids if i not in props),
            "images_without_truth": sum(1 for i in ids if i not in truth),
            "per_image": per_image, "truth_file": str(truth_csv),
            "proposal_file": str(proposals_csv), "iou_threshold": IOU_THRESHOLD,
            "strict": False, "min_truth_area": min_truth_area,
            "repaired_polygons": truth_table.repaired + prop_table.repaired,
            "scorer": "benchmarks.baselines.plain_score, one process"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m benchmarks.load_baseline",
                                description=" ".join(__doc__.split("\n\n")[0].split()))
    sub = p.add_subparsers(dest="command", required=True)
    pp = sub.add_parser("polygonize", help="the sample's polygonizer over prediction shards")
    pp.add_argument("--pred", type=Path, required=True, help="directory of pred-*.tar shards")
    pp.add_argument("--out", type=Path, required=True, help="proposal CSV to write")
    pp.add_argument("--min-area", type=float, default=MIN_POLYGON_AREA,
                    help=f"drop blobs under this many px (default {MIN_POLYGON_AREA})")
    ps = sub.add_parser("score", help="the plain shapely scorer of a proposal CSV")
    ps.add_argument("--truth", type=Path, required=True, help="SpaceNet truth CSV")
    ps.add_argument("--proposals", type=Path, required=True, help="SpaceNet proposal CSV")
    ps.add_argument("--json", type=Path, default=None, help="write the result as JSON here")
    ps.add_argument("--min-truth-area", type=float, default=MIN_TRUTH_AREA,
                    help=f"drop truth polygons with area <= this many px "
                         f"(default {MIN_TRUTH_AREA})")
    return p


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    args = parse_args(p, argv)
    if args.command == "polygonize":
        tiles, polygons = polygonize(args.pred, args.out, args.min_area)
        print(f"{tiles} tiles, {polygons} polygons -> {args.out}")
        return 0
    out = score(args.truth, args.proposals, args.min_truth_area)
    print(f"F1 {out['f1']:.4f}  precision {out['precision']:.4f}  recall {out['recall']:.4f}  "
          f"TP {out['tp']}  FP {out['fp']}  FN {out['fn']}  ({out['images']} images)")
    if args.json is not None:
        atomic_write_text(args.json, json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(run("load_baseline", main))
