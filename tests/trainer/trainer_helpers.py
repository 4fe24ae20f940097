"""Helpers for trainer tests: free ports, torchrun in a subprocess with a timeout, weights."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from pathlib import Path

import torch
from proc_helpers import REPO, free_port, torchrun_cmd, worker_env  # noqa: F401 (re-exported)


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
