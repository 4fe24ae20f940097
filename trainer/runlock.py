"""One trainer at a time in a run directory: rank 0 holds a POSIX lock on ``RUN/.lock``, which
names it ("pid N on HOST"). A light module: ``trainer.train --check`` asks before torchrun."""

from __future__ import annotations

import fcntl
from pathlib import Path
from typing import IO

LOCK = ".lock"  # held by the trainer using the run directory


def in_use(run_dir: Path, owner: str) -> str:
    """The refusal of a run directory that ``owner`` (the lock file's text) is training in."""
    return (f"{run_dir}: another trainer is using this run directory "
            f"({owner or 'another process'}); wait for it or stop it first")


def try_lock(f: IO[str]) -> str | None:
    """Lock the open lock file ``f`` (exclusive, not waiting): None when this process now holds
    it, else the holder's text. OSError (a file system without locks) goes to the caller.

    NOTE: a POSIX lock (lockf), not flock: it belongs to this process, so the DataLoader
    workers forked while training do not hold it after train() returns."""
    try:
        fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except (BlockingIOError, PermissionError):
        f.seek(0)
        return f.read().strip()
    return None


def check_free(run_dir: Path) -> None:
    """ValueError (:func:`in_use`) if a trainer holds ``run_dir``'s lock now; makes nothing.

    NOTE: for ``trainer.train --check`` (the launch scripts, before torchrun): from rank 0 the
    refusal made every rank exit 2, and torchrun restarted the group on it MAX_RESTARTS times.
    The lock is taken and let go at once (closing the file releases this process's locks)."""
    try:
        f = open(run_dir / LOCK, "r+", encoding="utf-8")  # noqa: SIM115 (closed below)
    except OSError:  # none (a new run), or unreadable: the trainer's own open says so
        return
    with f:
        try:
            owner = try_lock(f)
        except OSError:  # no locks on this file system: the trainer warns and goes on
            return
    if owner is not None:
        raise ValueError(in_use(run_dir, owner))
