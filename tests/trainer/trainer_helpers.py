"""Helpers for trainer tests: free ports, torchrun in a subprocess with a timeout, weights."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return env


def torchrun_cmd(nproc: int, module_args: list[str], max_restarts: int = 0,
                 extra: list[str] | None = None) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes=1",
            f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
            f"--master_port={free_port()}", f"--max-restarts={max_restarts}",
            *(extra or []), *module_args]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun starts its workers in sessions of their own, so
    killing the launcher's process group alone leaves them running)."""
    out = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return out
    for c in map(int, children):
        out += [c, *descendants(c)]
    return out


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid``'s whole tree, workers in other sessions included."""
    for p in [pid, *descendants(pid)]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(p, signal.SIGKILL)


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; on timeout kill its whole process tree and fail."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=worker_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc.pid)
        out, err = proc.communicate()
        raise AssertionError(f"timed out after {timeout}s: {' '.join(cmd)}\n{err[-3000:]}") \
            from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def train_args(data: Path, run_dir: Path, overrides: list[str],
               config: str = "configs/tiny.toml") -> list[str]:
    args = ["-m", "trainer.train", "--config", config, "--data", str(data),
            "--run-dir", str(run_dir)]
    for o in overrides:
        args += ["--set", o]
    return args


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    from trainer.checkpoint import list_checkpoints, load

    return load(list_checkpoints(run_dir)[-1])["model"]
