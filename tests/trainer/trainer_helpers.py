"""Helpers for trainer tests: free ports, torchrun in a subprocess with a timeout, weights."""

from __future__ import annotations

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


def run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` in its own process group; on timeout kill the whole group and fail."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=worker_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
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
