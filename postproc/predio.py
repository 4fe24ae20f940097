"""Prediction shards: ``PRED/pred-NNNNNN.tar``, one sample per tile keyed by ImageId.

Members are ``<key>.prob.png`` (8-bit RGB, channels background/building/boundary as
round(255 * p), so a person can open it and see the prediction) and ``<key>.meta.json`` (the tile's
meta from ``dataio.prepare``: image_id, crs, transform, width, height, bands, building_count).

NaN policy: a pixel with any non-finite probability is written as pure background (255, 0, 0). A
NaN is "no evidence", and it must never seed or grow a building; a whole-NaN tile yields no
polygons instead of garbage. Values outside [0, 1] are clipped.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import tarfile
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from dataio.atomic import atomic_open, atomic_write_text, fsync_dir
from dataio.imageid import IMAGE_ID_RE

KEY_RE = IMAGE_ID_RE  # (one definition of an ImageId for prepare and postproc)
SHARD_GLOB = "pred-*.tar"
# present in a directory while publish_dir replaces its files (and after a kill in between)
PUBLISHING = ".publishing"
PROB_EXT, META_EXT = "prob.png", "meta.json"
# NOTE: a fixed mtime makes shards byte-identical across runs (reproducible, diffable).
FIXED_MTIME = 0.0


class PredError(ValueError):
    """A prediction shard or sample that cannot be used; the message names the shard."""


def check_key(key: str) -> str:
    """Return ``key`` if it is a safe ImageId, else raise.

    Keys become file names (GeoJSON per tile), so '/', '..' and dots are refused: a crafted tar
    member can never write outside an output directory.
    """
    if not isinstance(key, str) or not KEY_RE.fullmatch(key):
        raise PredError(f"invalid sample key {key!r}: an ImageId must match {KEY_RE.pattern}")
    return key


def quantize_probs(prob: np.ndarray) -> np.ndarray:
    """float HxWx3 in [0, 1] -> uint8 round(255 * p); non-finite pixels become background."""
    prob = np.asarray(prob)
    if prob.ndim != 3 or prob.shape[2] != 3:
        raise ValueError(f"probabilities must be HxWx3, got shape {prob.shape}")
    if prob.dtype == np.uint8:
        return prob
    if not np.issubdtype(prob.dtype, np.floating):
        raise ValueError(f"probabilities must be float in [0, 1] or uint8, got {prob.dtype}")
    p = prob.astype(np.float32, copy=False)
    bad = ~np.isfinite(p).all(axis=2)
    q = np.rint(np.clip(np.nan_to_num(p, nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0) * 255.0)
    q = q.astype(np.uint8)
    if bad.any():
        q[bad] = (255, 0, 0)
    return q


def encode_prob_png(prob: np.ndarray) -> bytes:
    """Encode HxWx3 probabilities (float in [0, 1], or already uint8) as an 8-bit RGB PNG."""
    q = quantize_probs(prob)
    if q.shape[0] == 0 or q.shape[1] == 0:
        raise ValueError(f"cannot encode an empty {q.shape} probability map")
    from postproc import pngfast  # (lazily: see decode_prob_png)

    return pngfast.encode_rgb8(q)


def decode_prob_png(data: bytes) -> np.ndarray:
    """Decode a ``prob.png`` into uint8 HxWx3; raise ValueError if it is not an RGB PNG."""
    # NOTE: imported here, not with the module: pngfast's kernels import numba (~0.3 s and
    # ~65 MiB), which readers of meta.json alone (postproc.merge) never need
    from postproc import pngfast

    try:
        fast = pngfast.decode_rgb8(data)
    except (ValueError, struct.error) as e:
        raise ValueError(f"undecodable PNG ({e})") from None
    if fast is not None:
        return fast
    # NOTE: Pillow opens a 16-bit RGB PNG as mode "RGB", keeping each value's high byte: a map
    # of round(255 * p) saved as uint16 read as all zeros (no building, and no error). The
    # bit depth is IHDR's byte 24 (IHDR is the first chunk; decode_rgb8 checked the signature).
    if data[12:16] == b"IHDR" and len(data) > 24 and data[24] != 8:
        raise ValueError(f"expected an 8-bit RGB PNG, got a {data[24]}-bit one")
    try:  # any other PNG flavour (interlaced): Pillow decides whether it is RGB
        with Image.open(io.BytesIO(data)) as im:
            if im.format != "PNG" or im.mode != "RGB":
                raise ValueError(f"expected an 8-bit RGB PNG, got {im.format} {im.mode}")
            arr = np.asarray(im)
    except (OSError, SyntaxError) as e:
        raise ValueError(f"undecodable PNG ({e})") from None
    return arr


def _check_meta(meta: dict[str, Any], key: str) -> dict[str, Any]:
    if not isinstance(meta, dict):
        raise PredError(f"{key}: meta.json is not an object")
    image_id = meta.get("image_id", key)
    if image_id != key:
        raise PredError(f"{key}: meta.json image_id {image_id!r} differs from the sample key")
    for name in ("width", "height"):
        # (a string "650" was "prob.png is 650x650 but meta.json says 650x650")
        v = meta.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int | float)
                              or not float(v).is_integer()):
            raise PredError(f"{key}: meta.json {name} {v!r} is not a whole number of pixels")
    return meta


def _sample_members(key: str, prob: np.ndarray, meta: dict[str, Any]) -> dict[str, Any]:
    check_key(key)
    data = prob if isinstance(prob, bytes) else encode_prob_png(prob)
    meta = {**meta, "image_id": key}
    return {"__key__": key, PROB_EXT: data,
            META_EXT: json.dumps(meta, sort_keys=True).encode("utf-8")}


def write_pred_shard(path: str | Path,
                     samples: Iterable[tuple[str, np.ndarray | bytes, dict[str, Any]]],
                     make_dirs: bool = True) -> int:
    """Write one prediction shard atomically; return the number of samples.

    ``prob`` may be float (encoded here), uint8 HxWx3, or already-encoded PNG bytes. The tar is
    written under a temporary name, every member is decoded back, and only then renamed onto
    ``path``: a crash or a bad member never leaves a half-written shard behind.
    ``make_dirs=False``: ``path``'s directory must exist (FileNotFoundError if not).
    """
    # NOTE: imported here: webdataset imports torch (~3 s and ~300 MB a process), and the
    # postproc commands' pool workers import this module only to read prediction shards.
    import webdataset as wds

    path = Path(path)
    n = 0
    with atomic_open(path, "w+b", make_dirs=make_dirs) as f:
        with wds.TarWriter(f, encoder=False, mtime=FIXED_MTIME) as writer:
            seen: set[str] = set()
            for key, prob, meta in samples:
                if key in seen:
                    raise PredError(f"{path}: duplicate sample key {key!r}")
                seen.add(key)
                writer.write(_sample_members(key, prob, meta))
                n += 1
        f.flush()
        f.seek(0)
        count = sum(1 for k, png, meta in _iter_tar(f, path)
                    if decode_sample(k, png, meta, path) is not None)
        if count != n:
            raise PredError(f"{path}: wrote {n} samples but read back {count}")
    return n


def begin_publish(out: Path) -> Path:
    """Mark ``out`` as being replaced: write ``out/.publishing`` durably (file and directory
    entry on disk) and return it. :func:`publish_dir` removes it after its last change."""
    marker = Path(out) / PUBLISHING
    atomic_write_text(marker, "a publish into this directory started and has not finished\n")
    return marker


def publish_dir(staging: Path, out: Path, pattern: str, ledger: str | None = None) -> None:
    """Move every file of ``staging`` into ``out``, then delete the files in ``out`` that match
    ``pattern`` and that this publish did not bring (an earlier run's); ``staging`` is removed.

    With ``ledger`` (a file name in ``out``), only files that the previous publish listed there
    are candidates for deletion, and this publish lists its own: for a directory the user may
    share with files of their own (``--geojson DIR``), which must never be deleted.

    NOTE: the files move one rename at a time, so a kill part-way leaves a mix of two runs. The
    marker ``out/.publishing`` exists from before the first move until after the last delete, so
    such a mix can be told apart from a complete directory (:func:`check_published`).
    """
    out.mkdir(parents=True, exist_ok=True)
    marker = begin_publish(out)
    new = sorted(staging.iterdir())
    names = {p.name for p in new}
    listed: set[str] = set()
    if ledger is not None:
        listed = _read_ledger(out / ledger)
        # NOTE: both runs' names until the deletes are done: a kill in between leaves every
        # file this command wrote listed, so the next publish can still remove it.
        atomic_write_text(out / ledger, "".join(f"{n}\n" for n in sorted(listed | names)))
    for p in new:
        os.replace(p, out / p.name)
    for old in out.glob(pattern):
        if old.name not in names and old.is_file() and (ledger is None or old.name in listed):
            old.unlink()
    if ledger is not None:
        atomic_write_text(out / ledger, "".join(f"{n}\n" for n in sorted(names)))
    staging.rmdir()
    fsync_dir(out)
    marker.unlink()
    fsync_dir(out)


def _read_ledger(path: Path) -> set[str]:
    """The names a previous publish listed; an unreadable ledger lists nothing (nothing is then
    deleted: a damaged ledger must not stop the publish, nor widen what it removes)."""
    try:
        return set(path.read_text(encoding="utf-8", errors="replace").splitlines())
    except FileNotFoundError:
        return set()
    except OSError as e:
        print(f"warning: {path}: unreadable ({e}); no stale file removed", file=sys.stderr)
        return set()


def check_published(out: str | Path, rerun: str) -> None:
    """Raise if a publish into ``out`` was interrupted (its marker is still there)."""
    if (Path(out) / PUBLISHING).exists():
        raise PredError(f"{out}: a publish into this directory was interrupted ({PUBLISHING} is "
                        f"still there), so it may mix two runs' files; {rerun}")


def publish_pred_dir(staging: Path, out: Path) -> None:
    """Move a complete prediction from ``staging`` into ``out`` and drop the shards of an earlier
    prediction there that this one did not replace; ``staging`` is removed.

    Readers of ``out`` (:func:`list_pred_shards`) refuse it while the publish is under way or
    after one was killed, and a rerun with fewer ranks or larger shards leaves no stale shard
    behind (its tiles would be counted twice).
    """
    publish_dir(staging, out, SHARD_GLOB)


def check_pred_dir(pred_dir: Path) -> Path:
    """``pred_dir`` (a ``--pred``) if it is a directory; else raise, saying what it is instead."""
    if pred_dir.is_file():
        # NOTE: a shard given for its directory was 'prediction directory not found', as if
        # the prediction were missing (cf. trainer.predict's --run-dir that is a file)
        hint = f", e.g. {pred_dir.parent}" if pred_dir.match(SHARD_GLOB) else ""
        raise PredError(f"--pred {pred_dir} is a file; give the directory of prediction shards "
                        f"({SHARD_GLOB}){hint}")
    if not pred_dir.is_dir():
        raise PredError(f"{pred_dir}: prediction directory not found (check --pred)")
    return pred_dir


def list_pred_shards(pred_dir: str | Path) -> list[Path]:
    """The ``pred-*.tar`` shards of a directory in sorted order; raise if there are none, or if
    an interrupted publish left a mix of two predictions there."""
    pred_dir = check_pred_dir(Path(pred_dir))
    check_published(pred_dir, f"rerun trainer.predict with --out {pred_dir}")
    shards = sorted(p for p in pred_dir.glob(SHARD_GLOB) if p.is_file())
    if not shards:
        raise PredError(f"{pred_dir}: no {SHARD_GLOB} shards in the prediction directory")
    return shards


def _split_member(name: str, shard: Path) -> tuple[str, str]:
    if "." not in name:
        raise PredError(f"{shard}: unexpected member {name!r} (want <ImageId>.{PROB_EXT})")
    key, ext = name.split(".", 1)
    try:
        check_key(key)
    except PredError as e:
        raise PredError(f"{shard}: member {name!r}: {e}") from None
    return key, ext


def _check_members(key: str, exts: Iterable[str], shard: Path) -> None:
    missing = [e for e in (PROB_EXT, META_EXT) if e not in exts]
    if missing:
        raise PredError(f"{shard}: sample {key!r} lacks {', '.join(missing)}")


def _parse_meta(key: str, data: bytes, shard: Path) -> dict[str, Any]:
    try:
        meta = json.loads(data)
    # NOTE: ValueError, not only JSONDecodeError: a number of over 4300 digits is int()'s
    # ValueError, said without the shard; and arrays nested ~100,000 deep a RecursionError, a
    # traceback (dataio.manifest.load_manifest catches it too)
    except (ValueError, RecursionError) as e:
        raise PredError(f"{shard}: {key}.{META_EXT}: malformed JSON ({e})") from None
    try:
        return _check_meta(meta, key)
    except PredError as e:
        raise PredError(f"{shard}: {e}") from None


def decode_sample(key: str, png: bytes, meta: dict[str, Any], shard: str | Path
                  ) -> np.ndarray:
    """Decode a sample's ``prob.png`` and check it against its meta; errors name the shard."""
    try:
        prob = decode_prob_png(png)
    except ValueError as e:
        raise PredError(f"{shard}: {key}.{PROB_EXT}: {e}") from None
    w, h = meta.get("width"), meta.get("height")
    if (w is not None and w != prob.shape[1]) or (h is not None and h != prob.shape[0]):
        raise PredError(f"{shard}: {key}: prob.png is {prob.shape[1]}x{prob.shape[0]} but "
                        f"meta.json says {w}x{h}")
    return prob


def _check_complete(fileobj: Any, shard: Path) -> None:
    """Raise unless the tar ends in its end-of-archive marker (two zero blocks).

    ``tarfile`` takes a missing or partial header for the end of the archive, so a shard cut at
    or inside a member's header would otherwise read as complete, minus its last tiles.
    """
    start = fileobj.tell()
    size = fileobj.seek(0, os.SEEK_END)
    fileobj.seek(max(0, size - 2 * tarfile.BLOCKSIZE))
    tail = fileobj.read()
    fileobj.seek(start)
    if size % tarfile.BLOCKSIZE or len(tail) < 2 * tarfile.BLOCKSIZE or tail.count(0) != len(tail):
        raise PredError(f"{shard}: truncated tar ({size} bytes, no end-of-archive marker)")


def _check_ended(fileobj: Any, offset: int, shard: Path) -> None:
    """Raise unless everything from ``offset`` (where ``tarfile`` stopped reading headers) to the
    end of the file is zeros: the end-of-archive marker and the record's padding.

    NOTE: ``tarfile`` takes a damaged header after the first (a bad checksum: a flipped bit, a
    block overwritten) for the end of the archive, without a word; the tail check above sees the
    marker still in place, and the shard read as complete minus the tiles from there on (2 of 4
    in the test). Read in blocks: a whole shard's worth only where it is damaged early.
    """
    fileobj.seek(offset)
    while block := fileobj.read(1 << 16):
        if block.count(0) != len(block):
            raise PredError(f"{shard}: corrupt tar (a damaged member header at byte {offset}; "
                            "the members after it were not read)")


def _iter_tar(fileobj: Any, shard: Path) -> Iterator[tuple[str, bytes, dict]]:
    """Stream raw samples (consecutive members sharing a key) from an open, complete tar."""
    for key, parts in _walk(fileobj, shard, frozenset({PROB_EXT, META_EXT})):
        yield key, parts[PROB_EXT] or b"", _parse_meta(key, parts[META_EXT] or b"", shard)


def _iter_headers(shard: Path, read: frozenset[str] = frozenset()
                  ) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """:func:`_walk` over the shard file ``shard``."""
    try:
        f = open(shard, "rb")  # noqa: SIM115 - the generator closes it
    except OSError as e:
        raise PredError(f"{shard}: cannot open shard ({e.strerror})") from None
    with f:
        yield from _walk(f, shard, read)


def _walk(fileobj: Any, shard: Path, read: frozenset[str]
          ) -> Iterator[tuple[str, dict[str, bytes | None]]]:
    """The samples of an open, complete shard, in order, from its tar headers: ``(key, {ext: the
    member's bytes if ext is in read, else None})``; the other members' bytes are seeked over,
    not read. Raise :class:`PredError` for a shard that is truncated or malformed, or whose
    samples lack a member.

    NOTE: the one walker of every reader (the full read, :func:`iter_metas`, :func:`shard_keys`):
    two, written apart, had to be given the damaged-header check (:func:`_check_ended`) each."""
    # NOTE: an OSError here (EIO reading the tail) is the input's, as in the walk below: it left
    # as a bare "[Errno 5] Input/output error" naming no shard, and inside a command's writing()
    # (merge reads the shards' metadata while its output is open) it became the output's, exit 1
    try:
        _check_complete(fileobj, shard)
        start = fileobj.tell()
        size = fileobj.seek(0, os.SEEK_END)
        fileobj.seek(start)
    except OSError as e:
        raise PredError(f"{shard}: cannot read shard ({e.strerror or e})") from None
    key: str | None = None
    parts: dict[str, bytes | None] = {}
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=fileobj, mode="r:") as tar:
            for member in tar:
                if not member.isfile():
                    continue
                if member.offset_data + member.size > size:
                    raise PredError(f"{shard}: truncated tar (member {member.name!r} ends "
                                    f"past its {size} bytes)")
                k, ext = _split_member(member.name, shard)
                if k != key:
                    if key is not None:
                        _check_members(key, parts, shard)
                        yield key, parts
                    if k in seen:
                        raise PredError(f"{shard}: members of sample {k!r} are not adjacent")
                    seen.add(k)
                    key, parts = k, {}
                data = tar.extractfile(member) if ext in read else None
                parts[ext] = data.read() if data is not None else None
            _check_ended(fileobj, tar.offset, shard)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise PredError(f"{shard}: truncated or corrupt tar ({e})") from None
    if key is not None:
        _check_members(key, parts, shard)
        yield key, parts


def shard_keys(shard_path: str | Path) -> list[str]:
    """The sample keys of a complete shard, in order, from its tar headers alone: the members'
    bytes are seeked over, not read (a resumed trainer.predict checks a whole stage of shards).
    Raise :class:`PredError` for a shard that is missing, truncated or malformed, or whose
    samples lack a member."""
    return [key for key, _ in _iter_headers(Path(shard_path))]


def iter_metas(shard_path: str | Path) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(key, meta)`` per sample, reading only the tar headers and the meta.json members:
    the prob.png bytes are seeked over (postproc.mosaic's first pass needs only the grids)."""
    shard = Path(shard_path)
    for key, parts in _iter_headers(shard, frozenset({META_EXT})):
        yield key, _parse_meta(key, parts[META_EXT] or b"", shard)


def iter_raw_samples(shard_path: str | Path) -> Iterator[tuple[str, bytes, dict[str, Any]]]:
    """Yield ``(key, prob.png bytes, meta)`` per sample, streaming; the PNG is not decoded (so
    that worker processes can do it)."""
    shard = Path(shard_path)
    try:
        f = open(shard, "rb")  # noqa: SIM115 - the generator closes it
    except OSError as e:
        raise PredError(f"{shard}: cannot open shard ({e.strerror})") from None
    with f:
        yield from _iter_tar(f, shard)


def iter_pred_samples(shard_path: str | Path) -> Iterator[tuple[str, np.ndarray, dict[str, Any]]]:
    """Yield ``(key, prob_u8 HxWx3, meta)`` for each sample of a shard, streaming (flat memory)."""
    for key, png, meta in iter_raw_samples(shard_path):
        yield key, decode_sample(key, png, meta, shard_path), meta
