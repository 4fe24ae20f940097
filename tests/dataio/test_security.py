"""Untrusted input: shard decoding never unpickles, and names can never leave a directory."""

from __future__ import annotations

import io
import json
import os
import tarfile
from pathlib import Path

import numpy as np
import pytest
from wds2idx import IndexCreator

from dataio.fixtures import write_dataset
from dataio.loader import LoaderConfig, build_loader
from dataio.prepare import PrepareConfig, prepare
from dataio.shards import check_key, encode_png, encode_sample
from dataio.synth import SynthConfig, write_aoi


class _Payload:
    """Unpickling this would create a marker file: the proof that code ran."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def _tile(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 2000, (16, 16, 3)).astype(np.uint16),
            rng.integers(0, 3, (16, 16)).astype(np.uint8))


def _add_raw_shard(root: Path, members: list[tuple[str, bytes]]) -> None:
    """Append a hand-made shard (and its DALI index) to the val split of ``root``'s manifest."""
    tar_path = root / "val" / "shard-000001.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    idx = tar_path.with_suffix(".idx")
    with IndexCreator(str(tar_path), str(idx), verbose=False) as ic:
        ic.create_index()
    manifest = json.loads((root / "manifest.json").read_text())
    n = len({name.split("/")[-1].partition(".")[0] for name, _ in members})
    manifest["splits"]["val"]["shards"].append({
        "name": tar_path.name, "index": idx.name, "samples": n,
        "bytes": tar_path.stat().st_size, "index_bytes": idx.stat().st_size})
    manifest["splits"]["val"]["samples"] += n
    (root / "manifest.json").write_text(json.dumps(manifest))


def _members(key: str, img_bytes: bytes) -> list[tuple[str, bytes]]:
    _, mask = _tile(0)
    meta = json.dumps({"image_id": key, "height": 16, "width": 16}).encode()
    return [(f"{key}.img.npy", img_bytes), (f"{key}.mask.png", encode_png(mask)),
            (f"{key}.meta.json", meta)]


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_a_pickled_npy_is_never_unpickled(tmp_path: Path, backend: str) -> None:
    root = write_dataset(tmp_path / "d", {"val": [("good", *_tile(1))]})
    marker, control = tmp_path / "pwned", tmp_path / "ctrl"  # equal lengths: same pickle size

    def npy(path: Path) -> bytes:
        evil = np.empty(2, dtype=object)
        evil[0] = _Payload(str(path))
        buf = io.BytesIO()
        np.save(buf, evil, allow_pickle=True)
        return buf.getvalue()

    np.load(io.BytesIO(npy(control)), allow_pickle=True)  # loaded the unsafe way, code runs
    assert control.exists()
    _add_raw_shard(root, _members("evil", npy(marker)))
    cfg = LoaderConfig(backend=backend, batch_size=2, num_threads=1)
    with build_loader(root, "val", cfg, train=False) as loader:
        keys = [k for b in loader for k, v in zip(b.keys, b.valid.tolist(), strict=True) if v]
        stats = loader.stats.as_dict()
    assert keys == ["good"]
    assert sum(stats["samples_skipped"].values()) == 1
    assert not marker.exists()


def test_member_names_that_climb_out_refuse_the_shard(tmp_path: Path) -> None:
    root = write_dataset(tmp_path / "d", {"val": [("good", *_tile(1))]})
    image, mask = _tile(2)
    sample = encode_sample("fine", image, mask, {"image_id": "fine"})
    members = [(f"../../escape.{k}", v) for k, v in sample.items() if k != "__key__"]
    _add_raw_shard(root, members)
    cfg = LoaderConfig(backend="torch", batch_size=2, num_threads=0)
    with build_loader(root, "val", cfg, train=False) as loader:
        keys = [k for b in loader for k in b.keys if k]
        assert loader.stats.as_dict()["shards_skipped"] == {"index_invalid": 1}
    assert keys == ["good"]


def test_image_ids_that_are_not_plain_names_are_skipped(tmp_path: Path) -> None:
    raw = tmp_path / "raw"
    write_aoi(SynthConfig(out=raw, tiles=3, seed=1, size=64))
    img_dir = raw / "RGB-PanSharpen"
    src = img_dir / "RGB-PanSharpen_AOI_2_Vegas_img3.tif"
    src.rename(img_dir / "RGB-PanSharpen_AOI_2_Vegas_img3.v2.tif")
    m = prepare(PrepareConfig([raw], tmp_path / "out", split=(100, 0, 0)), progress=False)
    assert [s["reason"] for s in m["skipped"]] == [
        "ImageId 'AOI_2_Vegas_img3.v2' has characters other than letters, digits, '_', '-'"]
    assert m["splits"]["train"]["samples"] == 2


def test_an_image_id_that_ends_in_a_newline_is_skipped_and_no_key_may(tmp_path: Path) -> None:
    """'$' matched before a final newline: a file named ``..._img3\\n.tif`` was prepared as the
    ImageId 'AOI_2_Vegas_img3\\n', a row break inside the truth CSV's first field."""
    raw = tmp_path / "raw"
    write_aoi(SynthConfig(out=raw, tiles=3, seed=1, size=64))
    img_dir = raw / "RGB-PanSharpen"
    (img_dir / "RGB-PanSharpen_AOI_2_Vegas_img3.tif").rename(
        img_dir / "RGB-PanSharpen_AOI_2_Vegas_img3\n.tif")
    m = prepare(PrepareConfig([raw], tmp_path / "out", split=(100, 0, 0)), progress=False)
    assert [s["reason"] for s in m["skipped"]] == [
        "ImageId 'AOI_2_Vegas_img3\\n' has characters other than letters, digits, '_', '-'"]
    assert m["splits"]["train"]["samples"] == 2
    with pytest.raises(ValueError, match="must match"):
        check_key("AOI_2_Vegas_img3\n")
