"""Random access to samples inside checked shards, through the offsets in their DALI index.

Plain ``os.pread``/``os.preadv`` on file descriptors, never ``mmap``: a shard truncated after it
was checked gives a short read (a skipped sample), not the SIGBUS/segfault that DALI's mmap'ed
webdataset reader gives. Only the rows of the crop are read, and a vertical flip is done by the
read itself (``preadv`` into the row buffers in reverse order), so neither costs a pass over the
pixels.
"""

from __future__ import annotations

import io
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dataio.sharding import SampleRef
from dataio.shards import IMG, MASK, META, decode_png

_IOV_MAX = 1024  # Linux' limit on buffers per preadv call
_NPY_DTYPE = np.dtype("<u2")
# What np.save writes for a C-order uint16 HWC array (format 1.0). NOTE: numpy's own header parser
# goes through ast.literal_eval (~0.4 ms a sample, measured); anything else falls back to it.
_NPY_FAST = re.compile(rb"\x93NUMPY\x01\x00(..)\{'descr': '<u2', 'fortran_order': False, "
                       rb"'shape': \((\d+), (\d+), (\d+)\), \}", re.DOTALL)
# The start of a PNG whose IHDR says 8-bit greyscale (what encode_png writes for a uint8 mask):
# groups width and height. NOTE: checked before DALI decodes it, because DALI converts any PNG to
# GRAY and crops inside the mask's bounds without complaint: a mask of another size or a colour
# one would train on misplaced or made-up classes where the torch backend skips the sample.
_PNG_GREY8 = re.compile(rb"\x89PNG\r\n\x1a\n\x00\x00\x00\x0dIHDR(.{4})(.{4})\x08\x00", re.DOTALL)


# Every reason a sample is skipped for: the trainer's footprints_skipped_samples_total serves each
# at 0 from the start (a series that first appears at N is no increase to Prometheus)
REASONS = ("img_invalid", "mask_invalid", "meta_invalid", "read_error")


class SampleError(ValueError):
    """One sample that cannot be used; ``reason`` (one of :data:`REASONS`) is a metric label."""

    def __init__(self, reason: str, message: str) -> None:
        if reason not in REASONS:  # (a new reason: add it there, so that it is served at 0)
            raise ValueError(f"unknown SampleError reason {reason!r}; known: {REASONS}")
        super().__init__(message)
        self.reason = reason


@dataclass(frozen=True)
class Header:
    height: int
    width: int
    bands: int
    data_offset: int  # absolute offset of the pixel data in the tar


class ShardReader:
    """Reads members by offset; one descriptor per shard, reopened after a fork."""

    def __init__(self, bands: int) -> None:
        self.bands = bands
        self._fds: dict[Path, int] = {}
        self._pid = os.getpid()

    def _fd(self, path: Path) -> int:
        if self._pid != os.getpid():  # a DataLoader worker: do not share the parent's table
            self._fds, self._pid = {}, os.getpid()
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = self._fds[path] = os.open(path, os.O_RDONLY)
            except OSError as e:
                raise SampleError("read_error", f"{path}: cannot open ({e})") from None
        return fd

    def _pread(self, ref: SampleRef, size: int, offset: int) -> bytes:
        try:
            data = os.pread(self._fd(ref.shard), size, offset)
        except OSError as e:
            raise SampleError("read_error", f"{ref.shard}:{ref.key}: {e}") from None
        if len(data) != size:
            raise SampleError("read_error", f"{ref.shard}:{ref.key}: short read at {offset} "
                                            f"({len(data)} of {size} bytes; shard truncated?)")
        return data

    def member(self, ref: SampleRef, component: str) -> bytes:
        offset, size = ref.members[component]
        return self._pread(ref, size, offset)

    def header(self, ref: SampleRef) -> Header:
        """Parse and check the ``img.npy`` header (uint16, C order, HWC, size matches)."""
        offset, size = ref.members[IMG]
        head = self._pread(ref, min(size, 256), offset)
        where = f"{ref.shard}:{ref.key}.{IMG}"
        fast = _NPY_FAST.match(head)
        if fast is not None:
            hlen = 10 + int.from_bytes(fast.group(1), "little")
            shape = tuple(int(fast.group(i)) for i in (2, 3, 4))
            return self._checked(ref, where, shape, False, _NPY_DTYPE, hlen, offset, size)
        try:
            f = io.BytesIO(head)
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read(f)
        except Exception as e:
            raise SampleError("img_invalid", f"{where}: bad npy header ({e})") from None
        return self._checked(ref, where, shape, fortran, dtype, f.tell(), offset, size)

    def _checked(self, ref: SampleRef, where: str, shape: tuple[int, ...], fortran: bool,
                 dtype: np.dtype, hlen: int, offset: int, size: int) -> Header:
        if dtype != _NPY_DTYPE or fortran or len(shape) != 3 or shape[2] != self.bands:
            raise SampleError("img_invalid", f"{where}: {dtype} {shape} fortran={fortran}, "
                                             f"expected uint16 C-order HWC with {self.bands} bands")
        if hlen + int(np.prod(shape)) * 2 != size:
            raise SampleError("img_invalid", f"{where}: {size} bytes do not hold {shape}")
        return Header(int(shape[0]), int(shape[1]), int(shape[2]), offset + hlen)

    def rows(self, ref: SampleRef, hdr: Header, y0: int, n: int, reverse: bool,
             out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``y0:y0+n`` of the image as uint16 (n, W, C), in reverse order if ``reverse``."""
        row_bytes = hdr.width * hdr.bands * 2
        if out is None:
            out = np.empty((n, hdr.width, hdr.bands), np.uint16)
        view = memoryview(out).cast("B")
        if reverse:
            bufs = [view[i * row_bytes:(i + 1) * row_bytes] for i in range(n - 1, -1, -1)]
            per_buf = row_bytes
        else:
            bufs, per_buf = [view], n * row_bytes
        offset = hdr.data_offset + y0 * row_bytes
        fd = self._fd(ref.shard)
        for i in range(0, len(bufs), _IOV_MAX):
            chunk = bufs[i: i + _IOV_MAX]
            want = len(chunk) * per_buf
            try:
                got = os.preadv(fd, chunk, offset)
            except OSError as e:
                raise SampleError("read_error", f"{ref.shard}:{ref.key}: {e}") from None
            if got != want:
                raise SampleError("read_error", f"{ref.shard}:{ref.key}: short read of pixels "
                                                f"({got} of {want} bytes; shard truncated?)")
            offset += want
        return out

    def meta(self, ref: SampleRef) -> dict[str, Any]:
        try:
            meta = json.loads(self.member(ref, META))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise SampleError("meta_invalid", f"{ref.shard}:{ref.key}.{META}: {e}") from None
        if not isinstance(meta, dict):
            raise SampleError("meta_invalid", f"{ref.shard}:{ref.key}.{META}: not an object")
        return meta

    def mask_png(self, ref: SampleRef, hdr: Header) -> bytes:
        """``mask.png``'s bytes, once its header says 8-bit grey of the image's size."""
        data = self.member(ref, MASK)
        head = _PNG_GREY8.match(data)
        if head is None or (int.from_bytes(head[2], "big"),
                            int.from_bytes(head[1], "big")) != (hdr.height, hdr.width):
            raise SampleError("mask_invalid", f"{ref.shard}:{ref.key}.{MASK}: not an 8-bit grey "
                                              f"PNG of the image's {hdr.height}x{hdr.width}")
        return data

    def mask(self, ref: SampleRef, hdr: Header) -> np.ndarray:
        """Decode ``mask.png`` in Python (the torch backend; DALI decodes it in the pipeline)."""
        data = self.mask_png(ref, hdr)
        try:
            mask = decode_png(data)
        except SampleError:
            raise
        except Exception as e:
            raise SampleError("mask_invalid", f"{ref.shard}:{ref.key}.{MASK}: does not decode "
                                              f"({type(e).__name__}: {e})") from None
        return mask  # uint8 of the image's size: mask_png checked the header it decodes from

    def close(self) -> None:
        if self._pid == os.getpid():
            for fd in self._fds.values():
                os.close(fd)
        self._fds = {}

    def __getstate__(self) -> dict[str, Any]:
        # Descriptors do not travel to spawned workers; they reopen lazily.
        return {"bands": self.bands, "_fds": {}, "_pid": -1}
