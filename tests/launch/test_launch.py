"""The launch scripts: usage on bad calls, and make gpu-check refusing without CUDA."""

from __future__ import annotations

import subprocess

import pytest
import torch

from launch.gpu_check import main as gpu_check


@pytest.mark.parametrize("script", ["launch/single_node.sh", "launch/multi_node.sh"])
def test_scripts_print_their_usage_without_arguments(script: str) -> None:
    res = subprocess.run(["bash", script], capture_output=True, text=True, timeout=30)
    assert res.returncode == 2
    assert "CONFIG DATA RUN" in res.stdout


def test_multi_node_needs_a_rendezvous_host() -> None:
    env = {"PATH": "/usr/bin:/bin"}
    res = subprocess.run(["bash", "launch/multi_node.sh", "c", "d", "r"], capture_output=True,
                         text=True, timeout=30, env=env)
    assert res.returncode != 0 and "MASTER_ADDR" in res.stderr


def test_slurm_batch_file_is_valid_bash() -> None:
    assert subprocess.run(["bash", "-n", "launch/slurm.sbatch"], timeout=30).returncode == 0


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA answer")
def test_gpu_check_says_so_without_cuda(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gpu_check(["--out", str(tmp_path / "g")]) == 1
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()
