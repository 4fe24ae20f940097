"""Helpers shared by the multi-process tests (trainer, ops): free loopback ports, the
environment of a worker process, torchrun command lines, and killing a process tree."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
from pathlib import Path

from benchmarks.load import tree_pids

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict[str, str]:
    """One thread per process (2 cores here) and the repository importable."""
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def torchrun_cmd(nproc: int, module_args: list[str], max_restarts: int = 0,
                 extra: list[str] | None = None) -> list[str]:
    """A one-node torchrun on a free loopback port."""
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
            f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", f"--max-restarts={max_restarts}",
            *(extra or []), *module_args]


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``'s whole tree: torchrun starts its workers in sessions of their own, so
    killing the launcher's process group alone leaves them running."""
    for p in tree_pids(pid):  # NOTE: found before any is killed: orphans lose their parent
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)
