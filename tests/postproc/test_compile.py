"""numba's cache: a process after the first loads every postproc kernel from it and compiles
nothing (a cold compile is ~20-35 s on a 2-core VM: the first ``polygonize`` of every fresh
checkout; see benchmarks/RESULTS.md, "Cold compile")."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("compile_worker.py")


def _compiled() -> dict[str, list[str]]:
    """What ``compile_worker.py`` compiled, in this checkout's cache (or NUMBA_CACHE_DIR's)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(WORKER)], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=240, check=True)
    return json.loads(out.stdout)


@pytest.mark.slow
def test_a_second_process_loads_every_kernel_from_the_cache() -> None:
    # NOTE: the first run fills the cache if the tests before it have not (a cold one compiles);
    # the second must compile nothing. (A kernel numba cannot cache, or an index it rejects,
    # costs every later process the whole compile again.)
    _compiled()
    assert _compiled() == {}


@pytest.mark.slow
def test_after_precompile_a_users_commands_and_validation_compile_nothing(pred_dir, tmp_path):
    """``make setup`` runs ``postproc.precompile``: afterwards polygonize, score, merge and a
    training validation's F1 load every kernel from the cache. Without it the first of them
    compiled (~15-25 s; the demo's first validation on an H200 took 24 s cold, 3 s warm)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
           "NUMBA_CACHE_DIR": str(tmp_path / "cache")}  # (empty: a fresh install's)
    done = subprocess.run([sys.executable, "-m", "postproc.precompile"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("postproc kernels compiled"), done.stdout
    (tmp_path / "out").mkdir()
    used = subprocess.run([sys.executable, str(WORKER), str(pred_dir[0]), str(pred_dir[1]),
                           str(tmp_path / "out")], env=env, cwd=ROOT, capture_output=True,
                          text=True, timeout=240)
    assert used.returncode == 0, used.stderr[-3000:]
    assert json.loads(used.stdout) == {}
    assert (tmp_path / "out" / "a.json").is_file()  # (the commands ran to their end)
