"""Loader backends: DALI and torch give the same tensors, augmentation keeps the mask aligned with
the image, streams are deterministic per seed, positions restore exactly."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from dataio.augment import AugSpec, Draws, Geometry
from dataio.fixtures import (
    ALIGNED_P2,
    ALIGNED_P98,
    aligned_tile,
    mask_from_aligned,
    write_dataset,
)
from dataio.loader import IGNORE_INDEX, Batch, Loader, LoaderConfig, build_loader
from dataio.shards import decode_sample, iter_tar_samples

BACKENDS = ["dali", "torch"]
H, W = 72, 88  # not square: transposes change the shape before the crop


@pytest.fixture(scope="module")
def aligned(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiles whose mask can be read back from the image; val mixes two tile sizes."""
    train = [(f"AOI_9_Test_img{i}", *aligned_tile(H, W, i)) for i in range(10)]
    val = [(f"AOI_9_Test_img{100 + i}", *aligned_tile(H, W, 100 + i)) for i in range(3)]
    val.append(("AOI_9_Test_img200", *aligned_tile(64, 64, 200)))
    return write_dataset(tmp_path_factory.mktemp("aligned"), {"train": train, "val": val},
                         shard_size=3, p2=ALIGNED_P2, p98=ALIGNED_P98)


def _cfg(backend: str, **kw: object) -> LoaderConfig:
    """``torch-workers``: the torch backend with 2 DataLoader worker processes (``torch``: none,
    reading in this process)."""
    kw.setdefault("crop_size", 48)
    workers = backend == "torch-workers"
    backend = "torch" if workers else backend
    kw.setdefault("num_threads", 2 if workers else 0 if backend == "torch" else 1)
    return LoaderConfig(backend=backend, batch_size=3, **kw)


def _by_key(loader: Loader, epochs: tuple[int, ...] = (0,)) -> dict[tuple[int, str], tuple]:
    out = {}
    for epoch in epochs:
        loader.set_epoch(epoch)
        for b in loader:
            for i, key in enumerate(b.keys):
                if key:
                    out[(epoch, key)] = (b.image[i].cpu().numpy(), b.mask[i].cpu().numpy(),
                                         b.meta[i])
    return out


def _tiles(data: Path, split: str) -> dict[str, tuple[np.ndarray, np.ndarray, dict]]:
    return {k: decode_sample(m) for shard in sorted((data / split).glob("*.tar"))
            for k, m in iter_tar_samples(shard)}


def _reference(image: np.ndarray, mask: np.ndarray, g: Geometry, b: float = 1.0,
               k: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Written out from the definition in dataio.augment, on the whole decoded tile."""
    img = image[g.ay: g.ay + g.ch, g.ax: g.ax + g.cw].astype(np.float64)
    msk = mask[g.ay: g.ay + g.ch, g.ax: g.ax + g.cw]
    if g.v:
        img, msk = img[::-1], msk[::-1]
    if g.h:
        img, msk = img[:, ::-1], msk[:, ::-1]
    if g.t:
        img, msk = img.transpose(1, 0, 2), msk.T
    p2, p98 = np.array(ALIGNED_P2), np.array(ALIGNED_P98)
    centre = (p2 + p98) / 2
    img = b * (centre + k * (img - centre))
    img = np.clip((img - p2) / (p98 - p2), 0, 1)
    return img.transpose(2, 0, 1), msk.astype(np.int64)


def test_backends_match_the_reference_without_augmentation(aligned: Path) -> None:
    tiles = _tiles(aligned, "train")
    results = {}
    for backend in BACKENDS:
        with build_loader(aligned, "train", _cfg(backend)) as loader:
            results[backend] = _by_key(loader)
    assert results["dali"].keys() == results["torch"].keys()
    assert {k for _, k in results["dali"]} == set(tiles)
    for (epoch, key), (img, msk, meta) in results["dali"].items():
        t_img, t_msk, _ = results["torch"][(epoch, key)]
        np.testing.assert_allclose(img, t_img, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(msk, t_msk)
        image, mask, tile_meta = tiles[key]
        ref_img, ref_msk = _reference(image, mask, Geometry.resolve(H, W, None, None, 0))
        np.testing.assert_allclose(img, ref_img, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(msk, ref_msk)
        assert meta == tile_meta


@pytest.mark.parametrize("backend", BACKENDS)
def test_augmentation_follows_its_definition_and_keeps_mask_aligned(aligned: Path,
                                                                    backend: str) -> None:
    tiles = _tiles(aligned, "train")
    epochs = (0, 1, 2, 3)
    cfg = _cfg(backend)
    spec = cfg.aug_spec()
    seen = set()
    with build_loader(aligned, "train", cfg, train=True) as loader:
        ids = {ref.key: i for i, ref in enumerate(loader.index.samples)}
        got = _by_key(loader, epochs)
    for (epoch, key), (img, msk, _) in got.items():
        assert img.shape == (3, 48, 48) and msk.shape == (48, 48)
        np.testing.assert_array_equal(mask_from_aligned(img), msk)  # aligned, whatever the op
        draws = Draws.draw(len(ids), cfg.seed, epoch, spec)
        g = Geometry.resolve(H, W, spec, draws, ids[key])
        seen.add((g.h, g.v, g.t))
        b, k = draws.bk[ids[key]]
        ref_img, ref_msk = _reference(*tiles[key][:2], g, b, k)
        np.testing.assert_array_equal(msk, ref_msk)
        np.testing.assert_allclose(img, ref_img, rtol=0, atol=2e-6)
    assert len(seen) == 8  # every flip/rotation combination was exercised


def test_backends_give_identical_augmented_streams(aligned: Path) -> None:
    results = {}
    for backend in BACKENDS:
        with build_loader(aligned, "train", _cfg(backend), train=True) as loader:
            results[backend] = _by_key(loader, (0, 1))
    assert results["dali"].keys() == results["torch"].keys()
    assert len(results["dali"]) == 2 * 10  # both epochs, every training tile
    for key, (img, msk, _) in results["dali"].items():
        np.testing.assert_allclose(img, results["torch"][key][0], rtol=0, atol=1e-6)
        np.testing.assert_array_equal(msk, results["torch"][key][1])


def test_flip_and_rotation_switches() -> None:
    rot = Draws.draw(400, 0, 0, AugSpec(flip=False, rot90=True))
    assert {tuple(x) for x in rot.hvt} == {(0, 0, 0), (1, 0, 1), (1, 1, 0), (0, 1, 1)}
    flip = Draws.draw(400, 0, 0, AugSpec(flip=True, rot90=False))
    assert {tuple(x) for x in flip.hvt} == {(0, 0, 0), (1, 0, 0), (0, 1, 0), (1, 1, 0)}
    none = Draws.draw(10, 0, 0, AugSpec(flip=False, rot90=False, brightness=0, contrast=0))
    assert not none.hvt.any() and (none.bk == 1).all()


def _stream(loader: Loader, epoch: int) -> list[Batch]:
    loader.set_epoch(epoch)
    return list(loader)


def _same(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        x.keys == y.keys and torch.equal(x.image, y.image) and torch.equal(x.mask, y.mask)
        and torch.equal(x.valid, y.valid) for x, y in zip(a, b, strict=True))


def test_same_seed_same_stream_new_epoch_new_order(aligned: Path) -> None:
    cfg = _cfg("dali")
    with build_loader(aligned, "train", cfg, train=True) as a, \
            build_loader(aligned, "train", cfg, train=True) as b:
        assert _same(_stream(a, 3), _stream(b, 3))
        assert [x.keys for x in _stream(a, 4)] != [x.keys for x in _stream(a, 3)]
    other = LoaderConfig(**{**cfg.__dict__, "seed": 1})
    with build_loader(aligned, "train", other, train=True) as c, \
            build_loader(aligned, "train", cfg, train=True) as d:
        assert [x.keys for x in _stream(c, 3)] != [x.keys for x in _stream(d, 3)]


@pytest.mark.parametrize("backend", [*BACKENDS, "torch-workers"])
def test_restored_position_gives_the_remaining_batches(aligned: Path, backend: str) -> None:
    cfg = _cfg(backend)
    with build_loader(aligned, "train", cfg, 1, 2, train=True) as loader:
        full = _stream(loader, 2)
        loader.set_epoch(2)
        it = iter(loader)
        next(it)
        state = loader.state_dict()  # taken while batch 0 is being trained on
        next(it)  # ... the run goes on a little and dies
        del it
        assert state["epoch"] == 2 and state["step"] == 1
        assert _same(_stream(loader, 3), _stream(loader, 3))  # an abandoned epoch is harmless
    with build_loader(aligned, "train", cfg, 1, 2, train=True) as resumed:
        resumed.load_state_dict(state)
        resumed.set_epoch(2)  # the trainer's loop calls this for the restored epoch too
        rest = list(resumed)
        assert resumed.state_dict()["step"] == len(resumed) == len(full)
    assert _same(rest, full[1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_position_restored_into_a_loader_already_used_gives_the_remaining_batches(
        aligned: Path, backend: str) -> None:
    """The plan of the epoch read from its start (which the torch backend keeps, cached) is not
    the plan of a position in it: reused, it gave the epoch's first batches again."""
    with build_loader(aligned, "train", _cfg(backend), train=True) as loader:
        full = _stream(loader, 2)
        state = {**loader.state_dict(), "step": 1, "samples_done": 3}  # after batch 0
        loader.load_state_dict(state)
        assert _same(list(loader), full[1:])


@pytest.mark.parametrize("backend", BACKENDS)
def test_each_iteration_without_set_epoch_reads_the_epoch_from_its_start(
        aligned: Path, backend: str) -> None:
    """As with DistributedSampler: iterating again (an evaluation loop, a restored epoch
    finished) repeats the epoch; it is not an empty epoch continuing from its end."""
    with build_loader(aligned, "val", _cfg(backend, crop_size=0)) as loader:
        first = list(loader)
        assert len(first) == len(loader) > 0 and _same(list(loader), first)
    with build_loader(aligned, "train", _cfg(backend), train=True) as loader:
        full = _stream(loader, 0)
        loader.load_state_dict({**loader.state_dict(), "step": 1, "samples_done": 3})
        assert _same(list(loader), full[1:])  # the restored position is used once...
        assert _same(list(loader), full)  # ...then the epoch starts over


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_new_epoch_ends_an_iterator_still_held_from_the_last(aligned: Path,
                                                               backend: str) -> None:
    """One epoch at a time (the loader has one position and one DALI pipeline): a batch peeked
    with ``it = iter(loader)`` in a notebook, ``it`` still held, must not break the next epoch
    (DALI's pipeline raised "output out of order") nor share its position."""
    with build_loader(aligned, "train", _cfg(backend), train=True) as loader:
        expected = _stream(loader, 1)
        loader.set_epoch(0)
        it = iter(loader)
        next(it)
        assert _same(_stream(loader, 1), expected)
        assert loader.state_dict()["step"] == len(loader)  # the new epoch's position, at its end
        with pytest.raises(StopIteration):  # the old iterator ended when the new one began
            next(it)


@pytest.mark.parametrize("other", [{"fingerprint": "other"}, {"seed": 1}, {"num_samples": 11}])
def test_state_from_another_dataset_or_seed_restarts_the_epoch(aligned: Path,
                                                                other: dict[str, object]) -> None:
    # (another seed is another permutation: the samples done there are not the first 6 here)
    with build_loader(aligned, "train", _cfg("dali"), train=True) as loader:
        state = {**loader.state_dict(), "step": 2, "samples_done": 6, **other}
        loader.load_state_dict(state)
        assert len(list(loader)) == len(loader)


def test_a_restored_position_holds_for_its_own_epoch_only(aligned: Path) -> None:
    cfg = _cfg("dali")
    with build_loader(aligned, "train", cfg, train=True) as loader:
        loader.set_epoch(0)
        it = iter(loader)
        next(it)
        state = loader.state_dict()
        del it
        full = _stream(loader, 1)
    with build_loader(aligned, "train", cfg, train=True) as resumed:
        resumed.load_state_dict(state)
        resumed.set_epoch(1)  # not the restored epoch: all of epoch 1, from its first step
        assert _same(list(resumed), full)


def test_restored_with_another_world_size_reads_the_rest_once_at_its_own_step(
        aligned: Path) -> None:
    cfg = _cfg("dali")
    with build_loader(aligned, "train", cfg, train=True) as one:  # 10 tiles: 4 steps of 3
        one.set_epoch(0)
        it = iter(one)
        read = [k for _ in range(2) for k in next(it).keys]
        state = one.state_dict()
        del it
    assert state["samples_done"] == 6
    for rank in (0, 1):
        with build_loader(aligned, "train", cfg, rank, 2, train=True) as two:  # 2 steps each
            two.load_state_dict(state)
            two.set_epoch(0)
            # the 4 samples left are one batch per rank: the last step of 2 (the trainer takes
            # its progress and its mid-epoch checkpoint decisions from this)
            assert two.state_dict()["step"] == 1
            batches = list(two)
            assert len(batches) == 1 and two.state_dict()["step"] == len(two) == 2
            read += [k for b in batches for k in b.keys if k]
    assert sorted(read) == sorted(_tiles(aligned, "train"))


def test_a_rank_outside_the_world_is_refused(aligned: Path) -> None:
    with pytest.raises(ValueError, match=r"rank 2 is not in \[0, world_size=2\)"):
        build_loader(aligned, "train", _cfg("torch"), 2, 2)


def test_eval_pads_mixed_tile_sizes(aligned: Path) -> None:
    for backend in BACKENDS:
        with build_loader(aligned, "val", _cfg(backend, crop_size=0)) as loader:
            batches = list(loader)
        assert [tuple(b.image.shape) for b in batches] == [(3, 3, H, W), (3, 3, 64, 64)]
        small = batches[1]
        assert small.keys == ["AOI_9_Test_img200", "", ""]
        assert small.valid.tolist() == [True, False, False]
        tile = _tiles(aligned, "val")["AOI_9_Test_img200"]
        np.testing.assert_array_equal(small.mask[0].numpy(), tile[1])


def test_train_crop_larger_than_tile_pads_bottom_right(aligned: Path) -> None:
    results = {}
    for backend in BACKENDS:
        with build_loader(aligned, "train", _cfg(backend, crop_size=80), train=True) as loader:
            results[backend] = _by_key(loader)
    assert results["dali"].keys() == results["torch"].keys() and len(results["dali"]) == 10
    for key, (img, msk, _) in results["dali"].items():
        assert img.shape == (3, 80, 80)
        np.testing.assert_array_equal(msk, results["torch"][key][1])
        np.testing.assert_allclose(img, results["torch"][key][0], rtol=0, atol=1e-6)
        assert (msk == IGNORE_INDEX).any() and (msk[:H, :H] >= 0).all()  # 72 rows, or 72 cols
        np.testing.assert_array_equal(img[:, msk == IGNORE_INDEX], 0)


def test_a_crop_larger_than_a_tile_is_named_once_on_rank_0(
        aligned: Path, footprints_log: list[logging.LogRecord]) -> None:
    """data.crop_size beyond the tile was cut to the tile and padded back without a word: a
    crop of 1024 on 650 px tiles computed mostly padding."""
    def told(backend: str, crop: int, rank: int = 0, world_size: int = 1) -> list[str]:
        footprints_log.clear()
        with build_loader(aligned, "train", _cfg(backend, crop_size=crop), rank, world_size,
                          train=True) as loader:
            _by_key(loader, epochs=(0, 1))
        return [r.getMessage() for r in footprints_log if "crop_size" in r.getMessage()]

    for backend in BACKENDS:
        lines = told(backend, 80)
        assert len(lines) == 1, lines  # once per loader, not per batch or epoch
        assert lines[0].startswith("data.crop_size=80 is larger than tile AOI_9_Test_img")
        assert f"({H} x {W} px): its crops are the tile padded to 80 x 80" in lines[0]
    assert told("torch", 80, rank=1, world_size=2) == []  # rank 0 says it
    assert told("torch", H) == []  # as large as the tile's short side: no padding


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="dali.*torch"):
        LoaderConfig(backend="tf.data")
    for bad in ({"batch_size": 0}, {"crop_size": -1}, {"brightness": 1.5}, {"prefetch": 0},
                {"brightness": 1.0}, {"contrast": 1.0},  # a jitter of 100%: 0 to 2x
                {"read_ahead": -1}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            LoaderConfig(**bad)
    from dataio.augment import Normaliser

    with pytest.raises(ValueError, match="p98 > p2"):  # a constant band: no scale
        Normaliser([100, 10], [100, 20])


def test_counters_are_exposed(aligned: Path) -> None:
    with build_loader(aligned, "train", _cfg("dali"), 0, 3, train=True) as loader:
        batches = list(loader)
        stats = loader.stats.as_dict()
    assert set(stats) >= {"samples_read", "samples_padded", "shards_skipped", "samples_skipped"}
    assert stats["samples_read"] == 4 and stats["samples_padded"] == 2  # 10 = 4 + 3 + 3
    assert stats["batches"] == len(batches) == 2


def test_dali_reads_the_next_steps_off_the_main_thread(aligned: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """DALI asks for a step's inputs inside ``run()``, on the training thread; the feed reads the
    steps after it in a thread of its own meanwhile, so reading overlaps the training step."""
    from dataio import dali_pipe

    reads: list[tuple[int, threading.Thread]] = []
    real = dali_pipe.prepare_step

    def recording(plan: object, j: int, *args: object, **kwargs: object) -> object:
        reads.append((j, threading.current_thread()))
        return real(plan, j, *args, **kwargs)

    monkeypatch.setattr(dali_pipe, "prepare_step", recording)
    with build_loader(aligned, "train", _cfg("dali"), train=True) as loader:
        it = iter(loader)
        assert next(it).image.shape[0] == 3
        asked = loader._backend.feed.next  # steps DALI has asked for so far
        assert asked < len(loader) == 4
        deadline = time.monotonic() + 10  # a wait for the event, not a speed limit
        while all(j != asked for j, _ in reads) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert any(j == asked for j, _ in reads), "the next step was not read ahead"
        assert len(list(it)) == len(loader) - 1
        # held, as a traceback may hold it: the thread must end by close(), not by the executor
        # being collected
        executor = loader._backend.feed._pool
        assert executor is not None
    assert sorted(j for j, _ in reads) == list(range(len(loader)))  # each step read once
    assert all(t is not threading.main_thread() and t.name.startswith("dali-feed")
               for _, t in reads)
    # one reading thread, as documented (ShardReader's descriptor table takes no lock)
    assert len({t for _, t in reads}) == 1
    assert not any(t.is_alive() for _, t in reads)  # close() ended the reading thread


@pytest.mark.parametrize("ahead", [0, 1])
def test_dali_reads_read_ahead_steps_ahead_and_0_reads_in_the_callback(
        aligned: Path, monkeypatch: pytest.MonkeyPatch, ahead: int) -> None:
    """``data.read_ahead`` is how many steps past those DALI asked for are read (the memory of
    that many batches of rows); 0 reads inside DALI's callback, on the training thread, as the
    benchmark's baseline assumes, and starts no thread."""
    from dataio import dali_pipe

    threads: list[threading.Thread] = []
    real = dali_pipe.prepare_step

    def recording(*args: object, **kwargs: object) -> object:
        threads.append(threading.current_thread())
        return real(*args, **kwargs)

    monkeypatch.setattr(dali_pipe, "prepare_step", recording)
    with build_loader(aligned, "train", _cfg("dali", read_ahead=ahead), train=True) as loader:
        feed = loader._backend.feed
        it = iter(loader)
        next(it)
        # submitted reads are only changed on this thread (start, DALI's callback, stop)
        assert [r.result().record.step for r in feed._reads] == list(
            range(feed.next, min(feed.next + ahead, len(loader))))
        assert (feed._pool is None) == (ahead == 0)
        assert len(list(it)) == len(loader) - 1
    assert len(threads) == len(loader)
    if ahead == 0:
        assert all(t is threading.main_thread() for t in threads)


def test_reading_ahead_or_in_the_callback_gives_the_same_batches(aligned: Path) -> None:
    got = {}
    for ahead in (0, 2):
        with build_loader(aligned, "train", _cfg("dali", read_ahead=ahead), train=True) as loader:
            got[ahead] = _by_key(loader, (0, 1))
    assert got[0].keys() == got[2].keys() and len(got[0]) == 20
    for key, (img, msk, meta) in got[0].items():
        np.testing.assert_array_equal(got[2][key][0], img)
        np.testing.assert_array_equal(got[2][key][1], msk)
        assert got[2][key][2] == meta


def test_dali_close_cancels_the_reads_not_begun(monkeypatch: pytest.MonkeyPatch) -> None:
    """Stopping the reads ahead (closing a loader left mid-epoch, abandoning an epoch, rebuilding
    the pipeline) waits for the one read that is running, not for all ``read_ahead`` steps to be
    read and thrown away."""
    from dataio import dali_pipe

    started, gate = threading.Event(), threading.Event()
    reads: list[int] = []

    def slow(plan: object, j: int, *args: object, **kwargs: object) -> None:
        reads.append(j)
        started.set()
        gate.wait(10)

    monkeypatch.setattr(dali_pipe, "prepare_step", slow)
    feed = dali_pipe._Feed(reader=None, transposes=False, keep=0, ahead=3)
    feed.start(SimpleNamespace(steps=5), 0)
    assert started.wait(10)  # step 0 is being read, steps 1 and 2 wait their turn
    threading.Timer(0.2, gate.set).start()  # lets step 0 finish while close() waits for it
    feed.close()
    assert reads == [0]


def test_dali_reuses_a_queue_of_row_buffers_across_epochs(aligned: Path) -> None:
    """The rows of a step go back to a pool once DALI has produced it, so reading does not fault
    in fresh pages every sample; the pool holds the batches in DALI's queue and those read ahead
    (``batch_size * (prefetch + 2 + read_ahead)``), so no epoch adds fresh buffers to it."""
    # (read_ahead 6: a pool sized for DALI's queue only, 4 buffers, would take fresh ones
    # every epoch)
    cfg = LoaderConfig(batch_size=1, crop_size=48, num_threads=1, read_ahead=6)
    with build_loader(aligned, "train", cfg, train=True) as loader:  # 10 steps
        feed = loader._backend.feed
        handed: list[np.ndarray] = []  # every buffer the reads got, each once
        real = feed.alloc

        def alloc(shape: tuple[int, int, int]) -> np.ndarray:
            buf = real(shape)
            if not any(buf is b for b in handed):
                handed.append(buf)
            return buf

        feed.alloc = alloc
        for epoch in range(3):
            _stream(loader, epoch)
    assert len(handed) <= cfg.batch_size * (cfg.prefetch + 2 + cfg.read_ahead) < 3 * 10


@pytest.mark.gpu
def test_gpu_pipeline_matches_cpu(aligned: Path) -> None:
    results = {}
    for device in ("cuda", "cpu"):
        with build_loader(aligned, "train", _cfg("dali"), train=True, device=device) as loader:
            batch = next(iter(loader))
            assert batch.image.device.type == device and batch.mask.device.type == device
            results[device] = _by_key(loader, (0, 1))
    for key, (img, msk, _) in results["cpu"].items():
        np.testing.assert_allclose(results["cuda"][key][0], img, rtol=0, atol=1e-6)
        np.testing.assert_array_equal(results["cuda"][key][1], msk)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_with_only_padding_still_yields_its_batches(aligned: Path, backend: str) -> None:
    cfg = _cfg(backend, crop_size=0)
    with build_loader(aligned, "val", cfg, 4, 5) as loader:  # 4 tiles, 5 ranks
        for epoch in (0, 1):
            loader.set_epoch(epoch)
            batches = list(loader)
            assert len(batches) == len(loader) == 1
            assert not batches[0].valid.any() and batches[0].keys == ["", "", ""]
            assert batches[0].image.shape == (3, 3, H, W)
            assert (batches[0].mask == IGNORE_INDEX).all()
        assert loader.stats.samples_padded == 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_training_rank_with_only_padding_yields_crop_sized_batches(aligned: Path,
                                                                   backend: str) -> None:
    # the other ranks' batches are 48 x 48 crops; DDP and the model see one shape
    with build_loader(aligned, "train", _cfg(backend), 10, 11, train=True) as loader:
        batches = list(loader)  # 10 tiles, 11 ranks: the last has none
    assert len(batches) == 1 and not batches[0].valid.any()
    assert batches[0].image.shape == (3, 3, 48, 48) and batches[0].mask.shape == (3, 48, 48)
    assert (batches[0].mask == IGNORE_INDEX).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_tiles_taller_than_one_vectored_read_flip_whole(tmp_path: Path, backend: str) -> None:
    """A vertical flip is done by the read, at most 1024 rows (Linux' IOV_MAX) per preadv."""
    tall = 1100
    data = write_dataset(tmp_path, {"train": [(f"AOI_9_Tall_img{i}", *aligned_tile(tall, 8, i))
                                              for i in range(2)]},
                         p2=ALIGNED_P2, p98=ALIGNED_P98)
    tiles = _tiles(data, "train")
    cfg = _cfg(backend, crop_size=0, rot90=False)
    spec = cfg.aug_spec()
    flips = set()
    with build_loader(data, "train", cfg, train=True) as loader:
        ids = {ref.key: i for i, ref in enumerate(loader.index.samples)}
        got = _by_key(loader, (0, 1, 2))
    for (epoch, key), (img, msk, _) in got.items():
        draws = Draws.draw(len(ids), cfg.seed, epoch, spec)
        g = Geometry.resolve(tall, 8, spec, draws, ids[key])
        flips.add(g.v)
        ref_img, ref_msk = _reference(*tiles[key][:2], g, *draws.bk[ids[key]])
        np.testing.assert_array_equal(msk, ref_msk)
        np.testing.assert_allclose(img, ref_img, rtol=0, atol=2e-6)
    assert flips == {False, True}


@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_tiles_with_rotations_pad_to_the_largest(aligned: Path, backend: str) -> None:
    seen = 0
    with build_loader(aligned, "train", _cfg(backend, crop_size=0), train=True) as loader:
        for b in loader:
            seen += int(b.valid.sum())
            assert b.image.shape[-2:] in ((H, W), (W, H), (W, W))
            for img, msk in zip(b.image[b.valid].numpy(), b.mask[b.valid].numpy(), strict=True):
                inside = msk != IGNORE_INDEX
                h, w = int(inside.any(1).sum()), int(inside.any(0).sum())
                assert (h, w) in ((H, W), (W, H)) and inside[:h, :w].all()
                assert inside.sum() == h * w  # the rest, bottom and right, is padding
                np.testing.assert_array_equal(mask_from_aligned(img[:, :h, :w]), msk[:h, :w])
                assert (img[:, ~inside] == 0).all()
    assert seen == 10  # every training tile, whole


def test_torch_workers_are_not_forked_from_this_threaded_process(
        aligned: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The trainer's process runs threads (DALI's, torch's intra-op pool, the metrics server,
    gloo's) when the DataLoader starts its workers: fork() then copies any lock another thread
    holds, and the child can deadlock on it (Python 3.12 warns: "This process is multi-threaded,
    use of fork() may lead to deadlocks in the child", seen on the GPU machine). The workers come
    from a forkserver instead, and read the same batches as the backend without workers."""
    forks: list[int] = []
    real_fork = os.fork

    def fork() -> int:  # (multiprocessing's fork start method calls os.fork in this process)
        forks.append(len(os.listdir("/proc/self/task")))
        return real_fork()

    monkeypatch.setattr(os, "fork", fork)
    stop = threading.Event()
    live = threading.Thread(target=stop.wait, daemon=True)
    live.start()
    try:
        with build_loader(aligned, "train", _cfg("torch-workers"), train=True) as loader:
            ctx = loader._backend.loader.multiprocessing_context
            assert ctx is not None and ctx.get_start_method() != "fork"
            with_workers = _by_key(loader, (0, 1))
    finally:
        stop.set()
        live.join()
    assert forks == [], f"fork() in a process of {forks} threads"
    with build_loader(aligned, "train", _cfg("torch"), train=True) as loader:
        assert loader._backend.loader.multiprocessing_context is None  # (no workers)
        in_process = _by_key(loader, (0, 1))
    assert with_workers.keys() == in_process.keys() and len(in_process) == 20
    for key, (img, msk, meta) in in_process.items():
        np.testing.assert_array_equal(with_workers[key][0], img)
        np.testing.assert_array_equal(with_workers[key][1], msk)
        assert with_workers[key][2] == meta
