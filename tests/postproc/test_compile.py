"""The kernels' cold compile: each compiled once, nothing needless (numba's compile time is
the first ``polygonize`` of every fresh checkout), and a second process loads them all from
numba's cache. One cold and one warm run of ``compile_worker.py`` in a fresh cache directory."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
WORKER = Path(__file__).with_name("compile_worker.py")

pytestmark = pytest.mark.slow


def _compiled(cache: Path) -> dict[str, list[str]]:
    env = {**os.environ, "NUMBA_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, str(WORKER)], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=240, check=True)
    return json.loads(out.stdout)


@pytest.fixture(scope="module")
def cold_then_warm(tmp_path_factory: pytest.TempPathFactory
                   ) -> tuple[dict[str, list[str]], dict[str, list[str]]]:
    cache = tmp_path_factory.mktemp("numba-cache")
    return _compiled(cache), _compiled(cache)


def test_no_slice_assignment_error_message_is_compiled(cold_then_warm: tuple) -> None:
    # NOTE: ``a[:n] = b[:n]`` compiles numba's shape-mismatch message (str joins and reprs):
    # ~5 s of the ~40 s cold compile, for an error that cannot happen in these kernels
    cold, _ = cold_then_warm
    assert not [name for name in cold if "raise_with_shape_context" in name]


def test_the_second_process_loads_every_kernel_from_the_cache(cold_then_warm: tuple) -> None:
    cold, warm = cold_then_warm
    assert {"postproc.tilekernel.polygonize_tile",
            "postproc.iou.pair_intersection_areas"} <= set(cold)
    assert warm == {}


# NOTE: specialisations on purpose: the clip's axis and side are literals (constant branches)
SPECIALISED = {"postproc.iou._clip_half": 4, "postproc.iou._sort_unique": 2}


def test_each_kernel_is_compiled_once(cold_then_warm: tuple) -> None:
    # NOTE: numba compiles a callee for each distinct argument types, and a literal int (a
    # ``0`` argument, or a variable set to 0 while its type is being inferred) is a type of its
    # own: _trace_ring was compiled 5 times, join_runs 3, for one warmup()
    cold, _ = cold_then_warm
    counts = {name: len(sigs) for name, sigs in cold.items() if name.startswith("postproc.")}
    assert counts, "compile_worker.py compiled nothing"
    assert {name: k for name, k in counts.items() if k != SPECIALISED.get(name, 1)} == {}
