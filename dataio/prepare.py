"""Prepare SpaceNet AOIs for training: masks, a 70:15:15 split, WebDataset shards, manifest.

    python -m dataio.prepare --raw RAW [--raw RAW2 ...] --out DATA [--split 70,15,15] [--seed S]
                             [--workers N] [--shard-size K] [--boundary-width W] [--overwrite]
    python -m dataio.prepare --raw RAW --out DATA --images-only     (new imagery, no labels)
                             [--chip-size N [--chip-margin M]] (scenes cut into N x N chips)
    ... [--product MUL-PanSharpen]   (the 8-band product instead of RGB-PanSharpen; with either)

``--product`` picks the imagery folder read, ``RAW/<product>/<product>_<ImageId>.tif``:
``RGB-PanSharpen`` (3 bands, the default) or ``MUL-PanSharpen`` (8 bands: coastal, blue, green,
yellow, red, red edge, NIR1, NIR2). Both lie on the same grid with the same ImageIds, so masks,
truth CSVs and predictions are the same; the samples hold every band, and the manifest records
the product (one without it is RGB-PanSharpen's).

With ``--images-only`` only ``RAW/<product>/`` is read (``geojson/`` may be absent, and is
ignored if present) and every tile goes into the ``test`` split, for ``trainer.predict``: no
truth CSVs, a manifest with ``"labels": false``, each sample's mask all ``MASK_PAD`` (no label).
With ``--chip-size N`` too, an image of 1.5N px or more either way is cut into a grid of chips
of about N px (``dataio.chips``), each a sample of its own read through a window of the image,
grown by ``--chip-margin`` M px of context on each side (64 by default; ``trainer.predict`` cuts
each prediction back to its chip). A chip whose own pixels are all nodata (the image's dataset
mask: nodata value, alpha band or mask) is left out, and counted; a whole image never is.

Tiles are processed in parallel and streamed into shards, so memory does not grow with the AOI.
Unusable tiles are skipped and listed in the manifest with their reason. The dataset is complete
once ``DATA/manifest.json`` exists; an interrupted run leaves no shard under a final name.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import csv
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field, replace
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from pyproj import CRS
from rasterio.errors import NotGeoreferencedWarning
from tqdm import tqdm

from dataio.atomic import (
    NAME_MAX,
    STAGING,
    atomic_open,
    check_writable,
    discard_staging_dir,
    fresh_staging_dir,
    fsync_dir,
    missing_dirs,
)
from dataio.augment import MASK_PAD
from dataio.chips import (
    DEFAULT_CHIP_MARGIN,
    Chip,
    check_chip_margin,
    check_chip_size,
    chip_grid,
    core_is_nodata,
    needs_chips,
)
from dataio.classes import CLASS_NAMES, NUM_CLASSES
from dataio.geo import crs_to_string, gdal_env, is_invertible, read_error, to_geo
from dataio.imageid import IMAGE_ID_RE
from dataio.labels import DEFAULT_BOUNDARY_WIDTH, LabelError, make_mask, read_footprints
from dataio.manifest import FORMAT_VERSION, MANIFEST, SPLITS, BandStats, save_manifest
from dataio.shards import ShardInfo, ShardWriter, encode_sample
from dataio.spacenet import (
    DEFAULT_PRODUCT,
    EMPTY,
    INCOMPLETE_MARKER,
    LABEL_DIR,
    PRODUCTS,
    TRUTH_HEADER,
    image_id_of,
    label_path,
    products_in,
    wkt_xyz,
)
from postproc.geojson import MAX_IMAGE_ID_BYTES
from postproc.pools import (
    close_pool,
    ignore_further_sigint,
    ignore_sigint,
    starting_workers,
    stop_code,
    stop_signals,
    stopped_by,
)

ACCEPTED_DTYPES = ("uint16", "uint8")
DEFAULT_SPLIT = (70.0, 15.0, 15.0)  # train:val:test weights
IMAGES_ONLY_SPLIT = (0.0, 0.0, 1.0)  # --images-only: every tile is a test tile
# NOTE: chips of one scene lie side by side: in different splits, val/test would be scored on
# pixels next to (and buildings cut from) the ones trained on, i.e. spatial leakage.
CHIPS_NEED_IMAGES_ONLY = ("--chip-size needs --images-only: chips of a labelled AOI would put "
                          "neighbouring chips of one scene into different splits (spatial "
                          "leakage between train and val/test)")
MARGIN_NEEDS_CHIPS = "--chip-margin needs --chip-size: it is the context around each chip"
# NOTE: an ImageId becomes a file name downstream, and a chip's one is longer than its scene's;
# polygonize --geojson stopped at the first too long, after the prediction (bytes: a file name's
# limit is in bytes; IMAGE_ID_RE allows ASCII alone for now, one byte a character)
TOO_LONG = (f"over the {MAX_IMAGE_ID_BYTES} bytes an ImageId may have: postproc.polygonize "
            "--geojson writes <ImageId>.geojson under a temporary name "
            f"{NAME_MAX - MAX_IMAGE_ID_BYTES} bytes longer, and a file name has at most "
            f"{NAME_MAX}; rename the file")


@dataclass
class PrepareConfig:
    raw: list[Path]
    out: Path
    split: tuple[float, float, float] = DEFAULT_SPLIT
    seed: int = 0
    workers: int = 1
    shard_size: int = 200
    boundary_width: float = DEFAULT_BOUNDARY_WIDTH
    overwrite: bool = False
    images_only: bool = False  # no labels read: every tile into test, masks all MASK_PAD
    chip_size: int | None = None  # --images-only: cut larger images into chips of ~N x N px
    # --chip-size: px of context around each chip in its sample (None: DEFAULT_CHIP_MARGIN)
    chip_margin: int | None = None
    product: str = DEFAULT_PRODUCT  # the imagery folder read (dataio.spacenet.PRODUCTS)

    def __post_init__(self) -> None:
        self.raw = [Path(r) for r in self.raw]
        self.out = Path(self.out)
        if not self.raw:
            raise ValueError("give at least one --raw AOI directory")
        if self.product not in PRODUCTS:
            raise ValueError(f"--product {self.product!r}: not one dataio.prepare reads (it reads "
                             f"{', '.join(PRODUCTS)}); {_found(self.raw[0])}")
        if self.images_only and tuple(self.split) != DEFAULT_SPLIT:
            raise ValueError("--split and --images-only do not go together: without labels "
                             "every tile goes into the test split")
        # NOTE: finite weights first: NaN passes both comparisons, and NaN, inf or weights whose
        # sum overflows would fail later in split_counts with a message not naming --split.
        if (len(self.split) != 3 or not all(math.isfinite(w) for w in self.split)
                or min(self.split) < 0 or self.split[0] <= 0):
            raise ValueError(f"--split needs three finite non-negative weights (train,val,test) "
                             f"with train > 0, got {self.split}")
        if not math.isfinite(sum(self.split)):  # finite weights, but they were called non-finite
            raise ValueError(f"--split weights {self.split} are too large: their sum is not "
                             "finite; scale them down (only their proportions count, e.g. "
                             "70,15,15)")
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {self.shard_size}")
        if self.seed < 0:  # numpy's generators take no negative seed
            raise ValueError(f"--seed must be >= 0, got {self.seed}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")
        if not 0 <= self.boundary_width <= 50:
            raise ValueError(f"--boundary-width must be in [0, 50] px, got {self.boundary_width}")
        if self.chip_size is not None:
            if not self.images_only:
                raise ValueError(CHIPS_NEED_IMAGES_ONLY)
            check_chip_size(self.chip_size)
            if self.chip_margin is None:
                self.chip_margin = DEFAULT_CHIP_MARGIN
            check_chip_margin(self.chip_margin, self.chip_size)
        elif self.chip_margin is not None:
            raise ValueError(MARGIN_NEEDS_CHIPS)


@dataclass(frozen=True)
class Tile:
    image_id: str
    tif: Path
    label: Path | None  # None: --images-only, the tile has no label
    split: str = ""
    chip: Chip | None = None  # --chip-size: this window of the image (image_id is the chip's)
    # --chip-margin: the chip grown by the margin, clipped to the image: the pixels its sample
    # holds (None: the chip's own)
    window: Chip | None = None


@dataclass(frozen=True)
class _Header:
    """What the scan reads of an image before it decides what to do with it."""

    tile: Tile
    bands: int
    dtype: str
    height: int
    width: int
    invertible: bool
    source: dict[str, Any]  # its entry in Scan.sources (chip counts are added to it)


@dataclass
class Scan:
    tiles: list[Tile] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)
    sources: list[dict[str, Any]] = field(default_factory=list)
    bands: int = 0
    # each tile's image -> its entry in sources (where _build counts the chips left out)
    source_of: dict[Path, dict[str, Any]] = field(default_factory=dict)


def scan(cfg: PrepareConfig) -> Scan:
    """Find every tile in every AOI, read raster headers, drop what cannot be used."""
    result = Scan()
    headers: list[_Header] = []
    seen: dict[str, Path] = {}
    for raw in cfg.raw:
        img_dir = raw / cfg.product
        if not raw.is_dir():  # (a typo: "no RGB-PanSharpen/ folder" sent one looking inside)
            raise ValueError(f"--raw {raw}: "
                             f"{'not a directory' if raw.exists() else 'no such directory'} "
                             "(a SpaceNet AOI directory, e.g. AOI_2_Vegas_Train)")
        if not img_dir.is_dir():
            raise ValueError(f"--raw {raw}: no {cfg.product}/ folder (expected the SpaceNet "
                             f"layout, e.g. AOI_2_Vegas_Train/{cfg.product}/*.tif); "
                             f"{_found(raw)}")
        if (raw / INCOMPLETE_MARKER).exists():
            raise ValueError(f"--raw {raw}: incomplete, dataio.synth did not finish writing it "
                             f"({INCOMPLETE_MARKER} is there); rerun synth with --overwrite")
        tifs = sorted(p for p in img_dir.iterdir() if p.suffix.lower() in (".tif", ".tiff"))
        # NOTE: refused as a missing product folder is: an AOI among several whose folder held
        # no .tif (a download that failed, a product folder made but never filled) added 0 tiles
        # without a word, its absence seen only in the manifest's sources. Before the labels'
        # check: an empty download has no geojson/ either, and --images-only would not mend it.
        if not tifs:
            others = "; leave this --raw out to prepare the others" if len(cfg.raw) > 1 else ""
            raise ValueError(f"--raw {raw}: {img_dir}/ holds no .tif (a download that failed, "
                             f"or one not unpacked there){others}")
        # NOTE: an AOI without labels (SpaceNet's *_Test_public) prepared without --images-only
        # read and sharded every image, skipped each as "label file missing", and then stopped
        # on "the training split is empty": minutes of work on a real AOI, and no word of the flag
        if not cfg.images_only and not (raw / LABEL_DIR).is_dir():
            raise ValueError(f"--raw {raw}: no {LABEL_DIR}/ folder (the building labels); "
                             "prepare imagery without labels with --images-only (for "
                             "trainer.predict)")
        source: dict[str, Any] = {"raw": str(raw), "tiles": len(tifs)}
        if cfg.images_only:  # (main says so in one line)
            source["labels_ignored"] = (raw / LABEL_DIR).is_dir()
        if cfg.chip_size is not None:  # (counted in _chipped; chips_empty in _build)
            source.update(chip_size=cfg.chip_size, images_chipped=0, chips=0, chips_empty=0)
        result.sources.append(source)
        for tif in tifs:
            def skip(reason: str, iid: str = "", tif: Path = tif) -> None:
                result.skipped.append({"image_id": iid, "path": str(tif), "reason": reason})

            try:
                iid = image_id_of(tif, cfg.product)
            except ValueError as e:
                skip(str(e))
                continue
            if not IMAGE_ID_RE.fullmatch(iid):
                skip(f"ImageId {iid!r} has characters other than letters, digits, '_', '-'", iid)
                continue
            if len(iid.encode()) > MAX_IMAGE_ID_BYTES:
                skip(f"ImageId of {len(iid.encode())} bytes, {TOO_LONG}", iid)
                continue
            if iid in seen:
                skip(f"duplicate ImageId (also in {seen[iid]})", iid)
                continue
            try:
                # NOTE: a GeoTIFF without a geotransform reads as the identity, with a
                # NotGeoreferencedWarning; the skip below reports it, once, in the manifest.
                with (gdal_env(),
                      warnings.catch_warnings(action="ignore", category=NotGeoreferencedWarning),
                      rasterio.open(tif) as ds):
                    count, dtype, has_crs = ds.count, ds.dtypes[0], ds.crs is not None
                    has_transform = not ds.transform.is_identity
                    height, width = ds.height, ds.width
                    invertible = is_invertible(ds.transform)
            except Exception as e:
                skip(f"unreadable image ({read_error(e)})", iid)
                continue
            if dtype not in ACCEPTED_DTYPES:
                skip(f"image dtype {dtype} (expected one of {', '.join(ACCEPTED_DTYPES)})", iid)
                continue
            if not has_crs:
                skip("image has no CRS (not georeferenced)", iid)
                continue
            # NOTE: a CRS alone places nothing: its footprints would all lie off the image (the
            # tile skipped for its labels) and a tile without buildings was kept, its samples
            # and predictions in pixel units. Either way it is skipped here, for this reason.
            if not has_transform:
                skip("image has no geotransform (not georeferenced)", iid)
                continue
            seen[iid] = tif
            result.source_of[tif] = source
            label = None if cfg.images_only else label_path(raw, iid)
            headers.append(_Header(Tile(iid, tif, label), count, dtype, height, width,
                                   invertible, source))
    if not headers:  # (every --raw holds a .tif: each was skipped)
        raise ValueError(f"no usable tiles in {', '.join(map(str, cfg.raw))}"
                         f"{first_skip(result.skipped)}")
    # NOTE: the model takes one band count, and the normalisation pools one radiometry (an
    # 8-bit tile among 11-bit ones would drag the percentiles down and come out nearly black);
    # the majority decides each and odd tiles are skipped.
    counts = collections.Counter(h.bands for h in headers)
    result.bands = max(counts, key=lambda c: (counts[c], c))
    dtypes = collections.Counter(h.dtype for h in headers if h.bands == result.bands)
    dtype = max(dtypes, key=lambda d: (dtypes[d], d == "uint16"))  # a tie: SpaceNet's format
    kept = []
    for h in headers:
        reason = (f"has {h.bands} bands, the rest of the AOI has {result.bands}"
                  if h.bands != result.bands else
                  f"is {h.dtype}, most tiles are {dtype}" if h.dtype != dtype else None)
        if reason:
            result.skipped.append({"image_id": h.tile.image_id, "path": str(h.tile.tif),
                                   "reason": reason})
        else:
            kept.append(h)
    result.tiles = ([h.tile for h in kept] if cfg.chip_size is None
                    else _chipped(kept, cfg.chip_size, cfg.chip_margin or 0, result))
    return result


def _chipped(kept: list[_Header], size: int, margin: int, result: Scan) -> list[Tile]:
    """The tiles of ``kept`` with every image of more than one chip cut into its chips.

    An image cut into chips is skipped whole, once, for what would fail each of its chips: a
    degenerate geotransform, a chip ImageId that another image already has (a file named like
    a chip of a scene beside it: ``A.tif`` cut at 512 px and ``A_r0_c512.tif``), or chip
    ImageIds too long for a file name downstream (not only those: a scene with holes in it)."""
    whole = {h.tile.image_id: h.tile.tif for h in kept if not needs_chips(h.height, h.width, size)}
    tiles = []
    for h in kept:
        if not needs_chips(h.height, h.width, size):
            tiles.append(h.tile)
            continue
        chips = chip_grid(h.height, h.width, size)
        ids = [c.image_id(h.tile.image_id) for c in chips]
        clash = next((i for i in ids if i in whole), None)
        longest = max(len(i.encode()) for i in ids)
        suffix = ids[-1][len(h.tile.image_id):]  # (the last chip's offsets: the longest)
        reason = ("image has a degenerate geotransform" if not h.invertible else
                  f"its chip ImageId {clash!r} is that of {whole[clash]} too; rename one of them"
                  if clash is not None else
                  f"its chip ImageIds are up to {longest} bytes ({suffix!r} added), {TOO_LONG}"
                  if longest > MAX_IMAGE_ID_BYTES else None)
        if reason:
            result.skipped.append({"image_id": h.tile.image_id, "path": str(h.tile.tif),
                                   "reason": reason})
            continue
        tiles += [replace(h.tile, image_id=i, chip=c,
                          window=c.grown(margin, h.height, h.width) if margin else None)
                  for i, c in zip(ids, chips, strict=True)]
        h.source["images_chipped"] += 1
        h.source["chips"] += len(chips)
    return tiles


def _found(raw: Path) -> str:
    """What imagery ``raw`` holds, for an error about ``--product``."""
    found = products_in(raw) if raw.is_dir() else []
    return (f"{raw} holds {', '.join(f'{p}/' for p in found)}" if found else
            f"{raw} holds none of {', '.join(f'{p}/' for p in PRODUCTS)}")


def first_skip(skipped: list[dict[str, str]]) -> str:
    """``; skipped PATH: REASON (and N more)`` for an error that stops prepare with nothing
    to write. NOTE: the reasons are listed in the manifest, which such a run never writes: the
    error said "see the skipped tiles' reasons", and there were none to see."""
    if not skipped:
        return ""
    more = f" (and {len(skipped) - 1} more)" if len(skipped) > 1 else ""
    return f"; skipped {skipped[0]['path']}: {skipped[0]['reason']}{more}"


def split_counts(n: int, weights: tuple[float, float, float]) -> tuple[int, int, int]:
    """Tiles per split (train, val, test) for ``n`` tiles: largest-remainder apportionment.

    Each split gets the floor of its exact share, and the tiles left over go to the largest
    remainders (ties to the earlier split). So a split of weight 0 never gets a tile, and no
    split is short by a whole tile against its exact share (rounding each share on its own
    gave 4/1/0 for 5 tiles at 70:15:15, and a tile to a 0-weight test split at 90:10:0).
    """
    total = sum(weights)
    exact = [n * (w / total) for w in weights]  # w / total first: no overflow for huge weights
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(3), key=lambda i: counts[i] - exact[i])  # stable: ties keep order
    for i in by_remainder[:n - sum(counts)]:
        counts[i] += 1
    return counts[0], counts[1], counts[2]


def assign_splits(tiles: list[Tile], weights: tuple[float, float, float],
                  seed: int) -> list[Tile]:
    """Shuffle with the seed and cut in the given proportions; returns tiles in write order.

    Depends only on the set of ImageIds and the seed (never on worker count or file order).
    """
    ordered = sorted(tiles, key=lambda t: t.image_id)
    perm = np.random.default_rng(seed).permutation(len(ordered))
    n_train, n_val, _ = split_counts(len(ordered), weights)
    out = []
    for rank, i in enumerate(perm):
        split = "train" if rank < n_train else "val" if rank < n_train + n_val else "test"
        out.append(replace(ordered[i], split=split))
    return out


def process_tile(tile: Tile, bands: int, boundary_width: float) -> dict[str, Any]:
    """Worker: read one tile, rasterise its mask, encode its sample. Never raises for bad input.

    A tile without a label (``--images-only``) gets a mask of ``MASK_PAD`` (the loader reads it
    as no label), no building count and no truth rows; its pixels count in the statistics.
    A chip (``--chip-size``) reads its window of the image alone (grown by ``--chip-margin``;
    where the margin cannot be read, the chip alone, noted), and has that window's transform and
    size: the chips of an image lie on its pixel grid, which ``postproc.merge`` relies on. Its
    meta.json adds ``source_offset`` (the chip's [row, col] in the image) and, with a margin,
    ``core`` (the chip's [row, col, height, width] in the sample); its pixels in the statistics
    are the chip's alone, so each pixel counts once.
    A chip whose own pixels are all nodata gives ``{"empty": True}``, no sample (merge works
    from the prediction shards: the chip is simply not there); a whole image is never empty.
    NOTE: a whole image is the user's tile, and its absence would read as a lost one; a chip
    is prepare's own cut, and an all-nodata one holds nothing to find."""
    # (the window read: the chip grown by its margin, or the chip)
    c = tile.window or tile.chip
    empty, notes = False, []
    try:
        # (a chip: a mask beside the image, <file>.msk, counts for core_is_nodata)
        with gdal_env(sidecar_masks=c is not None), rasterio.open(tile.tif) as ds:
            if c is None:
                pixels = ds.read()
                transform, crs, height, width = ds.transform, ds.crs, ds.height, ds.width
            else:
                try:
                    pixels = ds.read(window=c.window())
                except Exception as e:
                    if c == tile.chip:
                        raise
                    # NOTE: a damaged block in the margin is a neighbour's pixels: the chip is
                    # read alone (a sample without a core, predicted without that context),
                    # not lost with it; a failure now is the chip's own (named below)
                    notes = [f"read without its --chip-margin: {c.span()} of the image could "
                             f"not be read ({read_error(e)})"]
                    c = tile.chip
                    pixels = ds.read(window=c.window())
                transform, crs = ds.window_transform(c.window()), ds.crs
                height, width = c.height, c.width
                if tile.chip is not None and pixels.shape[1:] == (height, width):  # (else below)
                    empty = core_is_nodata(ds, pixels, tile.chip, c)
            now = ds.height, ds.width
    except Exception as e:
        return {"skip": f"unreadable image ({read_error(e)})" if c is None else
                f"unreadable chip, {c.span()} of the image ({read_error(e)})"}
    # NOTE: rasterio crops a window that runs off the image: a chip of an image replaced by a
    # smaller one since the scan would be a sample of another size than its window's (a whole
    # image is read at the size it has now)
    if c is not None and pixels.shape[1:] != (height, width):
        return {"skip": f"chip {c.span()} run off the image, now {now[0]} x {now[1]} px: it "
                        "changed since prepare's scan; rerun dataio.prepare"}
    if pixels.shape[0] != bands:
        return {"skip": f"has {pixels.shape[0]} bands, the rest of the AOI has {bands}"}
    if not is_invertible(transform):  # e.g. a pixel size of 0: no pixel has a place on the map
        return {"skip": "image has a degenerate geotransform"}
    if empty:
        return {"empty": True}
    image_crs = CRS.from_user_input(crs.to_wkt())
    image = np.ascontiguousarray(pixels.transpose(1, 2, 0)).astype(np.uint16, copy=False)
    meta = {
        "image_id": tile.image_id, "crs": crs_to_string(image_crs),
        "transform": list(transform)[:6], "width": width, "height": height, "bands": bands,
        "building_count": None, "source": tile.tif.name,
    }
    own = image  # the pixels that count in the statistics
    if tile.chip is not None:  # (a whole image's meta.json as before)
        meta["source_offset"] = [tile.chip.row0, tile.chip.col0]  # row, column in the image
        if c != tile.chip:  # (a chip without a margin, or read without it: no core)
            r, k, h, w = meta["core"] = tile.chip.core_in(c)
            # NOTE: a margin is a neighbour's pixels (up to 4 chips' worth at a corner):
            # counted there, and band_stats stay those of the whole images
            own = image[r:r + h, k:k + w]
    if tile.label is None:
        # NOTE: the shard format stays whole (both readers, the index check and the loader's
        # backends need all three members); a mask of MASK_PAD is "no label" to every reader
        mask = np.full((height, width), MASK_PAD, np.uint8)
        return {"sample": encode_sample(tile.image_id, image, mask, meta), "rows": [],
                "hist": BandStats.of_image(own), "classes": None, "notes": notes}
    try:
        fp = read_footprints(tile.label, image_crs, transform, width, height)
    except LabelError as e:
        return {"skip": str(e)}
    mask = make_mask(fp.polygons, (height, width), boundary_width)
    meta["building_count"] = len(fp.polygons)
    geo_precision = 10 if image_crs.is_geographic else 4
    rows = [[tile.image_id, k + 1, wkt_xyz(p, 4), wkt_xyz(to_geo(p, transform), geo_precision)]
            for k, p in enumerate(fp.polygons)]
    return {
        "sample": encode_sample(tile.image_id, image, mask, meta),
        "rows": rows or [[tile.image_id, -1, EMPTY, EMPTY]],
        "hist": BandStats.of_image(image) if tile.split == "train" else None,
        "classes": np.bincount(mask.ravel(), minlength=NUM_CLASSES)[:NUM_CLASSES],
        "notes": [*notes, *fp.notes],
    }


def _bounded_map(fn: Callable[[Tile], dict[str, Any]], items: Iterable[Tile],
                 workers: int) -> Iterator[dict[str, Any]]:
    """Ordered parallel map with a bounded window, so results never pile up in memory.

    A tile whose worker dies (killed for memory, or a crash inside GDAL on a damaged file) is
    skipped with that reason, and the rest go on (see :func:`_alone`)."""
    if workers <= 1:
        yield from map(fn, items)
        return
    window = 4 * workers
    pool = _pool(workers)
    try:
        it = iter(items)
        with starting_workers():  # (the first submits start them)
            pending: collections.deque[tuple[Tile, Future[dict[str, Any]]]] = collections.deque(
                (t, _submit(pool, fn, t)) for t in _take(it, window))
        while pending:
            tile, fut = pending.popleft()
            try:
                result = fut.result()
            except BrokenProcessPool:
                # NOTE: a dead worker breaks the whole pool: every tile in flight fails with it
                # and which one killed it is unknown. The first is rerun alone (the culprit is
                # skipped there), the others in a new pool; each break uses up one tile.
                close_pool(pool)
                result = _alone(fn, tile)
                pool = _pool(workers)
                with starting_workers():
                    pending = collections.deque((t, _submit(pool, fn, t)) for t, _ in pending)
            for t in _take(it, 1):
                pending.append((t, _submit(pool, fn, t)))
            yield result
    finally:  # (queued tiles dropped, running ones finish)
        close_pool(pool)


def _count(n: int, noun: str) -> str:
    """``n`` with ``noun``, plural unless one ("1 image", "16 chips")."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _workers_said(workers: int) -> str:
    """How the summary line names the pool: 0 and 1 both read every tile in this process."""
    return f"{workers} workers" if workers > 1 else "in this process"


def _pool(workers: int) -> ProcessPoolExecutor:
    # NOTE: spawn, not fork: the parent holds a tqdm thread and GDAL state. Ctrl-C is the
    # parent's (postproc.pools): a worker that took it failed its tile, and the pool's exit
    # then waited for the rest of the window.
    return ProcessPoolExecutor(workers, mp_context=get_context("spawn"), initializer=ignore_sigint)


def _submit(pool: ProcessPoolExecutor, fn: Callable[[Tile], dict[str, Any]],
            tile: Tile) -> Future[dict[str, Any]]:
    """``pool.submit(fn, tile)``, or a future failed with the pool's BrokenProcessPool.

    NOTE: a worker may die while the head's result is already in hand (the consumer was busy
    with it): the next submit then raised BrokenProcessPool outside the recovery above, a
    traceback and no dataset. As a failed future it is met at the head like the others."""
    try:
        return pool.submit(fn, tile)
    except BrokenProcessPool as e:
        failed: Future[dict[str, Any]] = Future()
        failed.set_exception(e)
        return failed


def _alone(fn: Callable[[Tile], dict[str, Any]], tile: Tile) -> dict[str, Any]:
    """``fn(tile)`` in a worker of its own; if that worker dies too, the tile is skipped."""
    pool = _pool(1)
    try:
        with starting_workers():
            fut = pool.submit(fn, tile)
        return fut.result()
    except BrokenProcessPool:
        return {"tile": tile, "skip": "its worker process died reading it (killed for memory, "
                                      "or a crash in GDAL on a damaged file)"}
    finally:
        close_pool(pool)


def _take(it: Iterator[Tile], n: int) -> list[Tile]:
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            break
    return out


def _worker(tile: Tile, bands: int, boundary_width: float) -> dict[str, Any]:
    result = process_tile(tile, bands, boundary_width)
    result["tile"] = tile
    return result


class _Call:
    """Picklable partial for the process pool."""

    def __init__(self, bands: int, boundary_width: float) -> None:
        self.bands, self.boundary_width = bands, boundary_width

    def __call__(self, tile: Tile) -> dict[str, Any]:
        return _worker(tile, self.bands, self.boundary_width)


OLD = ".old"  # where publish moves the replaced dataset aside until the new one is in


def check_output(cfg: PrepareConfig) -> list[Path]:
    """Refuse to mix a new dataset into an old one; returns what --overwrite replaces (only our
    files), replaced by :func:`publish` once the new dataset is complete."""
    out = cfg.out
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out}: exists and is not a directory")
    # NOTE: one under a file was "[Errno 20] Not a directory: 'OUT/.partial'", and one this user
    # cannot write "[Errno 13] Permission denied: 'OUT/.partial'", naming no flag (and a
    # read-only manifest was replaced)
    check_writable(out / MANIFEST, "--out", given=out)
    if not out.exists():
        return []
    ours = [out / MANIFEST, *(out / s for s in SPLITS)]
    present = [p for p in ours if p.exists()]
    others = [p for p in out.iterdir() if p not in ours and p.name not in (STAGING, OLD)]
    if (out / OLD).is_dir() and not (out / MANIFEST).exists() and not cfg.overwrite:
        # a prepare killed inside its swap: .old is the only copy of the previous dataset
        raise ValueError(f"--out {out}: an interrupted prepare left the previous dataset in "
                         f"{out / OLD} (its new one in {out / STAGING}); move it back, or pass "
                         "--overwrite to replace it")
    if present and not cfg.overwrite:
        what = "a dataset" if (out / MANIFEST).exists() else "an incomplete dataset"
        raise ValueError(f"--out {out}: already holds {what}; pass --overwrite to replace it")
    if others and not present:
        raise ValueError(f"--out {out}: is not empty and holds no dataset; choose another --out")
    return present


def publish(stage: Path, out: Path, replaced: list[Path]) -> None:
    """Move the complete dataset in ``stage`` up into ``out``, replacing the old one.

    Only renames until the new manifest is in: the old manifest and splits move aside into
    ``out/.old`` (manifest first, so readers never see it beside a half-swapped split), the new
    splits move in, the new manifest last. A kill inside these few renames leaves no manifest (a
    clear error) with the old dataset whole in ``.old`` and the new one in the stage, never a
    deleted dataset; the old one is deleted only once the new one is in place.
    """
    old = out / OLD
    if old.exists():  # a previous publish's, killed after its new manifest or replaced on purpose
        shutil.rmtree(old)
    old.mkdir()
    order = sorted(replaced, key=lambda p: p.name != MANIFEST)
    for p in order:
        p.replace(old / p.name)
    fsync_dir(out)
    for s in SPLITS:
        (stage / s).replace(out / s)
    fsync_dir(out)
    (stage / MANIFEST).replace(out / MANIFEST)
    fsync_dir(out)
    shutil.rmtree(stage)
    shutil.rmtree(old)


def prepare(cfg: PrepareConfig, progress: bool = True) -> dict[str, Any]:
    """Run the whole preparation; returns the manifest it wrote."""
    t0 = time.perf_counter()
    replaced = check_output(cfg)
    found = scan(cfg)
    tiles = assign_splits(found.tiles, IMAGES_ONLY_SPLIT if cfg.images_only else cfg.split,
                          cfg.seed)
    # (say so before the work, not after)
    if tiles and not cfg.images_only and not any(t.split == "train" for t in tiles):
        raise ValueError(f"the training split would be empty: {len(tiles)} tile(s) at --split "
                         f"{','.join(f'{w:g}' for w in cfg.split)}; add tiles or raise its weight")
    # NOTE: the new dataset is built in a stage inside --out (same filesystem, so the moves are
    # renames) and replaces the old one only when complete: a refused, failed or killed run
    # leaves the old dataset as it was. A stage left by a killed run is ours; it goes first.
    out_made = missing_dirs(cfg.out)
    stage = fresh_staging_dir(cfg.out)
    try:
        manifest = _build(cfg, stage, found, tiles, t0, progress)
    except BaseException:
        discard_staging_dir(cfg.out, out_made)  # (and an --out made for it: left empty)
        raise
    # NOTE: from here the stage is the complete new dataset: an error inside publish must not
    # delete it (the old one may already be aside in .old).
    publish(stage, cfg.out, replaced)
    return manifest


def _build(cfg: PrepareConfig, out: Path, found: Scan, tiles: list[Tile], t0: float,
           progress: bool) -> dict[str, Any]:
    """Write the shards, truth CSVs and manifest of ``tiles`` into ``out`` (the stage)."""
    stats = BandStats(found.bands)
    classes = {s: np.zeros(NUM_CLASSES, np.int64) for s in SPLITS}
    shards: dict[str, list[ShardInfo]] = {s: [] for s in SPLITS}
    samples = dict.fromkeys(SPLITS, 0)
    buildings = dict.fromkeys(SPLITS, 0)
    writers: dict[str, ShardWriter | None] = dict.fromkeys(SPLITS)
    skipped, repaired = list(found.skipped), []
    bar = tqdm(total=len(tiles), desc="prepare", unit="tile" if cfg.chip_size is None else "chip",
               disable=not progress)
    with contextlib.ExitStack() as stack:
        truth = {}
        for s in SPLITS:
            if cfg.images_only:  # no truth.csv; the split directories all the same (publish)
                (out / s).mkdir(parents=True, exist_ok=True)
                continue
            f = stack.enter_context(atomic_open(out / s / "truth.csv", "w", newline=""))
            truth[s] = csv.writer(f)
            truth[s].writerow(TRUTH_HEADER)
        # (closed with the stage: a Ctrl-C while a shard was written left the pool to garbage
        # collection, after the 'interrupted' line)
        results = stack.enter_context(contextlib.closing(
            _bounded_map(_Call(found.bands, cfg.boundary_width), tiles, cfg.workers)))
        try:
            for res in results:
                bar.update()
                tile: Tile = res["tile"]
                if res.get("empty"):  # (counted, not listed: a strip has thousands)
                    found.source_of[tile.tif]["chips_empty"] += 1
                    continue
                if "skip" in res:
                    skipped.append({"image_id": tile.image_id, "path": str(tile.tif),
                                    "reason": res["skip"]})
                    continue
                s = tile.split
                w = writers[s]
                if w is None:
                    w = writers[s] = ShardWriter(out / s, len(shards[s]))
                w.write(res["sample"])
                samples[s] += 1
                if res["classes"] is not None:  # (a tile with a label)
                    truth[s].writerows(res["rows"])
                    buildings[s] += sum(1 for r in res["rows"] if r[1] != -1)
                    classes[s] += res["classes"]
                repaired += [{"image_id": tile.image_id, "note": n} for n in res["notes"]]
                if res["hist"] is not None:
                    stats.add(res["hist"])
                if w.samples >= cfg.shard_size:
                    shards[s].append(w.close())
                    writers[s] = None
            for s, w in writers.items():
                if w is not None:
                    shards[s].append(w.close())
                    writers[s] = None
        except BaseException:
            for w in writers.values():
                if w is not None:
                    w.abort()
            raise
        finally:
            bar.close()
        manifest = _manifest(cfg, found, stats, classes, shards, samples, buildings, skipped,
                             repaired, time.perf_counter() - t0)
    save_manifest(out, manifest)
    return manifest


def _manifest(cfg: PrepareConfig, found: Scan, stats: BandStats, classes: dict[str, np.ndarray],
              shards: dict[str, list[ShardInfo]], samples: dict[str, int],
              buildings: dict[str, int], skipped: list[dict[str, str]],
              repaired: list[dict[str, str]], seconds: float) -> dict[str, Any]:
    labels = not cfg.images_only
    train = classes["train"]
    if labels and train.sum() == 0:
        raise ValueError(f"the training split is empty: add tiles or change --split"
                         f"{first_skip(skipped)}")
    if not labels and sum(samples.values()) == 0:  # (else "no training pixels" below)
        empty = sum(src.get("chips_empty", 0) for src in found.sources)
        raise ValueError((f"no tile of {', '.join(map(str, cfg.raw))} could be read"
                          if not empty else
                          f"nothing to predict in {', '.join(map(str, cfg.raw))}: {empty} "
                          "chips are all nodata") + first_skip(skipped))
    config: dict[str, Any] = {"split": list(cfg.split) if labels else list(IMAGES_ONLY_SPLIT),
                              "seed": cfg.seed, "shard_size": cfg.shard_size,
                              "boundary_width": cfg.boundary_width}
    if cfg.chip_size is not None:  # (no keys without it: the manifest as before)
        config["chip_size"] = cfg.chip_size
        config["chip_margin"] = cfg.chip_margin
    # NOTE: without labels there is nothing to count: null, not zeros that read as "no building"
    return {
        "format_version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        # NOTE: labels false: --images-only; band_stats are then those of the test tiles
        "labels": labels,
        "config": config,
        "sources": found.sources,
        # NOTE: which imagery the bands are (a run trained on one refuses to predict another);
        # a manifest without it is from before --product: RGB-PanSharpen
        "product": cfg.product,
        "bands": found.bands,
        "dtype": "uint16",
        "layout": "HWC",
        "classes": list(CLASS_NAMES),
        "splits": {s: {"samples": samples[s], "buildings": buildings[s] if labels else None,
                       "truth": f"{s}/truth.csv" if labels else None,
                       "class_pixels": classes[s].tolist() if labels else None,
                       "shards": [i.to_json() for i in shards[s]]} for s in SPLITS},
        "band_stats": stats.to_json(),
        "class_frequencies": (train / train.sum()).tolist() if labels else None,
        "skipped": skipped,
        "repaired": repaired,
        "seconds": round(seconds, 3),
    }


IMAGES_ONLY_HELP = (
    "new imagery without labels: read only RAW/<--product>/ (geojson/ may be absent and is "
    "ignored), put every tile into the test split for trainer.predict, write no truth.csv; the "
    "manifest says \"labels\": false and training refuses the dataset; not with --split")


CHIP_SIZE_HELP = (
    "with --images-only: cut each image into chips of N x N from its top-left corner, "
    "round(side / N) per side, the last row and column taking the rest (N/2 to 1.5N px; the "
    "chips do not overlap, their --chip-margin context does), each chip a sample named "
    "<ImageId>_r<row>_c<col> (its pixel offset), but a chip all nodata (the image's nodata "
    "value, alpha band or mask), which is left out and counted; "
    "an image under 1.5N px both ways stays whole")

CHIP_MARGIN_HELP = (
    "with --chip-size N: each chip's sample holds M px of the image around it on each side "
    "(clipped to the image), context for the pixels near its edges; trainer.predict cuts each "
    f"prediction back to the chip; 0 to N px (default {DEFAULT_CHIP_MARGIN}; 0: none)")


PRODUCT_HELP = (
    "the imagery read, RAW/NAME/NAME_<ImageId>.tif: RGB-PanSharpen (3 bands: red, green, blue; "
    "the default) or MUL-PanSharpen (8 bands: coastal, blue, green, yellow, red, red edge, NIR1, "
    "NIR2); same grid and ImageIds, so labels and truth are the same; recorded in the manifest")


def _parse_chip_size(text: str) -> int:
    try:
        size = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--chip-size {text!r}: expected a whole number of px, "
                                         "e.g. 512") from None
    try:
        return check_chip_size(size)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _parse_chip_margin(text: str) -> int:
    try:
        return int(text)  # (0 <= M <= N is checked with --chip-size in main)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--chip-margin {text!r}: expected a whole number of "
                                         "px, e.g. 64") from None


def _parse_split(text: str) -> tuple[float, float, float]:
    try:
        parts = tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"--split {text!r}: expected e.g. 70,15,15") from None
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"--split {text!r}: expected three numbers")
    return parts  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dataio.prepare",
                                description=__doc__.split("\n")[0])
    p.add_argument("--raw", type=Path, action="append", required=True,
                   help="a SpaceNet AOI directory (repeat for several)")
    p.add_argument("--out", type=Path, required=True, help="dataset directory to create")
    # (default None: --images-only refuses a --split given, even the default's)
    p.add_argument("--split", type=_parse_split, default=None,
                   help="train,val,test weights (default "
                   f"{','.join(f'{w:g}' for w in DEFAULT_SPLIT)})")
    p.add_argument("--seed", type=int, default=0,
                   help="seed of the split's shuffle (default %(default)s)")
    p.add_argument("--workers", type=int, default=min(4, len(os.sched_getaffinity(0))),
                   help="worker processes (default: this machine's cores, at most 4)")
    p.add_argument("--shard-size", type=int, default=200,
                   help="samples per shard (default %(default)s)")
    p.add_argument("--boundary-width", type=float, default=DEFAULT_BOUNDARY_WIDTH,
                   help="boundary band, px on each side of every outline (default %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")
    p.add_argument("--images-only", action="store_true", help=IMAGES_ONLY_HELP)
    p.add_argument("--chip-size", type=_parse_chip_size, default=None, metavar="N",
                   help=CHIP_SIZE_HELP)
    p.add_argument("--chip-margin", type=_parse_chip_margin, default=None, metavar="M",
                   help=CHIP_MARGIN_HELP)
    p.add_argument("--product", default=DEFAULT_PRODUCT, metavar="NAME", help=PRODUCT_HELP)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    if args.images_only and args.split is not None:
        p.error("--split and --images-only do not go together: without labels every tile goes "
                "into the test split")
    if args.chip_size is not None and not args.images_only:
        p.error(CHIPS_NEED_IMAGES_ONLY)
    if args.chip_margin is not None:
        if args.chip_size is None:
            p.error(MARGIN_NEEDS_CHIPS)
        try:
            check_chip_margin(args.chip_margin, args.chip_size)
        except ValueError as e:
            p.error(str(e))
    try:
        # NOTE: the first Ctrl-C (or SIGTERM) sets both aside (postproc.pools), so a second one
        # cannot cut the removal of the stage or the pool's shutdown short
        with stop_signals():
            cfg = PrepareConfig(raw=args.raw, out=args.out, split=args.split or DEFAULT_SPLIT,
                                seed=args.seed, workers=args.workers,
                                shard_size=args.shard_size, boundary_width=args.boundary_width,
                                overwrite=args.overwrite, images_only=args.images_only,
                                chip_size=args.chip_size, chip_margin=args.chip_margin,
                                product=args.product)
            m = prepare(cfg, progress=not args.quiet)
    except (ValueError, OSError) as e:
        print(f"dataio.prepare: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # the stage is gone; a dataset already there stays (publish)
        ignore_further_sigint()  # (a further Ctrl-C in the interpreter's exit: a traceback)
        print(f"dataio.prepare: {stopped_by()}; rerun the same command to prepare {args.out} "
              "(a dataset already there is kept until the new one is complete)", file=sys.stderr)
        return stop_code()
    counts = ", ".join(f"{s} {m['splits'][s]['samples']}" for s in SPLITS)
    n = sum(m["splits"][s]["samples"] for s in SPLITS)
    for src in m["sources"]:
        if src.get("labels_ignored"):
            print(f"  {Path(src['raw']) / LABEL_DIR}: ignored (--images-only)")
    chipped = ""
    if cfg.chip_size is not None:
        chips = sum(src["chips"] for src in m["sources"])
        images = sum(src["images_chipped"] for src in m["sources"])
        empty = sum(src["chips_empty"] for src in m["sources"])
        chipped = (f"; {_count(images, 'image')} cut into {_count(chips, 'chip')} of "
                   f"{cfg.chip_size} px, {cfg.chip_margin} px margin"
                   f"{f', {empty} all nodata left out' if empty else ''}")
    product = ("" if cfg.product == DEFAULT_PRODUCT else
               f"; {cfg.product}, {m['bands']} bands")  # (the default's line as before)
    # NOTE: with --chip-size a sample is a chip or a whole image, not a tile of the AOI: the
    # line said "prepared 16 tiles" of 1 image cut into 16 chips
    unit = "tile" if cfg.chip_size is None else "sample"
    print(f"prepared {_count(n, unit)} into {cfg.out} ({counts}{product}"
          f"{'; images only, no labels' if cfg.images_only else ''}{chipped}) in "
          f"{m['seconds']:.1f}s "
          f"({n / max(m['seconds'], 1e-9):.1f} {unit}s/s, {_workers_said(cfg.workers)}); "
          f"skipped {len(m['skipped'])}")
    for s in m["skipped"][:10]:
        print(f"  skipped {s['path']}: {s['reason']}")
    if len(m["skipped"]) > 10:
        print(f"  ... and {len(m['skipped']) - 10} more (see {cfg.out / MANIFEST})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
