"""dataio.shards: a shard appears under its final name only once every member decodes and its DALI
index lists every sample; a shard that fails either check leaves no file behind."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from dataio import shards
from dataio.shards import ShardError, ShardWriter, check_shard, encode_sample


def _sample(key: str, mask_rows: int = 4) -> dict[str, object]:
    image = np.arange(4 * 5 * 3, dtype=np.uint16).reshape(4, 5, 3)
    return encode_sample(key, image, np.ones((mask_rows, 5), np.uint8), {"image_id": key})


def test_a_closed_shard_is_in_place_and_matches_its_entry(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, 3)
    for key in ("a", "b"):
        w.write(_sample(key))
    info = w.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000003.idx", "shard-000003.tar"]
    assert info.samples == 2 and check_shard(tmp_path, info.to_json()) is None


def test_a_mask_of_another_size_than_its_image_fails_the_shard(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, 0)
    w.write(_sample("a"))
    w.write(_sample("b", mask_rows=3))  # would reach the loss misaligned with its image
    with pytest.raises(ShardError, match=r"shard-000000\.tar\.tmp:b: mask\.png is uint8 \(3, 5\)"):
        w.close()
    assert list(tmp_path.iterdir()) == []


class _MiscountingIndex:
    """Stands in for wds2idx's IndexCreator and writes an index that lists one sample only."""

    def __init__(self, tar: str, idx: str, verbose: bool = True) -> None:
        self.idx = Path(idx)

    def __enter__(self) -> _MiscountingIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def create_index(self) -> None:
        self.idx.write_text("v1.2 1\n")


def test_an_index_that_does_not_list_every_sample_fails_the_shard(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(shards, "IndexCreator", _MiscountingIndex)
    w = ShardWriter(tmp_path, 0)
    for key in ("a", "b"):
        w.write(_sample(key))
    with pytest.raises(ShardError, match=r"\.shard-000000\.idx\.tmp: index does not list 2"):
        w.close()
    assert list(tmp_path.iterdir()) == []  # neither the tar, nor the index, nor their temps


def test_a_key_written_twice_fails_the_shard(tmp_path: Path) -> None:
    """Read back, the two samples are one (members group by key): the shard would hold a tile
    fewer than was written to it, the second one's members over the first's."""
    w = ShardWriter(tmp_path, 0)
    for key in ("a", "a", "b"):
        w.write(_sample(key))
    with pytest.raises(ShardError, match=r"\.shard-000000\.tar\.tmp: wrote 3 samples, read back 2"):
        w.close()
    assert list(tmp_path.iterdir()) == []
