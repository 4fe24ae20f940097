"""Pictures for the report (issue 7): tiles with outlines coloured by outcome, and training curves.

Tiles: the image from the dataset shards, normalised as the model sees it (clipped per band to the
training split's 2nd..98th percentile from the manifest, never per tile), shown as an RGB composite
of the manifest's product (``dataio.spacenet.rgb_composite``: MUL-PanSharpen's bands 5, 3, 2;
said in a line and in each PNG's text), with outlines matched
by the scorer's rule (``postproc.matching``: proposals in file order, IoU >= 0.5): true-positive
proposals green, false-positive proposals red, missed truth yellow. A legend box in the top-left
corner holds the counts. Truth the scorer drops (area <= 20 px) is not drawn. Proposals that
share no ImageId with the split's truth (another split's CSV) are refused, as ``postproc.score``
refuses them; an empty proposal CSV draws every building as missed.

CLI::

    python -m postproc.render --data DATA --split test --proposals PROPOSALS.csv --out DIR \\
        [--pred PRED] [--image-ids ID ...] [--tiles N]
    python -m postproc.render --curves RUN/log.jsonl --out RUN/report/curves.png
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from PIL.PngImagePlugin import PngInfo
from shapely.geometry.base import BaseGeometry

from dataio.atomic import atomic_write_bytes
from dataio.spacenet import DEFAULT_PRODUCT, rgb_composite
from postproc.matching import match_image
from postproc.pools import say
from postproc.score import ScoreConfig, check_same_split, f1_from_counts

TP_COLOUR = (0, 255, 0)
FP_COLOUR = (255, 0, 0)
MISSED_COLOUR = (255, 255, 0)
LEGEND_BG = (0, 0, 0)
LEGEND_TEXT = (255, 255, 255)
LINE_WIDTH = 2  # px: visible on a 650 px tile without hiding small buildings
# NOTE: the legend box is sized from these templates, not the counts, so it has one size per
# tile size and a test can leave it out.
LEGEND_TEMPLATES = ("TP 000000", "FP 000000", "missed 000000", "F1: 0.0000")
DEFAULT_TILES = 4
# PNG text chunk on every tile this command writes: how a rerun knows which PNGs are its own
TILE_TAG = ("Software", "footprints postproc.render tile")
COMPOSITE_KEY = "Description"  # PNG text: "<product> bands R, G, B as red, green, blue"
TAR_REASONS = ("missing", "size")  # dataio.sharding.shard_reason labels of a tar's own damage


def _font() -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=14)


def legend_box(width: int, height: int) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the legend in a tile of this size (inclusive-exclusive)."""
    font = _font()
    sizes = [font.getbbox(t) for t in LEGEND_TEMPLATES]
    line = max(b[3] for b in sizes) + 2
    w = max(b[2] for b in sizes) + 8
    return 0, 0, min(width, w), min(height, line * len(LEGEND_TEMPLATES) + 6)


def display_rgb(img: np.ndarray, p2: list[float], p98: list[float],
                composite: tuple[int, int, int] | None = None) -> np.ndarray:
    """uint8 HxWx3: the ``composite`` bands (1-based; default bands 1-3, or band 1 as grey:
    ``rgb_composite``'s choice for RGB-PanSharpen) clipped to [p2, p98] and scaled to 0..255."""
    if composite is None:
        composite = rgb_composite(DEFAULT_PRODUCT, img.shape[2])
    out = np.empty((*img.shape[:2], 3), np.uint8)
    for i, b in enumerate(c - 1 for c in composite):
        lo, hi = float(p2[b]), float(p98[b])
        x = (img[..., b].astype(np.float32) - lo) / max(hi - lo, 1e-6)
        out[..., i] = np.rint(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
    return out


def rings(geom: BaseGeometry) -> list[list[tuple[float, float]]]:
    """Every ring (shells and holes) of a polygon or multipolygon, as closed coordinate lists."""
    out = []
    for poly in getattr(geom, "geoms", [geom]):
        if poly.is_empty:
            continue
        out.append(list(poly.exterior.coords))
        out.extend(list(r.coords) for r in poly.interiors)
    return out


def draw_tile(rgb: np.ndarray, truth: list[BaseGeometry], proposals: list[BaseGeometry],
              score_cfg: ScoreConfig | None = None) -> tuple[Image.Image, tuple[int, int, int]]:
    """The tile with coloured outlines and the legend; returns (image, (tp, fp, fn))."""
    t, match, matched = match_image(truth, proposals, score_cfg)
    im = Image.fromarray(rgb, "RGB")
    draw = ImageDraw.Draw(im)
    layers = ((MISSED_COLOUR, [g for g, m in zip(t, matched, strict=True) if not m]),
              (FP_COLOUR, [p for p, m in zip(proposals, match, strict=True) if m < 0]),
              (TP_COLOUR, [p for p, m in zip(proposals, match, strict=True) if m >= 0]))
    for colour, geoms in layers:
        for g in geoms:
            for ring in rings(g):
                draw.line(ring, fill=colour, width=LINE_WIDTH)
    tp = int((match >= 0).sum())
    counts = (tp, len(proposals) - tp, int(t.size) - tp)
    _legend(draw, im.size, counts)
    return im, counts


def _legend(draw: ImageDraw.ImageDraw, size: tuple[int, int], counts: tuple[int, int, int]
            ) -> None:
    tp, fp, fn = counts
    box = legend_box(*size)
    draw.rectangle((box[0], box[1], box[2] - 1, box[3] - 1), fill=LEGEND_BG)
    font = _font()
    line = (box[3] - box[1] - 6) // len(LEGEND_TEMPLATES)
    texts = ((f"TP {tp}", TP_COLOUR), (f"FP {fp}", FP_COLOUR), (f"missed {fn}", MISSED_COLOUR),
             (f"F1: {f1_from_counts(tp, fp, fn)[2]:.4f}", LEGEND_TEXT))
    for k, (text, colour) in enumerate(texts):
        draw.text((box[0] + 4, box[1] + 3 + k * line), text, fill=colour, font=font)


def pick_tiles(truth: dict[str, list[BaseGeometry]], n: int, score_cfg: ScoreConfig) -> list[str]:
    """The ``n`` tiles with the most (scored) truth buildings; ties by ImageId."""
    # (the scorer's rule, its rounding tolerance included: what it counts is what is drawn)
    counts = {k: int(score_cfg.keeps_truth(np.array([g.area for g in v], float)).sum())
              for k, v in truth.items()}
    return sorted(counts, key=lambda k: (-counts[k], k))[:n]


@dataclass
class TileImages:
    """What :func:`load_images` read: the images, and the wanted tiles it could not read."""

    images: dict[str, np.ndarray]
    skipped: list[str] = field(default_factory=list)  # wanted, not readable (damaged shards)
    damaged: dict[str, str] = field(default_factory=dict)  # shard -> why, said once each


def load_images(data: Path, split: str, ids: list[str],
                shard_infos: list[dict[str, Any]] | None = None) -> TileImages:
    """img.npy of the wanted tiles from ``DATA/<split>/shard-*.tar`` (only those are decoded).

    NOTE: a damaged shard (truncated, cut at a header, a member that does not decode) stopped
    the render at the first tile it could not read. Now what it holds before the damage is
    read, the shard is named once with the reason (the loaders' check against the manifest,
    ``shard_infos``, else the tar's own error), and the wanted tiles not found are skipped: they
    may lie in the unread part. Without a damaged shard a tile not found is still an error.
    """
    from dataio.sharding import shard_reason
    from dataio.shards import IMG, ShardError, check_shard, decode_npy, iter_tar_members

    directory = data / split
    infos = {info["name"]: info for info in shard_infos or []}
    shards = sorted({p.name for p in directory.glob("shard-*.tar")} | set(infos))
    if not shards:
        raise ValueError(f"--data {data}: no {split}/shard-*.tar (check --data and --split)")
    out = TileImages({})
    want = set(ids)
    for name in shards:
        shard, info = directory / name, infos.get(name)
        # (only the tar's own checks: render does not read the .idx, so its damage is not this)
        reason = check_shard(directory, info) if info is not None else None
        if reason is not None and shard_reason(reason) not in TAR_REASONS:
            reason = None
        keys: set[str] = set()
        try:
            # NOTE: member by member, not sample by sample: a sample is whole only when the
            # next one starts, so the last whole tile before the damage was lost with it
            for key, ext, raw in iter_tar_members(shard) if shard.is_file() else ():
                keys.add(key)
                if ext != IMG or key not in want:
                    continue
                try:
                    out.images[key] = decode_npy(raw)
                except (ValueError, EOFError) as e:  # (np.load's, for bytes not a whole .npy)
                    reason = reason or f"{shard}: {key}.{IMG} does not decode ({e})"
                if len(out.images) == len(want):
                    break
            else:
                # (a tar damaged at a later header can read as if it ended there, unsaid)
                if reason is None and info is not None and len(keys) != info["samples"]:
                    reason = (f"{shard}: {len(keys)} samples read, manifest says "
                              f"{info['samples']} (a damaged member header)")
        except ShardError as e:
            reason = reason or str(e)
        if reason is not None:
            out.damaged[str(shard)] = reason
            say(f"warning: damaged shard: {reason}; its tiles that cannot be read are skipped")
        if len(out.images) == len(want):
            break
    missing = [k for k in ids if k not in out.images]
    if missing and not out.damaged:
        raise ValueError(f"{missing[0]}: no such tile in {directory} shards "
                         "(check --image-ids and --split)")
    out.skipped = missing
    if not out.images:
        raise ValueError(f"no tile of split {split!r} of {data} could be read: the "
                         f"{len(missing)} wanted are not in the readable part of "
                         f"{_count(len(out.damaged), 'damaged shard')} (see the warnings above)")
    return out


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m postproc.render",
        description="Report pictures: tiles with truth and proposal outlines coloured by outcome "
                    "(green TP, red FP, yellow missed) as DIR/<ImageId>.png, or with --curves "
                    "the training curves of a run as one PNG.")
    p.add_argument("--out", type=Path, required=True,
                   help="directory for the tile PNGs (tiles an earlier render left there and "
                        "this one does not draw are removed); with --curves, the PNG file to "
                        "write")
    p.add_argument("--proposals", type=Path, default=None, help="proposal CSV to draw")
    p.add_argument("--data", type=Path, default=None,
                   help="prepared dataset (default: data in PRED/provenance.json)")
    p.add_argument("--split", default=None, choices=("train", "val", "test"),
                   help="split of the tiles; truth from DATA/<split>/truth.csv (default: the "
                        "split in PRED/provenance.json, else test)")
    p.add_argument("--pred", type=Path, default=None,
                   help="prediction directory whose provenance.json gives --data and --split")
    p.add_argument("--image-ids", nargs="+", default=None, metavar="ID", help="tiles to draw")
    p.add_argument("--tiles", type=int, default=DEFAULT_TILES,
                   help=f"without --image-ids: draw the N tiles with the most truth buildings "
                        f"(default {DEFAULT_TILES})")
    p.add_argument("--curves", type=Path, default=None, metavar="LOG",
                   help="draw the training curves of RUN/log.jsonl into --out instead")
    return p


def _curves(args: argparse.Namespace) -> int:
    from postproc.curves import plot_curves, read_log

    if args.proposals or args.image_ids or args.data:
        raise ValueError("--curves draws only the training curves; draw tiles in another call")
    if args.out.suffix.lower() != ".png":
        raise ValueError(f"--out {args.out}: with --curves, --out is the PNG file to write "
                         "(e.g. RUN/report/curves.png)")
    from dataio.atomic import writing

    epochs = read_log(args.curves)
    with writing():  # (a full disk: exit 1; --out was checked up front)
        plot_curves(epochs, args.out, title=args.curves.parent.name)
    from postproc.cli import report

    report(f"{len(epochs)} epochs -> {args.out}")  # (a full disk under stdout: 1; see report)
    return 0


def _data_and_split(args: argparse.Namespace) -> tuple[Path, str]:
    from postproc.predio import check_pred_dir
    from postproc.provenance import provenance_path, read_provenance

    data, split = args.data, args.split
    if args.pred is not None:
        check_pred_dir(args.pred)
        data = data or provenance_path(args.pred, "data")
        split = split or (read_provenance(args.pred) or {}).get("split")
    if data is None:
        raise ValueError("no dataset: pass --data (or --pred with a provenance.json)")
    return data, split or "test"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from dataio.atomic import (
        check_not_a_directory,
        check_writable,
        discard_staging_dir,
        fresh_staging_dir,
        fsync_dir,
        missing_dirs,
        writing,
    )

    # --out is the PNG with --curves, else the directory of tile pictures
    if args.curves is not None:
        check_writable(args.out, "--out")
    else:
        check_writable(args.out / "tile.png", "--out", given=args.out)
    if args.curves is not None:
        return _curves(args)
    from tqdm import tqdm

    from dataio.manifest import load_manifest
    from postproc.csvio import read_proposal_csv, read_truth_csv
    from postproc.predio import check_key

    if args.proposals is None:
        raise ValueError("--proposals is required to draw tiles (or pass --curves LOG)")
    if args.tiles < 1:
        raise ValueError(f"--tiles {args.tiles} must be at least 1")
    data, split = _data_and_split(args)
    manifest = load_manifest(data)
    p2, p98 = manifest.percentiles()
    # NOTE: an 8-band MUL-PanSharpen tile's bands 1-3 (coastal, blue, green) drew a bluish
    # picture unlike the scene; its red, green, blue are bands 5, 3, 2
    composite = rgb_composite(manifest.product, manifest.bands)
    shown = f"{manifest.product} bands {', '.join(map(str, composite))} as red, green, blue"
    truth_csv = data / split / "truth.csv"
    truth = read_truth_csv(truth_csv).polygons
    proposals = read_proposal_csv(args.proposals).polygons
    # refused as postproc.score refuses it: another split's proposals drew every building missed
    check_same_split(truth, proposals, f"the {split} truth {truth_csv}",
                     f"--proposals {args.proposals}")
    score_cfg = ScoreConfig()
    ids = args.image_ids or pick_tiles(truth, args.tiles, score_cfg)
    for image_id in ids:
        check_key(image_id)
        if image_id not in truth:
            raise ValueError(f"--image-ids {image_id}: not in {truth_csv}")
        check_not_a_directory(args.out / f"{image_id}.png", f"--out {args.out}",
                              f"tile {image_id}'s picture")
    read = load_images(data, split, ids, manifest.shards(split))
    images, drawn = read.images, [k for k in ids if k in read.images]
    # NOTE: the tiles are drawn into a stage inside --out and moved in only once all are drawn
    # (as trainer.predict and dataio.prepare publish): a render stopped part-way (a Ctrl-C, a
    # full disk) over an earlier render's tiles left the two mixed, some tiles new and the rest
    # old, the earlier tiles it would have removed included. Now --out is left as it was, and
    # an --out made for it goes again.
    made = missing_dirs(args.out)
    said: list[str] = []
    # (the inputs were read above: an OSError from here on is the outputs', a full disk: exit 1)
    with writing():
        stage = fresh_staging_dir(args.out)
        try:
            for image_id in tqdm(drawn, unit="tile", desc="render"):
                rgb = display_rgb(images[image_id], p2, p98, composite)
                im, (tp, fp, fn) = draw_tile(rgb, truth[image_id], proposals.get(image_id, []),
                                             score_cfg)
                buf = io.BytesIO()
                im.save(buf, format="PNG", compress_level=6, pnginfo=_tile_info(shown))
                atomic_write_bytes(stage / f"{image_id}.png", buf.getvalue())
                said.append(f"{image_id}: TP {tp}  FP {fp}  missed {fn} -> "
                            f"{args.out / image_id}.png")
        except BaseException:
            discard_staging_dir(args.out, made)
            raise
        for tile in sorted(stage.iterdir()):  # (renames on one file system: quick)
            os.replace(tile, args.out / tile.name)
        stage.rmdir()
        fsync_dir(args.out)
    if read.skipped:
        said.append(f"{len(read.skipped)} of the {len(ids)} tiles were left out, not readable "
                    f"from {_count(len(read.damaged), 'damaged shard')}: "
                    f"{', '.join(read.skipped)} (see the warnings above)")
    # (a skipped tile's picture from an earlier render goes too: it drew other proposals)
    # NOTE: inside writing(): removing this command's own outputs from the --out checked up
    # front is part of its output step, so an OSError here (EIO, a file system remounted
    # read-only) is the disk's, exit 1 as for the tiles' writes; it was 2, "fix the input".
    # Done before the report is printed: a closed stdout (| head -0 under python -u) stopped
    # the run at the print, quietly, with the earlier tiles still beside the new ones.
    removed: list[str] = []
    with writing():
        for old in stale_tiles(args.out, drawn):
            old.unlink()
            removed.append(f"removed {old} (an earlier render's tile)")
    from postproc.cli import report

    report("\n".join([f"tiles show {shown}", *said, *removed]))  # (a full disk: 1, see report)
    return 0


def _tile_info(shown: str) -> PngInfo:
    info = PngInfo()
    info.add_text(TILE_TAG[0], TILE_TAG[1])
    info.add_text(COMPOSITE_KEY, shown)  # (which bands the picture is: 5, 3, 2 of MUL-PanSharpen)
    return info


def stale_tiles(out: Path, keep: list[str]) -> list[Path]:
    """The tile PNGs of an earlier render in ``out`` that are not among ``keep``.

    A report lists every PNG in the directory, so a run drawing fewer or other tiles must not
    leave the earlier ones there. NOTE: only files this command wrote go: named
    ``<ImageId>.png`` and carrying its PNG text tag; any other PNG in ``out`` is the user's.
    """
    from postproc.predio import KEY_RE

    keep_set, stale = set(keep), []
    for path in sorted(out.glob("*.png")):
        if path.stem in keep_set or not KEY_RE.fullmatch(path.stem) or not path.is_file():
            continue
        try:
            with Image.open(path) as im:
                tag = im.info.get(TILE_TAG[0])
        except (OSError, SyntaxError, ValueError):
            continue
        if tag == TILE_TAG[1]:
            stale.append(path)
    return stale


if __name__ == "__main__":
    from postproc.cli import exit_on_error

    sys.exit(exit_on_error(main))
