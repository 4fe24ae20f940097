"""Tiny prepared datasets written straight from arrays, for tests and benchmarks.

The same on-disk format as :mod:`dataio.prepare` (shards through :class:`ShardWriter`, DALI
indexes, ``manifest.json``), without rasters or labels, and with percentiles chosen by the caller
so that expected tensors can be written down exactly. ``aligned_tile`` makes a tile whose mask can
be read back from its image after any augmentation (see its docstring).
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from dataio.manifest import FORMAT_VERSION, save_manifest
from dataio.shards import ShardWriter, encode_sample

Sample = tuple[str, np.ndarray, np.ndarray]  # key, uint16 HWC image, uint8 HW mask

# Band-0 levels of ``aligned_tile`` per class, and thresholds that separate them after a
# brightness/contrast change of up to 10% and normalisation with ALIGNED_P2/ALIGNED_P98.
ALIGNED_LEVELS = (100, 1000, 2000)
ALIGNED_P2, ALIGNED_P98 = [0.0, 0.0, 0.0], [4000.0, 4000.0, 4000.0]
ALIGNED_THRESHOLDS = (0.15, 0.39)


def aligned_tile(height: int, width: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A random blocky 0/1/2 mask with no symmetry, and an image whose band 0 encodes it
    (``ALIGNED_LEVELS`` plus noise < 50), band 1 random and band 2 a horizontal ramp."""
    rng = np.random.default_rng(seed)
    cells = rng.integers(0, 3, (height // 8 + 1, width // 8 + 1)).astype(np.uint8)
    mask = np.kron(cells, np.ones((8, 8), np.uint8))[:height, :width]
    mask[:3, :5] = 2  # an asymmetric corner mark
    image = np.empty((height, width, 3), np.uint16)
    image[..., 0] = np.take(ALIGNED_LEVELS, mask) + rng.integers(0, 50, (height, width))
    image[..., 1] = rng.integers(0, 4000, (height, width))
    image[..., 2] = np.linspace(0, 3999, width, dtype=np.uint16)[None, :]
    return image, mask


def mask_from_aligned(image_chw: np.ndarray) -> np.ndarray:
    """Read the mask back from band 0 of a normalised, augmented ``aligned_tile``."""
    low, high = ALIGNED_THRESHOLDS
    return (image_chw[0] > low).astype(np.int64) + (image_chw[0] > high)


def write_dataset(root: Path, splits: dict[str, Iterable[Sample]], shard_size: int = 4,
                  p2: list[float] | None = None, p98: list[float] | None = None) -> Path:
    """Write ``root/{split}/shard-*.tar`` (+ ``.idx``) and ``root/manifest.json``."""
    root = Path(root)
    manifest: dict[str, Any] = {"format_version": FORMAT_VERSION, "splits": {},
                                "class_frequencies": [0.6, 0.2, 0.2], "skipped": []}
    bands = None
    for split, samples in splits.items():
        shards: list[dict[str, Any]] = []
        writer, count = None, 0
        for key, image, mask in samples:
            bands = image.shape[2]
            if writer is None:
                writer = ShardWriter(root / split, len(shards))
            meta = {"image_id": key, "height": image.shape[0], "width": image.shape[1],
                    "bands": bands, "transform": [0.3, 0, 0, 0, -0.3, 0], "crs": "EPSG:32611"}
            writer.write(encode_sample(key, image, mask, meta))
            count += 1
            if writer.samples == shard_size:
                shards.append(writer.close().to_json())
                writer = None
        if writer is not None:
            shards.append(writer.close().to_json())
        manifest["splits"][split] = {"samples": count, "shards": shards}
    manifest["bands"] = bands or 3
    manifest["band_stats"] = {"p2": p2 or [100.0] * manifest["bands"],
                              "p98": p98 or [1100.0] * manifest["bands"]}
    save_manifest(root, manifest)
    return root


def edit_manifest(root: Path, split: str, shard: int, **changes: Any) -> None:
    """Change one shard's manifest entry (tests of the checks that run before reading)."""
    path = Path(root) / "manifest.json"
    data = json.loads(path.read_text())
    data["splits"][split]["shards"][shard].update(changes)
    path.write_text(json.dumps(data))
