"""Helpers for the postproc tests: prediction shards and truth CSVs made by code."""

from __future__ import annotations

import contextlib
import csv
import errno
import io
import os
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import numpy as np
import pytest
from shapely.geometry import Polygon

from postproc.predio import write_pred_shard
from postproc.synthmask import SynthConfig, one_hot, synth_tile

REPO = Path(__file__).resolve().parents[2]
TRANSFORM_4326 = [3e-6, 0.0, -115.2, 0.0, -3e-6, 36.2]


def tile_meta(key: str, size: int, n: int, crs: str = "EPSG:4326") -> dict:
    return {"image_id": key, "crs": crs, "transform": TRANSFORM_4326, "width": size,
            "height": size, "bands": 3, "building_count": n}


def write_truth_csv(path: Path, tiles: dict[str, list[Polygon]]) -> Path:
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ImageId", "BuildingId", "PolygonWKT_Pix", "PolygonWKT_Geo"])
        for key, polys in tiles.items():
            if not polys:
                w.writerow([key, -1, "POLYGON EMPTY", "POLYGON EMPTY"])
            for k, p in enumerate(polys, start=1):
                w.writerow([key, k, p.wkt, "POLYGON EMPTY"])
    return path


def make_pred_dir(root: Path, shards: int, per_shard: int, size: int = 200,
                  buildings: int = 15) -> tuple[Path, Path]:
    """``root/pred/pred-*.tar`` with one-hot predictions of synthetic masks, and a truth CSV."""
    cfg = SynthConfig(size=size, buildings=buildings)
    truth: dict[str, list[Polygon]] = {}
    for s in range(shards):
        samples = []
        for t in range(per_shard):
            seed = 100 * s + t
            mask, polys = synth_tile(seed, cfg)
            key = f"AOI_9_Test_img{seed}"
            if t == 1:  # one empty tile per shard
                mask, polys = np.zeros_like(mask), []
            truth[key] = polys
            samples.append((key, one_hot(mask), tile_meta(key, size, len(polys))))
        write_pred_shard(root / "pred" / f"pred-{s:06d}.tar", samples)
    return root / "pred", write_truth_csv(root / "truth.csv", truth)


def count_shard_reads(monkeypatch) -> list[int]:
    """The size of every read that postproc.predio makes from a shard from now on (unbuffered:
    what is counted is what was read)."""
    from postproc import predio

    got: list[int] = []

    class Counting(io.FileIO):
        def read(self, size=-1):
            data = super().read(size)
            got.append(len(data))
            return data

    monkeypatch.setattr(predio, "open", lambda path, _mode: Counting(path), raising=False)
    return got


def assert_no_png_read(got: list[int], shards: list[Path]) -> None:
    """The reads ``got`` (count_shard_reads) skipped every prob.png member of ``shards``."""
    pngs = 0
    for shard in shards:
        with tarfile.open(shard) as tar:
            pngs += sum(m.size for m in tar if m.name.endswith(".prob.png"))
    # (the completeness checks read each shard's end-of-archive blocks twice: 2 x 1 KiB)
    tail = 2 * 2 * tarfile.BLOCKSIZE * len(shards)
    assert got and pngs and sum(got) <= sum(s.stat().st_size for s in shards) - pngs + tail


def full_disk_at_commit(monkeypatch: pytest.MonkeyPatch, module: Any) -> None:
    """``module.atomic_open`` (the writer a command imported) fails at its commit, after the
    body, as a full disk does at the last flush: ENOSPC naming no file."""
    real = module.atomic_open

    @contextlib.contextmanager
    def full_at_commit(path: Path, *args: object, **kwargs: object) -> Iterator[IO]:
        with real(path, *args, **kwargs) as f:
            yield f
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(module, "atomic_open", full_at_commit)


# the two ends of stdout for :func:`unbuffered_stdout`, to parametrize ("full" needs /dev/full)
STDOUT_ENDS = [pytest.param("full", marks=pytest.mark.skipif(
    not os.path.exists("/dev/full"), reason="needs /dev/full")), "closed"]


@contextlib.contextmanager
def unbuffered_stdout(where: str) -> Iterator[None]:
    """``sys.stdout`` as ``python -u`` makes it (every print written at once), onto a full disk
    (``where="full"``: /dev/full, every write ENOSPC) or a pipe whose reader has gone
    (``"closed"``: ``| head -0``); the real one put back after."""
    if where == "full":
        fd = os.open("/dev/full", os.O_WRONLY)
    else:
        read, fd = os.pipe()
        os.close(read)
    stream = io.TextIOWrapper(io.FileIO(fd, "w"), write_through=True)
    real, sys.stdout = sys.stdout, stream
    try:
        yield
    finally:
        sys.stdout = real
        with contextlib.suppress(OSError):  # (what is left in it meets the full disk again)
            stream.close()


def check_stdout_failure(where: str, code: int, err: str) -> None:
    """A command's end with :func:`unbuffered_stdout` ``where``: exit 1 (a failure of the run)
    both ways, with the full disk's one line last on stderr, or nothing said for a closed
    stdout (``postproc.cli.end_quietly``)."""
    lines = [line for line in err.splitlines() if line.strip() and "/s]" not in line]
    assert code == 1, (code, lines)
    if where == "full":
        assert lines[-1:] == ["error: [Errno 28] No space left on device"], lines
    else:
        assert not any("error" in line or "Broken pipe" in line for line in lines), lines
