"""The suite's own set-up that every test relies on (tests/conftest.py, tests/proc_helpers.py)."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from proc_helpers import _port_slice, worker_env

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


_TEMP_CHILD = ["-c", "import tempfile; print(tempfile.gettempdir())"]


@pytest.fixture(scope="module")
def module_worker_tempdir() -> str:
    """Where a worker started by a module fixture makes its temporary files."""
    return subprocess.run([sys.executable, *_TEMP_CHILD], env=worker_env(), capture_output=True,
                          text=True, timeout=60, check=True).stdout.strip()


def test_temporary_files_land_under_pytests_basetemp(
        module_worker_tempdir: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    """(torchrun's torchelastic_* directories, multiprocessing's pymp-* and DALI's autograph
    files were left in /tmp, ~100 a run)"""
    base = tmp_path_factory.getbasetemp().resolve()
    child = subprocess.run([sys.executable, *_TEMP_CHILD], capture_output=True, text=True,
                           timeout=60, check=True).stdout.strip()
    for where in (tempfile.gettempdir(), child, module_worker_tempdir):
        assert Path(where).resolve().is_relative_to(base), (where, base)
    with tempfile.TemporaryDirectory() as d:
        assert Path(d).resolve().is_relative_to(base)


# (PYTEST_XDIST_WORKER, PYTEST_XDIST_WORKER_COUNT, its slice of 2; None: either, by name)
WORKERS = [("gw0", "2", 0), ("gw1", "2", 1), ("gw3", "2", 1), ("master", "2", None),
           ("sub", "", None)]


@pytest.mark.parametrize("worker, count, slot", WORKERS, ids=[w for w, _, _ in WORKERS])
def test_free_port_draws_from_its_xdist_workers_slice(worker: str, count: str,
                                                      slot: int | None,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """``gw<N>`` draws from slice N (a replaced worker, gw2 and on, modulo the count); a worker
    named otherwise (``--tx popen//id=NAME``) gets a slice too (int() of its name failed every
    test that started a process). Below an ephemeral range from 32768, as on Linux."""
    monkeypatch.setenv("PYTEST_XDIST_WORKER", worker)
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", count)
    start, step = _port_slice(32768)
    half = (32768 - 10000) // 2
    if not count:  # (one worker: the whole range)
        assert (start, step) == (10000, 32768 - 10000)
    else:
        assert step == half and start in (10000, 10000 + half)
    if slot is not None:
        assert start == 10000 + slot * half
