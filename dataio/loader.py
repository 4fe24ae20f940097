"""The data loader the trainer and predictor use: batches of prepared shards on the right device.

    loader = build_loader(DATA, "train", LoaderConfig(), rank, world_size, train=True)
    for epoch in range(start, epochs):
        loader.set_epoch(epoch)
        for batch in loader:          # Batch(image, mask, keys, valid, meta)
            ...
        checkpoint["loader"] = loader.state_dict()

Backends (``LoaderConfig.backend``): ``"dali"`` (default; :mod:`dataio.dali_pipe`) and
``"torch"`` (:mod:`dataio.torch_pipe`). Both follow the same plan (:mod:`dataio.sharding`,
:mod:`dataio.augment`) and give the same tensors for the same sample. The device: CUDA device
``LOCAL_RANK`` when CUDA is present (DALI then runs a GPU pipeline on it), else the CPU (a
CPU-only DALI pipeline). The torch backend's DataLoader workers (``num_threads`` > 0) start from a
forkserver, never by fork() of this threaded process (:func:`dataio.torch_pipe.worker_context`):
a script that builds such a loader needs the usual ``if __name__ == "__main__":`` guard.

Every rank yields ``len(loader)`` batches per epoch, so DDP never waits on a rank with less data.
Padding slots (at the end of a rank's epoch) and skipped samples come with ``valid=False``, an
all-``IGNORE_INDEX`` mask and a zero image: the loss ignores them by ``ignore_index``; metrics must
use only ``valid`` samples (NOTE: a batch can be entirely padding, in which case a mean-reduced
cross entropy is NaN; sum the loss and divide by the valid pixels, or skip the backward for it).

With ``train=False`` tiles are whole and not augmented. If a batch mixes tile sizes, every sample
is padded at the bottom/right to the largest (image 0, mask ``IGNORE_INDEX``); SpaceNet tiles of
an AOI share one size, so this does not normally happen.

Position: ``state_dict()`` is ``{"epoch", "step", "samples_done", ...}`` after the batches
yielded so far; ``load_state_dict`` makes the next ``__iter__`` continue with exactly the batches
an uninterrupted epoch would have yielded (same world size and batch size; with others, it still
reads each remaining sample once). ``set_epoch`` with the restored epoch keeps the position, any
other epoch starts at step 0. Without a restored position each ``__iter__`` starts the epoch from
the beginning (as with ``DistributedSampler``, call ``set_epoch`` to reshuffle).

The DALI pipeline or DataLoader is built once per loader and reused for every epoch; abandoning an
epoch midway costs one DALI pipeline rebuild (well under a second).

Bad input: shards are checked against the manifest (size, index, sample count) when the loader is
built; one that fails is left out with a warning and counted in ``stats.shards_skipped``. A sample
that does not read or decode becomes an empty slot (``valid=False``) with a warning, counted in
``stats.samples_skipped`` by reason, in both backends (DALI rebuilds its pipeline once to get past
it, see :mod:`dataio.dali_pipe`); epochs keep their length. Each rank checks the shards on its
own; the trainer and predict compare ``loader.fingerprint`` across ranks
(``trainer.dist.agreed_loader``) and stop every rank if one reads other data.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dataio.augment import MASK_PAD, AugSpec, Normaliser
from dataio.hostpool import HostPool
from dataio.manifest import MANIFEST, load_manifest
from dataio.plan import EpochPlan, RawBatch
from dataio.reader import SampleError, ShardReader
from dataio.sharding import (
    PAD,
    DataError,
    batches_per_epoch,
    samples_done,
    usable_samples,
)

log = logging.getLogger(f"footprints.{__name__}")  # under the trainer: its [rank N] handler

IGNORE_INDEX = -100
BACKENDS = ("dali", "torch")
# NOTE: the widest seed every consumer keeps whole (torch CPU, numpy legacy, DALI: 32 bits)
MAX_SEED = 2**32 - 1


@dataclass
class LoaderConfig:
    backend: str = "dali"  # "dali" | "torch"
    batch_size: int = 8  # per rank
    crop_size: int = 512  # training random crop; 0 = whole tiles
    flip: bool = True
    rot90: bool = True
    brightness: float = 0.1  # max relative change, 0 = off
    contrast: float = 0.1
    num_threads: int = 2  # DALI CPU threads (at least 1) / DataLoader workers (0: main process)
    prefetch: int = 2  # DALI queue depth / DataLoader prefetch factor
    # DALI backend: steps read ahead in a thread of the loader's own, so that reading overlaps
    # the training step (0: read inside DALI's callback, on the training thread)
    read_ahead: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.backend not in BACKENDS:
            raise ValueError(f"loader backend {self.backend!r} is not one of {BACKENDS} "
                             "(set data.backend)")
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {self.batch_size}")
        # NOTE: numpy's generators take no negative seed; DALI keeps the low 32 bits of its
        # pipeline seed and fails to build at 2**63 (after the process group and the model).
        if not 0 <= self.seed <= MAX_SEED:
            raise ValueError(f"data.seed must be in [0, {MAX_SEED}], got {self.seed}")
        if self.read_ahead < 0:
            raise ValueError(f"data.read_ahead must be >= 0, got {self.read_ahead}")
        if self.num_threads < 0 or self.prefetch < 1:
            raise ValueError(f"data.num_threads must be >= 0 and data.prefetch >= 1, got "
                             f"{self.num_threads} and {self.prefetch}")
        self.aug_spec()  # validates crop_size, brightness, contrast

    def aug_spec(self) -> AugSpec:
        return AugSpec(self.crop_size, self.flip, self.rot90, self.brightness, self.contrast)


@dataclass
class Batch:
    image: torch.Tensor  # float32 NCHW, normalised, on the loader's device
    mask: torch.Tensor  # int64 NHW; padding is all IGNORE_INDEX (-100) so the loss skips it
    keys: list[str]  # ImageIds; "" for padding and skipped samples
    valid: torch.Tensor  # bool N, False for padding and skipped samples (exclude from metrics)
    meta: list[dict[str, Any]]  # each sample's meta.json; {} for padding


@dataclass
class LoaderStats:
    """Counters since the loader was built. For Prometheus: ``loader_<name>_total``, the two
    dicts as one counter each with a ``reason`` label (``samples_skipped``: img_invalid,
    mask_invalid, meta_invalid, read_error; ``shards_skipped``: missing, size, index_missing,
    index_changed, index_invalid, sample_count, other)."""

    samples_read: int = 0  # valid samples yielded
    samples_padded: int = 0  # padding slots yielded (ranks' shares rounded up to full batches)
    batches: int = 0
    shards_skipped: Counter[str] = field(default_factory=Counter)  # by reason, once per build
    samples_skipped: Counter[str] = field(default_factory=Counter)  # by reason, per occurrence
    pipeline_rebuilds: int = 0  # DALI pipelines rebuilt to get past a sample it cannot decode

    def as_dict(self) -> dict[str, Any]:
        return {"samples_read": self.samples_read, "samples_padded": self.samples_padded,
                "batches": self.batches, "shards_skipped": dict(self.shards_skipped),
                "samples_skipped": dict(self.samples_skipped),
                "pipeline_rebuilds": self.pipeline_rebuilds}


def resolve_device(device: torch.device | str | None, rank: int) -> torch.device:
    """``None``: CUDA device ``LOCAL_RANK`` (torchrun) when CUDA is present, else the CPU."""
    if device is not None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device
    if torch.cuda.is_available():
        # as trainer.dist.device_for: one visible GPU per process (CUDA_VISIBLE_DEVICES set per
        # rank) is cuda:0 whatever LOCAL_RANK says
        local = int(os.environ.get("LOCAL_RANK") or rank) % torch.cuda.device_count()
        return torch.device("cuda", local)
    return torch.device("cpu")


class Loader:
    """One split for one rank; see the module docstring."""

    def __init__(self, data: Path, split: str, cfg: LoaderConfig, rank: int = 0,
                 world_size: int = 1, train: bool = False,
                 device: torch.device | str | None = None,
                 percentiles: tuple[list[float], list[float]] | None = None) -> None:
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.cfg, self.rank, self.world_size, self.train = cfg, rank, world_size, train
        manifest = load_manifest(Path(data))
        self.index = usable_samples(manifest, split)
        if percentiles is not None and len(percentiles[0]) != manifest.bands:
            raise DataError(f"{manifest.root / MANIFEST}: {manifest.bands} bands, but "
                            f"the given percentiles are for {len(percentiles[0])}")
        # NOTE: trainer.predict passes the run's (training) percentiles: a model sees its inputs
        # scaled as in training, whatever dataset it predicts on.
        self.norm = Normaliser(*(percentiles or manifest.percentiles()))
        self.labels = manifest.labels  # False: masks are all MASK_PAD, IGNORE_INDEX in batches
        self.spec = cfg.aug_spec() if train else None
        self.device = resolve_device(device, rank)
        self.fingerprint = self.index.fingerprint()
        self.stats = LoaderStats(shards_skipped=Counter(self.index.shards_skipped))
        self._bad: dict[int, str] = {}  # sample ids DALI could not decode (torch re-detects)
        self._told_small_tile = False
        self._epoch, self._step, self._done, self._resume = 0, 0, 0, False
        self._live: Generator[Batch, None, None] | None = None  # the epoch being iterated
        self._reader = ShardReader(manifest.bands)
        self._pool = HostPool()
        self._backend = self._make_backend(self._fallback_shape())

    def _fallback_shape(self) -> tuple[int, int]:
        """Output size of a batch that holds no sample at all."""
        if self.spec is not None and self.spec.crop:
            return (self.spec.crop, self.spec.crop)
        for ref in self.index.samples[:16]:
            try:
                hdr = self._reader.header(ref)
                return (hdr.height, hdr.width)
            except SampleError:
                continue
        return (1, 1)

    def _make_backend(self, fallback: tuple[int, int]) -> Any:
        cfg = self.cfg
        if cfg.backend == "torch":
            from dataio.torch_pipe import TorchBackend

            return TorchBackend(self.index.samples, self.spec, self.norm, seed=cfg.seed,
                                rank=self.rank, world_size=self.world_size,
                                batch_size=cfg.batch_size, num_workers=cfg.num_threads,
                                prefetch=cfg.prefetch, device=self.device,
                                fallback_shape=fallback)
        try:
            from dataio.dali_pipe import DaliBackend
        except ImportError as e:  # pragma: no cover - DALI is a dependency
            raise ImportError(f"the DALI backend needs nvidia-dali ({e}); install it or set "
                              "data.backend=torch") from e
        backend = DaliBackend(self._reader, self.norm.bands, cfg.batch_size,
                              max(1, cfg.num_threads), cfg.prefetch, self.device, cfg.seed,
                              self._pool, transposes=self.spec is not None and self.spec.rot90,
                              read_ahead=cfg.read_ahead)
        backend.fallback_shape = fallback
        return backend

    # ---- epochs and position ------------------------------------------------------------

    @property
    def num_samples(self) -> int:
        return len(self.index)

    def __len__(self) -> int:
        return batches_per_epoch(self.num_samples, self.world_size, self.cfg.batch_size)

    def set_epoch(self, epoch: int) -> None:
        if self._resume and epoch == self._epoch:
            return  # continue the restored epoch where it stopped
        self._epoch, self._step, self._done, self._resume = epoch, 0, 0, False

    def __iter__(self) -> Iterator[Batch]:
        # NOTE: one epoch at a time (one position, one DALI pipeline): an iterator still held
        # from before (``it = iter(loader)`` in a notebook) ends here; left running, it fed the
        # same pipeline as the new one and moved the same position.
        self._end_live()
        self._live = self._batches()
        return self._live

    def _end_live(self) -> None:
        if self._live is not None:
            self._live.close()
            self._live = None

    def _batches(self) -> Generator[Batch, None, None]:
        if not self._resume:
            self._step, self._done = 0, 0
        self._resume = False
        start_done, start_step = self._done, self._step
        plan = EpochPlan.make(self.index.samples, self.spec, self.norm, seed=self.cfg.seed,
                              epoch=self._epoch, rank=self.rank, world_size=self.world_size,
                              batch_size=self.cfg.batch_size, done=start_done,
                              first_step=start_step, bad=self._bad)
        if self.cfg.backend == "torch":
            raws = self._backend.epoch(plan, start_done)
        else:
            raws = self._backend.epoch(plan)
        try:
            for k, raw in enumerate(raws, start=1):
                batch = self._finish(raw)
                # NOTE: advance before yielding: a checkpoint taken while this batch is being
                # trained on must resume after it.
                self._step = start_step + k
                self._done = samples_done(self.num_samples, start_done, k, self.world_size,
                                          self.cfg.batch_size)
                yield batch
        finally:
            raws.close()  # the backend's own clean-up, now rather than when collected

    def _finish(self, raw: RawBatch) -> Batch:
        rec = raw.record
        mask = raw.mask
        if mask.dtype != torch.int64:
            mask = (self._pool.empty(tuple(mask.shape), torch.int64).copy_(mask)
                    if mask.device.type == "cpu" else mask.long())
        if rec.padded_pixels or not rec.valid.all() or not self.labels:
            mask.masked_fill_(mask == MASK_PAD, IGNORE_INDEX)
        if rec.small_tile is not None and not self._told_small_tile:
            self._warn_small_tile(*rec.small_tile)
        st = self.stats
        st.batches += 1
        st.samples_read += int(rec.valid.sum())
        st.samples_padded += sum(1 for i in rec.ids if i == PAD)
        st.samples_skipped.update(r for r in rec.reasons if r is not None)
        st.pipeline_rebuilds = self._backend.rebuilds
        valid = torch.from_numpy(np.asarray(rec.valid, dtype=bool)).to(self.device)
        return Batch(raw.image, mask, rec.keys, valid, rec.metas)

    def _warn_small_tile(self, key: str, height: int, width: int) -> None:
        """Once per loader, on rank 0: a crop larger than a tile is cut to the tile and padded
        back to ``crop x crop`` with pixels the loss ignores (see :mod:`dataio.augment`).

        NOTE: a warning, not torchvision RandomCrop's or DALI crop's error: padding is what
        their pad_if_needed=True / out_of_bounds_policy="pad" do, and this loader's contract
        (tiles of several AOIs, or non-square ones, may be smaller than the crop on one side).
        But a crop larger than every tile (1024 on SpaceNet's 650 px) mostly computes padding.
        """
        self._told_small_tile = True
        crop = self.cfg.crop_size
        if self.rank == 0:
            log.warning("data.crop_size=%d is larger than tile %s (%d x %d px): its crops are "
                        "the tile padded to %d x %d with pixels the loss ignores, computed all "
                        "the same; set data.crop_size to at most the tile size (0: whole "
                        "tiles)", crop, key, height, width, crop, crop)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch, "step": self._step, "samples_done": self._done,
                "world_size": self.world_size, "batch_size": self.cfg.batch_size,
                "num_samples": self.num_samples, "fingerprint": self.fingerprint,
                "seed": self.cfg.seed, "train": self.train}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The next ``__iter__`` (after ``set_epoch`` of the same epoch, or none) resumes."""
        self._epoch, self._step, self._done, self._resume = int(state["epoch"]), 0, 0, True
        same_data = (state.get("fingerprint") == self.fingerprint
                     and state.get("num_samples") == self.num_samples
                     and state.get("seed") == self.cfg.seed)
        if not same_data:
            log.warning("loader state is for other data or another seed (fingerprint %s, %s "
                        "samples, seed %s; now %s, %s, %s): epoch %d restarts at step 0",
                        state.get("fingerprint"), state.get("num_samples"), state.get("seed"),
                        self.fingerprint, self.num_samples, self.cfg.seed, self._epoch)
            return
        self._done = min(int(state["samples_done"]), self.num_samples)
        if (state.get("world_size"), state.get("batch_size")) == (self.world_size,
                                                                  self.cfg.batch_size):
            self._step = int(state["step"])
        else:
            rest = batches_per_epoch(self.num_samples - self._done, self.world_size,
                                     self.cfg.batch_size)
            self._step = len(self) - rest

    def close(self) -> None:
        self._end_live()
        self._backend.close()
        self._reader.close()

    def __enter__(self) -> Loader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_loader(data: Path, split: str, cfg: LoaderConfig, rank: int = 0, world_size: int = 1,
                 train: bool = False, device: torch.device | None = None,
                 percentiles: tuple[list[float], list[float]] | None = None) -> Loader:
    """The loader for ``split`` of the prepared dataset ``data`` (see the module docstring);
    ``percentiles`` (p2, p98 per band) replace the manifest's for the normalisation."""
    return Loader(data, split, cfg, rank, world_size, train, device, percentiles)
