"""One epoch of one rank, step by step: which samples, read how, augmented how.

Both backends call :func:`prepare_step` (DALI from its ``external_source`` callback, torch in a
DataLoader worker), so they read the same bytes with the same parameters; they differ only in
who decodes the mask and who computes the pixels.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from dataio.augment import MASK_PAD, AugSpec, Draws, Geometry, Normaliser
from dataio.reader import Header, SampleError, ShardReader
from dataio.sharding import PAD, SampleRef, permutation, rank_slots

log = logging.getLogger(f"footprints.{__name__}")  # under the trainer: its [rank N] handler


@dataclass
class EpochPlan:
    """The remaining steps of one epoch on one rank, and what they need."""

    refs: list[SampleRef]
    spec: AugSpec | None
    norm: Normaliser
    epoch: int
    first_step: int  # the epoch step number of ``slots[0]`` (>0 after a restore)
    slots: np.ndarray  # (steps, batch_size) sample ids, PAD for padding
    draws: Draws | None
    bad: dict[int, str] = field(default_factory=dict)  # ids known not to decode -> reason

    @classmethod
    def make(cls, refs: list[SampleRef], spec: AugSpec | None, norm: Normaliser, *, seed: int,
             epoch: int, rank: int, world_size: int, batch_size: int, done: int,
             first_step: int, bad: dict[int, str] | None = None) -> EpochPlan:
        order = permutation(len(refs), seed, epoch, shuffle=spec is not None)
        slots = rank_slots(order, rank, world_size, batch_size, done)
        draws = Draws.draw(len(refs), seed, epoch, spec)
        return cls(refs, spec, norm, epoch, first_step, slots, draws,
                   {} if bad is None else bad)

    @property
    def steps(self) -> int:
        return len(self.slots)

    @property
    def batch_size(self) -> int:
        return self.slots.shape[1]


@dataclass
class StepRecord:
    """What a batch holds besides pixels: keys, metas, validity and why a slot is empty."""

    step: int  # within the epoch
    ids: list[int]
    keys: list[str]
    metas: list[dict[str, Any]]
    valid: np.ndarray  # bool (batch_size,)
    reasons: list[str | None]  # per slot: None for a sample or padding, else why it was skipped
    shape: tuple[int, int] | None = None  # output H, W (None: no valid sample in the batch)
    padded_pixels: bool = False  # some sample is smaller than the batch (mask gets IGNORE)
    # the first sample whose tile is smaller than the training crop: key, height, width
    small_tile: tuple[str, int, int] | None = None


@dataclass
class SampleInput:
    """Everything a backend needs to produce one sample's tensors."""

    slot: int
    geom: Geometry
    rows: np.ndarray  # uint16 (ch, W, C): the crop's rows, vertically flipped if geom.v
    mask: Any  # PNG bytes (DALI decodes them) or a decoded uint8 (H, W) array
    mean: np.ndarray
    std: np.ndarray


@dataclass
class StepInputs:
    record: StepRecord
    items: list[SampleInput]
    target: tuple[int, int] | None  # the batch's output H, W


Alloc = Callable[[tuple[int, int, int]], np.ndarray]  # a uint16 buffer for the rows


def read_sample(reader: ShardReader, ref: SampleRef, plan: EpochPlan, sid: int, slot: int,
                decode_mask: bool, alloc: Alloc | None) -> tuple[SampleInput, dict[str, Any]]:
    hdr: Header = reader.header(ref)
    g = Geometry.resolve(hdr.height, hdr.width, plan.spec, plan.draws, sid)
    meta = reader.meta(ref)
    mask = reader.mask(ref, hdr) if decode_mask else reader.mask_png(ref, hdr)
    out = alloc((g.ch, hdr.width, hdr.bands)) if alloc is not None else None
    rows = reader.rows(ref, hdr, g.ay, g.ch, g.v, out=out)
    b, k = (plan.draws.bk[sid] if plan.draws is not None else (1.0, 1.0))
    mean, std = plan.norm.mean_std(float(b), float(k))
    return SampleInput(slot, g, rows, mask, mean, std), meta


def prepare_step(plan: EpochPlan, j: int, reader: ShardReader, decode_mask: bool,
                 alloc: Alloc | None = None) -> StepInputs:
    """Read the samples of row ``j`` of the plan; unusable ones become empty slots."""
    bs = plan.batch_size
    rec = StepRecord(plan.first_step + j, [int(i) for i in plan.slots[j]], [""] * bs,
                     [{} for _ in range(bs)], np.zeros(bs, bool), [None] * bs)
    items: list[SampleInput] = []
    for slot, sid in enumerate(rec.ids):
        if sid == PAD:
            continue
        ref = plan.refs[sid]
        if sid in plan.bad:
            rec.reasons[slot] = plan.bad[sid]
            continue
        try:
            item, meta = read_sample(reader, ref, plan, sid, slot, decode_mask, alloc)
        except SampleError as e:
            log.warning("skipping sample %s of %s (%s): %s", ref.key, ref.shard, e.reason, e)
            rec.reasons[slot] = e.reason
            continue
        items.append(item)
        rec.keys[slot], rec.metas[slot], rec.valid[slot] = ref.key, meta, True
    crop = plan.spec.crop if plan.spec is not None else 0
    rec.small_tile = next(((rec.keys[it.slot], it.geom.height, it.geom.width) for it in items
                           if crop > min(it.geom.height, it.geom.width)), None)
    target = batch_shape(plan.spec, [it.geom.out_shape for it in items])
    rec.shape = target
    rec.padded_pixels = any(it.geom.out_shape != target for it in items)
    return StepInputs(rec, items, target)


def batch_shape(spec: AugSpec | None, shapes: list[tuple[int, int]]) -> tuple[int, int] | None:
    """A training crop is always ``crop x crop``; otherwise the largest sample of the batch."""
    if spec is not None and spec.crop:
        return (spec.crop, spec.crop)
    if not shapes:
        return None
    return (max(s[0] for s in shapes), max(s[1] for s in shapes))


@dataclass
class RawBatch:
    """A backend's output: owned tensors; empty slots hold image 0 and mask ``MASK_PAD``."""

    record: StepRecord
    image: torch.Tensor  # float32 (N, C, H, W) in [0, 1]
    mask: torch.Tensor  # uint8 or int64 (N, H, W); MASK_PAD where there is no sample


def empty_batch(record: StepRecord, bands: int, shape: tuple[int, int], device: torch.device,
                mask_dtype: torch.dtype = torch.uint8) -> RawBatch:
    """A batch with no sample in it (trailing padding, or every sample skipped)."""
    n = len(record.ids)
    return RawBatch(record, torch.zeros((n, bands, *shape), device=device),
                    torch.full((n, *shape), MASK_PAD, dtype=mask_dtype, device=device))
