"""dataio.prepare --images-only: new imagery without labels (SpaceNet's *_Test_public AOIs)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from dali_helpers import dali_read

from dataio.augment import MASK_PAD
from dataio.fixtures import write_dataset
from dataio.loader import IGNORE_INDEX, LoaderConfig, build_loader
from dataio.manifest import ManifestError, load_manifest
from dataio.prepare import PrepareConfig
from dataio.prepare import main as prepare_main
from dataio.shards import check_shard, decode_sample, iter_tar_samples

SPLITS = ("train", "val", "test")


def _tile_ids(raw: Path) -> list[str]:
    return sorted(t.name[len("RGB-PanSharpen_"):-4] for t in (raw / "RGB-PanSharpen").glob("*.tif"))


def _samples(data: Path) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    return {k: decode_sample(mem) for shard in sorted((data / "test").glob("shard-*.tar"))
            for k, mem in iter_tar_samples(shard)}


def test_every_tile_goes_to_test_with_no_labels(images_only_dataset: Path,
                                                unlabelled_aoi: Path) -> None:
    """An AOI without geojson/ (refused before: every tile was skipped for its missing label)
    becomes a test split of every tile, no truth.csv, and a manifest that says it has no labels."""
    m = load_manifest(images_only_dataset)
    assert m.data["labels"] is False and not m.labels
    assert [m.samples(s) for s in SPLITS] == [0, 0, 6] and len(m.shards("test")) == 2
    for info in m.shards("test"):
        assert check_shard(images_only_dataset / "test", info) is None
    assert not list(images_only_dataset.rglob("truth.csv"))
    assert m.data["class_frequencies"] is None and m.data["skipped"] == []
    for s in SPLITS:  # nothing counted, rather than zeros that read as "no building"
        split = m.data["splits"][s]
        assert split["buildings"] is split["class_pixels"] is split["truth"] is None
    with pytest.raises(ManifestError, match="no labels"):
        _ = m.class_frequencies  # (what the trainer's loss would take)
    got = _samples(images_only_dataset)
    assert sorted(got) == _tile_ids(unlabelled_aoi)
    for key, (img, mask, meta) in got.items():
        assert img.dtype == np.uint16 and img.shape == (128, 128, 3)
        assert (mask == MASK_PAD).all()  # no label anywhere, not background
        assert meta["image_id"] == key and meta["building_count"] is None
        assert meta["crs"] == "EPSG:32611" and len(meta["transform"]) == 6
    # the percentiles are those of these tiles (there is no training split)
    pix = np.concatenate([img.reshape(-1, 3) for img, _, _ in got.values()])
    pix = pix[(pix > 0).all(axis=1)]  # (without SpaceNet's no-data, as the manifest counts)
    p2, p98 = m.percentiles()
    np.testing.assert_allclose(np.percentile(pix, 2, axis=0), p2, atol=2)
    np.testing.assert_allclose(np.percentile(pix, 98, axis=0), p98, atol=2)


def test_shards_read_by_webdataset_and_dali(images_only_dataset: Path,
                                            unlabelled_aoi: Path) -> None:

    tars = sorted((images_only_dataset / "test").glob("shard-*.tar"))
    ds = wds.WebDataset([str(t) for t in tars], shardshuffle=False).decode("l8")
    keys = []
    for sample in ds:
        assert sample["img.npy"].dtype == np.uint16 and sample["img.npy"].shape == (128, 128, 3)
        assert (sample["mask.png"] == MASK_PAD).all()
        assert sample["meta.json"]["image_id"] == sample["__key__"]
        keys.append(sample["__key__"])
    assert sorted(keys) == _tile_ids(unlabelled_aoi)

    img, mask, meta = dali_read(tars, 6)
    assert sorted(json.loads(bytes(meta.at(i)))["image_id"] for i in range(6)) == sorted(keys)
    for i in range(6):
        assert np.asarray(img.at(i)).dtype == np.uint16
        assert (np.asarray(mask.at(i)) == MASK_PAD).all()


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_loader_gives_masks_of_ignore_index_only(images_only_dataset: Path,
                                                 backend: str) -> None:
    """Every pixel of such a batch is "no label" for a loss or a metric, in a batch full of
    tiles too (before, MASK_PAD became IGNORE_INDEX only in batches with padding or a skip)."""
    cfg = LoaderConfig(backend=backend, batch_size=3, num_threads=1, read_ahead=0)
    keys = []
    with build_loader(images_only_dataset, "test", cfg, train=False,
                      device=torch.device("cpu")) as loader:
        for batch in loader:
            assert bool(batch.valid.all())  # (6 tiles, batches of 3: no padding)
            assert (batch.mask == IGNORE_INDEX).all()
            assert torch.isfinite(batch.image).all()
            keys += batch.keys
    assert len(keys) == 6


def test_split_with_images_only_is_refused(unlabelled_aoi: Path, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stop:
        prepare_main(["--raw", str(unlabelled_aoi), "--out", str(tmp_path / "d"),
                      "--images-only", "--split", "70,15,15"])
    assert stop.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--split" in last and "--images-only" in last
    assert not (tmp_path / "d").exists()  # before any work
    with pytest.raises(ValueError, match="--split and --images-only"):
        PrepareConfig([unlabelled_aoi], tmp_path / "d", split=(80, 10, 10), images_only=True)


def test_labels_beside_the_images_are_ignored_in_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from dataio.synth import SynthConfig, write_aoi

    raw = tmp_path / "AOI_2_Vegas_Train"
    write_aoi(SynthConfig(out=raw, tiles=3, seed=4, size=64))
    assert prepare_main(["--raw", str(raw), "--out", str(tmp_path / "d"), "--images-only",
                         "--workers", "0", "--quiet"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    said = [line for line in out if "ignored" in line]
    assert len(said) == 1 and str(raw / "geojson" / "buildings") in said[0]
    assert "--images-only" in said[0]
    m = load_manifest(tmp_path / "d")
    assert not m.labels and m.data["sources"][0]["labels_ignored"] is True
    assert m.samples("test") == 3 and not list((tmp_path / "d").rglob("truth.csv"))
    assert all((mask == MASK_PAD).all() for _, mask, _ in _samples(tmp_path / "d").values())


def test_a_manifest_without_the_labels_key_is_labelled(tmp_path: Path) -> None:
    """(every dataset prepared before --images-only) and a labels value that is no bool is
    named, not taken for true"""
    from dataio.fixtures import aligned_tile

    data = write_dataset(tmp_path / "d", {"train": [("a", *aligned_tile(16, 16, 0))]})
    m = load_manifest(data)
    assert "labels" not in m.data and m.labels and m.class_frequencies == [0.6, 0.2, 0.2]
    path = data / "manifest.json"
    path.write_text(json.dumps({**m.data, "labels": "no"}))
    with pytest.raises(ManifestError, match="labels must be true or false"):
        load_manifest(data)
    # a labelled dataset still needs its class frequencies
    path.write_text(json.dumps({**m.data, "labels": True, "class_frequencies": None}))
    with pytest.raises(ManifestError, match="class_frequencies"):
        load_manifest(data)
