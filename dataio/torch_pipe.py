"""The torch backend: the same plan, decoded with numpy/PIL in ``DataLoader`` worker processes.

The reference the benchmark compares DALI with, and the fallback a user can choose
(``backend="torch"``). A worker gets ``(epoch, samples_done, first_step, j)`` and rebuilds the
epoch's plan itself from the seed (cheap, cached), so persistent workers need no plan shipped to
them and a restored position is just a different first item. A sample that does not read or
decode leaves its slot empty (``valid=False``) with the reason in the batch record, which the
loader counts; nothing short-changes the epoch.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterator
from multiprocessing.context import BaseContext
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from dataio.augment import MASK_PAD, AugSpec, Normaliser, transform_image, transform_mask
from dataio.plan import EpochPlan, RawBatch, prepare_step
from dataio.reader import ShardReader
from dataio.sharding import SampleRef

StepKey = tuple[int, int, int, int]  # epoch, samples done before the plan, first step, row


class _Steps(Dataset):
    """Map-style dataset whose items are whole batches, addressed by :data:`StepKey`."""

    def __init__(self, refs: list[SampleRef], spec: AugSpec | None, norm: Normaliser, *,
                 seed: int, rank: int, world_size: int, batch_size: int,
                 fallback_shape: tuple[int, int]) -> None:
        self.refs, self.spec, self.norm = refs, spec, norm
        self.seed, self.rank, self.world_size, self.batch_size = seed, rank, world_size, batch_size
        self.fallback_shape = fallback_shape
        self.reader = ShardReader(norm.bands)
        self._plan: tuple[tuple[int, int, int], EpochPlan] | None = None

    def plan(self, epoch: int, done: int, first_step: int) -> EpochPlan:
        key = (epoch, done, first_step)
        if self._plan is None or self._plan[0] != key:
            plan = EpochPlan.make(self.refs, self.spec, self.norm, seed=self.seed, epoch=epoch,
                                  rank=self.rank, world_size=self.world_size,
                                  batch_size=self.batch_size, done=done, first_step=first_step)
            self._plan = (key, plan)
        return self._plan[1]

    def __len__(self) -> int:  # not used for sampling; DataLoader wants it
        return 0

    def __getitem__(self, key: StepKey) -> tuple[Any, torch.Tensor, torch.Tensor]:
        epoch, done, first_step, j = key
        inputs = prepare_step(self.plan(epoch, done, first_step), j, self.reader,
                              decode_mask=True)
        height, width = inputs.target or self.fallback_shape
        bs = self.batch_size
        image = np.zeros((bs, self.norm.bands, height, width), np.float32)
        mask = np.full((bs, height, width), MASK_PAD, np.uint8)
        for it in inputs.items:
            oh, ow = it.geom.out_shape
            transform_image(it.rows, it.geom, it.mean, it.std, out=image[it.slot, :, :oh, :ow])
            mask[it.slot, :oh, :ow] = transform_mask(it.mask, it.geom)
        return inputs.record, torch.from_numpy(image), torch.from_numpy(mask)


class _StepSampler(Sampler):
    """Yields the current epoch's step keys; reassigned before each epoch."""

    def __init__(self) -> None:
        self.keys: list[StepKey] = []

    def __iter__(self) -> Iterator[StepKey]:
        return iter(self.keys)

    def __len__(self) -> int:
        return len(self.keys)


def _as_is(item: Any) -> Any:
    return item


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # the workers are the parallelism; no nested thread pools


def worker_context(num_workers: int) -> BaseContext | None:
    """How the DataLoader starts its workers: from a forkserver, never by fork() of this process.

    NOTE: the loader's process runs threads by the time the workers start (DALI's, torch's
    intra-op pool, the metrics server, gloo's), and fork() copies a lock another thread holds
    into a child that can then deadlock on it (Python 3.12 warns "This process is
    multi-threaded, use of fork() may lead to deadlocks in the child"). A forkserver is a
    fresh, single-threaded process that forks the workers; it imports this module (and so
    torch and numpy) once, so a worker starts without importing them again. Workers are
    persistent: the start is paid once per loader, not per epoch. Spawn where there is no
    forkserver."""
    if num_workers == 0:
        return None
    if "forkserver" not in mp.get_all_start_methods():
        return mp.get_context("spawn")
    ctx = mp.get_context("forkserver")
    # NOTE: a worker also imports the main module run with -m (trainer.train, as
    # __mp_main__), as under spawn: ~0.6 s a loader on 2 cores, in its workers at once.
    # Preloading it here too made every worker warn (runpy: "found in sys.modules ... prior
    # to execution"). (A process-wide setting, read when the forkserver starts: nothing
    # else here uses one.)
    ctx.set_forkserver_preload([__name__])
    return ctx


class TorchBackend:
    """Runs plans through one ``DataLoader`` with persistent workers."""

    def __init__(self, refs: list[SampleRef], spec: AugSpec | None, norm: Normaliser, *,
                 seed: int, rank: int, world_size: int, batch_size: int, num_workers: int,
                 prefetch: int, device: torch.device, fallback_shape: tuple[int, int]) -> None:
        self.device = device
        self.dataset = _Steps(refs, spec, norm, seed=seed, rank=rank, world_size=world_size,
                              batch_size=batch_size, fallback_shape=fallback_shape)
        self.sampler = _StepSampler()
        workers = num_workers > 0
        self.loader = DataLoader(self.dataset, batch_size=None, sampler=self.sampler,
                                 collate_fn=_as_is, num_workers=num_workers,
                                 persistent_workers=workers,
                                 prefetch_factor=prefetch if workers else None,
                                 pin_memory=device.type == "cuda", worker_init_fn=_worker_init,
                                 multiprocessing_context=worker_context(num_workers))
        self.rebuilds = 0

    def epoch(self, plan: EpochPlan, done: int) -> Iterator[RawBatch]:
        self.sampler.keys = [(plan.epoch, done, plan.first_step, j) for j in range(plan.steps)]
        for record, image, mask in self.loader:
            if image.device != self.device:
                image = image.to(self.device, non_blocking=True)
                mask = mask.to(self.device, non_blocking=True)
            yield RawBatch(record, image, mask)

    def close(self) -> None:
        self.loader = None  # persistent workers exit with their iterator
