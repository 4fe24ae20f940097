"""Which samples each rank reads, in which order, every epoch; and how a position is restored.

NOTE: why not DALI's own sharding. ``fn.readers.webdataset(shard_id, num_shards)`` cuts the
concatenated sample list into ``num_shards`` contiguous ranges; ``random_shuffle`` only shuffles
inside an ``initial_fill`` buffer of the range; ``stick_to_shard=False`` moves every pipeline to
the next range after each epoch, and ``pad_last_batch`` repeats the last sample with nothing in
the output saying which samples are repeats. Neither a global per-epoch reshuffle reproducible from
a seed, nor padding that can be excluded from metrics, nor a restorable mid-epoch position comes
out of that. So the order is made here and both backends follow it (DALI through
``fn.external_source``):

* the split's usable samples (shards that pass :func:`dataio.shards.check_shard`) are numbered
  0..N-1 in manifest order;
* epoch ``e`` permutes them with ``SeedSequence([seed, e])`` (no shuffle for evaluation);
* rank ``r`` of ``W`` takes every W-th element of the permutation starting at ``r`` (strided, so
  the ranks' counts differ by at most one) and pads its list with ``-1`` to
  ``batches * batch_size`` where ``batches = ceil(ceil(N / W) / batch_size)`` is the same on every
  rank. Together the ranks read every sample exactly once; padding sits at the end of a rank's
  list and comes out with ``valid=False``;
* after ``s`` steps on every rank exactly the first ``min(N, s * batch_size * W)`` elements of
  the permutation were read, so a position is ``(epoch, samples_done)`` and resuming re-splits the
  rest of the permutation the same way: with the same world size this gives the very batches an
  uninterrupted epoch would have given.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dataio.imageid import IMAGE_ID_RE
from dataio.manifest import Manifest
from dataio.shards import COMPONENTS, check_shard

log = logging.getLogger(f"footprints.{__name__}")  # under the trainer: its [rank N] handler

PAD = -1  # a slot that holds no sample


class DataError(RuntimeError):
    """Input the loader cannot use; the message names the file (and sample) and the problem."""

    refusal = True  # bad input, not a failure of the run (trainer.dist.refusal: exit code 2)


@dataclass(frozen=True)
class SampleRef:
    """Where one sample's members lie inside its shard (from the DALI index, no tar parsing)."""

    key: str
    shard: Path
    members: dict[str, tuple[int, int]]  # component -> (offset, size) in the tar


def shard_reason(message: str) -> str:
    """A short metric label for a :func:`check_shard` message."""
    for needle, label in (("index missing", "index_missing"), ("index size", "index_changed"),
                          ("lists", "sample_count"), ("not a DALI", "index_invalid"),
                          ("missing", "missing"), ("bytes on disk", "size")):
        if needle in message:
            return label
    return "other"


def _parse_index(idx: Path, tar: Path, expected: int) -> list[SampleRef]:
    """Parse a DALI webdataset index (``v1.2 N`` then ``ext offset size name ...`` per sample)."""
    lines = idx.read_text(encoding="utf-8").splitlines()
    refs = []
    for line in lines[1:]:
        parts = line.split()
        if len(parts) % 4:
            raise ValueError(f"malformed line {line[:80]!r}")
        members = {parts[i]: (int(parts[i + 1]), int(parts[i + 2]))
                   for i in range(0, len(parts), 4)}
        missing = [c for c in COMPONENTS if c not in members]
        if missing:
            raise ValueError(f"sample without {missing} ({line[:80]!r})")
        name = parts[3]
        key = name.partition(".")[0]
        # NOTE: keys become file names downstream (prediction shards, GeoJSON per tile): a
        # member like "../x.img.npy" is not something prepare writes, so the shard is refused.
        if "/" in name or not IMAGE_ID_RE.fullmatch(key):
            raise ValueError(f"sample key {key!r} of member {name!r} is not an ImageId")
        refs.append(SampleRef(key, tar, members))
    if len(refs) != expected:
        raise ValueError(f"{len(refs)} sample lines, header/manifest says {expected}")
    return refs


@dataclass
class SampleIndex:
    """The usable samples of one split, and the shards left out (with reasons)."""

    samples: list[SampleRef]
    shards_skipped: Counter[str] = field(default_factory=Counter)
    skipped_detail: list[str] = field(default_factory=list)

    @classmethod
    def build(cls, manifest: Manifest, split: str, warn: bool = True,
              until_usable: bool = False) -> SampleIndex:
        """Check every shard of ``split`` against the manifest before anything opens it;
        ``warn``: log each shard left out (a check before the loaders, which log them, does
        not); ``until_usable``: stop after the first usable shard (see :func:`check_usable`)."""
        directory = manifest.split_dir(split)
        out = cls([])
        for info in manifest.shards(split):
            reason = check_shard(directory, info)
            tar, idx = directory / info["name"], directory / info["index"]
            label = shard_reason(reason) if reason else "index_invalid"
            if reason is None:
                try:
                    out.samples.extend(_parse_index(idx, tar, info["samples"]))
                    if until_usable and out.samples:
                        break
                    continue
                except (OSError, ValueError, UnicodeDecodeError) as e:
                    reason = f"{idx}: unusable index ({e})"
            out.shards_skipped[label] += 1
            out.skipped_detail.append(reason)
            if warn:
                log.warning("leaving out shard %s (%s): %s", tar, label, reason)
        return out

    def __len__(self) -> int:
        return len(self.samples)

    def fingerprint(self) -> str:
        """Identifies the sample list, in order: ranks must agree on it, and a loader resumes
        mid-epoch only in the list it left (else at the epoch's start). Not the dataset's
        identity for a resume: :meth:`dataio.manifest.Manifest.fingerprint` (see there why two)."""
        h = hashlib.sha1()
        for ref in self.samples:
            h.update(f"{ref.shard.name}/{ref.key};".encode())
        return h.hexdigest()[:16]


def usable_samples(manifest: Manifest, split: str) -> SampleIndex:
    """The usable samples of ``split`` (each shard left out is logged); :class:`DataError` when
    there is none to read (an empty split, or every shard left out), said once for every
    reader of a split."""
    return _require_some(manifest, split, SampleIndex.build(manifest, split))


def check_usable(manifest: Manifest, split: str) -> None:
    """Raise :func:`usable_samples`' :class:`DataError` where it would, quietly (the loaders
    warn), for a check before any loader (``trainer.train --check``, the benchmarks' --data).

    NOTE: it stops at the first usable shard: parsing every index took 0.58 s for a split of
    100k samples in 400 shards (warm page cache, a 2-core VM), ~6 s for 1M, before a launch
    whose loaders parse them all again; only a split with no usable shard is read whole.
    """
    _require_some(manifest, split, SampleIndex.build(manifest, split, warn=False,
                                                     until_usable=True))


SHOWN_REASONS = 3  # shards left out named in the error; one line of every shard was ~250 B each


def left_out(reasons: list[str]) -> str:
    """The shards left out as an error names them: the first :data:`SHOWN_REASONS` reasons
    and how many more (a split of 400 shards, all truncated, made one line of ~100 kB)."""
    more = len(reasons) - SHOWN_REASONS
    return "; ".join(reasons[:SHOWN_REASONS]) + (f"; and {more} more" if more > 0 else "")


def _require_some(manifest: Manifest, split: str, index: SampleIndex) -> SampleIndex:
    if not manifest.samples(split):  # (no shard was left out: there were none)
        raise DataError(f"split {split!r} of {manifest.root} is empty: dataio.prepare put no "
                        "tile in it (see its --split" + (
                            "; with --images-only every tile is in test)"
                            if not manifest.labels else ")"))
    if not len(index):
        reasons = index.skipped_detail
        raise DataError(f"{manifest.split_dir(split)}: no usable sample in split {split!r}; "
                        f"{len(reasons)} shards left out: {left_out(reasons) or 'none listed'}")
    return index


# ---- per-epoch, per-rank order -------------------------------------------------------------


def epoch_seed(seed: int, epoch: int, stream: int) -> np.random.Generator:
    """Independent generators per (seed, epoch, purpose): 0 = order, 1 = augmentation."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch, stream]))


def permutation(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    if not shuffle:
        return np.arange(n, dtype=np.int64)
    return epoch_seed(seed, epoch, 0).permutation(n).astype(np.int64)


def batches_per_epoch(n: int, world_size: int, batch_size: int) -> int:
    """Identical on every rank: the largest rank share, rounded up to whole batches."""
    return math.ceil(math.ceil(n / world_size) / batch_size) if n else 0


def rank_slots(order: np.ndarray, rank: int, world_size: int, batch_size: int,
               done: int = 0) -> np.ndarray:
    """Sample ids of this rank's remaining batches, ``PAD`` at the end; shape (batches, bs)."""
    rest = order[done:]
    mine = rest[rank::world_size]
    nb = batches_per_epoch(len(rest), world_size, batch_size)
    slots = np.full(nb * batch_size, PAD, dtype=np.int64)
    slots[: len(mine)] = mine
    return slots.reshape(nb, batch_size)


def samples_done(n: int, done_before: int, steps: int, world_size: int, batch_size: int) -> int:
    """Elements of the permutation read by all ranks after ``steps`` more steps from ``done``."""
    return min(n, done_before + steps * world_size * batch_size)
