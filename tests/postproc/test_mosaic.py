"""postproc.mosaic: prediction shards -> one COG of the area, read back with rasterio.

The area is real use: a 600 x 600 px UTM raster cut into 3 x 3 tiles of 200 px (origins off by
up to 1e-6 m, as float origins are), one tile left out (a hole), two shards not in ImageId
order. Every tile read back through the window of its own transform must be its prob.png.
"""

from __future__ import annotations

import errno
import os
import stat
import tarfile
from pathlib import Path

import numpy as np
import pytest
import rasterio
import rasterio.shutil
from affine import Affine
from pp_helpers import (
    STDOUT_ENDS,
    assert_no_png_read,
    check_stdout_failure,
    count_shard_reads,
    unbuffered_stdout,
)

from dataio.atomic import NAME_MAX
from postproc import mosaic
from postproc.cli import exit_on_error
from postproc.predio import iter_pred_samples, write_pred_shard

T, PX, X0, Y0 = 200, 0.3, 500000.0, 4000000.0
UTM = "EPSG:32611"
HOLE = (1, 2)  # (row, col) of the tile left out


def run(argv: list[str]) -> int:
    return exit_on_error(lambda: mosaic.main(argv))


def _probs(h: int, w: int, seed: int) -> np.ndarray:
    """uint8 HxWx3 that differs at every pixel and band (a misplaced or swapped pixel shows)."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def _meta(fwd: Affine, col: float, row: float, w: int, h: int, crs: str = UTM) -> dict:
    c, f = fwd @ (col, row)
    return {"crs": crs, "transform": [fwd.a, fwd.b, c, fwd.d, fwd.e, f], "width": w,
            "height": h}


def _cut(pred: Path, fwd: Affine, rows: int, cols: int, t: int, skip=(), jitter=1e-7) -> Path:
    """``pred/pred-00000{0,1}.tar``: the tiles of a rows x cols grid of t px tiles, shard 0 holding
    the second half of them (so shard order is not ImageId order)."""
    samples = []
    for r in range(rows):
        for c in range(cols):
            if (r, c) in skip:
                continue
            meta = _meta(fwd, c * t, r * t, t, t)
            meta["transform"][2] += jitter * (3 * r + c)
            samples.append((f"AOI_9_Mosaic_r{r}c{c}", _probs(t, t, 10 * r + c), meta))
    half = len(samples) // 2
    write_pred_shard(pred / "pred-000000.tar", samples[half:])
    write_pred_shard(pred / "pred-000001.tar", samples[:half])
    return pred


def _tiles(pred: Path) -> dict[str, tuple[np.ndarray, dict]]:
    return {k: (p, m) for s in sorted(pred.glob("pred-*.tar")) for k, p, m in iter_pred_samples(s)}


def _read_back(src, meta: dict) -> tuple[np.ndarray, np.ndarray]:
    """The COG's pixels and mask under a tile, through the window of the tile's transform."""
    col, row = ~src.transform @ tuple(meta["transform"][i] for i in (2, 5))
    assert abs(col - round(col)) < 1e-3 and abs(row - round(row)) < 1e-3  # (on the pixel grid)
    win = rasterio.windows.Window(round(col), round(row), meta["width"], meta["height"])
    return src.read(window=win).transpose(1, 2, 0), src.read_masks(1, window=win)


@pytest.fixture(scope="module")
def area(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("mosaic")
    pred = _cut(root / "pred", Affine(PX, 0, X0, 0, -PX, Y0), 3, 3, T, skip=[HOLE])
    out = root / "out" / "area.tif"
    assert run(["--pred", str(pred), "--out", str(out)]) == 0
    return pred, out


def test_every_tile_reads_back_as_its_prob_png_and_the_hole_is_masked(area):
    pred, out = area
    tiles = _tiles(pred)
    assert len(tiles) == 8
    with rasterio.open(out) as src:
        assert src.crs.to_epsg() == 32611 and (src.width, src.height) == (3 * T, 3 * T)
        assert src.transform.almost_equals(Affine(PX, 0, X0, 0, -PX, Y0), precision=1e-6)
        assert src.descriptions == mosaic.BANDS and src.dtypes == ("uint8",) * 3
        for key, (prob, meta) in tiles.items():
            pixels, mask = _read_back(src, meta)
            assert np.array_equal(pixels, prob), key
            assert (mask == 255).all(), key
        mask = src.dataset_mask()
    r, c = HOLE
    assert (mask[r * T:(r + 1) * T, c * T:(c + 1) * T] == 0).all()
    assert (mask == 255).sum() == 8 * T * T  # (the hole and nothing else)


def test_the_first_pass_reads_no_png(area, monkeypatch):
    """The first pass needs each tile's meta.json alone: the prob.png members are seeked over.
    (They were read, the whole prediction once more, only to be thrown away.)"""
    pred, _ = area
    shards = sorted(pred.glob("pred-*.tar"))
    got = count_shard_reads(monkeypatch)
    assert len(mosaic.scan(shards, mosaic.TOLERANCE_PX).tiles) == 8
    assert_no_png_read(got, shards)


def test_the_file_is_a_cloud_optimized_geotiff_and_nothing_else_is_left(area):
    _, out = area
    with rasterio.open(out) as src:
        assert src.tags(ns="IMAGE_STRUCTURE").get("LAYOUT") == "COG"
        prof = src.profile
        assert prof["tiled"] and prof["blockxsize"] == prof["blockysize"] == mosaic.BLOCK_PX
        assert prof["compress"] == "deflate"
        assert src.overviews(1), "no overviews"
        assert src.mask_flag_enums[0] == [rasterio.enums.MaskFlags.per_dataset]
    assert sorted(p.name for p in out.parent.iterdir()) == ["area.tif"]


def test_blocks_without_a_tile_are_not_stored(tmp_path):
    """Two 64 px tiles at opposite corners of a 3 x 3 block area: the blocks between hold no
    tile and take no bytes (GDAL reads them as masked 0s)."""
    fwd = Affine(PX, 0, X0, 0, -PX, Y0)
    far = 3 * mosaic.BLOCK_PX - 64
    pred = tmp_path / "pred"
    write_pred_shard(pred / "pred-000000.tar", [
        ("AOI_9_a", _probs(64, 64, 1), _meta(fwd, 0, 0, 64, 64)),
        ("AOI_9_b", _probs(64, 64, 2), _meta(fwd, far, far, 64, 64))])
    out = tmp_path / "area.tif"
    assert run(["--pred", str(pred), "--out", str(out)]) == 0
    with rasterio.open(out) as src:
        assert src.width == src.height == 3 * mosaic.BLOCK_PX
        offsets = {(i, j): src.get_tag_item(f"BLOCK_OFFSET_{i}_{j}", "TIFF", bidx=1)
                   for i in range(3) for j in range(3)}
        assert src.read_masks(1)[64:far, 64:far].max() == 0
    assert offsets.pop((0, 0)) and offsets.pop((2, 2))
    assert not any(offsets.values()), offsets


def test_one_band(area, tmp_path):
    """--band building; a temporary file a killed run left beside --out is removed."""
    pred, _ = area
    out = tmp_path / "building.tif"
    (tmp_path / ".building.tif.0badf00d.tiff.tmp").write_bytes(b"killed")
    assert run(["--pred", str(pred), "--out", str(out), "--band", "building"]) == 0
    with rasterio.open(out) as src:
        assert src.count == 1 and src.descriptions == ("building",)
        for key, (prob, meta) in _tiles(pred).items():
            assert np.array_equal(_read_back(src, meta)[0][:, :, 0], prob[:, :, 1]), key
    assert [p.name for p in tmp_path.iterdir()] == ["building.tif"]


@pytest.mark.parametrize("fwd", [Affine(0.5, 0, X0, 0, 0.5, Y0),  # south-up
                                 Affine(0.4, 0.3, X0, 0.3, -0.4, Y0)],  # rotated
                         ids=["south_up", "rotated"])
def test_south_up_and_rotated_grids_keep_their_affine(fwd, tmp_path):
    pred = _cut(tmp_path / "pred", fwd, 2, 3, 24)
    out = tmp_path / "area.tif"
    assert run(["--pred", str(pred), "--out", str(out)]) == 0
    with rasterio.open(out) as src:
        assert src.transform.almost_equals(fwd, precision=1e-6), src.transform
        assert (src.width, src.height) == (72, 48)
        for key, (prob, meta) in _tiles(pred).items():
            assert np.array_equal(_read_back(src, meta)[0], prob), key


def _refused(argv: list[str], capsys, out: Path) -> str:
    assert run(argv) == 2
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("other", ["crs", "half_pixel"])
def test_tiles_on_several_grids_are_refused(other, tmp_path, capsys):
    pred = _cut(tmp_path / "pred", Affine(PX, 0, X0, 0, -PX, Y0), 1, 2, 16)
    meta = _meta(Affine(PX, 0, X0, 0, -PX, Y0), 32.5 if other == "half_pixel" else 32, 0, 16, 16,
                 "EPSG:32612" if other == "crs" else UTM)
    write_pred_shard(pred / "pred-000002.tar", [("AOI_9_Other", _probs(16, 16, 5), meta)])
    out = tmp_path / "area.tif"
    err = _refused(["--pred", str(pred), "--out", str(out)], capsys, out)
    assert "2 pixel grids" in err and "AOI_9_Mosaic_r0c1" in err and "AOI_9_Other" in err


def test_tiles_a_rounding_off_one_grid_are_told_the_tolerance_that_joins_them(tmp_path, capsys):
    """SpaceNet-style lon/lat tiles (EPSG:4326, 2.7e-6 degree pixels) whose origins were written
    to 1e-7 degrees lie up to 0.02 px off one grid: refused, as they must be at the default
    --tolerance, but the refusal named only ways out that keep them apart. It says by how much
    they are off and the --tolerance that joins them; with it the mosaic is written."""
    deg = 0.3 / 111320
    fwd = Affine(deg, 0, -115.3, 0, -deg, 36.2)
    pred = _cut(tmp_path / "pred", fwd, 1, 2, 16, jitter=0)
    for m in (pred / "pred-000000.tar", pred / "pred-000001.tar"):  # (in EPSG:4326)
        write_pred_shard(m, [(k, p, {**meta, "crs": "EPSG:4326"})
                             for k, p, meta in iter_pred_samples(m)])
    meta = _meta(fwd, 32, 0, 16, 16, "EPSG:4326")
    meta["transform"][2] = round(meta["transform"][2], 7)  # (0.014 px off)
    write_pred_shard(pred / "pred-000002.tar", [("AOI_9_Rounded", _probs(16, 16, 5), meta)])
    out = tmp_path / "area.tif"
    err = _refused(["--pred", str(pred), "--out", str(out)], capsys, out)
    assert "AOI_9_Rounded on another, off the first by 0.014 px" in err, err
    assert "pass --tolerance 0.02 (now 0.01)" in err, err
    assert run(["--pred", str(pred), "--out", str(out), "--tolerance", "0.02"]) == 0
    with rasterio.open(out) as src:
        assert (src.width, src.height) == (48, 16)
    capsys.readouterr()
    # (half a pixel off is no rounding: no --tolerance to try)
    meta["transform"][2] = (fwd @ (32.5, 0))[0]
    write_pred_shard(pred / "pred-000002.tar", [("AOI_9_Rounded", _probs(16, 16, 5), meta)])
    out = tmp_path / "half.tif"
    assert "--tolerance" not in _refused(["--pred", str(pred), "--out", str(out)], capsys, out)


def test_overlaps_go_to_the_first_image_id_and_are_noted(tmp_path, capsys):
    """b at (0, 0); a over b's bottom-right quarter; c the same extent as a, a later name. Shard
    order a, c, b (the last read would win if written over): the pixels must follow ImageId
    order (painted here from the last to the first)."""
    fwd = Affine(PX, 0, X0, 0, -PX, Y0)
    place = {"AOI_9_b": (0, 0), "AOI_9_a": (16, 16), "AOI_9_c": (16, 16)}
    probs = {k: _probs(32, 32, i) for i, k in enumerate(place)}
    pred = tmp_path / "pred"
    for i, k in enumerate(["AOI_9_a", "AOI_9_c", "AOI_9_b"]):
        write_pred_shard(pred / f"pred-{i:06d}.tar", [(k, probs[k], _meta(fwd, *place[k], 32,
                                                                           32))])
    out = tmp_path / "area.tif"
    assert run(["--pred", str(pred), "--out", str(out)]) == 0
    want = np.zeros((48, 48, 3), np.uint8)
    for k in sorted(place, reverse=True):
        x, y = place[k]
        want[y:y + 32, x:x + 32] = probs[k]
    with rasterio.open(out) as src:
        assert np.array_equal(src.read().transpose(1, 2, 0), want)
        mask = src.dataset_mask()
    assert (mask[:16, 32:] == 0).all() and (mask[32:, :16] == 0).all()
    assert (mask == 255).sum() == 48 * 48 - 2 * 16 * 16
    err = capsys.readouterr().err
    assert "mosaic: 3 pairs of tiles overlap" in err and "first: AOI_9_a and AOI_9_c" in err


@pytest.mark.parametrize("when", ["writing_tiles", "after_the_cog_copy"])
def test_an_interrupted_run_leaves_nothing(when, area, tmp_path, monkeypatch, capsys):
    pred, _ = area
    out = tmp_path / "new" / "area.tif"
    if when == "writing_tiles":
        real, calls = mosaic.decode_sample, []

        def decode(*a):
            calls.append(1)
            if len(calls) >= 3:  # (the third tile, and any of the run after it)
                raise KeyboardInterrupt
            return real(*a)

        monkeypatch.setattr(mosaic, "decode_sample", decode)
    else:
        real_copy = rasterio.shutil.copy

        def copy(*a, **kw):
            real_copy(*a, **kw)
            raise KeyboardInterrupt

        monkeypatch.setattr(rasterio.shutil, "copy", copy)
    assert run(["--pred", str(pred), "--out", str(out)]) == 130
    assert capsys.readouterr().err.endswith("interrupted\n")
    assert list(tmp_path.iterdir()) == []  # (new/ made for it is gone too)
    # an earlier mosaic stays as it was
    out.parent.mkdir()
    out.write_bytes(b"earlier")
    assert run(["--pred", str(pred), "--out", str(out)]) == 130
    assert [p.name for p in out.parent.iterdir()] == ["area.tif"]
    assert out.read_bytes() == b"earlier"


def test_bad_inputs_are_named(area, tmp_path, capsys):
    pred0, _ = area
    out = tmp_path / "area.tif"
    pred = tmp_path / "pred"
    pred.mkdir()
    assert "no pred-*.tar shards" in _refused(["--pred", str(pred), "--out", str(out)], capsys,
                                              out)
    shard = pred / "pred-000000.tar"
    tarfile.open(shard, "w").close()  # (complete, and empty: no tile to place)
    assert f"--pred {pred}: no tile in its 1 pred-*.tar shard(s)" in _refused(
        ["--pred", str(pred), "--out", str(out)], capsys, out)
    shard.write_bytes((pred0 / "pred-000000.tar").read_bytes()[:-3000])
    assert f"{shard}: truncated" in _refused(["--pred", str(pred), "--out", str(out)], capsys, out)
    for drop, said in (("transform", "transform None is not six finite numbers"),
                       ("crs", "meta.json has no crs")):
        meta = _meta(Affine(PX, 0, X0, 0, -PX, Y0), 0, 0, 8, 8)
        del meta[drop]
        write_pred_shard(shard, [("AOI_9_Bad", _probs(8, 8, 1), meta)])
        err = _refused(["--pred", str(pred), "--out", str(out)], capsys, out)
        assert f"{shard}: AOI_9_Bad: meta.json" in err and said in err, err
    meta = _meta(Affine(PX, 0, X0, 0, -PX, Y0), 0, 0, 8, 8)
    write_pred_shard(shard, [("AOI_9_Twice", _probs(8, 8, 1), meta)])
    write_pred_shard(pred / "pred-000001.tar", [("AOI_9_Twice", _probs(8, 8, 2), meta)])
    err = _refused(["--pred", str(pred), "--out", str(out)], capsys, out)
    assert f"{pred / 'pred-000001.tar'}: ImageId 'AOI_9_Twice' also appears in an earlier" in err


@pytest.mark.parametrize("name", ["area.png", "area", "area.tif.jpg"])
def test_an_out_not_named_as_a_geotiff_is_refused_before_the_work(name, area, tmp_path, capsys,
                                                                  monkeypatch):
    """(--out x.png wrote the COG under that name: a TIFF that viewers fail to open)"""
    pred, _ = area
    monkeypatch.setattr(mosaic, "scan", None)  # (before the first pass)
    out = tmp_path / name
    err = _refused(["--pred", str(pred), "--out", str(out)], capsys, out)
    assert err == (f"error: --out {out}: the mosaic is a Cloud-Optimized GeoTIFF; give a name "
                   "ending in .tif or .tiff\n")


@pytest.mark.parametrize("name", ["area.TIF", "area.tiff"])
def test_either_geotiff_suffix_in_any_case_is_written(name, area, tmp_path):
    pred, first = area
    out = tmp_path / name
    assert run(["--pred", str(pred), "--out", str(out)]) == 0
    with rasterio.open(out) as src, rasterio.open(first) as ref:
        assert src.driver == "GTiff" and np.array_equal(src.read(), ref.read())


def test_an_unwritable_out_is_refused_before_the_work(area, tmp_path, capsys, monkeypatch):
    pred, _ = area
    monkeypatch.setattr(mosaic, "iter_raw_samples", None)  # (the work would fail otherwise)
    shard = pred / "pred-000000.tar"
    before = shard.read_bytes()
    assert run(["--pred", str(pred), "--out", str(shard)]) == 2
    assert "is the --pred input" in capsys.readouterr().err and shard.read_bytes() == before
    assert run(["--pred", str(pred), "--out", str(tmp_path)]) == 2
    assert "is a directory" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert run(["--pred", str(pred), "--out", str(tmp_path / "file" / "area.tif")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    # a name too long for its temporary names (GDAL's, 19 bytes longer): refused, not exit 1
    # from the write after the work (237 bytes: within atomic_open's 241, not within 236)
    long = tmp_path / ("a" * (NAME_MAX - mosaic.TMP_NAME_EXTRA - len(".tif") + 1) + ".tif")
    assert run(["--pred", str(pred), "--out", str(long)]) == 2
    assert f"--out {long}: the name {long.name} has 237 bytes; at most 236" in (
        capsys.readouterr().err)
    assert run(["--pred", str(pred), "--out", str(tmp_path / "a.tif"), "--tolerance", "0.5"]) == 2
    assert "--tolerance 0.5 px must lie in [0, 0.5)" in capsys.readouterr().err
    with tarfile.open(shard):  # (the shard is intact)
        pass


def test_a_full_disk_while_writing_exits_1_naming_the_file(area, tmp_path, monkeypatch,
                                                           capsys):
    """An OSError while the GeoTIFF is written (GDAL's COG copy on a full disk) is a failure
    of the run, exit code 1, in one line naming the file; it was 2, as for bad input. Nothing is
    left; a missing input is still 2."""
    pred, _ = area
    out = tmp_path / "new" / "area.tif"

    def full(src: Path, dst: Path, **kwargs: object) -> None:
        Path(dst).write_bytes(b"half")
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    monkeypatch.setattr(rasterio.shutil, "copy", full)
    assert run(["--pred", str(pred), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: [Errno 28] No space left on device: ") and (
        f"{out.parent}/.area.tif." in err[-1]), err
    assert list(tmp_path.iterdir()) == []
    assert run(["--pred", str(tmp_path / "missing"), "--out", str(out)]) == 2


@pytest.mark.parametrize("where", STDOUT_ENDS)
def test_a_full_or_closed_unbuffered_stdout_exits_1(area, tmp_path, capsys, where):
    """``python -u -m postproc.mosaic ... > /dev/full``: the report's print raised a bare
    OSError, exit 2 ("fix the input"), where polygonize and score exit 1 (a failure of the
    run); a closed stdout (``| head -0``) ends quietly with 1. The GeoTIFF is written before."""
    pred, _ = area
    out = tmp_path / "area.tif"
    with unbuffered_stdout(where):
        code = run(["--pred", str(pred), "--out", str(out)])
    check_stdout_failure(where, code, capsys.readouterr().err)
    assert out.exists()


def test_an_io_error_syncing_the_directory_says_the_mosaic_is_in_place(area, tmp_path,
                                                                      monkeypatch, capsys):
    """An EIO at the sync of --out's directory, after the rename: it said "[Errno 5]
    Input/output error: 'DIR'", read as the mosaic not written, where it is in place, whole.
    The line says so; still exit 1 (the disk errs; the new entry may not survive a crash)."""
    pred, _ = area
    out = tmp_path / "area.tif"
    real = os.fsync

    def eio_on_directories(fd: int) -> None:
        if stat.S_ISDIR(os.fstat(fd).st_mode):
            raise OSError(errno.EIO, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", eio_on_directories)
    assert run(["--pred", str(pred), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: [Errno 5] Input/output error at the sync of its directory, after "
                       f"the rename: {out} is in place, written whole, but its new entry there "
                       f"may not survive a crash (rerun to write it again): '{tmp_path}'"), err
    with rasterio.open(out) as src:
        assert src.driver == "GTiff" and src.width == 3 * T
    assert [p.name for p in tmp_path.iterdir()] == ["area.tif"]


def test_a_full_disk_making_the_out_directory_exits_1(area, tmp_path, monkeypatch, capsys):
    """A new --out directory that cannot be made once --out was checked (a full disk has no
    block for it) is the disk's, exit code 1, as the file's write is; it was made before the
    output step and said 2, "fix the input". Nothing is left."""
    pred, _ = area
    out = tmp_path / "new" / "area.tif"
    real = Path.mkdir

    def full(self: Path, *args: object, **kwargs: object) -> None:
        if self == out.parent:
            raise OSError(errno.ENOSPC, "No space left on device", str(self))
        real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", full)
    assert run(["--pred", str(pred), "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: [Errno 28] No space left on device: '{out.parent}'"], err
    assert list(tmp_path.iterdir()) == []
