"""Prediction shards: PNG encoding (NaN policy), atomic verified writing, strict streaming reads."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from dataio.atomic import staging_dir
from postproc.predio import (
    PredError,
    check_key,
    decode_prob_png,
    encode_prob_png,
    iter_metas,
    iter_pred_samples,
    list_pred_shards,
    publish_dir,
    publish_pred_dir,
    quantize_probs,
    shard_keys,
    write_pred_shard,
)


def test_encode_decode_round_trip_is_round_255p():
    rng = np.random.default_rng(0)
    p = rng.random((17, 23, 3)).astype(np.float32)
    out = decode_prob_png(encode_prob_png(p))
    assert out.dtype == np.uint8 and out.shape == (17, 23, 3)
    np.testing.assert_array_equal(out, np.rint(p * 255).astype(np.uint8))


def test_nan_pixels_become_background_and_values_are_clipped():
    p = np.full((2, 3, 3), 0.5, np.float32)
    p[0, 0, 1] = np.nan
    p[0, 1, 2] = np.inf
    p[1, 0] = (-1.0, 2.0, 0.0)
    q = quantize_probs(p)
    assert tuple(q[0, 0]) == (255, 0, 0)
    assert tuple(q[0, 1]) == (255, 0, 0)
    assert tuple(q[1, 0]) == (0, 255, 0)
    assert tuple(q[1, 1]) == (128, 128, 128)


def test_decode_rejects_non_rgb_png():
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(buf, format="PNG")
    with pytest.raises(ValueError, match="RGB"):
        decode_prob_png(buf.getvalue())
    with pytest.raises(ValueError, match="undecodable"):
        decode_prob_png(b"not a png")


def _png16_rgb(arr: np.ndarray) -> bytes:
    """A 16-bit RGB PNG (Pillow cannot write one)."""
    import struct
    import zlib

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (struct.pack(">I", len(body)) + kind + body
                + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF))

    h, w, _ = arr.shape
    rows = b"".join(b"\0" + arr[y].astype(">u2").tobytes() for y in range(h))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


def test_a_16_bit_prob_png_is_refused_naming_the_shard(tmp_path):
    """Pillow reads a 16-bit RGB PNG as "RGB", keeping the high bytes: round(255 * p) saved as
    uint16 (another tool's map) read back as all background, without a word."""
    prob = np.zeros((4, 4, 3), np.uint16)
    prob[..., 1] = 255  # building everywhere
    path = tmp_path / "pred-000000.tar"
    _raw_tar(path, [("a.prob.png", _png16_rgb(prob)), ("a.meta.json", b"{}")])
    with pytest.raises(PredError, match=r"pred-000000.tar: a.prob.png: expected an 8-bit RGB "
                                        r"PNG, got a 16-bit one"):
        list(iter_pred_samples(path))

@pytest.mark.parametrize("key", ["a/b", "..", "a.b", "", "img 1", "../../etc/passwd"])
def test_unsafe_keys_are_refused(key):
    with pytest.raises(PredError):
        check_key(key)


def test_write_read_round_trip_and_listing(tmp_path):
    rng = np.random.default_rng(1)
    probs = {f"img{k}": rng.integers(0, 256, (8, 9, 3), dtype=np.uint8) for k in range(3)}
    samples = [(k, v, {"width": 9, "height": 8, "crs": "EPSG:4326"}) for k, v in probs.items()]
    assert write_pred_shard(tmp_path / "pred-000001.tar", samples) == 3
    write_pred_shard(tmp_path / "pred-000000.tar", samples[:1])
    (tmp_path / "other.tar").write_bytes(b"")
    shards = list_pred_shards(tmp_path)
    assert [s.name for s in shards] == ["pred-000000.tar", "pred-000001.tar"]
    got = list(iter_pred_samples(shards[1]))
    assert [k for k, _, _ in got] == list(probs)
    for k, prob, meta in got:
        np.testing.assert_array_equal(prob, probs[k])
        assert meta["image_id"] == k
    # byte-identical when written twice (fixed mtime, sorted JSON)
    write_pred_shard(tmp_path / "again.tar", samples)
    assert (tmp_path / "again.tar").read_bytes() == (tmp_path / "pred-000001.tar").read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))


def test_failed_write_leaves_nothing(tmp_path):
    bad = [("ok", np.zeros((2, 2, 3), np.uint8), {}), ("bad/key", np.zeros((2, 2, 3)), {})]
    with pytest.raises(PredError):
        write_pred_shard(tmp_path / "pred-000000.tar", bad)
    assert list(tmp_path.iterdir()) == []


def _stage(out, names: list[str], seed: int):
    staging = staging_dir(out)
    staging.mkdir(parents=True)
    for i, name in enumerate(names):
        prob = np.full((4, 4, 3), seed, np.uint8)
        write_pred_shard(staging / name, [(f"img{seed}_{i}", prob, {})])
    return staging


def test_a_publish_cut_short_is_refused_until_a_complete_one(tmp_path, monkeypatch):
    out = tmp_path / "PRED"
    publish_pred_dir(_stage(out, ["pred-000000.tar"], 1), out)
    assert [p.name for p in list_pred_shards(out)] == ["pred-000000.tar"]
    # the next prediction is killed part-way through its renames into PRED
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(dst)
        if len(calls) > 2:
            raise OSError("killed")
        real(src, dst)

    staging = _stage(out, [f"pred-{k:06d}.tar" for k in range(3)], 2)
    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="killed"):
        publish_pred_dir(staging, out)
    monkeypatch.setattr(os, "replace", real)
    assert len(list(out.glob("pred-*.tar"))) >= 1  # a mix of the two predictions...
    with pytest.raises(PredError) as e:  # ...that no reader takes for a complete one
        list_pred_shards(out)
    msg = str(e.value)
    assert str(out) in msg and "interrupted" in msg and "rerun trainer.predict" in msg
    assert "\n" not in msg
    # a complete publish (what a rerun of trainer.predict does) clears the mark and the mix
    shutil.rmtree(staging)
    publish_pred_dir(_stage(out, ["pred-000000.tar"], 3), out)
    assert sorted(p.name for p in out.iterdir()) == ["pred-000000.tar"]
    assert [k for k, _, _ in iter_pred_samples(out / "pred-000000.tar")] == ["img3_0"]


def test_missing_directory_and_no_shards(tmp_path):
    with pytest.raises(PredError, match="not found"):
        list_pred_shards(tmp_path / "nope")
    with pytest.raises(PredError, match="no pred"):
        list_pred_shards(tmp_path)


def test_truncated_tar_names_the_shard(tmp_path):
    samples = [(f"img{k}", np.full((64, 64, 3), k, np.uint8), {}) for k in range(4)]
    path = tmp_path / "pred-000000.tar"
    write_pred_shard(path, samples)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(PredError, match="pred-000000.tar"):
        list(iter_pred_samples(path))


@pytest.mark.parametrize("into_header", [0, 100])
def test_a_tar_cut_at_or_inside_a_header_is_refused(tmp_path, into_header):
    # tarfile alone reads a cut at a member boundary (or in a header) as a shorter complete tar
    samples = [(f"img{k}", np.full((64, 64, 3), k, np.uint8), {}) for k in range(4)]
    path = tmp_path / "pred-000000.tar"
    write_pred_shard(path, samples)
    with tarfile.open(path) as tar:
        third = tar.getmembers()[4].offset  # the header of img2.prob.png
    data = path.read_bytes()
    path.write_bytes(data[: third + into_header])
    with pytest.raises(PredError, match="pred-000000.tar: truncated tar"):
        list(iter_pred_samples(path))


@pytest.mark.parametrize("damage", ["a flipped bit", "a zeroed block"])
@pytest.mark.parametrize("read", [iter_pred_samples, iter_metas, shard_keys])
def test_a_damaged_header_inside_a_tar_is_refused(tmp_path, damage, read):
    """tarfile takes a header that fails its checksum (or reads as zeros) after the first for
    the end of the archive: each reader gave the shard's first 2 tiles of 4, without a word."""
    samples = [(f"img{k}", np.full((64, 64, 3), k, np.uint8), {}) for k in range(4)]
    path = tmp_path / "pred-000000.tar"
    write_pred_shard(path, samples)
    with tarfile.open(path) as tar:
        third = tar.getmembers()[4].offset  # the first header of img2
    data = bytearray(path.read_bytes())
    if damage == "a flipped bit":
        data[third + 100] ^= 1  # (its mode field: the checksum no longer matches)
    else:
        data[third:third + tarfile.BLOCKSIZE] = bytes(tarfile.BLOCKSIZE)
    path.write_bytes(bytes(data))
    with pytest.raises(PredError, match=f"pred-000000.tar: corrupt tar .*at byte {third}"):
        list(read(path))


def test_damaged_png_header_names_the_shard(tmp_path):
    png = bytearray(encode_prob_png(np.zeros((4, 4, 3))))
    png[8:12] = (12).to_bytes(4, "big")  # IHDR says 12 bytes long: it is 13
    path = tmp_path / "pred-000000.tar"
    _raw_tar(path, [("a.prob.png", bytes(png)), ("a.meta.json", b"{}")])
    with pytest.raises(PredError, match=r"pred-000000.tar: a.prob.png: undecodable PNG"):
        list(iter_pred_samples(path))


def _raw_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_crafted_members_are_refused(tmp_path):
    png = encode_prob_png(np.zeros((2, 2, 3)))
    meta = json.dumps({}).encode()
    path = tmp_path / "pred-000000.tar"
    _raw_tar(path, [("../evil.prob.png", png), ("../evil.meta.json", meta)])
    with pytest.raises(PredError, match="invalid sample key"):
        list(iter_pred_samples(path))
    _raw_tar(path, [("a.prob.png", png)])
    with pytest.raises(PredError, match="lacks meta.json"):
        list(iter_pred_samples(path))
    _raw_tar(path, [("a.prob.png", png), ("a.meta.json", b"{not json")])
    with pytest.raises(PredError, match="malformed JSON"):
        list(iter_pred_samples(path))
    _raw_tar(path, [("a.prob.png", b"garbage"), ("a.meta.json", meta)])
    with pytest.raises(PredError, match="a.prob.png"):
        list(iter_pred_samples(path))
    for size in ({"width": 5}, {"height": 5}):  # (a 2x2 map for a tile of another size)
        _raw_tar(path, [("a.prob.png", png), ("a.meta.json", json.dumps(size).encode())])
        with pytest.raises(PredError, match="meta.json says"):
            list(iter_pred_samples(path))
    for size in ({"width": "2"}, {"height": 2.5}, {"width": True}):  # (said "2x2 ... says 2x2")
        _raw_tar(path, [("a.prob.png", png), ("a.meta.json", json.dumps(size).encode())])
        (name, value), = size.items()
        with pytest.raises(PredError, match=rf"pred-000000.tar: a: meta.json {name} "
                                            rf"{value!r} is not a whole number of pixels"):
            list(iter_pred_samples(path))


@pytest.mark.parametrize("meta", [b"[" * 100_000 + b"]" * 100_000,
                                  b'{"width": ' + b"9" * 5000 + b"}"], ids=["deep", "digits"])
@pytest.mark.parametrize("read", [iter_pred_samples, iter_metas])
def test_a_meta_json_that_json_cannot_hold_is_malformed(tmp_path, meta, read):
    """(nested 100,000 deep: json's RecursionError, a traceback; a 5,000-digit number: int()'s
    ValueError, a line that named no shard)"""
    path = tmp_path / "pred-000000.tar"
    _raw_tar(path, [("a.prob.png", encode_prob_png(np.zeros((2, 2, 3)))), ("a.meta.json", meta)])
    with pytest.raises(PredError, match=r"pred-000000.tar: a.meta.json: malformed JSON"):
        list(read(path))


def test_a_sample_repeated_later_in_a_shard_is_refused(tmp_path):
    """A key whose members come back after another sample would otherwise be yielded twice:
    the runner checks ImageIds across shards only, so the CSV got its rows twice."""
    png = encode_prob_png(np.zeros((2, 2, 3)))
    meta = json.dumps({}).encode()
    path = tmp_path / "pred-000000.tar"
    _raw_tar(path, [("a.prob.png", png), ("a.meta.json", meta), ("b.prob.png", png),
                    ("b.meta.json", meta), ("a.prob.png", png), ("a.meta.json", meta)])
    with pytest.raises(PredError, match=r"pred-000000.tar: members of sample 'a' are not adjacent"):
        list(iter_pred_samples(path))


def test_iter_metas_reads_the_metas_and_refuses_what_the_full_read_refuses(tmp_path):
    """postproc.mosaic's first pass reads the headers and meta.json members alone: the same
    metas, and the same errors for a shard that is cut, crafted or lacks a member (a PNG that
    does not decode is the second pass's to find)."""
    path = tmp_path / "pred-000000.tar"
    samples = [(f"img{k}", np.full((64, 64, 3), k, np.uint8), {"width": 64, "n": k})
               for k in range(4)]
    write_pred_shard(path, samples)
    assert list(iter_metas(path)) == [(k, m) for k, _, m in iter_pred_samples(path)]
    assert [m["n"] for _, m in iter_metas(path)] == [0, 1, 2, 3]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    with pytest.raises(PredError, match="pred-000000.tar: truncated tar"):
        list(iter_metas(path))
    png, meta = encode_prob_png(np.zeros((2, 2, 3))), json.dumps({}).encode()
    for members, error in [
            ([("../evil.prob.png", png), ("../evil.meta.json", meta)], "invalid sample key"),
            ([("a.prob.png", png)], "sample 'a' lacks meta.json"),
            ([("a.meta.json", meta), ("b.prob.png", png), ("b.meta.json", meta)],
             "sample 'a' lacks prob.png"),
            ([("a.prob.png", png), ("a.meta.json", b"{not json")], "malformed JSON"),
            ([("a.prob.png", png), ("a.meta.json", b'{"width": "2"}')],
             "a: meta.json width '2' is not a whole number"),
            ([("a.prob.png", png), ("a.meta.json", meta), ("b.prob.png", png),
              ("b.meta.json", meta), ("a.prob.png", png), ("a.meta.json", meta)],
             "members of sample 'a' are not adjacent")]:
        _raw_tar(path, members)
        with pytest.raises(PredError, match=f"pred-000000.tar: .*{error}"):
            list(iter_metas(path))
    _raw_tar(path, [("a.prob.png", b"garbage"), ("a.meta.json", meta)])
    assert list(iter_metas(path)) == [("a", {})]


def _publish_names(out, names, ledger=".ledger"):
    staging = out / ".partial"
    staging.mkdir(parents=True)
    for n in names:
        (staging / n).write_text(n)
    publish_dir(staging, out, "*.geojson", ledger=ledger)


def test_a_ledger_publish_removes_only_listed_files_even_after_a_kill(tmp_path, monkeypatch):
    out = tmp_path / "GJ"
    out.mkdir()
    (out / "mine.geojson").write_text("the user's")
    _publish_names(out, ["a.geojson", "b.geojson", "c.geojson"])
    # the next publish brings a and a new d, and is killed among its deletes
    real, calls = Path.unlink, []

    def unlink(self, missing_ok=False):
        calls.append(self.name)
        if self.suffix == ".geojson":
            raise KeyboardInterrupt
        real(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(KeyboardInterrupt):
        _publish_names(out, ["a.geojson", "d.geojson"])
    monkeypatch.undo()
    # the ledger still lists what the killed publish would have removed, and what it brought,
    # so a rerun removes both (d, unlisted, would stay for good as if it were the user's)
    assert {"a.geojson", "b.geojson", "c.geojson", "d.geojson"} <= set(
        (out / ".ledger").read_text().split())
    shutil.rmtree(out / ".partial", ignore_errors=True)
    _publish_names(out, ["a.geojson"])
    assert sorted(p.name for p in out.glob("*.geojson")) == ["a.geojson", "mine.geojson"]
    assert (out / ".ledger").read_text() == "a.geojson\n"
    # a damaged ledger widens nothing and stops nothing
    (out / ".ledger").write_bytes(b"\xff\xfe\x00garbage")
    _publish_names(out, ["b.geojson"])
    assert sorted(p.name for p in out.glob("*.geojson")) == ["a.geojson", "b.geojson",
                                                             "mine.geojson"]
    assert (out / ".ledger").read_text() == "b.geojson\n" and not (out / ".publishing").exists()


@pytest.mark.parametrize("module", ["postproc.predio", "postproc.polygonize", "postproc.merge",
                                    "postproc.tune"])
def test_the_postproc_commands_load_no_rasterio(module: str) -> None:
    """postproc reads PNGs, meta.json and GeoJSON; rasterio (GDAL) is prepare's. predio took its
    ImageId pattern from dataio.geo, and its rasterio cost every postproc command (polygonize's
    pool workers too) ~0.3 s and ~20 MiB at start."""
    import subprocess
    import sys

    code = f"import sys, {module}; print(sorted(m for m in sys.modules if m == 'rasterio'))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=Path(__file__).resolve().parents[2],
                         env={**os.environ, "PYTHONPATH": "."}, check=True)
    assert out.stdout.strip() == "[]", f"importing {module} loads rasterio"


@pytest.mark.parametrize("command", ["polygonize", "tune", "merge", "mosaic"])
def test_every_command_reading_shards_refuses_a_marked_prediction(
        command: str, pred_dir: tuple[Path, Path], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    """README: a ``.publishing`` left in PRED (a publish cut short) is refused by every command
    that reads its shards, before it writes anything (it may mix two predictions' tiles)."""
    import importlib

    from postproc.cli import exit_on_error

    pred = tmp_path / "pred"
    shutil.copytree(pred_dir[0], pred)
    gj = tmp_path / "geojson"
    if command == "merge":  # (its tiles' GeoJSON, made before the mark)
        polygonize = importlib.import_module("postproc.polygonize")
        assert exit_on_error(lambda: polygonize.main(
            ["--pred", str(pred), "--out", str(tmp_path / "all.csv"), "--geojson", str(gj),
             "--workers", "1"])) == 0
    (pred / ".publishing").write_text("")
    out = tmp_path / "out"
    argv = {"polygonize": ["--out", f"{out}.csv", "--workers", "1"],
            "tune": ["--truth", str(pred_dir[1]), "--run-dir", str(out), "--workers", "1"],
            "merge": ["--geojson", str(gj), "--out", f"{out}.geojson"],
            "mosaic": ["--out", f"{out}.tif"]}[command]
    capsys.readouterr()
    module = importlib.import_module(f"postproc.{command}")
    assert exit_on_error(lambda: module.main(["--pred", str(pred), *argv])) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {pred}: a publish into this directory was interrupted"), err
    assert not list(tmp_path.glob("out*"))
