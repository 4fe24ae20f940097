"""Corrupt input never crashes the loader and never gives a silently short epoch: bad shards are
left out (checked against the manifest before anything reads them), bad samples become empty
slots, and everything is counted."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest

from dataio import sharding, shards
from dataio.fixtures import aligned_tile, edit_manifest, write_dataset
from dataio.loader import LoaderConfig, build_loader
from dataio.manifest import load_manifest
from dataio.reader import SampleError, ShardReader
from dataio.sharding import DataError, SampleIndex

BACKENDS = ["dali", "torch"]
N = 8  # 3 shards: 3 + 3 + 2


@pytest.fixture
def data(tmp_path: Path) -> Path:
    samples = [(f"AOI_9_Bad_img{i}", *aligned_tile(32, 40, i)) for i in range(N)]
    return write_dataset(tmp_path / "DATA", {"train": samples}, shard_size=3)


def _cfg(backend: str = "dali") -> LoaderConfig:
    return LoaderConfig(backend=backend, batch_size=2, crop_size=24,
                        num_threads=0 if backend == "torch" else 1)


def _epoch(data: Path, backend: str = "dali", epochs: int = 1) -> tuple[list[str], int, dict]:
    with build_loader(data, "train", _cfg(backend), train=True) as loader:
        keys, batches = [], 0
        for epoch in range(epochs):
            loader.set_epoch(epoch)
            for b in loader:
                batches += 1
                keys += [k for k, v in zip(b.keys, b.valid.tolist(), strict=True) if v]
                assert (b.mask[~b.valid] == -100).all()
        assert batches == epochs * len(loader)
        return keys, batches, loader.stats.as_dict()


def _member(data: Path, key: str, component: str) -> tuple[Path, int, int]:
    for ref in SampleIndex.build(load_manifest(data), "train").samples:
        if ref.key == key:
            return (ref.shard, *ref.members[component])
    raise KeyError(key)


def _overwrite(path: Path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _spoil(data: Path, key: str, component: str) -> None:
    """Garbage over a member, same size (the shard check still passes). A mask's PNG header is
    checked in Python before DALI sees the mask, so it is spoiled after the IHDR chunk (byte 33):
    what follows only a decoder reads (DALI then fails inside its pipeline)."""
    shard, offset, _ = _member(data, key, component)
    _overwrite(shard, offset + (33 if component == "mask.png" else 0), b"\x00garbage!" * 2)


@pytest.mark.parametrize("damage,reason", [
    ("truncate", "size"), ("grown", "size"), ("drop_tar", "missing"),
    ("drop_index", "index_missing"),
    ("manifest_bytes", "size"), ("manifest_count", "sample_count"),
    ("garbage_index", "index_changed"), ("scrambled_index", "index_invalid"),
    ("rotten_index", "index_invalid"),
    ("rotten_index_header", "index_invalid"), ("merged_index_lines", "index_invalid")])
def test_bad_shard_is_left_out_with_a_warning_and_counted(data: Path, damage: str, reason: str,
                                                          caplog: pytest.LogCaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    # the trainer's setup_logging (run in-process by trainer tests) stops propagation to root,
    # where caplog listens
    monkeypatch.setattr(logging.getLogger("footprints"), "propagate", True)
    tar = data / "train" / "shard-000001.tar"
    if damage == "truncate":
        # NOTE: read through its index with DALI's default mmap this would segfault.
        os.truncate(tar, tar.stat().st_size // 2)
    elif damage == "grown":  # e.g. another prepare run writing into this one's directory
        with open(tar, "ab") as f:
            f.write(bytes(1024))
    elif damage == "drop_tar":  # e.g. a partial copy of the dataset to a node
        tar.unlink()
    elif damage == "drop_index":
        tar.with_suffix(".idx").unlink()
    elif damage == "manifest_bytes":
        edit_manifest(data, "train", 1, bytes=tar.stat().st_size + 512)
    elif damage == "manifest_count":
        edit_manifest(data, "train", 1, samples=5)
    elif damage == "garbage_index":
        tar.with_suffix(".idx").write_text("v1.2 3\nnot an index at all\n")
    elif damage == "rotten_index":  # one byte that is not UTF-8 near the end, same size
        # (a text read decodes ahead: it raised UnicodeDecodeError, naming no file)
        _overwrite(tar.with_suffix(".idx"), tar.with_suffix(".idx").stat().st_size - 3, b"\xff")
    elif damage == "rotten_index_header":
        _overwrite(tar.with_suffix(".idx"), 0, b"\xff")
    elif damage == "merged_index_lines":  # two samples' lines made one: same size and header
        idx = tar.with_suffix(".idx")
        head, first, rest = idx.read_text().split("\n", 2)
        idx.write_text(f"{head}\n{first} {rest}")
    else:  # same size and header, lines that do not parse
        idx = tar.with_suffix(".idx")
        head, _, body = idx.read_text().partition("\n")
        idx.write_text(head + "\n" + "x" * len(body))
    with caplog.at_level(logging.WARNING):
        keys, _, stats = _epoch(data)
    assert "shard-000001.tar" in caplog.text
    assert stats["shards_skipped"] == {reason: 1}
    assert sorted(keys) == sorted(f"AOI_9_Bad_img{i}" for i in (0, 1, 2, 6, 7))


def test_no_usable_shard_is_an_error_naming_the_split(data: Path) -> None:
    for tar in (data / "train").glob("*.tar"):
        os.truncate(tar, 100)
    with pytest.raises(DataError, match="no usable sample in split 'train'"):
        build_loader(data, "train", _cfg())


def test_the_error_names_a_few_of_many_shards_left_out(data: Path, monkeypatch) -> None:
    """One repr of every shard's reason (~250 B each) made the one-line error of a split of
    400 bad shards 100 kB long; now the first few and a count."""
    monkeypatch.setattr(sharding, "SHOWN_REASONS", 2)
    for tar in (data / "train").glob("*.tar"):
        os.truncate(tar, 100)
    with pytest.raises(DataError) as e:
        build_loader(data, "train", _cfg())
    msg = str(e.value)
    assert "no usable sample in split 'train'; 3 shards left out: " in msg
    assert msg.count("bytes on disk") == 2 and msg.endswith("; and 1 more"), msg


def test_check_usable_reads_no_index_past_the_first_usable_shard(
        data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """trainer.train's checks (in every worker, before its loaders parse every index again) and
    the benchmarks' need one usable shard, not the whole list: it stops at the first; a split
    with none is read whole and refused as the loader refuses it."""
    parsed: list[Path] = []
    parse = sharding._parse_index

    def counted(idx: Path, tar: Path, expected: int):
        parsed.append(idx)
        return parse(idx, tar, expected)

    monkeypatch.setattr(sharding, "_parse_index", counted)
    manifest = load_manifest(data)
    os.truncate(data / "train" / "shard-000000.tar", 100)  # (left out: the next one is read)
    sharding.check_usable(manifest, "train")
    assert [p.name for p in parsed] == ["shard-000001.idx"]
    for tar in (data / "train").glob("*.tar"):
        os.truncate(tar, 100)
    with pytest.raises(DataError, match="no usable sample in split 'train'; 3 shards left out"):
        sharding.check_usable(manifest, "train")


def test_an_empty_split_says_so_not_that_shards_were_left_out(tmp_path: Path) -> None:
    """prepare leaves val/test empty with few tiles or --split 85,0,15; predict --split test then
    said 'no usable sample in split 'test'; shards left out: none listed', as if data were lost."""
    tile = ("AOI_9_Bad_img0", *aligned_tile(32, 40, 0))
    data = write_dataset(tmp_path / "DATA", {"train": [tile], "test": []})
    with pytest.raises(DataError, match=r"split 'test' of .*DATA is empty: dataio\.prepare put "
                                        r"no tile in it \(see its --split\)$"):
        build_loader(data, "test", _cfg())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("component,reason", [
    ("mask.png", "mask_invalid"), ("img.npy", "img_invalid"), ("meta.json", "meta_invalid")])
def test_member_that_does_not_decode_is_skipped_and_counted(data: Path, backend: str,
                                                            component: str, reason: str) -> None:
    _spoil(data, "AOI_9_Bad_img4", component)
    keys, batches, stats = _epoch(data, backend, epochs=2)
    assert sorted(keys) == sorted(2 * [f"AOI_9_Bad_img{i}" for i in range(N) if i != 4])
    assert stats["samples_skipped"] == {reason: 2}  # once per epoch
    assert stats["samples_padded"] == 0  # a skipped sample is not padding (8 = 4 batches of 2)
    assert stats["shards_skipped"] == {}
    if backend == "dali" and component == "mask.png":
        # DALI cannot skip inside a pipeline: one rebuild, then the sample is known bad.
        assert stats["pipeline_rebuilds"] == 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad,reason", [
    ("header_shape", "img_invalid"), ("bands", "img_invalid"), ("mask_size", "mask_invalid"),
    ("mask_colour", "mask_invalid"), ("meta_not_object", "meta_invalid")])
def test_sample_that_does_not_fit_its_header_or_dataset_is_skipped(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, backend: str, bad: str,
        reason: str) -> None:
    samples = [(f"AOI_9_Bad_img{i}", *aligned_tile(32, 40, i)) for i in range(N)]
    key, image, mask = samples[4]
    if bad == "bands":  # the manifest says 3 (a tile that prepare should have skipped)
        samples[4] = (key, np.dstack([image, image[..., :1]]), mask)
    elif bad.startswith("mask"):  # a shard from a writer that did not verify it
        # (DALI decodes any PNG to grey and crops inside it: it took both of these in training)
        samples[4] = (key, image, mask[:30] if bad == "mask_size" else np.dstack([mask] * 3))
        monkeypatch.setattr(shards, "verify_shard",
                            lambda path: sum(1 for _ in shards.iter_tar_samples(path)))
    data = write_dataset(tmp_path / "DATA", {"train": samples}, shard_size=3)
    monkeypatch.undo()
    if bad == "header_shape":  # the header promises a row more than the member holds
        shard, offset, size = _member(data, key, "img.npy")
        head = shard.read_bytes()[offset: offset + 128]
        _overwrite(shard, offset, head.replace(b"(32, 40, 3)", b"(33, 40, 3)"))
    elif bad == "meta_not_object":
        shard, offset, size = _member(data, key, "meta.json")
        _overwrite(shard, offset, b"[" + b" " * (size - 2) + b"]")
    keys, _, stats = _epoch(data, backend)
    assert sorted(keys) == sorted(f"AOI_9_Bad_img{i}" for i in range(N) if i != 4)
    assert stats["samples_skipped"] == {reason: 1}


def test_a_sample_dali_cannot_decode_after_a_restored_position_is_skipped(data: Path) -> None:
    _spoil(data, "AOI_9_Bad_img6", "mask.png")
    with build_loader(data, "train", _cfg()) as loader:  # evaluation order: img0, img1, ...
        it = iter(loader)
        next(it)
        state = loader.state_dict()
        del it
    with build_loader(data, "train", _cfg()) as resumed:
        resumed.load_state_dict(state)
        batches = list(resumed)
        assert len(batches) == len(resumed) - 1 == 3
        assert [k for b in batches for k in b.keys] == [
            f"AOI_9_Bad_img{i}" for i in (2, 3, 4, 5)] + ["", "AOI_9_Bad_img7"]
        assert resumed.stats.samples_skipped == {"mask_invalid": 1}
        assert resumed.stats.pipeline_rebuilds == 1


def test_a_sample_dali_cannot_decode_after_a_step_left_empty_is_skipped(data: Path) -> None:
    """A step whose samples were all skipped waits in the feed (it never reaches DALI) until the
    next batch comes out; when DALI fails on that next batch, the samples checked are those of
    every step in flight, not only the oldest (the empty one)."""
    for key in ("AOI_9_Bad_img2", "AOI_9_Bad_img3"):
        _spoil(data, key, "img.npy")  # step 1 (evaluation order): no sample left
    _spoil(data, "AOI_9_Bad_img5", "mask.png")  # step 2: fails inside DALI
    with build_loader(data, "train", _cfg()) as loader:
        batches = list(loader)
        assert [b.keys for b in batches] == [["AOI_9_Bad_img0", "AOI_9_Bad_img1"], ["", ""],
                                             ["AOI_9_Bad_img4", ""],
                                             ["AOI_9_Bad_img6", "AOI_9_Bad_img7"]]
        assert loader.stats.samples_skipped == {"img_invalid": 2, "mask_invalid": 1}
        assert loader.stats.pipeline_rebuilds == 1


@pytest.mark.parametrize("backend", BACKENDS)
def test_consecutive_steps_left_empty_keep_their_place(data: Path, backend: str) -> None:
    """Two whole batches of unreadable samples in a row: DALI never sees those steps, and both
    must come out empty before the batch that follows them (not one of them, then "DALI output
    out of order" from pairing the other with that batch's pixels)."""
    for i in (2, 3, 4, 5):
        _spoil(data, f"AOI_9_Bad_img{i}", "img.npy")  # steps 1 and 2 (evaluation order)
    with build_loader(data, "train", _cfg(backend)) as loader:
        batches = list(loader)
        assert [b.keys for b in batches] == [["AOI_9_Bad_img0", "AOI_9_Bad_img1"], ["", ""],
                                             ["", ""], ["AOI_9_Bad_img6", "AOI_9_Bad_img7"]]
        assert [b.valid.tolist() for b in batches] == [[True, True], [False, False],
                                                       [False, False], [True, True]]
        assert loader.stats.samples_skipped == {"img_invalid": 4}


def test_dali_failure_no_sample_explains_is_a_clear_error(data: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    _spoil(data, "AOI_9_Bad_img4", "mask.png")
    # Python decodes it fine (pretend): then DALI's failure is not a bad sample we can skip.
    monkeypatch.setattr(ShardReader, "mask", lambda self, ref, hdr: np.zeros((1, 1), np.uint8))
    with pytest.raises(DataError, match="AOI_9_Bad_img4") as err:
        _epoch(data, "dali")
    assert "shard-000001.tar" in str(err.value)


@pytest.mark.parametrize("reverse", [False, True])
def test_pixels_cut_off_after_the_header_was_read_are_a_read_error(data: Path,
                                                                    reverse: bool) -> None:
    """A shard cut short between reading a sample's header and its rows (the rows are read
    into a reused buffer: a short read unnoticed would hand on the last sample's pixels)."""
    ref = SampleIndex.build(load_manifest(data), "train").samples[0]
    reader = ShardReader(3)
    hdr = reader.header(ref)
    os.truncate(ref.shard, hdr.data_offset + 5 * hdr.width * hdr.bands * 2)  # 5 whole rows
    with pytest.raises(SampleError, match="short read of pixels") as err:
        reader.rows(ref, hdr, 0, hdr.height, reverse)
    assert err.value.reason == "read_error"
    reader.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_shard_truncated_after_the_check_gives_skips_not_a_crash(data: Path,
                                                                 backend: str) -> None:
    with build_loader(data, "train", _cfg(backend), train=True) as loader:
        tar = data / "train" / "shard-000002.tar"
        os.truncate(tar, 1024)  # between the check and the reads: no mmap, so no SIGBUS
        batches = list(loader)
        assert len(batches) == len(loader)
        assert loader.stats.samples_skipped == {"read_error": 2}
        assert loader.stats.samples_read == N - 2
