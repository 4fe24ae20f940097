"""Resuming a stopped ``trainer.predict``: which shards of its stage a rerun keeps.

A prediction at scale (a city cut into 100,000 chips, hours of GPU time) stopped near its end (a
node failure, a Slurm time limit, Ctrl-C) lost every shard: its stage ``PRED/.partial`` was removed,
and a rerun started from zero. Now a stopped run keeps its stage, with ``.partial/.resume.json``:
the key of the prediction that made it (the weights loaded, the run's model config, the data, the
split and every setting that decides which tiles land in which shard, or their values, and a
fingerprint of the code that computes them). A rerun whose key is the same keeps each rank's
complete shards k = 0..K-1 and starts that rank's loader at the batch of its first tile after them
(the loader's own position, ``Loader.load_state_dict``: the kept tiles are neither read nor
predicted again); another key, or ``--fresh``, discards the stage as before.

NOTE: the batch the rank starts at is predicted whole, its tiles already in a kept shard dropped
after: a tile's prediction is that of its batch (the batch's calls, ``trainer.predict.per_tile``),
so the output is that of an uninterrupted run byte for byte. With ``--shard-size`` a multiple of
the batch size no tile is predicted twice; else at most a batch's worth per rank.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dataio.atomic import (
    TMP_SUFFIX,
    atomic_write_text,
    fresh_staging_dir,
    remove_discarded,
    staging_dir,
)
from dataio.sharding import PAD, rank_slots
from postproc.pools import say
from postproc.predio import PredError, shard_keys

RESUME_KEY = ".resume.json"  # in the stage; removed before the publish (it is not output)
KEY_FORMAT = 1
# a shard, or a temporary file of one (dataio.atomic.atomic_open's)
SHARD_NAME = re.compile(r"pred-(\d{6})\.tar|\.pred-(\d{6})\.tar\..+" + re.escape(TMP_SUFFIX))
# how the user changes each field of the key (named when a stage is discarded for it)
CHANGED = {"format": "the stage's format", "weights_sha256": "the checkpoint's weights",
           "percentiles": "the checkpoint's percentiles", "model": "RUN/config.json model.*",
           "manifest_sha256": "--data's manifest.json",
           "samples": "--data's usable samples", "split": "--split", "tta": "--tta",
           "shard_size": "--shard-size", "batch_size": "--batch-size",
           "world_size": "the number of ranks", "backend": "data.backend",
           "device": "the device", "precision": "the precision",
           "code": "the code (models/, the loader, trainer.predict, the PNG writer; or the "
                   "footprints, torch or DALI version)"}
# NOTE: the sources whose change may change a prediction's values (the model, the loader's
# decoding, normalisation and order, predict itself and its precision, the PNG encoding): a
# stage that other code wrote, resumed, mixed two codes' output in one PRED. Hashed, not git's
# commit: the same files give the same key with or without git, and an edit not yet committed
# counts. Wider than strictly needed costs a discarded stage; narrower, silently mixed output.
# (tests/trainer/test_predict.py fails when predict imports a project module that is neither
# here nor named there as one that cannot change a prediction's values)
CODE_ROOT = Path(__file__).resolve().parents[1]
CODE = ("models/*.py", "dataio/loader.py", "dataio/plan.py", "dataio/reader.py",
        "dataio/augment.py", "dataio/sharding.py", "dataio/dali_pipe.py", "dataio/torch_pipe.py",
        "dataio/hostpool.py", "trainer/predict*.py", "trainer/amp.py", "postproc/predio.py",
        "postproc/pngfast.py")


def file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def code_files(root: Path | None = None) -> list[Path]:
    """The files of :data:`CODE` under ``root`` (:data:`CODE_ROOT`), in a fixed order."""
    root = CODE_ROOT if root is None else root
    return sorted({p for pattern in CODE for p in root.glob(pattern) if p.is_file()})


def _versions() -> dict[str, str | None]:
    """This package's version and the libraries' that compute the values (DALI's distribution
    is named after its CUDA: nvidia-dali-cuda120, ...)."""
    out: dict[str, str | None] = {}
    for name in ("footprints", "torch"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:  # (run from a checkout, not installed)
            out[name] = None
    for dist in importlib.metadata.distributions():
        name = (dist.metadata["Name"] or "").lower()
        if name.startswith("nvidia-dali"):
            out[name] = dist.version
    return out


def code_sha256(root: Path | None = None) -> str:
    """sha256 over :func:`code_files` (each file's path under ``root`` and its bytes) and
    :func:`_versions`: the same code gives the same key on every machine."""
    root = CODE_ROOT if root is None else root
    h = hashlib.sha256(json.dumps(_versions(), sort_keys=True).encode())
    for path in code_files(root):
        data = path.read_bytes()
        h.update(f"\0{path.relative_to(root).as_posix()}\0{len(data)}\0".encode())
        h.update(data)
    return h.hexdigest()


def shard_name(k: int, rank: int, world_size: int) -> str:
    """Rank ``rank``'s ``k``-th shard: ranks never collide (r, r + W, r + 2W, ...)."""
    return f"pred-{k * world_size + rank:06d}.tar"


def share_shard_names(samples: int, rank: int, world_size: int, shard_size: int) -> list[str]:
    """The names of rank ``rank``'s shards when all ``samples`` of the split are predicted (a
    tile the loader skips only makes fewer): its stride of the samples, ``shard_size`` a shard."""
    mine = len(range(rank, samples, world_size))
    return [shard_name(k, rank, world_size) for k in range(-(-mine // shard_size))]


def mismatch(staging: Path, key: dict[str, Any]) -> str | None:
    """None if ``staging`` was made by the prediction that ``key`` describes; else why not."""
    try:
        old = json.loads((staging / RESUME_KEY).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return (f"it has no {RESUME_KEY}: a run from before resuming, or one stopped while "
                "publishing")
    except (OSError, ValueError) as e:
        return f"its {RESUME_KEY} is unreadable ({e})"
    if not isinstance(old, dict):
        return f"its {RESUME_KEY} is not an object"
    changed = [CHANGED.get(k, k) for k in {**CHANGED, **key, **old} if key.get(k) != old.get(k)]
    return f"made by another prediction: {', '.join(changed)} changed" if changed else None


def prepare_stage(out: Path, key: dict[str, Any], fresh: bool) -> bool:
    """Rank 0: keep ``out``'s stage if the prediction ``key`` made it (True: resume), else make
    an empty one holding ``key`` (False), saying in one line why one was discarded."""
    key = json.loads(json.dumps(key, default=str))  # (as it is read back: tuples are lists)
    staging = staging_dir(out)
    why = "" if not staging.is_dir() else "--fresh" if fresh else mismatch(staging, key)
    if why is None:
        remove_discarded(out)
        say(f"trainer.predict: resuming the stopped prediction in {staging} (--fresh to "
            "start over)")
        return True
    if why:
        say(f"trainer.predict: discarding {staging} ({why}); starting over")
    fresh_staging_dir(out)  # (a killed run's removed)
    atomic_write_text(staging / RESUME_KEY, json.dumps(key, sort_keys=True) + "\n")
    return False


def resumable(out: Path) -> bool:
    """Whether ``out``'s stage holds a prediction's key and a shard: a rerun may resume it."""
    staging = staging_dir(out)
    return (staging / RESUME_KEY).is_file() and any(staging.glob("pred-*.tar"))


@dataclass
class Resume:
    """Where one rank's share continues."""

    shards: int = 0  # the rank's complete shards k = 0..shards-1, kept
    tiles: int = 0  # the tiles in them
    step: int = 0  # the loader step to start at: the batch of the first tile after them
    drop: set[str] = field(default_factory=set)  # tiles of that batch in a kept shard
    skipped: int = 0  # tiles before that batch in no kept shard: the stopped run skipped them


def scan_share(staging: Path, keys: list[str], rank: int, world_size: int, batch_size: int,
               shard_size: int) -> Resume:
    """This rank's shards of ``staging`` that a rerun keeps: k = 0, 1, ... up to the first that
    is missing, truncated or not the next tiles of the rank's share in order. ``keys``: the
    split's usable samples in the loader's order (evaluation: unshuffled)."""
    ids = rank_slots(np.arange(len(keys)), rank, world_size, batch_size).reshape(-1)
    pos = {keys[i]: j for j, i in enumerate(ids.tolist()) if i != PAD}
    kept: list[str] = []
    k, last = 0, -1
    while True:
        path = staging / shard_name(k, rank, world_size)
        try:
            got = shard_keys(path)
            # NOTE: tarfile pads what it writes to whole records: a file cut in that padding
            # reads whole, but it is not the bytes an uninterrupted run publishes
            cut = path.stat().st_size % tarfile.RECORDSIZE
        except (PredError, OSError):  # (missing, truncated, damaged: written again from here)
            break
        at = [pos.get(key, -1) for key in got]
        # every shard but the share's last holds shard_size tiles, the share's next ones in
        # order: anything else is not this prediction's
        if (cut or not got or len(got) > shard_size or len(kept) != k * shard_size
                or any(a <= b for a, b in zip(at, [last, *at], strict=False))):
            break
        kept += got
        k, last = k + 1, at[-1]
    step = (last + 1) // batch_size
    if last + 1 == len(pos):  # (the share is done: its last batch is not read again)
        step = -(-len(pos) // batch_size)
    start = min(step * batch_size, len(pos))
    drop = {key for key in kept if pos[key] >= start}
    return Resume(k, len(kept), step, drop, start - (len(kept) - len(drop)))


def clear_share(staging: Path, rank: int, world_size: int, keep: int) -> None:
    """Remove this rank's shards from its ``keep``-th on (a rerun writes them again) and its
    temporary files (a killed write's): another rank's files are not this rank's to touch."""
    for p in staging.iterdir():
        m = SHARD_NAME.fullmatch(p.name)
        if m is None:
            continue
        n = int(m.group(1) or m.group(2))
        if n % world_size == rank and (m.group(2) or n // world_size >= keep):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def loader_state(loader: Any, step: int) -> dict[str, Any]:
    """``loader``'s position at ``step`` of its (evaluation) epoch: every rank has read
    ``step`` batches (its own count: a rank's share is its own stride of the samples)."""
    state = loader.state_dict()
    state.update(step=step, samples_done=min(loader.num_samples,
                                             step * loader.cfg.batch_size * loader.world_size))
    return state
