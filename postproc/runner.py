"""Polygonize a directory of prediction shards on all cores, and across machines under torchrun.

Parallelism: ranks take the sorted shards round-robin (rank r gets shards r, r+W, r+2W, ...);
inside a rank, a pool of worker processes takes chunks of tiles (PNG decoding included) from a
stream that runs across shard boundaries, at most ``2 * workers`` chunks in flight, so memory
stays flat however many shards there are. The CSV is
written by rank 0 only, in rounds: in round i every rank hands over the rows of its i-th shard
(``gather_objects``), which puts them in global shard order. Errors travel in the same rounds, so
a bad shard on one rank stops every rank with the same one-line reason instead of a hang.

GeoJSON (``--geojson DIR``): every rank writes its tiles into ``DIR/.partial``; rank 0 moves them
into ``DIR`` only after the CSV is committed, and removes the tiles of an earlier run that this
one did not write (``predio.publish_dir``; only tiles listed in ``DIR/.polygonize-tiles`` by that
run: other ``*.geojson`` in DIR are the user's and stay), so ``DIR`` never holds a failed run's
half or a smaller run's stale tiles beside the CSV. ``DIR/.publishing`` marks a move that was cut
short. Rank 0's commit and publish are agreed (``trainer.dist.on_main``), as its writes are: its
failure there (EIO, a full disk) stops every rank with that reason and exit code 1. Every rank
writes into ``DIR/.partial``, so under torchrun on several nodes DIR (like PRED) must be on a
file system that all nodes share.
"""

from __future__ import annotations

import concurrent.futures as cf
import contextlib
import math
import multiprocessing as mp
import os
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dataio.atomic import (
    WriteError,
    atomic_open,
    check_not_a_directory,
    fresh_staging_dir,
    fsync_dir,
    staging_dir,
    writing,
)
from postproc.csvio import proposal_rows, write_rows
from postproc.geojson import GEOJSON_SUFFIX, write_tile_geojson
from postproc.polygonize import PolygonizeConfig, polygonize_probs, warmup
from postproc.pools import close_pool, ignore_sigint, starting_workers
from postproc.predio import (
    PUBLISHING,
    PredError,
    begin_publish,
    decode_sample,
    iter_raw_samples,
    publish_dir,
)

# the tiles the last run published into --geojson DIR: only those may be removed as stale
GEOJSON_LEDGER = ".polygonize-tiles"
CHUNK_TILES = 4  # tiles per task: small enough to balance, large enough to amortise IPC


@dataclass
class ShardResult:
    """What one shard yields; ``error`` is set instead of raising, to travel between ranks."""

    shard: str
    rows: list[list[str]] = field(default_factory=list)
    tiles: int = 0
    polygons: int = 0
    error: str | None = None
    write_failed: bool = False  # ``error`` is a GeoJSON write's (a full disk): exit 1, not 2


def default_workers(local_world_size: int = 1) -> int:
    """The cores this process may use, shared among the ranks on this machine."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, local_world_size))


def _tiles_to_rows(chunk: list[tuple[str, bytes, dict]], shard: str, cfg: PolygonizeConfig,
                   geojson_dir: Path | None) -> tuple[list[list[str]], int]:
    """Decode, polygonize and (optionally) write GeoJSON for a chunk of tiles."""
    rows: list[list[str]] = []
    n = 0
    for key, png, meta in chunk:
        if geojson_dir is not None:
            # (the stage is DIR/.partial, atomic.staging_dir; the tile's name in DIR is the
            # user's to free: refused, exit 2, before the CSV commits)
            published = geojson_dir.parent
            check_not_a_directory(published / f"{key}{GEOJSON_SUFFIX}",
                                  f"--geojson {published}", f"tile {key}'s GeoJSON")
        prob = decode_sample(key, png, meta, shard)
        try:
            found = polygonize_probs(prob, cfg)
        except ValueError as e:  # a tile the kernels cannot take (its size)
            raise PredError(f"{shard}: {key}: {e}") from None
        polys = [g for g, _ in found]
        confs = [c for _, c in found]
        rows.extend(proposal_rows(key, polys, confs))
        n += len(polys)
        if geojson_dir is not None:
            try:
                with writing():
                    write_tile_geojson(geojson_dir, key, polys, confs, meta)
            except (PredError, WriteError) as e:
                raise type(e)(f"{shard}: {key}: {e}") from None
    return rows, n


def _worker_init() -> None:
    ignore_sigint()  # Ctrl-C is the parent's: it stops the pool (postproc.pools)
    # NOTE: one thread per worker process; the pool is the parallelism (numba, BLAS, OpenMP).
    os.environ["OMP_NUM_THREADS"] = "1"
    try:
        import numba

        numba.set_num_threads(1)
    except (ImportError, ValueError):
        pass


def _chunks(shard: Path) -> Iterator[list[tuple[str, bytes, dict]]]:
    chunk: list[tuple[str, bytes, dict]] = []
    for sample in iter_raw_samples(shard):
        chunk.append(sample)
        if len(chunk) == CHUNK_TILES:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _work_items(shards: list[Path]) -> Iterator[tuple[int, list | None, str | None]]:
    """(shard index, chunk, None) per chunk, then (index, None, error or None) ends a shard."""
    for i, shard in enumerate(shards):
        try:
            for chunk in _chunks(shard):
                yield i, chunk, None
        except (PredError, ValueError) as e:
            yield i, None, str(e)
            continue
        yield i, None, None


def _run_now(chunk: list, shard: str, cfg: PolygonizeConfig, geojson_dir: Path | None
             ) -> cf.Future:
    fut: cf.Future = cf.Future()
    try:
        fut.set_result(_tiles_to_rows(chunk, shard, cfg, geojson_dir))
    except (PredError, ValueError, WriteError) as e:
        fut.set_exception(e)
    return fut


def shard_results(shards: list[Path], cfg: PolygonizeConfig, geojson_dir: Path | None,
                  pool: cf.Executor | None, workers: int) -> Iterator[ShardResult]:
    """One :class:`ShardResult` per shard, in order, with chunks of the next shards already in
    the pool while a shard finishes (at most ``2 * workers`` chunks in flight: flat memory)."""
    partial: dict[int, ShardResult] = {}
    pending: deque[tuple[int, cf.Future | None, str | None, int]] = deque()

    def settle() -> ShardResult | None:
        i, fut, err, tiles = pending.popleft()
        res = partial.setdefault(i, ShardResult(shard=str(shards[i])))
        if fut is not None:  # a chunk
            res.tiles += tiles
            try:
                rows, n = fut.result()
                res.rows.extend(rows)
                res.polygons += n
            except (PredError, ValueError, WriteError) as e:
                if not res.error:
                    res.error, res.write_failed = str(e), isinstance(e, WriteError)
            return None
        res.error = res.error or err  # the end of shard i
        if res.error:
            res.rows = []
        return partial.pop(i)

    for i, chunk, err in _work_items(shards):
        if chunk is None:
            pending.append((i, None, err, 0))
        elif pool is None:
            pending.append((i, _run_now(chunk, str(shards[i]), cfg, geojson_dir), None,
                            len(chunk)))
        else:
            fut = pool.submit(_tiles_to_rows, chunk, str(shards[i]), cfg, geojson_dir)
            pending.append((i, fut, None, len(chunk)))
        while len(pending) > (2 * workers if pool is not None else 0):
            done = settle()
            if done is not None:
                yield done
    while pending:
        done = settle()
        if done is not None:
            yield done


def make_pool(workers: int) -> cf.Executor | None:
    warmup()  # compile once here; forked workers inherit the machine code
    if workers <= 1:
        return None
    # NOTE: fork shares the parent's compiled numba kernels; nothing here holds a GDAL handle.
    ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=_worker_init)
    # NOTE: a fork pool forks all its workers at the first submit: do it now, while this is the
    # only thread, not later beside gloo's (callers make the pool before dist.init for this).
    # A Ctrl-C meanwhile: held until they are started (postproc.pools), then the pool is closed
    # here, as the caller never got it (its workers waited for work, and the exit joined them).
    try:
        with starting_workers():
            first = pool.submit(int)
        first.result()
    except BaseException:
        close_pool(pool)
        raise
    return pool


@dataclass
class RunSummary:
    shards: int = 0
    tiles: int = 0
    polygons: int = 0


def run(shards: list[Path], out_csv: Path, cfg: PolygonizeConfig, geojson_dir: Path | None,
        workers: int, env: Any, pool: cf.Executor | None = None) -> RunSummary:
    """Polygonize ``shards`` (all ranks pass the same sorted list) into ``out_csv``.

    ``env`` is a ``trainer.dist.DistEnv``; with more than one rank the process group must be up.
    ``pool`` (from :func:`make_pool`, made before the process group so that no gloo thread is
    forked) is used and left open; without one, ``run`` makes and closes its own.
    Raises ``PredError`` (on every rank) if any shard is bad, a ``WriteError`` if an output
    could not be written (a full disk: exit code 1, where bad input is 2); ``out_csv`` and
    ``geojson_dir`` are then left as they were.
    """
    from trainer.dist import gather_objects, on_main

    mine = shards[env.rank::env.world_size]
    rounds = math.ceil(len(shards) / env.world_size)
    staging = None if geojson_dir is None else _stage_geojson(geojson_dir, env)
    own_pool = pool is None
    if own_pool:
        pool = make_pool(workers)
    summary = RunSummary(shards=len(shards))
    bar = tqdm(total=len(shards), unit="shard", disable=not env.is_main, desc="polygonize")
    seen: set[str] = set()
    stream = shard_results(mine, cfg, staging, pool, workers)
    try:
        # (each output step below is inside writing() itself: on rank 0, within on_main, so that
        # the error relayed to the other ranks is a WriteError too; the shards are read outside)
        with contextlib.ExitStack() as stack:
            def create() -> Any:
                with writing():
                    f = stack.enter_context(atomic_open(out_csv, "w", encoding="utf-8",
                                                        newline=""))
                    write_rows(f, [], header=True)
                return f

            def write(rows: list[list[str]]) -> None:
                with writing():
                    write_rows(f, rows)

            # rank 0 creates it; a failure there stops every rank with its reason
            f = on_main(env, f"creating {out_csv}", create)
            for _ in range(rounds):  # every rank takes part in every round, done or not
                mine_i = next(stream, None)
                parts = gather_objects(mine_i) if env.distributed else [mine_i]
                failed = [p for p in parts if p is not None and p.error]
                if failed:  # (the same error, of the same class, on every rank)
                    raise (WriteError if failed[0].write_failed else PredError)(failed[0].error)
                rows: list[list[str]] = []
                for p in parts:
                    if p is None:
                        continue
                    summary.tiles += p.tiles
                    summary.polygons += p.polygons
                    # NOTE: on every rank (each has every part): a stop decided on rank 0 alone
                    # left the others to die on a reset connection with a gloo traceback
                    _check_unique(p, seen)
                    rows += p.rows
                    bar.update(1)
                # rank 0 writes; a failure there (a full disk) stops every rank with its reason
                on_main(env, f"writing {out_csv}", lambda rows=rows: write(rows))
                bar.set_postfix(tiles=summary.tiles, polygons=summary.polygons)

            def commit() -> None:
                with writing():
                    if staging is None:
                        stack.close()  # (atomic_open's exit: the CSV's fsync and rename)
                    else:
                        _commit_marked(stack, out_csv, geojson_dir)

            # NOTE: agreed, as each write before it: rank 0's commit failing (EIO, a full disk)
            # exited 1 there and 0 on the other ranks, a run that looked half done
            on_main(env, f"committing {out_csv}", commit)
        if staging is not None:
            # every rank's GeoJSON is written: its shards came through the last round
            def publish() -> None:
                with writing():
                    publish_dir(staging, geojson_dir, "*.geojson", ledger=GEOJSON_LEDGER)

            on_main(env, f"publishing into {geojson_dir}", publish)  # (agreed: as the commit)
    finally:
        bar.close()
        stream.close()
        if own_pool:
            close_pool(pool)
    return summary


def _commit_marked(csv: contextlib.ExitStack, out_csv: Path, geojson_dir: Path) -> None:
    """Commit the CSV (close ``csv``, atomic_open's exit) with ``geojson_dir`` marked as being
    published (``predio.begin_publish``) from before it.

    NOTE: marked before the CSV commits: a kill between the two commits leaves the mark, not a
    GeoJSON directory that silently disagrees with the CSV. But a commit that fails (EIO or a
    full disk at the CSV's fsync, a Ctrl-C) leaves the old CSV, which DIR still matches: the
    mark, "a publish into DIR was cut short", claimed one that never began, and DIR was left
    changed. It goes again, unless an earlier run's mark was there (DIR may mix two runs) or
    the CSV was replaced after all (its rename done, the directory's sync failed). The mark's
    own write too: it may fail (EIO at DIR's sync, a Ctrl-C) after its rename."""
    marker = geojson_dir / PUBLISHING
    marked_before = marker.exists()
    csv_before = _file_identity(out_csv)
    try:
        begin_publish(geojson_dir)
        csv.close()
    except BaseException:
        if not marked_before and _file_identity(out_csv) == csv_before:
            with contextlib.suppress(OSError):  # (left, the mark says too much, not too little)
                marker.unlink()
                fsync_dir(geojson_dir)
        raise


def _file_identity(path: Path) -> tuple[int, int] | None:
    """``path``'s device and inode (a rename onto it changes them), or None if there is none.

    NOTE: lstat: the rename replaces the name itself, a link too; os.stat followed an --out
    link to its target, and one it could not follow (its target under a file: ENOTDIR) failed
    the run after the work, where the CSV replaces such a link without --geojson."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino


def check_geojson_marks(geojson_dir: Path) -> None:
    """Refuse a directory at the names polygonize writes in ``geojson_dir`` besides its tiles:
    the publish mark and the tile list (ValueError naming it: bad input, exit 2).

    NOTE: found only after the work, at the CSV's commit (the mark is written before it) or in
    the publish (the list), "Is a directory": exit 1, "the disk's, rerun", for a directory the
    user must move."""
    flag = f"--geojson {geojson_dir}"
    check_not_a_directory(geojson_dir / PUBLISHING, flag, "polygonize's publish mark")
    check_not_a_directory(geojson_dir / GEOJSON_LEDGER, flag,
                          "polygonize's list of published tiles")


def _stage_geojson(geojson_dir: Path, env: Any) -> Path:
    """Rank 0 empties ``geojson_dir/.partial`` (a killed run's); the ranks write into it only
    after that."""
    from trainer.dist import on_main

    def prepare() -> None:
        with writing():
            fresh_staging_dir(geojson_dir)

    on_main(env, f"preparing {staging_dir(geojson_dir)}", prepare)
    return staging_dir(geojson_dir)


def _check_unique(res: ShardResult, seen: set[str]) -> None:
    ids = {row[0] for row in res.rows}
    dup = ids & seen
    if dup:
        raise PredError(f"{res.shard}: ImageId {sorted(dup)[0]!r} also appears in an earlier "
                        "shard")
    seen |= ids

