"""dataio.prepare --product: SpaceNet's 8-band MUL-PanSharpen imagery instead of RGB-PanSharpen."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import rasterio
import torch
import webdataset as wds
from dali_helpers import dali_read

from dataio.loader import LoaderConfig, build_loader
from dataio.manifest import MANIFEST, load_manifest
from dataio.prepare import PrepareConfig, prepare
from dataio.prepare import main as prepare_main
from dataio.shards import decode_sample, iter_tar_samples

MUL = "MUL-PanSharpen"
SPLITS = ("train", "val", "test")


def _samples(data: Path) -> dict[str, tuple[str, np.ndarray, np.ndarray, dict]]:
    return {k: (s, *decode_sample(mem)) for s in SPLITS
            for shard in sorted((data / s).glob("shard-*.tar"))
            for k, mem in iter_tar_samples(shard)}


def _tif(raw: Path, product: str, iid: str) -> np.ndarray:
    with rasterio.open(raw / product / f"{product}_{iid}.tif") as ds:
        return ds.read().transpose(1, 2, 0)


def test_synth_mul_lies_on_the_rgb_grid_with_its_bands(mul_aoi: Path, tmp_path: Path) -> None:
    """--mul: 8 bands per tile, georeferenced like its RGB tile, with red, green, blue (bands 5,
    3, 2) those of the RGB tile; without it, no MUL-PanSharpen/ (the RGB bytes the same)."""
    rgb_tifs = sorted((mul_aoi / "RGB-PanSharpen").glob("*.tif"))
    assert len(rgb_tifs) == 8
    for rgb_tif in rgb_tifs:
        iid = rgb_tif.name[len("RGB-PanSharpen_"):-4]
        with rasterio.open(rgb_tif) as rgb, rasterio.open(mul_aoi / MUL / f"{MUL}_{iid}.tif") as m:
            assert (m.count, m.dtypes[0], m.crs, m.transform, m.shape) == (
                8, "uint16", rgb.crs, rgb.transform, rgb.shape)
            r, x = rgb.read(), m.read()
        np.testing.assert_array_equal(x[[4, 2, 1]], r)
        assert x.max() <= 2047 and not np.array_equal(x[6], x[4])  # 11-bit; NIR is not red
    from dataio.synth import SynthConfig, write_aoi

    write_aoi(SynthConfig(out=tmp_path / "plain", tiles=8, seed=5, size=96))
    assert not (tmp_path / "plain" / MUL).exists()
    for rgb_tif in rgb_tifs:
        assert (tmp_path / "plain" / "RGB-PanSharpen" / rgb_tif.name).read_bytes() == \
            rgb_tif.read_bytes()


def test_prepare_mul_gives_8_band_samples_with_the_rgb_labels(mul_aoi: Path, mul_dataset: Path,
                                                              tmp_path: Path) -> None:
    m = load_manifest(mul_dataset)
    assert m.product == m.data["product"] == MUL and m.bands == 8
    assert [m.samples(s) for s in SPLITS] == [6, 1, 1]
    got = _samples(mul_dataset)
    for key, (_, img, _, meta) in got.items():
        assert img.dtype == np.uint16 and img.shape == (96, 96, 8)
        np.testing.assert_array_equal(img, _tif(mul_aoi, MUL, key))
        assert meta["bands"] == 8 and meta["source"] == f"{MUL}_{key}.tif"
    # per-band statistics of the training split, 8 of them
    pix = np.concatenate([img.reshape(-1, 8) for s, img, _, _ in got.values() if s == "train"])
    pix = pix[(pix > 0).all(axis=1)]
    p2, p98 = m.percentiles()
    assert len(p2) == len(p98) == 8
    np.testing.assert_allclose(np.percentile(pix, 2, axis=0), p2, atol=2)
    np.testing.assert_allclose(np.percentile(pix, 98, axis=0), p98, atol=2)
    # the same ImageIds, splits, masks and truth as the RGB product of the same AOI
    rgb = tmp_path / "RGB"
    prepare(PrepareConfig(raw=[mul_aoi], out=rgb, shard_size=4, seed=0), progress=False)
    assert load_manifest(rgb).product == "RGB-PanSharpen" and load_manifest(rgb).bands == 3
    rgb_got = _samples(rgb)
    assert {k: v[0] for k, v in rgb_got.items()} == {k: v[0] for k, v in got.items()}
    for key, (_, _, mask, meta) in got.items():
        np.testing.assert_array_equal(mask, rgb_got[key][2])
        assert meta["building_count"] == rgb_got[key][3]["building_count"]
    for s in SPLITS:
        assert (mul_dataset / s / "truth.csv").read_bytes() == (rgb / s / "truth.csv").read_bytes()


def test_mul_shards_read_by_webdataset_and_dali(mul_dataset: Path) -> None:
    tars = sorted((mul_dataset / "train").glob("shard-*.tar"))
    keys = []
    for sample in wds.WebDataset([str(t) for t in tars], shardshuffle=False).decode("l8"):
        assert sample["img.npy"].dtype == np.uint16 and sample["img.npy"].shape == (96, 96, 8)
        keys.append(sample["__key__"])
    assert len(keys) == 6
    img, _, meta = dali_read(tars, 6)
    assert sorted(json.loads(bytes(meta.at(i)))["image_id"] for i in range(6)) == sorted(keys)
    for i in range(6):
        a = np.asarray(img.at(i))
        assert a.dtype == np.uint16 and a.shape == (96, 96, 8)


@pytest.mark.parametrize("backend", ["dali", "torch"])
def test_loader_normalises_each_of_the_8_bands(mul_dataset: Path, backend: str) -> None:
    """Evaluation batches: each band clipped to its own [p2, p98] of the manifest; training
    batches (crop, flips, brightness/contrast per band) keep the 8 bands."""
    m = load_manifest(mul_dataset)
    p2, p98 = (np.array(p, np.float64)[:, None, None] for p in m.percentiles())
    tiles = {k: img for k, (_, img, _, _) in _samples(mul_dataset).items()}
    cfg = LoaderConfig(backend=backend, batch_size=3, num_threads=1, read_ahead=0, crop_size=64)
    seen = 0
    with build_loader(mul_dataset, "train", cfg, train=False,
                      device=torch.device("cpu")) as loader:
        for batch in loader:
            assert batch.image.shape == (3, 8, 96, 96)
            for i, key in enumerate(batch.keys):
                want = np.clip((tiles[key].transpose(2, 0, 1) - p2) / (p98 - p2), 0, 1)
                np.testing.assert_allclose(batch.image[i].numpy(), want, atol=1e-5)
                seen += 1
    assert seen == 6
    with build_loader(mul_dataset, "train", cfg, train=True,
                      device=torch.device("cpu")) as loader:
        batch = next(iter(loader))
        assert batch.image.shape == (3, 8, 64, 64)
        assert bool(((batch.image >= 0) & (batch.image <= 1)).all())


def test_a_missing_or_unknown_product_is_one_line(small_aoi: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "d"
    assert prepare_main(["--raw", str(small_aoi), "--out", str(out), "--product", MUL,
                         "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dataio.prepare: error: --raw {small_aoi}: no {MUL}/ folder (expected the "
                   f"SpaceNet layout, e.g. AOI_2_Vegas_Train/{MUL}/*.tif); {small_aoi} holds "
                   "RGB-PanSharpen/"]
    assert prepare_main(["--raw", str(small_aoi), "--out", str(out), "--product", "MUL",
                         "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["dataio.prepare: error: --product 'MUL': not one dataio.prepare reads (it "
                   f"reads RGB-PanSharpen, {MUL}); {small_aoi} holds RGB-PanSharpen/"]
    assert not out.exists()


def test_the_default_records_rgb_and_an_older_manifest_reads_as_rgb(small_dataset: Path,
                                                                     tmp_path: Path) -> None:
    data = json.loads((small_dataset / MANIFEST).read_text())
    assert data["product"] == "RGB-PanSharpen"
    del data["product"]  # (a manifest from before --product)
    (tmp_path / MANIFEST).write_text(json.dumps(data))
    assert load_manifest(tmp_path).product == "RGB-PanSharpen"
    data["product"] = 3
    (tmp_path / MANIFEST).write_text(json.dumps(data))
    with pytest.raises(ValueError, match="product must be a product name"):
        load_manifest(tmp_path)


def test_images_only_and_chips_read_the_product(mul_aoi: Path, tmp_path: Path) -> None:
    out = tmp_path / "chips"
    assert prepare_main(["--raw", str(mul_aoi), "--out", str(out), "--product", MUL,
                         "--images-only", "--chip-size", "64", "--chip-margin", "8",
                         "--workers", "0", "--quiet"]) == 0
    m = load_manifest(out)
    assert (m.product, m.bands, m.labels, m.samples("test")) == (MUL, 8, False, 8 * 4)
    for key, (_, img, _, meta) in _samples(out).items():
        (r, c), (cr, cc, h, w) = meta["source_offset"], meta["core"]
        assert img.shape[2] == 8
        np.testing.assert_array_equal(  # (the chip in its sample: the MUL tile's pixels)
            img[cr:cr + h, cc:cc + w], _tif(mul_aoi, MUL, key.rsplit("_r", 1)[0])[r:r + h, c:c + w])


@pytest.mark.gpu
def test_the_gpu_pipeline_gives_the_cpu_ones_8_bands(mul_dataset: Path) -> None:
    """DALI's graph on the GPU (crop_mirror_normalize of 8-channel HWC) as on the CPU."""
    cfg = LoaderConfig(backend="dali", batch_size=3, num_threads=1, crop_size=64)
    results = {}
    for device in ("cuda", "cpu"):
        with build_loader(mul_dataset, "train", cfg, train=True, device=device) as loader:
            loader.set_epoch(1)
            results[device] = {k: (b.image[i].cpu().numpy(), b.mask[i].cpu().numpy())
                               for b in loader for i, k in enumerate(b.keys) if k}
    assert len(results["cpu"]) == 6
    for key, (img, msk) in results["cpu"].items():
        assert img.shape == (8, 64, 64)
        np.testing.assert_allclose(results["cuda"][key][0], img, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(results["cuda"][key][1], msk)
