"""Helpers for trainer tests: free ports, torchrun in a subprocess with a timeout, weights."""

from __future__ import annotations

import logging
import subprocess
from pathlib import Path

import torch
from proc_helpers import (  # noqa: F401 (re-exported)
    REPO,
    first_failure,
    free_port,
    kill_tree,
    torchrun_cmd,
    worker_env,
    worker_exit_codes,
)


def run(cmd: list[str], timeout: float, env: dict[str, str] | None = None, gpu: bool = False
        ) -> subprocess.CompletedProcess[str]:
    """Run ``cmd`` (with ``env`` added; on the GPU if ``gpu``); on timeout kill its whole process
    tree and fail."""
    proc = subprocess.Popen(cmd, cwd=REPO, env={**worker_env(gpu), **(env or {})},
                            stdout=subprocess.PIPE,
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


def messages(records: list[logging.LogRecord]) -> str:
    """The messages the project's logger got, one a line (from conftest's ``footprints_log``:
    once each, whatever an earlier test in the process did to the logger's propagation)."""
    return "\n".join(r.getMessage() for r in records)


def poison_every_other_gradient(net: torch.nn.Module) -> None:
    """Make the head's gradient NaN on the 1st, 3rd, 5th, ... backward: a finite loss whose
    step the trainer must skip, never two in a row."""
    calls = {"n": 0}

    def poison(grad: torch.Tensor) -> torch.Tensor:
        calls["n"] += 1
        return grad * float("nan") if calls["n"] % 2 else grad

    net.head.weight.register_hook(poison)
