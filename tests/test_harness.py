"""The suite's own set-up that every test relies on (tests/conftest.py, tests/proc_helpers.py)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from proc_helpers import worker_env

_CHILD = ["-c", "import os; print(repr(os.environ.get('CUDA_VISIBLE_DEVICES')))"]


@pytest.fixture(scope="module")
def module_worker() -> str:
    """What a worker started by a module fixture (before any autouse fixture) sees."""
    return subprocess.run([sys.executable, *_CHILD], env=worker_env(), capture_output=True,
                          text=True, timeout=60, check=True).stdout.strip()


def test_a_cpu_test_and_the_processes_it_starts_see_no_gpu(module_worker: str) -> None:
    # on a CUDA machine too: the CPU tests check gloo, DALI on the CPU and bit-exact resumes
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "" and not torch.cuda.is_available()
    child = subprocess.run([sys.executable, *_CHILD], capture_output=True, text=True,
                           timeout=60, check=True)
    assert child.stdout.strip() == "''" and module_worker == "''"
