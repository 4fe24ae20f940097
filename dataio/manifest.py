"""``DATA/manifest.json``: what a prepared dataset holds, and the statistics training needs.

Also the streaming statistics that fill it: per-band histograms give exact percentiles in memory
that does not grow with the number of tiles.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dataio.atomic import atomic_write_text
from dataio.classes import NUM_CLASSES
from dataio.spacenet import DEFAULT_PRODUCT

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
SPLITS = ("train", "val", "test")
LOW_PCT, HIGH_PCT = 2.0, 98.0  # the SpaceNet-2 winner's clipping percentiles


class ManifestError(ValueError):
    pass


class BandStats:
    """Streaming per-band histograms of uint16 pixels (exact percentiles, flat memory)."""

    def __init__(self, bands: int) -> None:
        self.hist = np.zeros((bands, 1), np.int64)

    @staticmethod
    def of_image(img_hwc: np.ndarray) -> list[np.ndarray]:
        """Per-band histograms of one image, trimmed to its maximum (cheap to send between
        processes: 2048 bins for 11-bit data)."""
        return [np.bincount(img_hwc[..., b].ravel()) for b in range(img_hwc.shape[-1])]

    def add(self, hists: list[np.ndarray]) -> None:
        longest = max(len(h) for h in hists)
        if longest > self.hist.shape[1]:
            grown = np.zeros((self.hist.shape[0], longest), np.int64)
            grown[:, : self.hist.shape[1]] = self.hist
            self.hist = grown
        for b, h in enumerate(hists):
            self.hist[b, : len(h)] += h

    def to_json(self) -> dict[str, Any]:
        if self.hist.sum() == 0:
            raise ManifestError("no training pixels: the training split is empty")
        values = np.arange(self.hist.shape[1], dtype=np.float64)
        out: dict[str, list[float]] = {"p2": [], "p98": [], "mean": [], "std": [], "min": [],
                                       "max": []}
        for h in self.hist:
            nz = np.nonzero(h)[0]
            # NOTE: 0 is SpaceNet's no-data (the black of tiles at a strip's edge); the winner
            # left it out of the percentiles ("Remove sensored mask", XD_XD's v5_im.py), else
            # a split with over 2% of it clips at p2 = 0 and loses contrast.
            lo, hi = _clip_range(np.concatenate(([0], h[1:])))
            if hi <= lo:  # no other value, or one alone: the histogram with its no-data
                lo, hi = _clip_range(h)
            if hi <= lo:
                # NOTE: a band (nearly) constant over 96% of the pixels, e.g. no-data: the loader
                # needs p98 > p2 to scale it, so its range reaches the largest value it holds
                # (a constant band gets a unit range and reads as 0).
                hi = max(float(nz[-1]), lo + 1.0)
            out["p2"].append(lo)
            out["p98"].append(hi)
            mean = float((h * values).sum() / h.sum())
            out["mean"].append(mean)
            out["std"].append(float(np.sqrt((h * (values - mean) ** 2).sum() / h.sum())))
            out["min"].append(float(nz[0]))
            out["max"].append(float(nz[-1]))
        return out


def _clip_range(h: np.ndarray) -> tuple[float, float]:
    """The LOW_PCT and HIGH_PCT percentiles of a histogram ((0, 0) if it is empty)."""
    if h.sum() == 0:
        return 0.0, 0.0
    cdf = np.cumsum(h) / h.sum()
    return (float(np.searchsorted(cdf, LOW_PCT / 100.0)),
            float(np.searchsorted(cdf, HIGH_PCT / 100.0)))


@dataclass(frozen=True)
class Manifest:
    """A loaded manifest with the accessors the loader and trainer use."""

    root: Path
    data: dict[str, Any]

    @property
    def bands(self) -> int:
        return int(self.data["bands"])

    @property
    def product(self) -> str:
        """The imagery the samples hold (``prepare --product``); a manifest without the key is
        from before the option, which read RGB-PanSharpen alone."""
        return str(self.data.get("product", DEFAULT_PRODUCT))

    def imagery(self) -> str:
        """``8-band MUL-PanSharpen``: for a message about what a model and a dataset take."""
        return f"{self.bands}-band {self.product}"

    @property
    def labels(self) -> bool:
        """Whether the dataset has labels (masks, truth CSVs); False for one prepared with
        ``--images-only``. A manifest without the key is from before it: labelled."""
        return self.data.get("labels", True) is not False

    def require_labels(self, what: str) -> None:
        """Raise :class:`ManifestError` naming the file if the dataset has no labels."""
        if not self.labels:
            raise ManifestError(f"{self.root / MANIFEST}: the dataset has no labels (prepared "
                                f"with --images-only); {what} needs a labelled dataset (prepare "
                                "one without --images-only)")

    @property
    def num_classes(self) -> int:
        self.require_labels("the class count")
        return len(self.data["class_frequencies"])

    def _split(self, split: str) -> dict[str, Any]:
        # NOTE: the schema check does not require every split (a hand-made dataset may lack
        # one): a missing one is named here, not a KeyError traceback (train --check, validate)
        if split not in self.data["splits"]:
            known = ", ".join(self.data["splits"])
            raise ManifestError(f"{self.root / MANIFEST}: no split {split!r} (has {known})")
        return self.data["splits"][split]

    def shards(self, split: str) -> list[dict[str, Any]]:
        return list(self._split(split)["shards"])

    def samples(self, split: str) -> int:
        return int(self._split(split)["samples"])

    def split_dir(self, split: str) -> Path:
        return self.root / split

    def percentiles(self) -> tuple[list[float], list[float]]:
        stats = self.data["band_stats"]
        return list(stats["p2"]), list(stats["p98"])

    @property
    def class_frequencies(self) -> list[float]:
        self.require_labels("the loss's class frequencies")
        return list(self.data["class_frequencies"])

    def fingerprint(self, splits: tuple[str, ...] = ("train", "val")) -> str:
        """A digest of what ``splits`` hold (their sample, building and class-pixel counts), not
        of where the dataset lies: a copy elsewhere, or the same AOIs prepared again alike, give
        the same one; another --seed, --split, --boundary-width or set of AOIs another.

        NOTE: one of two fingerprints of a dataset, for another question than the other
        (``dataio.sharding.SampleIndex.fingerprint``): this one asks "is it the dataset a
        checkpoint trained on" (``Trainer.resume`` refuses another), so it ignores how the
        samples are laid out in shards (another --shard-size, a shard left out as damaged: the
        same data). The other asks "is it the same list of samples, in the same order": ranks
        must agree on it, and a loader's mid-epoch position means nothing in another list. A
        dataset re-sharded therefore resumes (this one agrees) at the start of its epoch (the
        other does not); one unifying both would refuse it, or take positions in one list
        for another's."""
        held = {s: {k: self.data["splits"].get(s, {}).get(k)
                    for k in ("samples", "buildings", "class_pixels")} for s in splits}
        return hashlib.sha256(json.dumps(held, sort_keys=True).encode()).hexdigest()[:16]


def load_manifest(root: Path) -> Manifest:
    """Read ``root/manifest.json``; a missing or foreign file, or a field that readers use with
    the wrong type or shape, is a :class:`ManifestError` naming the file (and the field)."""
    path = Path(root) / MANIFEST
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if not Path(root).is_dir():  # (a typo in --data: say that, not "no manifest")
            raise ManifestError(f"{root}: no such directory (a dataset made by "
                                "dataio.prepare was expected)") from None
        raise ManifestError(f"{path}: not found; is {root} a dataset made by dataio.prepare? "
                            "(an interrupted prepare leaves no manifest)") from None
    except OSError as e:  # (unreadable: permissions, an I/O error; a traceback in every reader)
        raise ManifestError(f"{path}: cannot read ({e})") from None
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise ManifestError(f"{path}: not valid UTF-8 JSON ({e})") from None
    if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
        version = data.get("format_version") if isinstance(data, dict) else None
        raise ManifestError(f"{path}: format_version {version!r}, expected {FORMAT_VERSION}")
    _check_schema(path, data)
    return Manifest(Path(root), data)


# ---- schema: what readers index into, checked once so a bad value is named, not a traceback ----

SHARD_FIELDS = {"name": str, "index": str, "samples": int, "bytes": int, "index_bytes": int}


def _check_schema(path: Path, data: dict[str, Any]) -> None:
    """Raise :class:`ManifestError` naming ``path`` and the field for a value of the wrong type."""
    for key in ("bands", "splits", "band_stats", "class_frequencies"):
        if key not in data:
            raise ManifestError(f"{path}: missing {key!r}")
    bands = _count(path, "bands", data["bands"], minimum=1)
    splits = _mapping(path, "splits", data["splits"])
    for name, split in splits.items():
        where = f"splits.{name}"
        split = _mapping(path, where, split)
        _count(path, f"{where}.samples", _field(path, where, split, "samples"))
        shards = _field(path, where, split, "shards")
        if not isinstance(shards, list):
            raise _wrong(path, f"{where}.shards", "a list", shards)
        for i, info in enumerate(shards):
            _check_shard_entry(path, f"{where}.shards[{i}]", info)
    stats = _mapping(path, "band_stats", data["band_stats"])
    for key in ("p2", "p98"):
        _numbers(path, f"band_stats.{key}", _field(path, "band_stats", stats, key), bands)
    product = data.get("product", DEFAULT_PRODUCT)
    if not isinstance(product, str) or not product:
        raise _wrong(path, "product", "a product name such as \"MUL-PanSharpen\"", product)
    labels = data.get("labels", True)
    if not isinstance(labels, bool):
        raise _wrong(path, "labels", "true or false", labels)
    # NOTE: a dataset without labels has no class pixels to count: null, not made-up numbers
    if labels or data["class_frequencies"] is not None:
        _numbers(path, "class_frequencies", data["class_frequencies"], NUM_CLASSES)


def _check_shard_entry(path: Path, where: str, info: Any) -> None:
    info = _mapping(path, where, info)
    for key, kind in SHARD_FIELDS.items():
        value = _field(path, where, info, key)
        if kind is int:
            _count(path, f"{where}.{key}", value)
        elif not isinstance(value, str) or not _plain_name(value):
            # NOTE: readers join it to the split directory; a path must not lead out of it.
            raise _wrong(path, f"{where}.{key}", "a plain file name", value)


def _plain_name(name: str) -> bool:
    return bool(name) and name not in (".", "..") and not any(c in name for c in "/\\\0")


def _field(path: Path, where: str, obj: dict[str, Any], key: str) -> Any:
    if key not in obj:
        raise ManifestError(f"{path}: {where} has no {key!r}")
    return obj[key]


def _mapping(path: Path, where: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _wrong(path, where, "an object", value)
    return value


def _count(path: Path, where: str, value: Any, minimum: int = 0) -> int:
    # NOTE: bool is an int in Python, but true/false in JSON is no count.
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise _wrong(path, where, f"an integer >= {minimum}", value)
    return value


def _numbers(path: Path, where: str, value: Any, length: int) -> list[float]:
    ok = isinstance(value, list) and len(value) == length and all(
        isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        for v in value)
    if not ok:
        raise _wrong(path, where, f"a list of {length} finite numbers", value)
    return value


def _wrong(path: Path, where: str, what: str, value: Any) -> ManifestError:
    shown = repr(value)
    shown = shown if len(shown) <= 60 else shown[:57] + "..."
    return ManifestError(f"{path}: {where} must be {what}, got {shown}")


def save_manifest(root: Path, data: dict[str, Any]) -> Path:
    path = Path(root) / MANIFEST
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=False) + "\n")
    return path
