"""Loader sharding: every rank a disjoint part, all ranks together every sample once, equal
batch counts, per-epoch reshuffle, and position arithmetic that resumes exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dataio.loader import IGNORE_INDEX, LoaderConfig, build_loader
from dataio.manifest import load_manifest
from dataio.sharding import PAD, batches_per_epoch, permutation, rank_slots, samples_done
from dataio.shards import iter_tar_samples

REPO = Path(__file__).resolve().parents[2]


def _split_keys(data: Path, split: str) -> list[str]:
    m = load_manifest(data)
    return [k for s in m.shards(split) for k, _ in iter_tar_samples(m.split_dir(split) / s["name"])]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("bs", [1, 3, 8])
def test_rank_slots_disjoint_complete_equal(world: int, bs: int) -> None:
    for n in range(1, 41):
        order = permutation(n, seed=5, epoch=n, shuffle=True)
        parts = [rank_slots(order, r, world, bs) for r in range(world)]
        assert {p.shape for p in parts} == {(batches_per_epoch(n, world, bs), bs)}
        ids = np.concatenate([p.ravel() for p in parts])
        real = ids[ids != PAD]
        assert sorted(real.tolist()) == list(range(n))  # each sample exactly once
        for p in parts:  # padding only at the end of a rank's list
            flat = p.ravel()
            first_pad = np.argmax(flat == PAD) if (flat == PAD).any() else len(flat)
            assert (flat[first_pad:] == PAD).all()
            # the ranks' shares differ by at most one sample
            assert abs((flat != PAD).sum() - n / world) < 1


@pytest.mark.parametrize("world,bs", [(1, 4), (2, 3), (3, 2), (4, 5)])
def test_resume_from_samples_done_gives_the_remaining_batches(world: int, bs: int) -> None:
    for n in (1, 7, 17, 24, 31):
        order = permutation(n, seed=1, epoch=2, shuffle=True)
        full = [rank_slots(order, r, world, bs) for r in range(world)]
        for step in range(len(full[0]) + 1):
            done = samples_done(n, 0, step, world, bs)
            for r in range(world):
                np.testing.assert_array_equal(rank_slots(order, r, world, bs, done), full[r][step:])
        # the last step's padding is not samples: a checkpoint never says more than n were read
        assert samples_done(n, 0, len(full[0]), world, bs) == n


def test_resume_with_another_world_size_still_reads_each_sample_once() -> None:
    n, bs = 29, 3
    order = permutation(n, seed=0, epoch=0, shuffle=True)
    before = [rank_slots(order, r, 2, bs)[:2] for r in range(2)]  # 2 steps on 2 ranks
    done = samples_done(n, 0, 2, 2, bs)
    after = [rank_slots(order, r, 3, bs, done) for r in range(3)]
    ids = np.concatenate([p.ravel() for p in before + after])
    assert sorted(ids[ids != PAD].tolist()) == list(range(n))


def test_permutation_is_seeded_and_changes_every_epoch() -> None:
    a = permutation(50, seed=3, epoch=0, shuffle=True)
    np.testing.assert_array_equal(a, permutation(50, seed=3, epoch=0, shuffle=True))
    assert not np.array_equal(a, permutation(50, seed=3, epoch=1, shuffle=True))
    assert not np.array_equal(a, permutation(50, seed=4, epoch=0, shuffle=True))
    np.testing.assert_array_equal(permutation(5, 3, 9, shuffle=False), np.arange(5))


@pytest.mark.parametrize("backend", ["dali", "torch"])
@pytest.mark.parametrize("world", [2, 3])
def test_simulated_ranks_cover_the_split_exactly_once(small_dataset: Path, backend: str,
                                                      world: int) -> None:
    cfg = LoaderConfig(backend=backend, batch_size=4, crop_size=64, num_threads=0 if
                       backend == "torch" else 1)
    expected = sorted(_split_keys(small_dataset, "train"))
    for epoch in (0, 1):
        seen: list[str] = []
        lengths = set()
        for rank in range(world):
            with build_loader(small_dataset, "train", cfg, rank, world, train=True) as loader:
                loader.set_epoch(epoch)
                batches = list(loader)
                lengths.add((len(loader), len(batches)))
                for b in batches:
                    assert b.image.shape[0] == b.mask.shape[0] == len(b.keys) == 4
                    pad = ~b.valid
                    assert [k for k, v in zip(b.keys, b.valid.tolist(), strict=True) if not v] \
                        == [""] * int(pad.sum())
                    assert (b.mask[pad] == IGNORE_INDEX).all()
                    assert (b.image[pad] == 0).all()
                    assert (b.mask[~pad] >= 0).all()
                    seen += [k for k in b.keys if k]
                stats = loader.stats.as_dict()
                assert stats["samples_read"] == sum(1 for b in batches for v in b.valid if v)
        assert len(lengths) == 1  # every rank yields the same number of batches
        assert sorted(seen) == expected  # disjoint and complete


def test_eval_order_is_fixed_and_split_by_rank(small_dataset: Path) -> None:
    cfg = LoaderConfig(batch_size=2)
    with build_loader(small_dataset, "val", cfg, 0, 2) as a, \
            build_loader(small_dataset, "val", cfg, 1, 2) as b:
        keys = [[k for batch in loader for k in batch.keys] for loader in (a, b)]
        a.set_epoch(5)
        assert [k for batch in a for k in batch.keys] == keys[0]  # no shuffle for evaluation
    assert not set(keys[0]) & set(keys[1]) - {""}
    assert sorted(k for k in keys[0] + keys[1] if k) == sorted(_split_keys(small_dataset, "val"))


def test_loader_warnings_go_through_the_trainers_rank_logger() -> None:
    """Under torchrun every rank may warn (a shard left out); the line must say which rank."""
    code = ("from trainer.dist import DistEnv, setup_logging\n"
            "setup_logging(DistEnv(rank=1, world_size=2))\n"
            "from dataio import dali_pipe, loader, plan, sharding\n"
            "for m in (dali_pipe, loader, plan, sharding):\n"
            "    m.log.warning('from %s', m.__name__)\n"
            "    m.log.info('hidden on rank 1')\n")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=120, check=True)
    lines = out.stderr.splitlines()
    for name in ("dataio.dali_pipe", "dataio.loader", "dataio.plan", "dataio.sharding"):
        assert any(line.endswith(f"[rank 1] WARNING from {name}") for line in lines), out.stderr
    assert "hidden" not in out.stderr


@pytest.mark.parametrize(("local_rank", "gpus", "want"), [
    ("1", 1, 0),  # one GPU bound per process (CUDA_VISIBLE_DEVICES per rank): it is cuda:0
    ("3", 4, 3), ("", 2, 1), (None, 2, 1)])  # no LOCAL_RANK: the rank's
def test_the_default_device_is_the_local_ranks_gpu(monkeypatch: pytest.MonkeyPatch,
                                                   local_rank: str | None, gpus: int,
                                                   want: int) -> None:
    import torch

    from dataio.loader import resolve_device

    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    assert resolve_device(None, rank=1) == torch.device("cuda", want)
