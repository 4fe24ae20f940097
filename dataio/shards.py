"""WebDataset shards of prepared samples: encoding, crash-safe writing, verification, checks.

One sample per tile, keyed by ImageId: ``img.npy`` (uint16 HWC, ``np.save``), ``mask.png`` (8-bit
grey) and ``meta.json``. Shards are written under a hidden temporary name, verified (every member
decodes), indexed for DALI with ``wds2idx`` and only then renamed to ``shard-NNNNNN.tar``.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tarfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from wds2idx import IndexCreator

from dataio.atomic import fsync_dir, fsync_file
from dataio.imageid import IMAGE_ID_RE

IMG, MASK, META = "img.npy", "mask.png", "meta.json"
COMPONENTS = (IMG, MASK, META)
SHARD_MTIME = 0.0  # fixed member times: the same input gives byte-identical shards


class ShardError(ValueError):
    """A shard that cannot be used; the message names the shard (and member) and the problem."""


@dataclass(frozen=True)
class ShardInfo:
    """What the manifest records of one shard, and what readers check before opening it."""

    name: str
    index: str
    samples: int
    bytes: int
    index_bytes: int

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


def check_key(key: str) -> str:
    """Refuse keys that could escape a directory or confuse DALI (which splits at the first dot)."""
    if not IMAGE_ID_RE.fullmatch(key):
        raise ValueError(f"sample key {key!r} must match {IMAGE_ID_RE.pattern} (no dots, slashes)")
    return key


def encode_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(arr), allow_pickle=False)
    return buf.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    # NOTE: allow_pickle=False: a crafted .npy must never execute code.
    return np.load(io.BytesIO(data), allow_pickle=False)


def encode_png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        return np.asarray(im)


def encode_sample(key: str, image_hwc: np.ndarray, mask: np.ndarray,
                  meta: dict[str, Any]) -> dict[str, Any]:
    """A webdataset sample dict of encoded members."""
    return {
        "__key__": check_key(key),
        IMG: encode_npy(image_hwc.astype(np.uint16, copy=False)),
        MASK: encode_png(mask.astype(np.uint8, copy=False)),
        META: json.dumps(meta, sort_keys=True).encode(),
    }


def decode_sample(members: dict[str, bytes], where: str = "") -> tuple[np.ndarray, np.ndarray,
                                                                        dict[str, Any]]:
    """Decode one sample's members to (image HWC uint16, mask HW uint8, meta); ShardError if bad."""
    try:
        img = decode_npy(members[IMG])
        mask = decode_png(members[MASK])
        meta = json.loads(members[META])
    except KeyError as e:
        raise ShardError(f"{where}: member {e.args[0]} missing") from None
    except Exception as e:
        raise ShardError(f"{where}: does not decode ({type(e).__name__}: {e})") from None
    if img.dtype != np.uint16 or img.ndim != 3:
        raise ShardError(f"{where}: img.npy is {img.dtype} {img.shape}, expected uint16 HWC")
    if mask.dtype != np.uint8 or mask.shape != img.shape[:2]:
        raise ShardError(f"{where}: mask.png is {mask.dtype} {mask.shape}, image {img.shape}")
    return img, mask, meta


def iter_tar_members(path: Path) -> Any:
    """Yield (key, component, bytes) per member of a shard in file order (stdlib tarfile);
    ShardError where the tar stops being readable, after the members before it."""
    try:
        with tarfile.open(path, "r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, ext = info.name.rsplit("/", 1)[-1].partition(".")
                f = tar.extractfile(info)
                yield key, ext, f.read() if f is not None else b""
    except (tarfile.TarError, OSError, EOFError) as e:
        raise ShardError(f"{path}: unreadable tar ({e})") from None


def iter_tar_samples(path: Path) -> Any:
    """Yield (key, {component: bytes}) from a shard in file order, using only stdlib tarfile."""
    current: str | None = None
    members: dict[str, bytes] = {}
    for key, ext, data in iter_tar_members(path):
        if key != current:
            if current is not None:
                yield current, members
            current, members = key, {}
        members[ext] = data
    if current is not None:
        yield current, members


def verify_shard(path: Path) -> int:
    """Decode every member of a shard; returns the sample count or raises ShardError."""
    n = 0
    for key, members in iter_tar_samples(path):
        check_key(key)
        decode_sample(members, f"{path}:{key}")
        n += 1
    return n


def index_samples(idx_path: Path) -> int:
    """Sample count recorded in a DALI index file (its header is ``v1.2 N``)."""
    # NOTE: bytes, not text: a decoder reads ahead, so one bad byte anywhere in the file would
    # raise a UnicodeDecodeError naming no file; only the header line is needed.
    with open(idx_path, "rb") as f:
        head = f.readline(256).decode("ascii", errors="replace").split()
    if len(head) != 2 or not head[1].isdigit():
        raise ShardError(f"{idx_path}: not a DALI webdataset index (header {head!r})")
    return int(head[1])


class ShardWriter:
    """Write one shard crash-safely: temp tar -> verify -> DALI index -> rename into place."""

    def __init__(self, directory: Path, number: int) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.final = self.directory / shard_name(number)
        self.final_idx = self.final.with_suffix(".idx")
        self.tmp = self.directory / f".{self.final.name}.tmp"
        self.tmp_idx = self.directory / f".{self.final_idx.name}.tmp"
        # NOTE: imported here: webdataset imports torch (~3 s and ~300 MB a process), and
        # prepare's spawned workers import this module only to rasterise and encode samples.
        import webdataset as wds

        self._file = open(self.tmp, "wb")  # noqa: SIM115 (closed in close/abort)
        self._tar = wds.TarWriter(self._file, encoder=False, mtime=SHARD_MTIME)
        self.samples = 0

    def write(self, sample: dict[str, Any]) -> None:
        self._tar.write(sample)
        self.samples += 1

    def close(self) -> ShardInfo:
        """Finish, verify and index the shard, then rename both files into place."""
        self._tar.close()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        try:
            n = verify_shard(self.tmp)
            if n != self.samples:
                raise ShardError(f"{self.tmp}: wrote {self.samples} samples, read back {n}")
            with IndexCreator(str(self.tmp), str(self.tmp_idx), verbose=False) as ic:
                ic.create_index()
            if index_samples(self.tmp_idx) != n:
                raise ShardError(f"{self.tmp_idx}: index does not list {n} samples")
            # The index must be on disk before its final name is, like the tar above: a torn
            # .idx under a final name would cost the loader the whole shard after a power loss.
            fsync_file(self.tmp_idx)
            os.replace(self.tmp_idx, self.final_idx)
            os.replace(self.tmp, self.final)
            fsync_dir(self.directory)
        except BaseException:
            self.abort()
            raise
        return ShardInfo(self.final.name, self.final_idx.name, n, self.final.stat().st_size,
                         self.final_idx.stat().st_size)

    def abort(self) -> None:
        """Drop the temporary files (an interrupted shard never appears under its final name)."""
        # NOTE: close the TarWriter first: left open, its tar stream's __del__ writes the end
        # blocks at garbage collection into the closed file ("Exception ignored ... ValueError").
        with contextlib.suppress(Exception):
            self._tar.close()
        with contextlib.suppress(Exception):
            self._file.close()
        for p in (self.tmp, self.tmp_idx):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()


def check_shard(directory: Path, info: dict[str, Any]) -> str | None:
    """Compare a shard on disk with its manifest entry; returns a reason if it must not be read.

    Cheap (stat and one index line), so readers run it before every pipeline build. A truncated
    tar read through its index would crash DALI; this catches it first.
    """
    tar, idx = Path(directory) / info["name"], Path(directory) / info["index"]
    try:
        size = tar.stat().st_size
    except FileNotFoundError:
        return f"{tar}: missing"
    if size != info["bytes"]:
        return f"{tar}: {size} bytes on disk, manifest says {info['bytes']} (truncated or changed)"
    try:
        if idx.stat().st_size != info["index_bytes"]:
            return f"{idx}: index size differs from the manifest"
        n = index_samples(idx)
    except FileNotFoundError:
        return f"{idx}: index missing"
    except (OSError, ShardError) as e:
        return str(e)
    if n != info["samples"]:
        return f"{idx}: lists {n} samples, manifest says {info['samples']}"
    return None
