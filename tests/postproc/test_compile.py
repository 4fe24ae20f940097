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
