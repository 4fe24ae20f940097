"""The suite's own set-up that every test relies on (tests/conftest.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import torch


def test_a_cpu_test_and_the_processes_it_starts_see_no_gpu() -> None:
    # on a CUDA machine too: the CPU tests check gloo, DALI on the CPU and bit-exact resumes
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()
    child = subprocess.run([sys.executable, "-c", "import os; print(repr(os.environ.get("
                            "'CUDA_VISIBLE_DEVICES')))"], capture_output=True, text=True,
                           timeout=60, check=True)
    assert child.stdout.strip() == "''"
