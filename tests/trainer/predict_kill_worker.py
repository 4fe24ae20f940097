"""Run by test_predict: ``predict_kill_worker.py PREDICT-ARGS...``: the real ``trainer.predict``
command (its imports, loader, stage and top level), stopped at a known point for a SIGKILL: its
first shard written whole, its second's temporary tar holding the first tiles (on disk), not all.
It then says ``blocked rank R pid P`` on stdout and sleeps until the test kills it: no Python
clean-up runs (no ``except``, no ``finally``, no ``atexit``), as for an OOM kill or a lost node.

Under torchrun, ``BLOCK_RANKS`` (comma-separated; default every rank) names the ranks that block;
the others predict their whole share and say ``waiting rank R pid P`` when they reach the
collective after it, where they wait for the blocked ones. A group that ``torchrun
--max-restarts`` restarts runs to the end: only the first attempt blocks.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

from postproc import predio
from trainer import dist, predict

BLOCK_SECONDS = 600  # (the test kills it long before; it never wakes up in a passing run)
_real_write, _real_open, _real_gather = predio.write_pred_shard, predio.atomic_open, \
    dist.gather_objects
_opened: list[IO[bytes]] = []  # the file each shard write has open: its temporary tar
_RANK = os.environ.get("RANK", "0")
# (a group that torchrun --max-restarts restarts runs on: its attempts after the first block not)
_BLOCKS = (_RANK in os.environ.get("BLOCK_RANKS", _RANK).split(",")
           and os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0")


def _say(what: str) -> None:
    # (unbuffered, one write: the test waits for it; under torchrun the ranks share the pipe)
    os.write(sys.stdout.fileno(), f"{what} rank {_RANK} pid {os.getpid()}\n".encode())


@contextlib.contextmanager
def _open(path: Path, *args: Any, **kwargs: Any) -> Iterator[IO[bytes]]:
    with _real_open(path, *args, **kwargs) as f:
        _opened.append(f)
        yield f


def _block_part_way(samples: list[Any]) -> Iterator[Any]:
    """``samples``, until the temporary tar holds some of them on disk and one is still to come:
    then a marker on stdout and a sleep."""
    for i, sample in enumerate(samples):
        if i:
            tmp = _opened[-1]
            # NOTE: the tar writer buffers a record (10 KiB) before it writes to the file: the
            # first tiles may still be in memory, so the block waits for bytes on disk
            tmp.flush()
            if os.fstat(tmp.fileno()).st_size:
                _say("blocked")
                time.sleep(BLOCK_SECONDS)
                raise SystemExit("predict_kill_worker: not killed while blocked")
        yield sample
    raise SystemExit("predict_kill_worker: the second shard's tar was not on disk before its "
                     "last tile: give the test a larger --shard-size")


def _write(path: Path, samples: list[Any], **kwargs: Any) -> int:
    if _opened and _BLOCKS:  # (a shard was written whole: this is the second)
        return _real_write(path, _block_part_way(samples), **kwargs)
    return _real_write(path, samples, **kwargs)


def _gather(obj: Any) -> list[Any]:
    if _opened:  # (the first collective after this rank's shards: its share is done)
        _say("waiting")
    return _real_gather(obj)


# NOTE: trainer.predict imports write_pred_shard from postproc.predio inside its run (so it is
# the module's attribute then), and write_pred_shard looks atomic_open up in its own module;
# trainer.dist's collectives look gather_objects up in their module too
predio.write_pred_shard = _write
predio.atomic_open = _open  # type: ignore[assignment]
dist.gather_objects = _gather

if __name__ == "__main__":
    sys.exit(predict.main())
